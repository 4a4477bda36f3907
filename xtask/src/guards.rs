//! RAII guards for everything a test run creates outside its own process: temporary
//! directories, loop devices, FUSE mounts (with the daemons that serve them) and the
//! benchmark's kernel mounts (ext4, tmpfs), plus a sweep that removes what a killed earlier
//! run left behind.
//!
//! This module owns the rule "no mount, daemon or loop device outlives a run": every resource
//! is released by `Drop`, on success, on error and after Ctrl-C. It never removes a directory
//! that still has a mount below it (that would delete through the mount), and it only kills
//! daemon processes that serve one of its own mountpoints, by pid.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::util::wait_until;

/// Every directory the harness creates lives below this, so a sweep can find leftovers. It is
/// on the normal disk (not tmpfs): the exFAT images and the benchmark's ext4 images (several
/// GiB, sparse) live here and must not eat RAM. Paths are kept short on
/// purpose: a unix socket's path must fit in 108 bytes, and pjdfstest binds sockets a few
/// directories deep below the mountpoint (longer run paths made 39 socket tests fail with
/// ENAMETOOLONG even on plain ext4).
pub const RUN_BASE: &str = "/var/tmp/phx";

/// One line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
}

/// Undo the octal escapes (`\040` for a space) the kernel uses in mount tables.
fn unescape_mount_field(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// The current mounts of this mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut entries = Vec::new();
    for line in text.lines() {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source super
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mountpoint) = fields.get(4) else {
            continue;
        };
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let Some(fstype) = fields.get(dash + 1) else {
            continue;
        };
        entries.push(MountEntry {
            mountpoint: unescape_mount_field(mountpoint),
            fstype: (*fstype).to_owned(),
        });
    }
    Ok(entries)
}

/// The filesystem type mounted exactly on `path`, if any (the topmost mount wins).
pub fn mounted_type(path: &Path) -> Result<Option<String>> {
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path)
        .map(|m| m.fstype))
}

/// Mounts at or below `dir`.
pub fn mounts_under(dir: &Path) -> Result<Vec<MountEntry>> {
    Ok(mounts()?
        .into_iter()
        .filter(|m| m.mountpoint.starts_with(dir))
        .collect())
}

/// A process we may have to wait for, identified by pid plus its start time so that a reused
/// pid is never mistaken for our daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    start_time: u64,
}

fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields after it start
    // behind the last ')'. starttime is field 22, i.e. the 20th field after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Proc {
    /// Whether the process still runs (not a zombie, and not a new process that reused the pid).
    pub fn alive(&self) -> bool {
        // A zombie has finished serving; only its parent can reap it.
        let state = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|s| {
                s.rfind(')')
                    .map(|i| s[i + 1..].trim_start().starts_with('Z'))
            });
        match state {
            Some(true) | None => false,
            Some(false) => proc_start_time(self.pid) == Some(self.start_time),
        }
    }
}

/// Processes whose command line has `arg` as one whole argument: the FUSE daemons we
/// started with that mountpoint (mountpoints are unique per run, so nothing else matches).
pub fn processes_with_arg(arg: &Path) -> Vec<Proc> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    let own = std::process::id();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(own) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .split(|b| *b == 0)
            .any(|a| a == arg.as_os_str().as_bytes())
        {
            if let Some(start_time) = proc_start_time(pid) {
                found.push(Proc { pid, start_time });
            }
        }
    }
    found
}

/// A directory below [`RUN_BASE`], removed on drop unless something is still mounted in it.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `label` is only shown in messages; the path stays short (see [`RUN_BASE`]).
    pub fn new(label: &str) -> Result<TempDir> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        std::fs::create_dir_all(RUN_BASE).with_context(|| format!("creating {RUN_BASE}"))?;
        // The pid in the name lets `sweep_stale` tell a dead run's leftovers from a live one's.
        let name = format!(
            "{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let path = Path::new(RUN_BASE).join(name);
        if path.exists() {
            // Left by an earlier process with the same pid that was killed outright.
            if !mounts_under(&path)?.is_empty() {
                bail!(
                    "{} ({label}) exists and has mounts below it; unmount them first",
                    path.display()
                );
            }
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        std::fs::create_dir(&path)
            .with_context(|| format!("creating {} ({label})", path.display()))?;
        // pjdfstest switches to other users who must reach the mountpoint, whatever the
        // caller's umask.
        for dir in [Path::new(RUN_BASE), path.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("chmod 755 {}", dir.display()))?;
        }
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        match mounts_under(&self.path) {
            Ok(left) if left.is_empty() => {
                if let Err(e) = std::fs::remove_dir_all(&self.path) {
                    eprintln!("warning: removing {}: {e}", self.path.display());
                }
            }
            Ok(left) => eprintln!(
                "warning: not removing {} because something is still mounted there: {:?}",
                self.path.display(),
                left.iter().map(|m| &m.mountpoint).collect::<Vec<_>>()
            ),
            Err(e) => eprintln!("warning: not removing {}: {e:#}", self.path.display()),
        }
    }
}

