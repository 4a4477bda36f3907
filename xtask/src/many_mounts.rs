//! `cargo xtask many-mounts`: many users on one machine (issue 14). N pershomefs homes are
//! mounted at once, each as the login hook mounts one (a root daemon with the hook's `-o`
//! words from `session::hook::home_mount_options`: `uid=`, `gid=`, `allow_other`,
//! `private_home`, `commit=`, `status=`, `fsname=`), each over its own backing directory on
//! one fresh ext4 loop filesystem, each for a different unprivileged uid. One worker process
//! per home (this xtask binary again, `many-mounts-worker`, started with that uid and gid and
//! no supplementary groups) makes a small tree and then runs a light desktop-like mix for the
//! given time: stat, readdir, reads, a 4 KiB write + fsync into a file kept open (as a
//! database does), editor saves (temp file, fsync, rename over), temp files, mkdir/rmdir,
//! xattrs, lookups of missing names, and a look into the next user's home (which must be
//! refused). At the end every home is unmounted (each daemon must exit with status 0: its last
//! commit landed), checked with the product's `pershome fsck` and the FAT audit, mounted
//! again and compared with what its worker wrote, and unmounted.
//!
//! It reports the daemons' memory (sampled every second) and CPU time, the machine's load,
//! and per home the p50/p99 latency of a stat and of a 4 KiB write + fsync. The figures are
//! reported, never judged: the machines are shared. Any error fails the run with a message
//! naming the home, the operation and the error: an operation that fails or reads back wrong
//! bytes, a daemon that dies, a worker that hangs, an unmount, fsck or comparison that fails.
//!
//! This module owns the load, the worker protocol and the report. It never leaves a mount, a
//! daemon, a worker or a loop device behind, even on failure or Ctrl-C: workers are killed
//! (by pid, and by `PR_SET_PDEATHSIG` if this process dies) before the guards unmount.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use pershome::testing::Rng;

use crate::guards::{LoopDev, Mount, TempDir};
use crate::target::{pershome_binary, pershomefs_binary};
use crate::util;

/// What the command line asks for.
pub struct Options {
    /// How many homes (users) at once.
    pub mounts: u32,
    /// Seconds of load, after every worker has made its tree.
    pub seconds: u64,
    /// Mean pause between two rounds of a worker (each round: a stat and one other operation).
    pub interval_ms: u64,
    /// The first user's uid; user i gets `first_uid + i` (gid the same).
    pub first_uid: u32,
    /// Seed of the workers' choices (each home derives its own from it).
    pub seed: u64,
    /// Self-test of the harness: SIGKILL this home's daemon halfway through (the run must
    /// then fail and say so).
    pub kill_daemon: Option<u32>,
}

/// The arguments of one worker (`cargo xtask many-mounts-worker`, started by `run`).
pub struct WorkerArgs {
    pub home: PathBuf,
    pub seed: u64,
    pub seconds: u64,
    pub interval_ms: u64,
    /// Another user's home, which this user must not be able to list.
    pub neighbour: Option<PathBuf>,
}

/// The small tree of every home: `tree/dN/fNN.txt`, files of 0–4 KiB.
const TREE_DIRS: usize = 5;
const TREE_FILES: usize = 20;
/// Documents saved the way editors save (`work/docN.txt`).
const DOCS: usize = 4;
/// Files kept open and written 4 KiB at a time with an fsync after each (`work/logN.bin`).
const LOGS: usize = 2;
const LOG_LEN: usize = 64 * 1024;
const BLOCK: usize = 4096;
const XATTR: &str = "user.pershome-bench";

/// How long a worker may take to make its tree, and how much longer than `seconds` it may
/// take to finish its load before the run calls it hung. Hang detection, not a timing
/// threshold: a healthy worker on a loaded machine finishes far inside these.
const SETUP_LIMIT: Duration = Duration::from_secs(300);
const FINISH_SLACK: Duration = Duration::from_secs(300);
/// After the first error, how long to wait for other homes' workers to report their own
/// (so a killed daemon is reported both as a death and as the operation that failed).
const ERROR_GRACE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------
// The orchestrator (root).

/// One home: its user, backing, mount and where its daemon leaves its exit status.
struct Home {
    index: u32,
    uid: u32,
    backing: PathBuf,
    mountpoint: PathBuf,
    status_file: PathBuf,
    mount: Option<Mount>,
}

impl Home {
    fn name(&self) -> String {
        format!("u{:02}", self.index)
    }

    /// How errors name this home.
    fn label(&self) -> String {
        format!(
            "home {} (uid {}, {})",
            self.name(),
            self.uid,
            self.mountpoint.display()
        )
    }

    /// Mount pershomefs as the login hook does: root daemon, the hook's options.
    fn mount(&mut self, pershomefs: &Path) -> Result<()> {
        let _ = std::fs::remove_file(&self.status_file);
        let options = pershome::session::hook::home_mount_options(
            self.uid,
            self.uid,
            pershome::sysconfig::SystemConfig::default()
                .commit_interval
                .0,
            &self.status_file,
            &format!("many-mounts-{}", self.name()),
        );
        let mut command = Command::new(pershomefs);
        command
            .env_clear()
            .arg(&self.backing)
            .arg(&self.mountpoint)
            .arg("-o")
            .arg(options.join(","))
            .stdin(Stdio::null());
        let mount = Mount::start("pershomefs", command, &self.mountpoint)
            .with_context(|| format!("mounting {}", self.label()))?;
        let fstype = crate::guards::mounted_type(&self.mountpoint)?;
        if fstype.as_deref() != Some("fuse.pershomefs") {
            bail!(
                "{}: mounted as {fstype:?}, expected fuse.pershomefs",
                self.label()
            );
        }
        if mount.daemons().is_empty() {
            bail!("{}: mounted, but no pershomefs daemon found", self.label());
        }
        self.mount = Some(mount);
        Ok(())
    }

