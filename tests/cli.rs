//! End-to-end tests of the `pershomefs` front end with real FUSE mounts.
//!
//! This is a `harness = false` test: the binary is both the test runner and, when started with
//! `--as-pershomefs`, a `pershomefs` built from `pershome::cli::pershomefs::main` and a tiny
//! filesystem defined here (an empty root directory). Running the daemon as a separate process
//! matters: `main` forks, which must not happen inside a multi-threaded test harness.
//!
//! Every mount is watched by a [`MountGuard`] that unmounts it on drop, so a failing test
//! leaves nothing mounted. Waiting is always polling with a timeout, never a blind sleep.
//! Needs root (for the read-only bind mount and the non-root `setpriv` case) and /dev/fuse.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, KernelConfig, ReplyAttr,
    ReplyDirectory, ReplyEntry, Request,
};
use pershome::cli::OpenError;
use pershome::mount_opts::MountOptions;

const CHILD_FLAG: &str = "--as-pershomefs";
/// The test filesystem writes `pid` (at init) and `destroyed` (at destroy) into this directory.
const MARKERS_ENV: &str = "PERSHOME_TEST_MARKERS";
/// A file in BACKING that makes the test opener fail like a newer-format store.
const NEWER_FORMAT_FILE: &str = "NEWER_FORMAT";
const TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The filesystem under test: an empty root directory owned by the `uid=`/`gid=` owner.

struct EmptyRoot {
    attr: FileAttr,
    markers: Option<PathBuf>,
}

impl EmptyRoot {
    fn mark(&self, name: &str, content: &str) {
        if let Some(dir) = &self.markers {
            if let Err(e) = std::fs::write(dir.join(name), content) {
                eprintln!("test filesystem: writing marker {name}: {e}");
            }
        }
    }
}

impl Filesystem for EmptyRoot {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> std::io::Result<()> {
        self.mark("pid", &std::process::id().to_string());
        Ok(())
    }
    fn destroy(&mut self) {
        self.mark("destroyed", "yes");
    }
    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOENT);
    }
    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            reply.attr(&Duration::from_secs(1), &self.attr);
        } else {
            reply.error(Errno::ENOENT);
        }
    }
    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [".", ".."];
        for (i, name) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo::ROOT, (i + 1) as u64, FileType::Directory, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn open_test_fs(backing: &Path, opts: &MountOptions) -> Result<EmptyRoot, OpenError> {
    if backing.join(NEWER_FORMAT_FILE).exists() {
        return Err(OpenError::NewerFormat(
            "the metadata on this stick is format 99, newer than this pershome understands: \
             update pershome"
                .to_owned(),
        ));
    }
    let attr = FileAttr {
        ino: INodeNo::ROOT,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: opts.uid,
        gid: opts.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    };
    Ok(EmptyRoot {
        attr,
        markers: std::env::var_os(MARKERS_ENV).map(PathBuf::from),
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers: running the binary, reading mountinfo, cleaning up.

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}, stdout {:?}, stderr {:?}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Scratch space for one test: BACKING, MOUNTPOINT and the marker directory.
struct Scratch {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    markers: PathBuf,
}

fn scratch() -> Result<Scratch, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let root = dir
        .path()
        .canonicalize()
        .map_err(|e| format!("canonicalize: {e}"))?;
    let backing = root.join("pershome");
    let mnt = root.join("home");
    let markers = root.join("markers");
    for d in [&backing, &mnt, &markers] {
        std::fs::create_dir(d).map_err(|e| format!("mkdir {d:?}: {e}"))?;
    }
    Ok(Scratch {
        _dir: dir,
        backing,
        mnt,
        markers,
    })
}

fn pershomefs_command(args: &[&OsStr], markers: Option<&Path>) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg(CHILD_FLAG).args(args).stdin(Stdio::null());
    cmd.env_remove("PERSHOME_LOG");
    if let Some(m) = markers {
        cmd.env(MARKERS_ENV, m);
    }
    Ok(cmd)
}

