//! Helpers shared by the integration tests: the options of an in-process `Fs`, and, for the
//! tests that mount pershomefs for real, starting the binary, waiting for the kernel (never a
//! blind sleep), and making sure no mount or daemon outlives a test, even one that fails.

#![allow(dead_code)] // each test binary uses its own subset

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pershome::fs::{Fs, FsOptions};

/// The mounting user of the in-process tests: uid and gid 1000.
pub fn opts() -> FsOptions {
    FsOptions {
        uid: 1000,
        gid: 1000,
        read_only: false,
        commit_interval: Duration::from_secs(5),
        names: None,
        ..FsOptions::new(1000, 1000)
    }
}

/// Opens a backing directory in-process, as a mount by uid 1000 would.
pub fn open(backing: &Path) -> Fs {
    Fs::open_backing(backing, opts()).expect("open backing")
}

/// The line of /proc/self/mounts for `path`, if something is mounted there.
pub fn mounted(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let want = path.to_str()?;
    mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(want))
        .map(str::to_string)
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pids of pershomefs processes whose command line names `mountpoint`.
pub fn daemons_serving(mountpoint: &Path) -> Vec<i32> {
    let want = mountpoint.as_os_str().as_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let is_pershomefs = cmdline
                .split(|&b| b == 0)
                .next()
                .is_some_and(|a| a.ends_with(b"pershomefs"));
            is_pershomefs && cmdline.split(|&b| b == 0).any(|a| a == want)
        })
        .collect()
}

/// A mount of pershomefs; dropping it unmounts (lazily if the daemon is dead) and waits for
/// the daemon to exit: the daemon writes its last commit after the kernel lets go of the
/// mount, as the login hook must wait for before the stick is pulled.
pub struct Mount {
    pub mountpoint: PathBuf,
}

impl Mount {
    /// Runs `pershomefs BACKING MOUNTPOINT [-o OPTS]`; it must return with the mount ready.
    pub fn new(backing: &Path, mountpoint: &Path, opts: &str) -> Mount {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pershomefs"));
        cmd.arg(backing).arg(mountpoint);
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts);
        }
        let out = cmd.output().expect("run pershomefs");
        // The guard exists before the checks, so a half-made mount is cleaned up too.
        let guard = Mount {
            mountpoint: mountpoint.to_path_buf(),
        };
        assert!(
            out.status.success(),
            "pershomefs failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            mounted(mountpoint).is_some(),
            "pershomefs returned before the mount was there"
        );
        guard
    }

    pub fn unmount(self) {
        drop(self)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        let mp = self.mountpoint.clone();
        wait_until("the mount is gone", || mounted(&mp).is_none());
        wait_until("the daemon has exited", || daemons_serving(&mp).is_empty());
    }
}

/// Whether real mounts can run here (root and /dev/fuse); says why not when they cannot.
pub fn can_mount() -> bool {
    if pershome::testing::skip_without_root("a real mount") {
        return false;
    }
    // As root, a missing /dev/fuse is a broken machine, not a reason to skip.
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse");
    assert!(fuse.is_ok(), "real mounts need /dev/fuse: {fuse:?}");
    true
}

/// A stick directory (`stick/pershome`, the backing) and an empty mount point, in a temporary
/// directory under /var/tmp (a real disk: /tmp may be a tmpfs without user xattrs), removed
/// when dropped.
#[allow(dead_code)] // not every test binary mounts
pub struct Scratch {
    pub _dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
}

#[allow(dead_code)]
pub fn scratch(prefix: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("temporary directory in /var/tmp");
    let backing = dir.path().join("stick/pershome");
    let mnt = dir.path().join("home");
    std::fs::create_dir_all(&backing).expect("mkdir backing");
    std::fs::create_dir(&mnt).expect("mkdir mount point");
    Scratch {
        _dir: dir,
        backing,
        mnt,
    }
}