    /// Unmount, wait for the daemon, and demand its exit status 0 (its last commit landed).
    fn unmount(&mut self) -> Result<()> {
        if let Some(mount) = self.mount.take() {
            mount
                .unmount()
                .with_context(|| format!("unmounting {}", self.label()))?;
        }
        let status = std::fs::read_to_string(&self.status_file).with_context(|| {
            format!(
                "{}: reading the daemon's exit status {}",
                self.label(),
                self.status_file.display()
            )
        })?;
        if status.trim() != "0" {
            bail!(
                "{}: the daemon exited with status {} (0 = unmounted with its last commit on the backing)",
                self.label(),
                status.trim()
            );
        }
        Ok(())
    }

    fn daemon_pids(&self) -> Vec<i32> {
        self.mount
            .as_ref()
            .map(|m| m.daemons().iter().map(|d| d.pid).collect())
            .unwrap_or_default()
    }

    fn daemon_alive(&self) -> bool {
        self.mount
            .as_ref()
            .is_some_and(|m| m.daemons().iter().any(|d| d.alive()))
    }
}

/// The fresh ext4 every backing lives on. Field order is drop order: the mount goes before
/// the loop device it lives on.
struct Disk {
    root: PathBuf,
    mount: Option<Mount>,
    _loop: LoopDev,
}

impl Disk {
    fn create(scratch: &TempDir, size_mib: u64) -> Result<Disk> {
        let root = scratch.path().join("e");
        std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        let image = scratch.path().join("ext4.img");
        let file = File::create(&image).with_context(|| format!("creating {}", image.display()))?;
        file.set_len(size_mib << 20)
            .with_context(|| format!("sizing {} to {size_mib} MiB", image.display()))?;
        drop(file);
        // As the bench: inode tables and journal initialised now, not by lazyinit during
        // the load.
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&image)
            .stdout(Stdio::null());
        util::run_checked(mkfs, "mkfs.ext4")?;
        let loop_dev = LoopDev::attach_with(&image, true)?;
        let mut mount = Command::new("mount");
        mount.args(["-t", "ext4"]).arg(loop_dev.device()).arg(&root);
        let mount = Mount::start_kernel("ext4", mount, &root)?;
        Ok(Disk {
            root,
            mount: Some(mount),
            _loop: loop_dev,
        })
    }

    /// Unmount, reporting failures (drop only warns); the loop device is detached on drop.
    fn release(mut self) -> Result<()> {
        if let Some(mount) = self.mount.take() {
            mount.unmount()?;
        }
        Ok(())
    }
}

/// A running worker. Dropping it kills it (by pid: it is our child) and reaps it.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<JoinHandle<Vec<String>>>,
    stderr: Option<JoinHandle<String>>,
    exit: Option<ExitStatus>,
    killed: bool,
}

impl Worker {
    fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
            self.killed = true;
        }
    }

    /// What the worker wrote on stderr (its error), once it has exited.
    fn stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start the worker of `home` as its user.
fn spawn_worker(
    exe: &Path,
    home: &Home,
    neighbour: Option<&Path>,
    options: &Options,
    ready: mpsc::Sender<u32>,
) -> Result<Worker> {
    let mut command = Command::new(exe);
    command
        .env_clear()
        .current_dir("/")
        .arg("many-mounts-worker")
        .arg("--home")
        .arg(&home.mountpoint)
        .arg("--seed")
        .arg(home_seed(options.seed, home.index).to_string())
        .arg("--seconds")
        .arg(options.seconds.to_string())
        .arg("--interval-ms")
        .arg(options.interval_ms.to_string());
    if let Some(n) = neighbour {
        command.arg("--neighbour").arg(n);
    }
    // std drops the supplementary groups (setgroups(0)) before setgid/setuid when root sets
    // a uid, so the worker has exactly the user's credentials.
    command
        .uid(home.uid)
        .gid(home.uid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe. It runs after the uid change (which would clear
    // it), so a worker dies with this process even if we are killed outright.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting the worker of {}", home.label()))?;
    let stdin = child.stdin.take();
    let out = child.stdout.take().context("worker stdout")?;
    let err = child.stderr.take().context("worker stderr")?;
    let index = home.index;
    let stdout = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line == "ready" {
                let _ = ready.send(index);
            } else {
                lines.push(line);
            }
        }
        lines
    });
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(err).read_to_string(&mut text);
        text
    });
    Ok(Worker {
        child,
        stdin,
        stdout: Some(stdout),
        stderr: Some(stderr),
        exit: None,
        killed: false,
    })
}