/// Runs the command to completion (with a timeout), stdout and stderr into files: the daemon
/// would keep a pipe open until it detaches, and a test must not depend on that to finish.
fn run(mut cmd: Command) -> Result<Outcome, String> {
    let out = tempfile::NamedTempFile::new().map_err(|e| format!("tempfile: {e}"))?;
    let err = tempfile::NamedTempFile::new().map_err(|e| format!("tempfile: {e}"))?;
    let reopen = |f: &tempfile::NamedTempFile| f.reopen().map_err(|e| format!("reopen: {e}"));
    cmd.stdout(reopen(&out)?).stderr(reopen(&err)?);
    let mut child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not exit within {TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    };
    let read = |f: &tempfile::NamedTempFile| std::fs::read_to_string(f.path()).unwrap_or_default();
    Ok(Outcome {
        code: status.code(),
        stdout: read(&out),
        stderr: read(&err),
    })
}

fn pershomefs(args: &[&OsStr], markers: Option<&Path>) -> Result<Outcome, String> {
    run(pershomefs_command(args, markers)?)
}

#[derive(Debug, Clone)]
struct MountEntry {
    mount_options: Vec<String>,
    fstype: String,
    source: String,
    super_options: Vec<String>,
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mountinfo.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last mountinfo entry whose mount point is `path` (the top of the stack there).
fn mount_entry(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    let mut found = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < sep + 4 || fields.len() < 6 {
            continue;
        }
        if unescape_mountinfo(fields[4]) != want {
            continue;
        }
        found = Some(MountEntry {
            mount_options: fields[5].split(',').map(str::to_owned).collect(),
            fstype: fields[sep + 1].to_owned(),
            source: unescape_mountinfo(fields[sep + 2]),
            super_options: fields[sep + 3].split(',').map(str::to_owned).collect(),
        });
    }
    found
}

fn is_pershome_mount(path: &Path) -> bool {
    mount_entry(path).is_some_and(|m| m.fstype.starts_with("fuse"))
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("timed out after {TIMEOUT:?} waiting until {what}"))
}

/// Whether a process runs (a zombie counts as ended: PID 1 here may never reap it).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn daemon_pid(markers: &Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(markers.join("pid"))
        .map_err(|e| format!("reading the daemon's pid marker: {e}"))?;
    text.trim()
        .parse()
        .map_err(|e| format!("pid marker {text:?}: {e}"))
}

/// Unmounts a FUSE mount on drop if it is still there: `fusermount3 -u`, then `umount -l`,
/// each followed by polling mountinfo until the entry vanishes.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let path = &self.0;
        for (cmd, args) in [("fusermount3", ["-u", "-q"]), ("umount", ["-l", "-q"])] {
            if !is_pershome_mount(path) {
                return;
            }
            eprintln!("  cleanup: {cmd} {}", path.display());
            let _ = Command::new(cmd)
                .args(args)
                .arg(path)
                .stderr(Stdio::null())
                .status();
            let _ = wait_until("the mount is gone", || !is_pershome_mount(path));
        }
        if is_pershome_mount(path) {
            eprintln!("  cleanup FAILED: {} is still mounted", path.display());
        }
    }
}

/// Why a test did not pass.
enum NotPassed {
    Failed(String),
    /// The machine cannot run this test; the reason is printed.
    Skipped(String),
}

impl From<String> for NotPassed {
    fn from(why: String) -> Self {
        NotPassed::Failed(why)
    }
}

impl From<&str> for NotPassed {
    fn from(why: &str) -> Self {
        NotPassed::Failed(why.to_owned())
    }
}

type TestResult = Result<(), NotPassed>;

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

