//! The mounts the login hook makes and removes: the stick (mount(2) with an option string
//! built here, never a shell), pershomefs on the home directory (the `pershomefs` binary run
//! with an argument vector), and their bounded unmounting at logout.
//!
//! This module owns the mount flags that make a stick harmless (`nosuid`, `nodev`, `noexec`
//! are always set, whatever the configuration says), the checks on the home path before
//! anything is mounted over it, and every wait of the hook: each has a deadline, so a logout
//! never hangs forever. It never decides *whether* to mount (that is `session::hook`).

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::sysconfig::StickMount;

/// The mount flags every stick mount carries, whatever the configuration says. A stick is attacker-controlled: a setuid binary
/// or a device node on it must never gain power, no program runs from the raw stick, and
/// access times are never written (flash wear).
pub const STICK_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC)
    .union(MsFlags::MS_NOATIME);

/// Mounts `device` on `target` as `mount` (from [`SystemConfig::stick_mount`]) says, with
/// [`STICK_FLAGS`] always added.
///
/// [`SystemConfig::stick_mount`]: crate::sysconfig::SystemConfig::stick_mount
pub fn mount_stick(device: &Path, target: &Path, mount: &StickMount) -> Result<()> {
    let fstype = mount.fstype.name();
    nix::mount::mount(
        Some(device),
        target,
        Some(fstype),
        mount.flags | STICK_FLAGS,
        Some(mount.data.as_str()),
    )
    .map_err(|e| {
        anyhow!(
            "mounting {} ({fstype}, {}) on {}: {e}",
            device.display(),
            mount.options,
            target.display()
        )
    })
}

/// One line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes the octal escapes (`\040` for a space) of /proc mount tables.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Parses /proc/self/mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mountpoint = fields.get(4)?;
            Some(MountEntry {
                mountpoint: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(mountpoint))),
                fstype: (*fields.get(sep + 1)?).to_owned(),
                source: String::from_utf8_lossy(&unescape(fields.get(sep + 2)?)).into_owned(),
            })
        })
        .collect()
}

/// The topmost mount on `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path))
}

/// Checks that `home` may be mounted over for user `uid`: an absolute path whose every
/// ancestor is a real directory (no symlink) owned by root and writable by nobody else, and
/// which is itself a directory (not a symlink) owned by the user or root. Otherwise a user
/// could point the mount at another place (a symlinked `$HOME`, a home under a directory
/// they control and swap between the check and the mount).
pub fn check_home(home: &Path, uid: u32) -> Result<()> {
    if !home.is_absolute() {
        bail!(
            "the home directory {} is not an absolute path",
            home.display()
        );
    }
    let mut cur = PathBuf::from("/");
    let comps: Vec<_> = home.components().skip(1).collect();
    for (i, comp) in comps.iter().enumerate() {
        let std::path::Component::Normal(name) = comp else {
            bail!(
                "the home directory {} has a `.` or `..` component",
                home.display()
            );
        };
        let parent_meta = std::fs::symlink_metadata(&cur)
            .with_context(|| format!("examining {}", cur.display()))?;
        if parent_meta.uid() != 0 || parent_meta.mode() & 0o022 != 0 {
            bail!(
                "{} (above the home {}) is not a directory only root can change (owner uid {}, \
                 mode {:o}): refusing to mount over a home whose path a user could redirect",
                cur.display(),
                home.display(),
                parent_meta.uid(),
                parent_meta.mode() & 0o7777
            );
        }
        cur.push(name);
        let meta = std::fs::symlink_metadata(&cur)
            .with_context(|| format!("examining {}", cur.display()))?;
        if meta.file_type().is_symlink() {
            bail!(
                "{} is a symlink: refusing to mount a stick home through it (make the home a \
                 real directory)",
                cur.display()
            );
        }
        if !meta.is_dir() {
            bail!("{} is not a directory", cur.display());
        }
        if i + 1 == comps.len() && meta.uid() != uid && meta.uid() != 0 {
            bail!(
                "the home directory {} belongs to uid {}, not to the user (uid {uid})",
                home.display(),
                meta.uid()
            );
        }
    }
    Ok(())
}

/// The `pershomefs` binary: beside the running program (both live in /usr/bin, and in
/// target/debug for the tests), else the installed one.
pub fn pershomefs_binary() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let beside = dir.join("pershomefs");
            if beside.is_file() {
                return beside;
            }
        }
    }
    PathBuf::from("/usr/bin/pershomefs")
}

/// Mounts pershomefs over `backing` on `home` for `uid`/`gid` and returns once it serves
/// (pershomefs returns only when the mount is ready). `options` are extra `-o` words.
pub fn mount_pershomefs(backing: &Path, home: &Path, options: &[String]) -> Result<()> {
    let binary = pershomefs_binary();
    let output = Command::new(&binary)
        .arg(backing)
        .arg(home)
        .arg("-o")
        .arg(options.join(","))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} {} failed ({}): {}",
            binary.display(),
            backing.display(),
            home.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Asks pershomefs to commit the metadata now: `fsync` on the home's top directory is a
