//! Choosing the stick for a user and making its `pershome/` directory reachable: a directory
//! given by the administrator (the thin-client case, and tests), or a removable device found
//! by `crate::stick::discover` and mounted at `/run/pershome/USER/raw/stick`.
//!
//! This module owns the choice among several sticks and the owner mark
//! (`pershome/.pershome/owner-name`). It never trusts the mark for anything but choosing: the
//! chosen stick is always mounted as the user who logs in, so a mark can at worst make the
//! hook *refuse* a stick, never hand one user's rights to another. A stick marked for another
//! user is refused even when it is the only one: a stick left in a workstation must not become
//! the next person's home (its `.bashrc` would run as them).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use anyhow::Result;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use super::mounts;
use crate::meta::layout::StoreLayout;
use crate::stick::discover::{self, Candidate};
use crate::stick::layout::find_pershome_dir;
use crate::stick::mount::{mount_stick, unmount_within};
use crate::sysconfig::SystemConfig;

/// The file in the store that names the stick's owner, written by the hook at first use (on
/// a long-name stick; an 8.3 stick's is `StoreLayout::owner_mark`, `OWNER.TXT`).
pub const OWNER_MARK: &str = "owner-name";

/// Where to look for the stick.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory standing for the stick (an sshfs mount of a thin client's stick, a test
    /// directory): its `pershome/` is used as it is, nothing is mounted.
    Directory(PathBuf),
    /// Removable block devices.
    Devices {
        /// `/sys/block` (another directory in tests).
        sys_block: PathBuf,
        /// Which filesystems count as a stick, and how they are mounted.
        config: SystemConfig,
    },
}

/// A stick ready for pershomefs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The `pershome/` directory (the backing).
    pub backing: PathBuf,
    /// What the hook mounted at `/run/pershome/USER/raw/stick`: the device, or (as root) the
    /// stick directory bound there; `None` when nothing was mounted (a user's own mount).
    pub mounted: Option<PathBuf>,
}

/// Why there is no usable stick; each is told to the user with the way to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// No removable FAT/exFAT device (or the configured directory does not exist).
    NoStick,
    /// A stick (or the directory) without a `pershome` directory at its top.
    NoPershomeDir(String),
    /// Only sticks marked as another user's home.
    OtherUsers(Vec<String>),
    /// Several unmarked sticks with `pershome/`: the hook cannot know which is the user's.
    Ambiguous(usize),
}