fn os(s: &Path) -> &OsStr {
    s.as_os_str()
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// The daemon returns once the mount is ready, shows as fuse.pershomefs with nosuid,nodev,
/// and ends (running `destroy`) when `fusermount3 -u` unmounts it.
fn daemon_mounts_and_fusermount_ends_it() -> TestResult {
    let s = scratch()?;
    let _guard = MountGuard(s.mnt.clone());
    let out = pershomefs(&[os(&s.backing), os(&s.mnt)], Some(&s.markers))?;
    check!(out.code == Some(0), "expected exit 0, got {out}");
    // No polling here: the mount must already be there when the command has returned.
    let entry = mount_entry(&s.mnt).ok_or("expected a mount right after exit 0, found none")?;
    check!(
        entry.fstype == "fuse.pershomefs",
        "expected type fuse.pershomefs, got {entry:?}"
    );
    for flag in ["nosuid", "nodev", "rw"] {
        check!(
            entry.mount_options.iter().any(|o| o == flag),
            "expected {flag} in {entry:?}"
        );
    }
    check!(
        entry
            .super_options
            .iter()
            .any(|o| o == "default_permissions"),
        "expected default_permissions in {entry:?}"
    );
    check!(
        entry.source == s.backing.to_string_lossy(),
        "expected source {:?} (BACKING), got {entry:?}",
        s.backing
    );
    let meta = std::fs::metadata(&s.mnt).map_err(|e| format!("stat mount: {e}"))?;
    let uid = nix::unistd::getuid().as_raw();
    check!(
        meta.is_dir() && meta.uid() == uid,
        "expected the root to be a directory owned by uid {uid}, got uid {} dir {}",
        meta.uid(),
        meta.is_dir()
    );
    let listing: Vec<_> = std::fs::read_dir(&s.mnt)
        .map_err(|e| format!("readdir: {e}"))?
        .collect();
    check!(
        listing.is_empty(),
        "expected an empty root, got {listing:?}"
    );
    let pid = daemon_pid(&s.markers)?;
    check!(process_alive(pid), "expected daemon {pid} to be running");

    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&s.mnt)
        .status()
        .map_err(|e| format!("fusermount3: {e}"))?;
    check!(st.success(), "fusermount3 -u failed: {st}");
    wait_until("the mount is gone", || mount_entry(&s.mnt).is_none())?;
    wait_until("the daemon has exited", || !process_alive(pid))?;
    check!(
        s.markers.join("destroyed").exists(),
        "expected destroy() to have run after fusermount3 -u"
    );
    Ok(())
}

/// SIGTERM to the daemon unmounts cleanly and runs `destroy`.
fn sigterm_unmounts_cleanly() -> TestResult {
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        let s = scratch()?;
        let _guard = MountGuard(s.mnt.clone());
        let out = pershomefs(&[os(&s.backing), os(&s.mnt)], Some(&s.markers))?;
        check!(out.code == Some(0), "expected exit 0, got {out}");
        let pid = daemon_pid(&s.markers)?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .map_err(|e| format!("kill {pid}: {e}"))?;
        wait_until("the mount is gone", || mount_entry(&s.mnt).is_none())?;
        wait_until("the daemon has exited", || !process_alive(pid))?;
        check!(
            s.markers.join("destroyed").exists(),
            "expected destroy() to have run after {signal}"
        );
    }
    Ok(())
}

/// With -f the process stays in the foreground; SIGINT (Ctrl-C) unmounts and it exits 0.
fn foreground_and_sigint() -> TestResult {
    let s = scratch()?;
    let _guard = MountGuard(s.mnt.clone());
    let mut cmd = pershomefs_command(
        &[os(&s.backing), os(&s.mnt), OsStr::new("-f")],
        Some(&s.markers),
    )?;
    let errfile = tempfile::NamedTempFile::new().map_err(|e| format!("tempfile: {e}"))?;
    cmd.stdout(Stdio::null())
        .stderr(errfile.reopen().map_err(|e| format!("reopen: {e}"))?);
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let result = (|| -> TestResult {
        wait_until("the foreground mount appears", || is_pershome_mount(&s.mnt))?;
        // The mount is in mountinfo before the kernel's INIT reaches the daemon, whose
        // init() writes the pid marker: wait for it too (CI once read it too early).
        wait_until("the daemon's pid marker", || daemon_pid(&s.markers).is_ok())?;
        check!(
            daemon_pid(&s.markers)? == child.id(),
            "expected the foreground process itself to serve the mount"
        );
        check!(
            matches!(child.try_wait(), Ok(None)),
            "expected pershomefs -f to keep running"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .map_err(|e| format!("kill: {e}"))?;
        wait_until("the mount is gone", || mount_entry(&s.mnt).is_none())?;
        let mut status = None;
        wait_until("pershomefs -f exits", || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        })?;
        let stderr = std::fs::read_to_string(errfile.path()).unwrap_or_default();
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "expected exit 0 after SIGINT, got {status:?}; stderr {stderr:?}"
        );
        check!(
            stderr.contains("mounted") && stderr.contains("unmounted"),
            "expected the foreground log on stderr, got {stderr:?}"
        );
        check!(
            s.markers.join("destroyed").exists(),
            "expected destroy() to have run after SIGINT"
        );
        Ok(())
    })();
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