/// A loop device attached to an image file; detached on drop.
pub struct LoopDev {
    device: PathBuf,
}

impl LoopDev {
    pub fn attach(image: &Path) -> Result<LoopDev> {
        LoopDev::attach_with(image, false)
    }

    /// Like `attach`; with `direct_io` the loop driver reads and writes the image with
    /// O_DIRECT, so its data is not cached a second time in the page cache of the file the
    /// image lives on (the benchmark wants the loop device to behave like a disk).
    pub fn attach_with(image: &Path, direct_io: bool) -> Result<LoopDev> {
        let mut command = Command::new("losetup");
        command.args(["-f", "--show"]);
        if direct_io {
            command.arg("--direct-io=on");
        }
        let output = command.arg(image).output().context("running losetup")?;
        if !output.status.success() {
            bail!(
                "{command:?} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !device.starts_with("/dev/loop") {
            bail!("losetup printed {device:?}, expected a /dev/loopN path");
        }
        Ok(LoopDev {
            device: PathBuf::from(device),
        })
    }

    pub fn device(&self) -> &Path {
        &self.device
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let status = Command::new("losetup").arg("-d").arg(&self.device).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "warning: losetup -d {} failed ({status:?})",
                self.device.display()
            );
        }
    }
}

/// A mount: a FUSE mount and the daemon processes serving it, or a kernel filesystem (the
/// benchmark's fresh ext4 and tmpfs). Unmounted on drop; `unmount` does the same and reports
/// failures. Unmounting a FUSE mount waits for the daemon to exit, because a daemon may still
/// be writing its metadata after the kernel let go of the mountpoint, and a remount before it
/// is done would read stale state.
pub struct Mount {
    mountpoint: PathBuf,
    what: String,
    daemons: Vec<Proc>,
    mounted: bool,
    /// FUSE mounts are unmounted with fusermount3 (falling back to umount), kernel ones
    /// with umount only.
    fuse: bool,
}

/// How long a mount may take to appear after its command returned (pershomefs, posixovl and
/// exfat-fuse all return once it is ready, so this is only slack), and how long a daemon may
/// take to finish after unmount (pershomefs commits its metadata then).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(5);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

impl Mount {
    /// Run `command` (which must mount `mountpoint` and return, leaving a daemon behind),
    /// wait until the mount is visible and remember the daemons.
    pub fn start(what: &str, command: Command, mountpoint: &Path) -> Result<Mount> {
        Mount::start_inner(what, command, mountpoint, true)
    }

    /// Run `command` (a `mount -t ext4|tmpfs ...`), wait until the mount is visible. The
    /// guard unmounts it with umount.
    pub fn start_kernel(what: &str, command: Command, mountpoint: &Path) -> Result<Mount> {
        Mount::start_inner(what, command, mountpoint, false)
    }

    fn start_inner(
        what: &str,
        mut command: Command,
        mountpoint: &Path,
        fuse: bool,
    ) -> Result<Mount> {
        crate::util::check_interrupted()?;
        let output = command
            .output()
            .with_context(|| format!("starting {what} ({command:?})"))?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        // Even a failing command may have left a mount or a daemon: guard them first.
        let mut guard = Mount {
            mountpoint: mountpoint.to_path_buf(),
            what: what.to_owned(),
            daemons: Vec::new(),
            mounted: true,
            fuse,
        };
        if !output.status.success() {
            guard.daemons = processes_with_arg(mountpoint);
            bail!("{what} failed ({}): {command:?}\n{stderr}", output.status);
        }
        if !wait_until(MOUNT_TIMEOUT, || {
            matches!(mounted_type(mountpoint), Ok(Some(_)))
        }) {
            guard.daemons = processes_with_arg(mountpoint);
            bail!(
                "{what} exited 0 but {} is not mounted after {MOUNT_TIMEOUT:?}: {command:?}\n{stderr}",
                mountpoint.display()
            );
        }
        guard.daemons = processes_with_arg(mountpoint);
        Ok(guard)
    }

    /// Take charge of a mount someone else made (a previous demo, a stale run).
    /// `what` is the mount's fstype; `fuse*` types are unmounted the FUSE way.
    pub fn adopt(what: &str, mountpoint: &Path, daemons: Vec<Proc>) -> Mount {
        Mount {
            mountpoint: mountpoint.to_path_buf(),
            what: what.to_owned(),
            daemons,
            mounted: true,
            fuse: what.starts_with("fuse"),
        }
    }