/// Each home's own seed (never 0: xorshift would stay at 0).
fn home_seed(seed: u64, index: u32) -> u64 {
    let mut x = seed ^ (u64::from(index) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    x | 1
}

/// The resident set of a process in KiB (0 when it is gone).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the first, utime the
    // 12th and stime the 13th (fields 14 and 15 of proc(5)).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The machine's busy and total CPU time so far (/proc/stat, all CPUs), in clock ticks.
fn machine_ticks() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait are the 4th and 5th.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// What `uptime` says (the machine's load), for the report.
fn uptime() -> String {
    for program in ["/usr/bin/uptime", "/bin/uptime"] {
        if let Ok(out) = Command::new(program).env_clear().output() {
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
        }
    }
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| format!("load average (/proc/loadavg): {}", s.trim()))
        .unwrap_or_else(|_| "unknown".into())
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Refuse uids that belong to an account: the workers must not act as a real user.
fn check_uids_free(first: u32, count: u32) -> Result<()> {
    if first < 1000 {
        bail!("--first-uid {first} is a system uid; choose one of 1000 or more");
    }
    let last = first
        .checked_add(count - 1)
        .filter(|l| *l < u32::MAX - 1)
        .with_context(|| format!("--first-uid {first} + {count} mounts runs past the uid range"))?;
    for uid in first..=last {
        // SAFETY: getpwuid returns a pointer to static storage or null; only null is tested,
        // and nothing else calls it concurrently here.
        let found = unsafe { !libc::getpwuid(uid).is_null() };
        if found {
            bail!("uid {uid} belongs to an account; choose another --first-uid (the run uses {first}..={last})");
        }
    }
    Ok(())
}

/// Memory samples of every daemon.
#[derive(Default)]
struct Memory {
    /// The largest sum over all daemons seen in one sample, KiB.
    peak_total: u64,
    /// The last sample's sum, KiB.
    last_total: u64,
    /// Per home: the largest RSS seen, KiB.
    peak: BTreeMap<u32, u64>,
    samples: u64,
}

impl Memory {
    fn sample(&mut self, homes: &[Home]) {
        let mut total = 0;
        for home in homes {
            let rss: u64 = home.daemon_pids().into_iter().map(rss_kib).sum();
            total += rss;
            let peak = self.peak.entry(home.index).or_default();
            *peak = (*peak).max(rss);
        }
        self.peak_total = self.peak_total.max(total);
        self.last_total = total;
        self.samples += 1;
    }
}

/// What one worker reported.
#[derive(Default)]
struct Results {
    stat_ns: Vec<u64>,
    write_ns: Vec<u64>,
    ops: u64,
    manifest: Vec<String>,
}

fn parse_results(lines: &[String]) -> Result<Results> {
    let mut results = Results::default();
    let mut done = false;
    let numbers = |rest: &str| -> Result<Vec<u64>> {
        rest.split_whitespace()
            .map(|n| n.parse().with_context(|| format!("bad sample {n:?}")))
            .collect()
    };
    for line in lines {
        let (key, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match key {
            "stat" => results.stat_ns = numbers(rest)?,
            "write" => results.write_ns = numbers(rest)?,
            "ops" => results.ops = rest.trim().parse().context("bad ops count")?,
            "file" | "xattr" | "dir" => results.manifest.push(line.clone()),
            "done" => done = true,
            _ => bail!("unexpected worker output {line:?}"),
        }
    }
    if !done {
        bail!("the worker's report is incomplete (no `done` line)");
    }
    Ok(results)
}

/// Nearest-rank percentile of sorted samples, in ms.
fn percentile_ms(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6)
}

/// Compare a home, mounted again, with what its worker reported writing.
fn verify(home: &Home, manifest: &[String]) -> Result<usize> {
    let top = std::fs::metadata(&home.mountpoint)
        .with_context(|| format!("stat of {}", home.mountpoint.display()))?;
    if top.uid() != home.uid || top.mode() & 0o7777 != 0o700 {
        bail!(
            "the home's top is owned by uid {} with mode {:o}, expected uid {} and 700",
            top.uid(),
            top.mode() & 0o7777,
            home.uid
        );
    }
    for line in manifest {
        let mut words = line.split(' ');
        let kind = words.next().unwrap_or("");
        let rel = words.next().context("manifest line without a path")?;
        let path = home.mountpoint.join(rel);
        match kind {
            "file" => {
                let len: usize = words.next().unwrap_or("").parse()?;
                let hash = words.next().unwrap_or("");
                let meta = std::fs::symlink_metadata(&path)
                    .with_context(|| format!("stat of {rel} after the remount"))?;
                if meta.uid() != home.uid {
                    bail!(
                        "{rel} is owned by uid {}, expected {}",
                        meta.uid(),
                        home.uid
                    );
                }
                let data = std::fs::read(&path)
                    .with_context(|| format!("reading {rel} after the remount"))?;
                let got = format!("{:016x}", fnv1a(&data));
                if data.len() != len || got != hash {
                    bail!(
                        "{rel} after the remount: {} bytes with hash {got}, expected {len} bytes with hash {hash}",
                        data.len()
                    );
                }
            }
            "xattr" => {
                let want = words.next().unwrap_or("");
                let got = get_xattr(&path, XATTR)
                    .with_context(|| format!("getxattr {XATTR} of {rel} after the remount"))?;
                let got = got.map(|v| hex(&v)).unwrap_or_else(|| "-".into());
                if got != want {
                    bail!("{rel}: {XATTR} after the remount is {got}, expected {want}");
                }
            }
            "dir" => {
                let want: BTreeSet<String> = words
                    .next()
                    .unwrap_or("")
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                let got =
                    list(&path).with_context(|| format!("listing {rel} after the remount"))?;
                if got != want {
                    bail!("{rel} after the remount lists {got:?}, expected {want:?}");
                }
            }
            _ => bail!("unknown manifest line {line:?}"),
        }
    }
    Ok(manifest.len())
}

/// Run `pershome fsck BACKING` (the product's check) and demand a clean result.
fn fsck(pershome: &Path, home: &Home) -> Result<()> {
    let out = Command::new(pershome)
        .env_clear()
        .arg("fsck")
        .arg(&home.backing)
        .output()
        .with_context(|| format!("running {} fsck", pershome.display()))?;
    if !out.status.success() {
        bail!(
            "{}: pershome fsck {} exited {}: {}{}",
            home.label(),
            home.backing.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let problems = pershome::audit::audit_tree_in(&home.backing, pershome::names::NameMode::Long)
        .with_context(|| format!("auditing {}", home.backing.display()))?;
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        bail!(
            "{}: the FAT audit of {} failed: {}",
            home.label(),
            home.backing.display(),
            list.join("; ")
        );
    }
    Ok(())
}

/// Run the whole thing; the report is printed and saved to `target/many-mounts.txt`.
pub fn run(options: &Options) -> Result<()> {
    if options.mounts == 0 || options.mounts > 1000 {
        bail!("--mounts must be 1 to 1000");
    }
    if options.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    if let Some(k) = options.kill_daemon {
        if k >= options.mounts {
            bail!(
                "--kill-daemon {k}: there are only homes 0 to {}",
                options.mounts - 1
            );
        }
    }
    util::require_root("many-mounts")?;
    check_uids_free(options.first_uid, options.mounts)?;
    crate::guards::sweep_stale()?;
    let pershomefs = pershomefs_binary()?;
    let pershome = pershome_binary()?;

    // Declaration order is the reverse of drop order: on an error the workers die first,
    // then the homes are unmounted, then the ext4 (and its loop device), then the directory.
    let scratch = TempDir::new("many-mounts")?;
    let disk = Disk::create(&scratch, 256 + 8 * u64::from(options.mounts))?;
    // The workers run as other users, who may not reach this binary where it was built.
    let exe = scratch.path().join("xtask-worker");
    // Copied from /proc/self/exe, the running image, not from its path: under `cargo xtask
    // ci` an earlier step (`cargo test --workspace`) rebuilds target/debug/xtask, and the
    // path then names a deleted file ("… (deleted)"), which failed CI.
    let own = std::path::PathBuf::from("/proc/self/exe");
    std::fs::copy(&own, &exe)
        .with_context(|| format!("copying {} to {}", own.display(), exe.display()))?;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    let status_dir = scratch.path().join("status");
    let homes_dir = scratch.path().join("h");
    for dir in [&status_dir, &homes_dir] {
        std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::set_permissions(&status_dir, std::fs::Permissions::from_mode(0o700))?;

    util::banner(&format!(
        "many-mounts: mounting {} pershomefs homes (uids {}..={})",
        options.mounts,
        options.first_uid,
        options.first_uid + options.mounts - 1
    ));
    let mut homes: Vec<Home> = Vec::new();
    for index in 0..options.mounts {
        util::check_interrupted()?;
        let uid = options.first_uid + index;
        let name = format!("u{index:02}");
        let backing = disk.root.join(&name);
        std::fs::create_dir(&backing).with_context(|| format!("creating {}", backing.display()))?;
        let mountpoint = homes_dir.join(&name);
        std::fs::create_dir(&mountpoint)
            .with_context(|| format!("creating {}", mountpoint.display()))?;
        std::os::unix::fs::chown(&mountpoint, Some(uid), Some(uid))
            .with_context(|| format!("chown {uid} {}", mountpoint.display()))?;
        std::fs::set_permissions(&mountpoint, std::fs::Permissions::from_mode(0o700))?;
        homes.push(Home {
            index,
            uid,
            backing,
            mountpoint,
            status_file: status_dir.join(format!("{name}.status")),
            mount: None,
        });
        let home = homes.last_mut().context("just pushed")?;
        home.mount(&pershomefs)?;
    }

    let (ready_tx, ready_rx) = mpsc::channel();
    let mut workers: Vec<Worker> = Vec::new();
    for home in &homes {
        let neighbour = (options.mounts > 1).then(|| {
            homes[((home.index + 1) % options.mounts) as usize]
                .mountpoint
                .clone()
        });
        workers.push(spawn_worker(
            &exe,
            home,
            neighbour.as_deref(),
            options,
            ready_tx.clone(),
        )?);
    }
    drop(ready_tx);

    // Phase 1: every worker makes its tree; the load starts for all at once.
    let mut ready = BTreeSet::new();
    let setup_start = Instant::now();
    let mut errors = Vec::new();
    let mut dead = BTreeSet::new();
    while ready.len() < homes.len() && errors.is_empty() {
        util::check_interrupted()?;
        while let Ok(index) = ready_rx.try_recv() {
            ready.insert(index);
        }
        check_health(&homes, &mut workers, &mut dead, &mut errors)?;
        if setup_start.elapsed() > SETUP_LIMIT {
            for home in homes.iter().filter(|h| !ready.contains(&h.index)) {
                errors.push(format!(
                    "{}: the worker did not make its tree within {SETUP_LIMIT:?}",
                    home.label()
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !errors.is_empty() {
        return fail(errors, &mut workers);
    }

    let load_before = uptime();
    let cpu_before: Vec<Option<u64>> = homes
        .iter()
        .map(|h| h.daemon_pids().into_iter().map(cpu_ticks).sum())
        .collect();
    let machine_before = machine_ticks()?;
    util::banner(&format!(
        "many-mounts: {} workers ready; {} s of load",
        workers.len(),
        options.seconds
    ));
    let start = Instant::now();
    for (worker, home) in workers.iter_mut().zip(&homes) {
        let sent = worker
            .stdin
            .as_mut()
            .map(|s| s.write_all(b"go\n").and_then(|()| s.flush()));
        if !matches!(sent, Some(Ok(()))) {
            errors.push(format!(
                "{}: could not start the worker's load",
                home.label()
            ));
        }
    }

    // Phase 2: watch. Memory every second; daemons and workers every 50 ms.
    let mut memory = Memory::default();
    let mut last_sample: Option<Instant> = None;
    let mut killed_daemon = false;
    let mut first_error: Option<Instant> = None;
    let limit = Duration::from_secs(options.seconds) + FINISH_SLACK;
    let mut cpu_after: Vec<Option<u64>> = vec![None; homes.len()];
    loop {
        util::check_interrupted()?;
        if last_sample.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            memory.sample(&homes);
            last_sample = Some(Instant::now());
        }
        if let Some(k) = options.kill_daemon {
            if !killed_daemon && start.elapsed() >= Duration::from_secs(options.seconds) / 2 {
                killed_daemon = true;
                for pid in homes[k as usize].daemon_pids() {
                    eprintln!("many-mounts: --kill-daemon: SIGKILL to pid {pid} of home u{k:02}");
                    // SAFETY: kill has no memory-safety preconditions; the pid is the daemon
                    // the mount guard found for this home.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let had = errors.len();
        check_health(&homes, &mut workers, &mut dead, &mut errors)?;
        // A finished worker's daemon is read before the unmount: its CPU time is the load's.
        for (i, worker) in workers.iter().enumerate() {
            if worker.exit.is_some() && cpu_after[i].is_none() {
                cpu_after[i] = homes[i].daemon_pids().into_iter().map(cpu_ticks).sum();
            }
        }
        if errors.len() > had && first_error.is_none() {
            first_error = Some(Instant::now());
        }
        if first_error.is_some_and(|t| t.elapsed() >= ERROR_GRACE) {
            break;
        }
        if workers.iter().all(|w| w.exit.is_some()) {
            break;
        }
        if start.elapsed() > limit {
            for (home, worker) in homes.iter().zip(&workers) {
                if worker.exit.is_none() {
                    errors.push(format!(
                        "{}: the worker has not finished {:?} after its {} s of load (hung?)",
                        home.label(),
                        FINISH_SLACK,
                        options.seconds
                    ));
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !errors.is_empty() {
        return fail(errors, &mut workers);
    }
    let wall = start.elapsed();
    let machine_after = machine_ticks()?;
    let load_after = uptime();

    let mut results = Vec::new();
    for (home, worker) in homes.iter().zip(workers.iter_mut()) {
        let lines = worker
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        results.push(parse_results(&lines).with_context(|| home.label())?);
    }
    drop(workers);

    // Phase 3: unmount (each daemon must exit 0), fsck, mount again, compare, unmount.
    util::banner("many-mounts: unmount, fsck, mount again, compare");
    let mut checked = 0;
    for (home, result) in homes.iter_mut().zip(&results) {
        util::check_interrupted()?;
        home.unmount()?;
        fsck(&pershome, home)?;
        home.mount(&pershomefs)?;
        checked += verify(home, &result.manifest)
            .with_context(|| format!("{}: comparing after the remount", home.label()))?;
        home.unmount()?;
        fsck(&pershome, home)?;
    }
    homes_guard_check(&homes)?;
    disk.release()?;
    drop(scratch);

    let report = Report {
        options,
        results: &results,
        memory: &memory,
        cpu: cpu_before
            .iter()
            .zip(&cpu_after)
            .map(|(b, a)| match (b, a) {
                (Some(b), Some(a)) => a.saturating_sub(*b) as f64 / clock_ticks_per_second(),
                _ => 0.0,
            })
            .collect(),
        wall,
        machine_busy: {
            let busy = machine_after.0.saturating_sub(machine_before.0) as f64;
            let total = machine_after.1.saturating_sub(machine_before.1).max(1) as f64;
            100.0 * busy / total
        },
        load_before,
        load_after,
        checked,
    };
    let table = report.format();
    println!("\n{table}");
    let out = util::target_dir().join("many-mounts.txt");
    std::fs::write(&out, &table).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("table saved to {}", out.display());
    Ok(())
}

/// Nothing of a home may still be mounted after phase 3 (the guards would only warn).
fn homes_guard_check(homes: &[Home]) -> Result<()> {
    for home in homes {
        if crate::guards::mounted_type(&home.mountpoint)?.is_some() {
            bail!("{} is still mounted", home.label());
        }
    }
    Ok(())
}

/// Look at every daemon and worker: a dead daemon or a worker that failed is an error.
fn check_health(
    homes: &[Home],
    workers: &mut [Worker],
    dead: &mut BTreeSet<u32>,
    errors: &mut Vec<String>,
) -> Result<()> {
    for (home, worker) in homes.iter().zip(workers.iter_mut()) {
        if worker.exit.is_none() {
            if let Some(status) = worker
                .child
                .try_wait()
                .with_context(|| format!("waiting for the worker of {}", home.label()))?
            {
                worker.exit = Some(status);
                if !status.success() {
                    // The worker's main prints its error as every xtask command does.
                    let text = worker.stderr();
                    let text = text.trim_start_matches("xtask: error: ").to_owned();
                    errors.push(format!(
                        "{}: {}",
                        home.label(),
                        if text.is_empty() {
                            format!("the worker failed ({status}) without a message")
                        } else {
                            text
                        }
                    ));
                }
            }
        }
        if !dead.contains(&home.index) && home.mount.is_some() && !home.daemon_alive() {
            dead.insert(home.index);
            errors.push(format!(
                "{}: the pershomefs daemon (pid {:?}) died during the run",
                home.label(),
                home.daemon_pids()
            ));
        }
    }
    Ok(())
}

/// Stop every worker and turn the errors into the run's failure (the guards then unmount).
fn fail(errors: Vec<String>, workers: &mut [Worker]) -> Result<()> {
    for worker in workers.iter_mut() {
        worker.kill();
    }
    let mut text = format!("many-mounts failed with {} error(s):", errors.len());
    for e in &errors {
        let _ = write!(text, "\n  {e}");
    }
    Err(anyhow!(text))
}

/// The figures of one run.
struct Report<'a> {
    options: &'a Options,
    results: &'a [Results],
    memory: &'a Memory,
    /// Per home: the daemon's user + system seconds during the load.
    cpu: Vec<f64>,
    wall: Duration,
    machine_busy: f64,
    load_before: String,
    load_after: String,
    checked: usize,
}

impl Report<'_> {
    fn format(&self) -> String {
        let o = self.options;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "many-mounts: {} pershomefs homes mounted as the login hook mounts them (root daemon, uid=/gid=, allow_other, private_home, commit={}), uids {}..={}, each on its own directory of one fresh ext4 loop filesystem",
            o.mounts,
            pershome::sysconfig::SystemConfig::default().commit_interval.0,
            o.first_uid,
            o.first_uid + o.mounts - 1
        );
        let _ = writeln!(
            out,
            "load: {:.1} s; one worker per home as its user, a round every {} ms on average (a stat, then one of: 4 KiB write+fsync, readdir, read, editor save, temp file, mkdir/rmdir, xattr set/get, missing name, the neighbour's home); seed {}",
            self.wall.as_secs_f64(),
            o.interval_ms,
            o.seed
        );
        let _ = writeln!(
            out,
            "{:<5} {:>10} {:>7} | {:>6} {:>8} {:>8} | {:>6} {:>8} {:>8} | {:>8} {:>7}",
            "home",
            "uid",
            "ops",
            "stat n",
            "p50 ms",
            "p99 ms",
            "w+fs n",
            "p50 ms",
            "p99 ms",
            "RSS MiB",
            "CPU s"
        );
        let _ = writeln!(out, "{}", "-".repeat(98));
        let fmt = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into());
        let mut all_stat = Vec::new();
        let mut all_write = Vec::new();
        let mut all_ops = 0;
        for (i, r) in self.results.iter().enumerate() {
            let mut stat = r.stat_ns.clone();
            let mut write = r.write_ns.clone();
            stat.sort_unstable();
            write.sort_unstable();
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let _ = writeln!(
                out,
                "u{:02}   {:>10} {:>7} | {:>6} {:>8} {:>8} | {:>6} {:>8} {:>8} | {:>8.1} {:>7.2}",
                i,
                o.first_uid + index,
                r.ops,
                stat.len(),
                fmt(percentile_ms(&stat, 50.0)),
                fmt(percentile_ms(&stat, 99.0)),
                write.len(),
                fmt(percentile_ms(&write, 50.0)),
                fmt(percentile_ms(&write, 99.0)),
                mib(self.memory.peak.get(&index).copied().unwrap_or(0)),
                self.cpu.get(i).copied().unwrap_or(0.0)
            );
            all_stat.extend(stat);
            all_write.extend(write);
            all_ops += r.ops;
        }
        all_stat.sort_unstable();
        all_write.sort_unstable();
        let cpu_total: f64 = self.cpu.iter().sum();
        let _ = writeln!(out, "{}", "-".repeat(98));
        let _ = writeln!(
            out,
            "{:<5} {:>10} {:>7} | {:>6} {:>8} {:>8} | {:>6} {:>8} {:>8} | {:>8.1} {:>7.2}",
            "all",
            format!("{} users", o.mounts),
            all_ops,
            all_stat.len(),
            fmt(percentile_ms(&all_stat, 50.0)),
            fmt(percentile_ms(&all_stat, 99.0)),
            all_write.len(),
            fmt(percentile_ms(&all_write, 50.0)),
            fmt(percentile_ms(&all_write, 99.0)),
            mib(self.memory.peak_total),
            cpu_total
        );
        let peak_daemon = self.memory.peak.values().copied().max().unwrap_or(0);
        let _ = writeln!(
            out,
            "daemons' RSS (VmRSS, sampled {} times, once a second): total peak {:.1} MiB, at the end {:.1} MiB; largest daemon {:.1} MiB",
            self.memory.samples,
            mib(self.memory.peak_total),
            mib(self.memory.last_total),
            mib(peak_daemon)
        );
        let cores = cores();
        let _ = writeln!(
            out,
            "daemons' CPU (user+sys, /proc/PID/stat) during the load: {cpu_total:.2} s = {:.1} % of the machine ({cores} cores x {:.1} s); the whole machine was {:.1} % busy (/proc/stat, every process)",
            100.0 * cpu_total / (cores as f64 * self.wall.as_secs_f64()).max(1e-9),
            self.wall.as_secs_f64(),
            self.machine_busy
        );
        let _ = writeln!(out, "uptime before the load: {}", self.load_before);
        let _ = writeln!(out, "uptime after the load:  {}", self.load_after);
        let _ = writeln!(
            out,
            "errors: 0; every daemon exited 0 at unmount; pershome fsck and the FAT audit clean; {} files, listings and xattrs compared after a remount",
            self.checked
        );
        let _ = writeln!(
            out,
            "stat = one statx of a tree file (mostly the kernel's attribute cache); w+fs = pwrite of 4 KiB + fsync of a file kept open (the daemon commits its metadata, then syncs the backing file)"
        );
        out
    }
}

// ---------------------------------------------------------------------------------------
// The worker (one user, one home).

/// FNV-1a, 64 bits: how the manifest names contents.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn hex(data: &[u8]) -> String {
    data.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(n);
    v
}

fn list(dir: &Path) -> std::io::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        names.insert(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = c_path(path)?;
    let n =
        CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The value of an xattr, `None` when the file has none of that name.
fn get_xattr(path: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
    let p = c_path(path)?;
    let n =
        CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(None);
        }
        return Err(e);
    }
    buf.truncate(r as usize);
    Ok(Some(buf))
}

/// The operations of the mix, with their weights (out of 100).
#[derive(Clone, Copy)]
enum Op {
    WriteFsync,
    Readdir,
    Read,
    Save,
    TempFile,
    MkdirRmdir,
    Xattr,
    Missing,
    Neighbour,
}

const MIX: [(Op, u64); 9] = [
    (Op::WriteFsync, 25),
    (Op::Readdir, 15),
    (Op::Read, 15),
    (Op::Save, 10),
    (Op::TempFile, 10),
    (Op::MkdirRmdir, 5),
    (Op::Xattr, 12),
    (Op::Missing, 6),
    (Op::Neighbour, 2),
];

/// One user's home and what the worker knows must be in it.
struct Load {
    home: PathBuf,
    uid: u32,
    neighbour: Option<PathBuf>,
    rng: Rng,
    /// (relative path, content) of every tree file.
    tree: Vec<(String, Vec<u8>)>,
    docs: Vec<Vec<u8>>,
    doc_xattr: Vec<Option<Vec<u8>>>,
    logs: Vec<(File, Vec<u8>)>,
    counter: u64,
    ops: u64,
    stat_ns: Vec<u64>,
    write_ns: Vec<u64>,
}

/// `what rel: error`, the form every failure is reported in.
fn op_err<'a, E: std::fmt::Display>(
    what: &str,
    rel: &'a str,
) -> impl FnOnce(E) -> anyhow::Error + 'a {
    let what = what.to_owned();
    move |e| anyhow!("{what} {rel}: {e}")
}

impl Load {
    fn path(&self, rel: &str) -> PathBuf {
        self.home.join(rel)
    }

    fn setup(args: &WorkerArgs) -> Result<Load> {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        if uid == 0 {
            bail!("the worker runs as root; it must run as the home's user");
        }
        let mut load = Load {
            home: args.home.clone(),
            uid,
            neighbour: args.neighbour.clone(),
            rng: Rng(args.seed | 1),
            tree: Vec::new(),
            docs: Vec::new(),
            doc_xattr: vec![None; DOCS],
            logs: Vec::new(),
            counter: 0,
            ops: 0,
            stat_ns: Vec::new(),
            write_ns: Vec::new(),
        };
        for rel in ["tree", "work"] {
            std::fs::create_dir(load.path(rel)).map_err(op_err("mkdir", rel))?;
        }
        for d in 0..TREE_DIRS {
            let dir = format!("tree/d{d}");
            std::fs::create_dir(load.path(&dir)).map_err(op_err("mkdir", &dir))?;
            for f in 0..TREE_FILES {
                let rel = format!("{dir}/f{f:02}.txt");
                let len = (load.rng.next() % (BLOCK as u64 + 1)) as usize;
                let data = bytes(&mut load.rng, len);
                std::fs::write(load.path(&rel), &data).map_err(op_err("create", &rel))?;
                load.tree.push((rel, data));
            }
        }
        for k in 0..DOCS {
            let rel = format!("work/doc{k}.txt");
            let data = bytes(&mut load.rng, 1000 + k * 100);
            std::fs::write(load.path(&rel), &data).map_err(op_err("create", &rel))?;
            load.docs.push(data);
        }
        for k in 0..LOGS {
            let rel = format!("work/log{k}.bin");
            let data = bytes(&mut load.rng, LOG_LEN);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(load.path(&rel))
                .map_err(op_err("create", &rel))?;
            file.write_all_at(&data, 0).map_err(op_err("write", &rel))?;
            file.sync_all().map_err(op_err("fsync", &rel))?;
            load.logs.push((file, data));
        }
        load.neighbour_refused()?;
        Ok(load)
    }

    /// Another user's home must stay closed (private_home: its top is theirs, 0700).
    fn neighbour_refused(&self) -> Result<()> {
        let Some(n) = &self.neighbour else {
            return Ok(());
        };
        match std::fs::read_dir(n) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
            Err(e) => bail!(
                "listing another user's home {}: expected EACCES, got {e}",
                n.display()
            ),
            Ok(_) => bail!(
                "listing another user's home {}: it was allowed (expected EACCES)",
                n.display()
            ),
        }
    }

    fn pick(&mut self, n: usize) -> usize {
        (self.rng.next() % n as u64) as usize
    }

    fn next_name(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("work/{prefix}-{}", self.counter)
    }

    fn stat(&mut self) -> Result<()> {
        let i = self.pick(self.tree.len());
        let path = self.path(&self.tree[i].0);
        let start = Instant::now();
        let meta = std::fs::symlink_metadata(&path);
        let ns = start.elapsed().as_nanos() as u64;
        let rel = &self.tree[i].0;
        let meta = meta.map_err(op_err("stat", rel))?;
        if meta.uid() != self.uid || meta.len() != self.tree[i].1.len() as u64 {
            bail!(
                "stat {rel}: uid {} size {}, expected uid {} size {}",
                meta.uid(),
                meta.len(),
                self.uid,
                self.tree[i].1.len()
            );
        }
        self.stat_ns.push(ns);
        Ok(())
    }

    fn op(&mut self, op: Op) -> Result<()> {
        match op {
            Op::WriteFsync => {
                let k = self.pick(LOGS);
                let block = self.pick(LOG_LEN / BLOCK);
                let data = bytes(&mut self.rng, BLOCK);
                let rel = format!("work/log{k}.bin");
                let (file, model) = &mut self.logs[k];
                let start = Instant::now();
                file.write_all_at(&data, (block * BLOCK) as u64)
                    .map_err(op_err("write 4 KiB", &rel))?;
                file.sync_all().map_err(op_err("fsync", &rel))?;
                self.write_ns.push(start.elapsed().as_nanos() as u64);
                model[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(&data);
            }
            Op::Readdir => {
                let d = self.pick(TREE_DIRS);
                let rel = format!("tree/d{d}");
                let got = list(&self.path(&rel)).map_err(op_err("readdir", &rel))?;
                let want: BTreeSet<String> =
                    (0..TREE_FILES).map(|f| format!("f{f:02}.txt")).collect();
                if got != want {
                    bail!("readdir {rel}: listed {got:?}, expected {want:?}");
                }
            }
            Op::Read => {
                let i = self.pick(self.tree.len());
                let rel = &self.tree[i].0;
                let data = std::fs::read(self.path(rel)).map_err(op_err("read", rel))?;
                if data != self.tree[i].1 {
                    bail!(
                        "read {rel}: {} bytes that differ from the {} written",
                        data.len(),
                        self.tree[i].1.len()
                    );
                }
            }
            Op::Save => {
                let k = self.pick(DOCS);
                let len = 1 + self.pick(16 * 1024);
                let data = bytes(&mut self.rng, len);
                let tmp = format!("work/.doc{k}.txt.tmp");
                let rel = format!("work/doc{k}.txt");
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(self.path(&tmp))
                    .map_err(op_err("create", &tmp))?;
                file.write_all(&data).map_err(op_err("write", &tmp))?;
                file.sync_all().map_err(op_err("fsync", &tmp))?;
                drop(file);
                std::fs::rename(self.path(&tmp), self.path(&rel))
                    .map_err(op_err(&format!("rename {tmp} over"), &rel))?;
                self.docs[k] = data;
                self.doc_xattr[k] = None;
            }
            Op::TempFile => {
                let rel = self.next_name("tmp");
                let len = self.pick(2048);
                let data = bytes(&mut self.rng, len);
                std::fs::write(self.path(&rel), &data).map_err(op_err("create", &rel))?;
                let back = std::fs::read(self.path(&rel)).map_err(op_err("read", &rel))?;
                if back != data {
                    bail!("read {rel}: not the {len} bytes just written");
                }
                std::fs::remove_file(self.path(&rel)).map_err(op_err("unlink", &rel))?;
            }
            Op::MkdirRmdir => {
                let rel = self.next_name("dir");
                std::fs::create_dir(self.path(&rel)).map_err(op_err("mkdir", &rel))?;
                let meta = std::fs::metadata(self.path(&rel)).map_err(op_err("stat", &rel))?;
                if !meta.is_dir() || meta.uid() != self.uid {
                    bail!("stat {rel}: not a directory of uid {}", self.uid);
                }
                std::fs::remove_dir(self.path(&rel)).map_err(op_err("rmdir", &rel))?;
            }
            Op::Xattr => {
                let k = self.pick(DOCS);
                let rel = format!("work/doc{k}.txt");
                let len = 1 + self.pick(64);
                let value = bytes(&mut self.rng, len);
                let path = self.path(&rel);
                set_xattr(&path, XATTR, &value).map_err(op_err("setxattr", &rel))?;
                let got = get_xattr(&path, XATTR).map_err(op_err("getxattr", &rel))?;
                if got.as_deref() != Some(&value[..]) {
                    bail!("getxattr {rel}: {got:?}, expected the {len} bytes just set");
                }
                self.doc_xattr[k] = Some(value);
            }
            Op::Missing => {
                let rel = self.next_name("missing");
                match std::fs::symlink_metadata(self.path(&rel)) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => bail!("stat {rel}: expected ENOENT, got {e}"),
                    Ok(_) => bail!("stat {rel}: exists, expected ENOENT"),
                }
            }
            Op::Neighbour => self.neighbour_refused()?,
        }
        self.ops += 1;
        Ok(())
    }

    fn run(&mut self, seconds: u64, interval_ms: u64) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(seconds);
        let total: u64 = MIX.iter().map(|(_, w)| w).sum();
        while Instant::now() < end {
            util::check_interrupted()?;
            self.stat()?;
            self.ops += 1;
            let mut roll = self.rng.next() % total;
            let mut chosen = Op::WriteFsync;
            for (op, weight) in MIX {
                if roll < weight {
                    chosen = op;
                    break;
                }
                roll -= weight;
            }
            self.op(chosen)?;
            // A person's pace, not a benchmark's: 0.5 to 1.5 times the interval.
            let pause = interval_ms / 2 + self.rng.next() % (interval_ms + 1);
            std::thread::sleep(Duration::from_millis(pause));
        }
        Ok(())
    }

    /// The figures and the manifest, on stdout.
    fn report(&self, out: &mut impl Write) -> std::io::Result<()> {
        let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
        writeln!(out, "stat {}", join(&self.stat_ns))?;
        writeln!(out, "write {}", join(&self.write_ns))?;
        writeln!(out, "ops {}", self.ops)?;
        let file = |out: &mut dyn Write, rel: &str, data: &[u8]| {
            writeln!(out, "file {rel} {} {:016x}", data.len(), fnv1a(data))
        };
        for (rel, data) in &self.tree {
            file(out, rel, data)?;
        }
        for (k, data) in self.docs.iter().enumerate() {
            let rel = format!("work/doc{k}.txt");
            file(out, &rel, data)?;
            let value = self.doc_xattr[k]
                .as_deref()
                .map(hex)
                .unwrap_or_else(|| "-".into());
            writeln!(out, "xattr {rel} {value}")?;
        }
        for (k, (_, data)) in self.logs.iter().enumerate() {
            file(out, &format!("work/log{k}.bin"), data)?;
        }
        writeln!(out, "dir . tree/work")?;
        let tree: Vec<String> = (0..TREE_DIRS).map(|d| format!("d{d}")).collect();
        writeln!(out, "dir tree {}", tree.join("/"))?;
        let mut work: Vec<String> = (0..DOCS).map(|k| format!("doc{k}.txt")).collect();
        work.extend((0..LOGS).map(|k| format!("log{k}.bin")));
        writeln!(out, "dir work {}", work.join("/"))?;
        writeln!(out, "done")?;
        out.flush()
    }
}

/// `cargo xtask many-mounts-worker`: one user's load (started by `run`, never by hand).
pub fn worker(args: &WorkerArgs) -> Result<()> {
    let mut load = Load::setup(args)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if line.trim() != "go" {
        bail!("the orchestrator went away before the load started");
    }
    load.run(args.seconds, args.interval_ms)?;
    // The logs are closed before the report, as an application would at logout.
    load.report(&mut stdout)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        assert_eq!(percentile_ms(&samples, 50.0), Some(50.0));
        assert_eq!(percentile_ms(&samples, 99.0), Some(99.0));
        assert_eq!(percentile_ms(&[7_000_000], 99.0), Some(7.0));
        assert_eq!(percentile_ms(&[], 50.0), None);
    }

    #[test]
    fn a_report_without_done_is_refused() {
        let lines = vec!["stat 1 2".to_owned(), "ops 2".to_owned()];
        let err = parse_results(&lines).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("incomplete")),
            "expected an incomplete-report error, got {err:?}"
        );
        let mut lines = lines;
        lines.push("done".to_owned());
        let ok = parse_results(&lines).expect("complete report");
        assert_eq!((ok.stat_ns, ok.ops), (vec![1, 2], 2));
    }

    #[test]
    fn the_table_has_a_row_per_home_and_pools_every_sample_in_the_overall_row() {
        let options = Options {
            mounts: 2,
            seconds: 1,
            interval_ms: 50,
            first_uid: 700_000_000,
            seed: 14,
            kill_daemon: None,
        };
        // Home 0's stats take 1..=50 ms, home 1's 51..=100 ms: alone each has its own p50,
        // pooled the p50 is 50 ms and the p99 99 ms.
        let ms = |r: std::ops::RangeInclusive<u64>| r.map(|v| v * 1_000_000).collect::<Vec<_>>();
        let results = vec![
            Results {
                stat_ns: ms(1..=50),
                write_ns: ms(10..=10),
                ops: 51,
                manifest: vec![],
            },
            Results {
                stat_ns: ms(51..=100),
                write_ns: ms(30..=30),
                ops: 51,
                manifest: vec![],
            },
        ];
        let mut memory = Memory::default();
        memory.peak.insert(0, 4096);
        memory.peak.insert(1, 5120);
        memory.peak_total = 9216;
        let report = Report {
            options: &options,
            results: &results,
            memory: &memory,
            cpu: vec![0.5, 0.25],
            wall: Duration::from_secs(1),
            machine_busy: 50.0,
            load_before: "before".into(),
            load_after: "after".into(),
            checked: 0,
        };
        let table = report.format();
        let row = |name: &str| {
            table
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .split_whitespace()
                .filter(|w| *w != "|")
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        // name uid ops stat-n p50 p99 write-n p50 p99 rss cpu
        assert_eq!(
            row("u00 "),
            [
                "u00",
                "700000000",
                "51",
                "50",
                "25.00",
                "50.00",
                "1",
                "10.00",
                "10.00",
                "4.0",
                "0.50"
            ],
            "home 0's row in:\n{table}"
        );
        assert_eq!(
            row("u01 "),
            [
                "u01",
                "700000001",
                "51",
                "50",
                "75.00",
                "100.00",
                "1",
                "30.00",
                "30.00",
                "5.0",
                "0.25"
            ],
            "home 1's row in:\n{table}"
        );
        assert_eq!(
            row("all "),
            [
                "all", "2", "users", "102", "100", "50.00", "99.00", "2", "10.00", "30.00", "9.0",
                "0.75"
            ],
            "the overall row in:\n{table}"
        );
    }

    #[test]
    fn home_seeds_differ_and_are_never_zero() {
        let seeds: BTreeSet<u64> = (0..30).map(|i| home_seed(0, i)).collect();
        assert_eq!(seeds.len(), 30, "expected 30 distinct seeds, got {seeds:?}");
        assert!(!seeds.contains(&0));
    }
}