/// `fsyncdir`, which commits the gathered changes. A failure is only logged: the unmount
/// commits anyway.
pub fn commit(home: &Path) {
    match std::fs::File::open(home).and_then(|d| d.sync_all()) {
        Ok(()) => tracing::debug!("committed metadata of {}", home.display()),
        Err(e) => tracing::warn!("committing metadata of {}: {e}", home.display()),
    }
}

/// How an unmount ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// The mount is gone.
    Clean,
    /// Still busy when the time was up; detached lazily (it goes once the last user lets go).
    Lazily,
}

/// Unmounts `path`, retrying while it is busy until `within` has passed, then detaching it
/// lazily (MNT_DETACH) so a logout is never stuck on a process that keeps a file open.
/// `Ok(Clean)` also when nothing is mounted there.
pub fn unmount_within(path: &Path, within: Duration) -> Result<Unmounted> {
    let deadline = Instant::now() + within;
    loop {
        match nix::mount::umount2(path, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(Unmounted::Clean),
            Err(Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(Errno::EBUSY) => {
                nix::mount::umount2(path, MntFlags::MNT_DETACH)
                    .map_err(|e| anyhow!("detaching {}: {e}", path.display()))?;
                return Ok(Unmounted::Lazily);
            }
            Err(e) => return Err(anyhow!("unmounting {}: {e}", path.display())),
        }
    }
}

/// Waits until nothing holds the store lock of `backing` (`.pershome/`, locked by the
/// pershomefs daemon for its whole life), i.e. until the daemon has written its last commit
/// and exited. `Ok(false)` when `within` passed first. A missing store counts as free.
pub fn wait_store_free(backing: &Path, within: Duration) -> Result<bool> {
    let store = backing.join(crate::meta::STORE_DIR);
    let dir = match nix::fcntl::open(
        &store,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        // SAFETY: open returned a new descriptor that nothing else owns.
        Ok(fd) => unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
        Err(Errno::ENOENT) => return Ok(true),
        Err(e) => bail!("opening {}: {e}", store.display()),
    };
    let deadline = Instant::now() + within;
    loop {
        // SAFETY: flock on a descriptor we own; the result is checked.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("locking {}", store.display()));
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stick_mounts_are_always_harmless() {
        let cfg = crate::sysconfig::SystemConfig::default();
        let m = cfg.stick_mount(crate::sysconfig::StickFs::Vfat, 1001, 100);
        let flags = m.flags | STICK_FLAGS;
        for want in [
            MsFlags::MS_NOSUID,
            MsFlags::MS_NODEV,
            MsFlags::MS_NOEXEC,
            MsFlags::MS_NOATIME,
        ] {
            assert!(flags.contains(want), "expected {want:?} in {flags:?}");
        }
        for want in [
            "uid=1001",
            "gid=100",
            "umask=077",
            "utf8=1",
            "shortname=mixed",
            "flush",
        ] {
            assert!(
                m.data.split(',').any(|w| w == want),
                "expected {want} in {:?}",
                m.data
            );
        }
    }

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:52 / /home/a\\040b rw,nosuid,nodev shared:9 - fuse.pershomefs /run/x rw,user_id=0\n";
        let got = parse_mountinfo(text);
        let expected = vec![
            MountEntry {
                mountpoint: "/mnt1".into(),
                fstype: "ext3".into(),
                source: "/dev/root".into(),
            },
            MountEntry {
                mountpoint: "/home/a b".into(),
                fstype: "fuse.pershomefs".into(),
                source: "/run/x".into(),
            },
        ];
        assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
    }

    #[test]
    fn home_checks() -> Result<()> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return Ok(());
        }
        // /tmp is world-writable (sticky): a home under it is refused.
        let t = tempfile::tempdir()?;
        let got = check_home(t.path(), 0);
        assert!(
            got.is_err(),
            "expected a home under /tmp to be refused, got {got:?}"
        );
        // A root-only tree (under /run, which only root may write): accepted; a symlinked
        // home: refused.
        let root_dir = tempfile::Builder::new()
            .prefix("phhome")
            .tempdir_in("/run")?;
        std::fs::create_dir(root_dir.path().join("a"))?;
        std::os::unix::fs::symlink(root_dir.path().join("a"), root_dir.path().join("link"))?;
        let ok = check_home(&root_dir.path().join("a"), 0);
        assert!(ok.is_ok(), "expected a root-owned home to pass, got {ok:?}");
        let got = check_home(&root_dir.path().join("link"), 0);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("symlink")),
            "expected a symlinked home to be refused, got {got:?}"
        );
        let got = check_home(&root_dir.path().join("a"), 4242);
        assert!(
            got.is_ok(),
            "a root-owned home dir is accepted for any user: {got:?}"
        );
        Ok(())
    }
}