/// Opens `backing`'s store directory without following a symlink: `Ok(None)` when there is
/// none, `Err` when it is anything but a real directory (a symlink planted on an sshfs or ext4
/// "stick" would otherwise make root read or write wherever it points).
/// The store is that of either layout (`meta::layout`); the mark's name follows it.
fn open_store_dir(backing: &Path) -> std::io::Result<Option<(std::fs::File, StoreLayout)>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let found = crate::meta::layout::detect_path(backing)?;
    let Some(layout) = found.layout() else {
        return Ok(None);
    };
    let name = match (layout, found.short) {
        (StoreLayout::Short83, Some(listed)) => std::ffi::OsStr::from_bytes(&listed).to_owned(),
        _ => layout.store_dir().into(),
    };
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(backing.join(name))
    {
        Ok(dir) => Ok(Some((dir, layout))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The owner name marked in `backing`'s store, `None` when unmarked. The store directory and
/// the mark are opened without following symlinks, and at most 256 bytes are read; anything
/// unreadable counts as "marked for somebody else" (`Some("")`), which refuses rather than
/// guesses.
pub fn read_owner_mark(backing: &Path) -> Option<String> {
    let (dir, layout) = match open_store_dir(backing) {
        Ok(Some(found)) => found,
        Ok(None) => return None,
        Err(_) => return Some(String::new()),
    };
    let open = |name: &str| {
        openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
    };
    let mark = layout.owner_mark();
    let opened = match open(mark) {
        // A `msdos` stick copied to a case-sensitive file system keeps its listing's case.
        Err(nix::errno::Errno::ENOENT) if layout == StoreLayout::Short83 => {
            open(&mark.to_ascii_lowercase())
        }
        other => other,
    };
    let fd = match opened {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return None,
        Err(_) => return Some(String::new()),
    };
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Some(String::new());
    }
    let mut buf = Vec::new();
    if file.take(256).read_to_end(&mut buf).is_err() {
        return Some(String::new());
    }
    // Only the first line, without control characters: the name is shown in messages.
    let text = String::from_utf8_lossy(&buf);
    let first = text.lines().next().unwrap_or("").trim();
    Some(first.chars().filter(|c| !c.is_control()).collect())
}

/// Marks `backing` as `user`'s home (after a successful mount of an unmarked stick), so that
/// with several sticks plugged in the hook picks this one. Failures are only logged.
pub fn write_owner_mark(backing: &Path, user: &str) {
    let result = (|| -> std::io::Result<()> {
        let (dir, layout) = open_store_dir(backing)?
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        let fd = openat(
            Some(dir.as_raw_fd()),
            layout.owner_mark(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        std::io::Write::write_all(&mut file, format!("{user}\n").as_bytes())?;
        file.sync_all()
    })();
    match result {
        Ok(()) => tracing::info!("marked {} as the home of {user}", backing.display()),
        Err(e) => tracing::warn!("marking {} as the home of {user}: {e}", backing.display()),
    }
}

/// How one stick compares for `user`.
fn verdict(backing: &Path, user: &str) -> Verdict {
    match read_owner_mark(backing) {
        None => Verdict::Unmarked,
        Some(name) if name == user => Verdict::Mine,
        Some(name) => Verdict::Other(name),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Mine,
    Unmarked,
    Other(String),
}

/// Finds `user`'s stick and makes its `pershome/` reachable. For devices, a chosen stick stays
/// mounted at `mountpoint` (with owner `uid`/`gid`); every other one is unmounted again.
pub fn find(
    source: &Source,
    user: &str,
    uid: u32,
    gid: u32,
    mountpoint: &Path,
) -> Result<std::result::Result<Found, Missing>> {
    match source {
        Source::Directory(dir) => {
            if !dir.is_dir() {
                return Ok(Err(Missing::NoStick));
            }
            let Some(backing) = find_pershome_dir(dir)? else {
                return Ok(Err(Missing::NoPershomeDir(dir.display().to_string())));
            };
            if let Verdict::Other(name) = verdict(&backing, user) {
                return Ok(Err(Missing::OtherUsers(vec![name])));
            }
            if !nix::unistd::geteuid().is_root() {
                // A user mounting their own home (pam_mount as the user): the daemon runs as
                // them and has no more rights than they do, so the path is used as it is.
                return Ok(Ok(Found {
                    backing,
                    mounted: None,
                }));
            }
            // As root, bind it under the root-only /run/pershome/USER/raw/stick first, so that
            // nothing on the far side of an sshfs can redirect the root daemon.
            mounts::bind_stick_dir(&backing, mountpoint)?;
            Ok(Ok(Found {
                backing: mountpoint.to_path_buf(),
                mounted: Some(backing),
            }))
        }
        Source::Devices { sys_block, config } => {
            let candidates = discover::candidates(sys_block, &config.stick.filesystems)?;
            find_on_devices(&candidates, config, user, uid, gid, mountpoint)
        }
    }
}

fn find_on_devices(
    candidates: &[Candidate],
    config: &SystemConfig,
    user: &str,
    uid: u32,
    gid: u32,
    mountpoint: &Path,
) -> Result<std::result::Result<Found, Missing>> {
    if candidates.is_empty() {
        return Ok(Err(Missing::NoStick));
    }
    let mount = |c: &Candidate| -> Result<()> {
        mount_stick(&c.devnode, mountpoint, &config.stick_mount(c.fs, uid, gid))
    };
    let release = || {
        if let Err(e) = unmount_within(mountpoint, std::time::Duration::from_secs(5)) {
            tracing::warn!("unmounting a stick that is not {user}'s: {e:#}");
        }
    };
    let mut unmarked: Vec<&Candidate> = Vec::new();
    let mut others: Vec<String> = Vec::new();
    let mut without_dir: Vec<String> = Vec::new();
    for c in candidates {
        if let Err(e) = mount(c) {
            tracing::warn!("skipping {}: {e:#}", c.devnode.display());
            continue;
        }
        let backing = match find_pershome_dir(mountpoint) {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => {
                without_dir.push(c.devnode.display().to_string());
                release();
                continue;
            }
        };
        match verdict(&backing, user) {
            Verdict::Mine => {
                return Ok(Ok(Found {
                    backing,
                    mounted: Some(c.devnode.clone()),
                }))
            }
            Verdict::Unmarked => unmarked.push(c),
            Verdict::Other(name) => others.push(name),
        }
        release();
    }
    match unmarked.as_slice() {
        [only] => {
            mount(only)?;
            match find_pershome_dir(mountpoint)? {
                Some(backing) => Ok(Ok(Found {
                    backing,
                    mounted: Some(only.devnode.clone()),
                })),
                None => {
                    release();
                    Ok(Err(Missing::NoPershomeDir(
                        only.devnode.display().to_string(),
                    )))
                }
            }
        }
        [] if !others.is_empty() => Ok(Err(Missing::OtherUsers(others))),
        [] if !without_dir.is_empty() => Ok(Err(Missing::NoPershomeDir(without_dir.join(", ")))),
        [] => Ok(Err(Missing::NoStick)),
        many => Ok(Err(Missing::Ambiguous(many.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_source_and_owner_marks() -> Result<()> {
        let t = tempfile::tempdir()?;
        let src = Source::Directory(t.path().to_path_buf());
        let mp = t.path().join("mp");
        std::fs::create_dir(&mp)?;
        // As root the stick directory is bound on `mp`: undo that after every find, also
        // when an assertion fails.
        struct Unbind<'a>(&'a Path);
        impl Drop for Unbind<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let find_once = |user: &str| {
            let _unbind = Unbind(&mp);
            find(&src, user, 1, 1, &mp)
        };
        let got = find_once("alice")?;
        assert_eq!(
            got,
            Err(Missing::NoPershomeDir(t.path().display().to_string()))
        );
        let backing = t.path().join("pershome");
        std::fs::create_dir_all(backing.join(".pershome"))?;
        let expected = if nix::unistd::geteuid().is_root() {
            Ok(Found {
                backing: mp.clone(),
                mounted: Some(backing.clone()),
            })
        } else {
            Ok(Found {
                backing: backing.clone(),
                mounted: None,
            })
        };
        assert_eq!(find_once("alice")?, expected, "unmarked: used");
        write_owner_mark(&backing, "alice");
        assert_eq!(read_owner_mark(&backing).as_deref(), Some("alice"));
        assert_eq!(find_once("alice")?, expected, "marked for alice");
        let got = find_once("bob")?;
        assert_eq!(
            got,
            Err(Missing::OtherUsers(vec!["alice".into()])),
            "bob gets alice's stick?"
        );
        let gone = Source::Directory(t.path().join("nope"));
        assert_eq!(find(&gone, "alice", 1, 1, &mp)?, Err(Missing::NoStick));
        Ok(())
    }

    /// Regression guard: a mark that is a symlink (to a file naming the victim) is not
    /// followed; it counts as somebody else's stick.
    #[test]
    fn symlinked_owner_mark_is_refused() -> Result<()> {
        let t = tempfile::tempdir()?;
        let backing = t.path().join("pershome");
        std::fs::create_dir_all(backing.join(".pershome"))?;
        std::fs::write(t.path().join("name"), "alice\n")?;
        std::os::unix::fs::symlink(
            t.path().join("name"),
            backing.join(".pershome").join(OWNER_MARK),
        )?;
        assert_eq!(
            read_owner_mark(&backing).as_deref(),
            Some(""),
            "expected a refused mark"
        );
        Ok(())
    }

    /// A store directory that is a symlink (to a directory holding a file named like the
    /// mark) is neither read nor written through: root would otherwise show the start of any
    /// file in a message, or create files anywhere.
    #[test]
    fn symlinked_store_is_never_followed() -> Result<()> {
        let t = tempfile::tempdir()?;
        let backing = t.path().join("pershome");
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir_all(&backing)?;
        std::fs::create_dir_all(&elsewhere)?;
        std::fs::write(elsewhere.join(OWNER_MARK), "secret\n")?;
        std::os::unix::fs::symlink(&elsewhere, backing.join(".pershome"))?;
        let got = read_owner_mark(&backing);
        assert_eq!(
            got.as_deref(),
            Some(""),
            "expected a refused mark, got {got:?}"
        );
        std::fs::remove_file(elsewhere.join(OWNER_MARK))?;
        write_owner_mark(&backing, "alice");
        assert!(
            !elsewhere.join(OWNER_MARK).exists(),
            "expected no mark written through the symlink"
        );
        Ok(())
    }
}