    /// The daemon processes serving the mount (none for a kernel filesystem), as found when
    /// it appeared: `many-mounts` watches them and reads their memory and CPU time.
    pub fn daemons(&self) -> &[Proc] {
        &self.daemons
    }

    /// Give up the guard and keep the mount: only `cargo xtask demo` does this, on purpose.
    pub fn leak(mut self) {
        self.mounted = false;
    }

    pub fn unmount(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let mnt = self.mountpoint.clone();
        let still_mounted = || matches!(mounted_type(&mnt), Ok(Some(_)));
        let mut errors = Vec::new();
        if still_mounted() {
            // A just-closed file can keep the mount busy for a moment: retry, then be lazy.
            let mut done = false;
            for _ in 0..50 {
                let ok = (self.fuse
                    && Command::new("fusermount3")
                        .arg("-u")
                        .arg(&mnt)
                        .stderr(std::process::Stdio::null())
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false))
                    || Command::new("umount")
                        .arg(&mnt)
                        .stderr(std::process::Stdio::null())
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false);
                if ok || !still_mounted() {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !done {
                errors.push(format!("{} was busy; detached it lazily", mnt.display()));
                let _ = Command::new("umount").arg("-l").arg(&mnt).status();
            }
        }
        if still_mounted() {
            errors.push(format!("{} is still mounted", mnt.display()));
        }
        let daemons = std::mem::take(&mut self.daemons);
        if !wait_until(EXIT_TIMEOUT, || daemons.iter().all(|d| !d.alive())) {
            for d in daemons.iter().filter(|d| d.alive()) {
                errors.push(format!(
                    "{} daemon pid {} did not exit within {EXIT_TIMEOUT:?} of unmount; killed it",
                    self.what, d.pid
                ));
                // SAFETY: kill has no memory-safety preconditions; the pid is our daemon,
                // checked by its start time just above.
                unsafe { libc::kill(d.pid, libc::SIGKILL) };
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("unmounting {}: {}", self.what, errors.join("; ")))
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Remove what an earlier run that was killed outright (SIGKILL, power) left below
/// [`RUN_BASE`]: mounts, loop devices on its images, and its directories. Runs of live xtask
/// processes are left alone.
pub fn sweep_stale() -> Result<()> {
    let base = Path::new(RUN_BASE);
    if !base.exists() {
        return Ok(());
    }
    let owner_alive = |path: &Path| -> bool {
        let Ok(rel) = path.strip_prefix(base) else {
            return true;
        };
        let Some(first) = rel.components().next() else {
            return true;
        };
        let name = first.as_os_str().to_string_lossy();
        match name.split('-').next().and_then(|p| p.parse::<u32>().ok()) {
            Some(pid) => pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists(),
            None => true,
        }
    };
    // Newest mounts first: the fs under test was mounted after, and on top of, the exFAT
    // mount (its backing is inside it), and mountinfo lists mounts in the order they were made.
    let stale: Vec<MountEntry> = mounts_under(base)?
        .into_iter()
        .filter(|m| !owner_alive(&m.mountpoint))
        .collect();
    for m in stale.into_iter().rev() {
        eprintln!(
            "cleaning up a stale mount from a killed run: {}",
            m.mountpoint.display()
        );
        Mount::adopt(&m.fstype, &m.mountpoint, processes_with_arg(&m.mountpoint)).unmount()?;
    }
    if let Ok(out) = Command::new("losetup")
        .args(["-n", "-O", "NAME,BACK-FILE", "-l"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut parts = line.split_whitespace();
            if let (Some(dev), Some(file)) = (parts.next(), parts.next()) {
                if Path::new(file).starts_with(base) && !owner_alive(Path::new(file)) {
                    eprintln!("cleaning up a stale loop device from a killed run: {dev}");
                    drop(LoopDev {
                        device: PathBuf::from(dev),
                    });
                }
            }
        }
    }
    for entry in std::fs::read_dir(base).with_context(|| format!("listing {RUN_BASE}"))? {
        let path = entry.with_context(|| format!("listing {RUN_BASE}"))?.path();
        if !owner_alive(&path) && mounts_under(&path)?.is_empty() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_fields_are_unescaped() {
        for (field, want) in [
            ("/var/tmp/a", "/var/tmp/a"),
            ("/var/tmp/a\\040b", "/var/tmp/a b"),
            ("/x\\011y\\134z", "/x\ty\\z"),
            ("/trailing\\04", "/trailing\\04"),
            ("/not\\999octal", "/not\\999octal"),
        ] {
            let got = unescape_mount_field(field);
            assert_eq!(
                got,
                PathBuf::from(want),
                "field {field:?}: expected {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn own_process_start_time_is_readable() {
        let pid = i32::try_from(std::process::id()).expect("pid fits i32");
        let got = proc_start_time(pid);
        assert!(
            got.is_some(),
            "expected a start time for our own pid {pid}, got None"
        );
    }
}