/// Options reach the kernel: ro, noexec, noatime, allow_other, an fsname with an escaped
/// comma, and uid/gid reach the opener.
fn options_reach_the_kernel() -> TestResult {
    let s = scratch()?;
    let _guard = MountGuard(s.mnt.clone());
    let out = pershomefs(
        &[
            os(&s.backing),
            os(&s.mnt),
            OsStr::new("-o"),
            OsStr::new(r"ro,noexec,noatime,fsname=my\,stick"),
            OsStr::new("-o"),
            OsStr::new("allow_other,uid=1234,gid=4321,commit=2,x-systemd.automount,subtype=x"),
        ],
        Some(&s.markers),
    )?;
    check!(out.code == Some(0), "expected exit 0, got {out}");
    let entry = mount_entry(&s.mnt).ok_or("expected a mount, found none")?;
    for flag in ["ro", "noexec", "noatime", "nosuid", "nodev"] {
        check!(
            entry.mount_options.iter().any(|o| o == flag),
            "expected {flag} in {entry:?}"
        );
    }
    check!(
        entry.super_options.iter().any(|o| o == "allow_other"),
        "expected allow_other in {entry:?}"
    );
    check!(
        entry.fstype == "fuse.pershomefs" && entry.source == "my,stick",
        "expected fuse.pershomefs from my,stick, got {entry:?}"
    );
    let meta = std::fs::metadata(&s.mnt).map_err(|e| format!("stat: {e}"))?;
    check!(
        (meta.uid(), meta.gid()) == (1234, 4321),
        "expected the root owned by 1234:4321, got {}:{}",
        meta.uid(),
        meta.gid()
    );
    Ok(())
}

/// Every check before mounting: its exit code, its message, and no mount.
fn refusals_leave_no_mount() -> TestResult {
    let s = scratch()?;
    let _guard = MountGuard(s.mnt.clone());
    let file = s.backing.parent().ok_or("no parent")?.join("plainfile");
    std::fs::write(&file, "x").map_err(|e| format!("write: {e}"))?;
    let missing = s.backing.with_file_name("missing");
    let inside = s.backing.join("sub");
    std::fs::create_dir(&inside).map_err(|e| format!("mkdir: {e}"))?;
    let newer = scratch()?;
    std::fs::write(newer.backing.join(NEWER_FORMAT_FILE), "").map_err(|e| format!("write: {e}"))?;

    let o = |s: &'static str| OsString::from(s);
    let p = |p: &Path| p.as_os_str().to_owned();
    let cases: Vec<(&str, Vec<OsString>, i32, &str)> =
        vec![
        ("no arguments", vec![], 1, "Usage"),
        ("one argument", vec![p(&s.backing)], 1, "MOUNTPOINT"),
        (
            "unknown option",
            vec![p(&s.backing), p(&s.mnt), o("-o"), o("ro,bogus")],
            1,
            "`bogus`",
        ),
        (
            "commit=0",
            vec![p(&s.backing), p(&s.mnt), o("-o"), o("commit=0")],
            1,
            "commit=0",
        ),
        (
            "missing backing",
            vec![p(&missing), p(&s.mnt)],
            2,
            "does not exist: is the stick mounted? Create the directory with `pershome prepare`.",
        ),
        ("backing is a file", vec![p(&file), p(&s.mnt)], 2, "is not a directory"),
        (
            "missing mountpoint",
            vec![p(&s.backing), p(&missing)],
            2,
            "MOUNTPOINT",
        ),
        (
            "mountpoint is a file",
            vec![p(&s.backing), p(&file)],
            2,
            "is not a directory",
        ),
        (
            "mountpoint inside backing",
            vec![p(&s.backing), p(&inside)],
            2,
            "inside BACKING",
        ),
        (
            "newer metadata format",
            vec![p(&newer.backing), p(&s.mnt)],
            3,
            "newer than this pershome understands",
        ),
        (
            "newer metadata format, foreground",
            vec![p(&newer.backing), p(&s.mnt), o("-f")],
            3,
            "newer than this pershome understands",
        ),
    ];
    let mut failures = Vec::new();
    for (name, args, code, needle) in cases {
        let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
        let out = pershomefs(&args, None)?;
        if out.code != Some(code) || !out.stderr.contains(needle) {
            failures.push(format!(
                "{name}: expected exit {code} and {needle:?} on stderr, got {out}"
            ));
        }
        for mnt in [&s.mnt, &inside] {
            if is_pershome_mount(mnt) {
                failures.push(format!("{name}: left a mount on {}", mnt.display()));
            }
        }
    }
    check!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// `--help` documents the options and the exit codes; `-V` prints the version.
fn help_and_version() -> TestResult {
    let out = pershomefs(&[OsStr::new("--help")], None)?;
    check!(
        out.code == Some(0)
            && out.stdout.contains("Exit status")
            && out.stdout.contains("commit=SECONDS"),
        "expected --help on stdout with exit 0, got {out}"
    );
    let out = pershomefs(&[OsStr::new("-V")], None)?;
    check!(
        out.code == Some(0) && out.stdout.contains(env!("CARGO_PKG_VERSION")),
        "expected the version with exit 0, got {out}"
    );
    Ok(())
}

/// A BACKING on a read-only filesystem is refused without `ro` and mounts with it.
fn read_only_backing() -> TestResult {
    let s = scratch()?;
    let ro_backing = s.backing.with_file_name("ro-backing");
    std::fs::create_dir(&ro_backing).map_err(|e| format!("mkdir: {e}"))?;
    let mount = |args: &[&str]| -> Result<(), String> {
        let st = Command::new("mount")
            .args(args)
            .status()
            .map_err(|e| format!("mount: {e}"))?;
        check!(st.success(), "mount {args:?} failed: {st}");
        Ok(())
    };
    let target = ro_backing.to_string_lossy().into_owned();
    let source = s.backing.to_string_lossy().into_owned();
    mount(&["--bind", &source, &target])?;
    // A guard for the bind mount too (umount -l works on any type).
    struct BindGuard(PathBuf);
    impl Drop for BindGuard {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _bind = BindGuard(ro_backing.clone());
    mount(&["-o", "remount,bind,ro", &target])?;
    let _guard = MountGuard(s.mnt.clone());

    let out = pershomefs(&[os(&ro_backing), os(&s.mnt)], None)?;
    check!(
        out.code == Some(2) && out.stderr.contains("read-only") && out.stderr.contains("-o ro"),
        "expected exit 2 and a read-only message, got {out}"
    );
    check!(
        !is_pershome_mount(&s.mnt),
        "expected no mount after the refusal"
    );

    let out = pershomefs(
        &[
            os(&ro_backing),
            os(&s.mnt),
            OsStr::new("-o"),
            OsStr::new("ro"),
        ],
        None,
    )?;
    check!(out.code == Some(0), "expected -o ro to mount, got {out}");
    let entry = mount_entry(&s.mnt).ok_or("expected a mount with -o ro")?;
    check!(
        entry.mount_options.iter().any(|o| o == "ro"),
        "expected ro in {entry:?}"
    );
    Ok(())
}

/// As an ordinary user the mount goes through fusermount3 and still shows fuse.pershomefs;
/// allow_other without `user_allow_other` in /etc/fuse.conf is a mount failure (exit 4).
fn non_root_through_fusermount3() -> TestResult {
    let s = scratch()?;
    let nobody = 65534u32;
    let root = s.backing.parent().ok_or("no parent")?;
    for d in [root, &s.backing, &s.mnt, &s.markers] {
        std::os::unix::fs::chown(d, Some(nobody), Some(nobody))
            .map_err(|e| format!("chown {d:?}: {e}"))?;
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod: {e}"))?;
    let _guard = MountGuard(s.mnt.clone());
    let as_nobody = |extra: &[&str]| -> Result<Outcome, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(exe)
            .arg(CHILD_FLAG)
            .arg(&s.backing)
            .arg(&s.mnt)
            .args(extra)
            .env(MARKERS_ENV, &s.markers)
            .env_remove("PERSHOME_LOG")
            .stdin(Stdio::null());
        run(cmd)
    };
    let user_allow_other = std::fs::read_to_string("/etc/fuse.conf")
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == "user_allow_other");
    if !user_allow_other {
        let out = as_nobody(&["-o", "allow_other"])?;
        check!(
            out.code == Some(4) && out.stderr.contains("user_allow_other"),
            "expected exit 4 naming user_allow_other, got {out}"
        );
        check!(!is_pershome_mount(&s.mnt), "expected no mount after exit 4");
    }
    // A BACKING the user cannot write to is refused before anything is opened.
    let root_owned = root.join("root-owned");
    std::fs::create_dir(&root_owned).map_err(|e| format!("mkdir: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .arg(CHILD_FLAG)
        .arg(&root_owned)
        .arg(&s.mnt)
        .stdin(Stdio::null());
    let out = run(cmd)?;
    check!(
        out.code == Some(2) && out.stderr.contains("not writable by you (uid 65534)"),
        "expected exit 2 for a BACKING nobody cannot write, got {out}"
    );
    check!(!is_pershome_mount(&s.mnt), "expected no mount after exit 2");

    // fusermount3 opens /dev/fuse with the user's rights: where /dev/fuse is root-only (some
    // containers; Debian makes it 0666), no ordinary user can mount FUSE at all.
    let dev_fuse_mode = std::fs::metadata("/dev/fuse")
        .map(|m| m.mode())
        .unwrap_or(0);
    if dev_fuse_mode & 0o006 != 0o006 {
        return Err(NotPassed::Skipped(format!(
            "/dev/fuse is mode {:o} here, so ordinary users cannot mount FUSE (checked only \
             the refusals before mounting: not writable, allow_other)",
            dev_fuse_mode & 0o777
        )));
    }
    let out = as_nobody(&["-o", "fsname=a\\,b"])?;
    check!(out.code == Some(0), "expected exit 0 as nobody, got {out}");
    let entry = mount_entry(&s.mnt).ok_or("expected a mount made by nobody")?;
    check!(
        entry.fstype == "fuse.pershomefs" && entry.source == "a,b",
        "expected fuse.pershomefs from a,b, got {entry:?}"
    );
    for flag in ["nosuid", "nodev"] {
        check!(
            entry.mount_options.iter().any(|o| o == flag),
            "expected {flag} in {entry:?}"
        );
    }
    let pid = daemon_pid(&s.markers)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| format!("kill: {e}"))?;
    wait_until("nobody's mount is gone", || mount_entry(&s.mnt).is_none())?;
    wait_until("nobody's daemon has exited", || !process_alive(pid))?;
    check!(
        s.markers.join("destroyed").exists(),
        "expected destroy() after SIGTERM"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The runner.

type Test = (&'static str, fn() -> TestResult);

const TESTS: &[Test] = &[
    ("help_and_version", help_and_version),
    ("refusals_leave_no_mount", refusals_leave_no_mount),
    (
        "daemon_mounts_and_fusermount_ends_it",
        daemon_mounts_and_fusermount_ends_it,
    ),
    ("sigterm_unmounts_cleanly", sigterm_unmounts_cleanly),
    ("foreground_and_sigint", foreground_and_sigint),
    ("options_reach_the_kernel", options_reach_the_kernel),
    ("read_only_backing", read_only_backing),
    ("non_root_through_fusermount3", non_root_through_fusermount3),
];

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == CHILD_FLAG) {
        let mut child_args = vec![OsString::from("pershomefs")];
        child_args.extend(args.into_iter().skip(2));
        return pershome::cli::pershomefs::main(child_args, open_test_fs);
    }
    // `cargo test -- NAME` filters by substring; libtest flags (--nocapture, ...) are ignored.
    let filter: Option<String> = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| !a.starts_with('-'))
        .map(str::to_owned);
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        println!("cli: these tests need root and /dev/fuse");
        return ExitCode::FAILURE;
    }
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, test) in TESTS {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let result = std::panic::catch_unwind(test)
            .unwrap_or_else(|_| Err(NotPassed::Failed("the test panicked".to_owned())));
        match result {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(NotPassed::Failed(why)) => {
                println!("test {name} ... FAILED\n{why}");
                failed += 1;
            }
            Err(NotPassed::Skipped(why)) => {
                println!("test {name} ... skipped: {why}");
                skipped += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
