//! Choosing the stick for a user and making its `pershome/` directory reachable: a directory
//! given by the administrator (the thin-client case, and tests), or a removable device found
//! by `session::discover` and mounted at `/run/pershome/USER/stick`.
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

use anyhow::{Context, Result};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use super::discover::{self, Candidate};
use super::mounts;
use crate::sysconfig::SystemConfig;

/// The name of the directory a stick must have at its top level (any case).
pub const PERSHOME_DIR: &str = "pershome";

/// The file in the store that names the stick's owner, written by the hook at first use.
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
    /// The device the hook mounted, `None` for a directory stick.
    pub device: Option<PathBuf>,
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

/// The `pershome` directory at the top of `top` (any case, a real directory, not a symlink).
pub fn find_pershome_dir(top: &Path) -> Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(top) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("listing {}", top.display())),
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", top.display()))?;
        let name = entry.file_name();
        if !name
            .as_encoded_bytes()
            .eq_ignore_ascii_case(PERSHOME_DIR.as_bytes())
        {
            continue;
        }
        // file_type() does not follow symlinks.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.push(entry.path());
        }
    }
    // On a case-sensitive directory there could be `pershome` and `PERSHOME`: prefer the
    // lowercase one, then the first in byte order, so the choice is stable.
    found.sort();
    let exact = found.iter().position(|p| p.ends_with(PERSHOME_DIR));
    Ok(exact
        .map(|i| found[i].clone())
        .or_else(|| found.into_iter().next()))
}

/// The owner name marked in `backing`'s store, `None` when unmarked. The mark is read
/// without following symlinks and at most 256 bytes of it; anything unreadable counts as
/// "marked for somebody else" (`Some("")`), which refuses rather than guesses.
pub fn read_owner_mark(backing: &Path) -> Option<String> {
    let store = backing.join(crate::meta::STORE_DIR);
    let Ok(dir) = std::fs::File::open(&store) else {
        return None;
    };
    let fd = match openat(
        Some(dir.as_raw_fd()),
        OWNER_MARK,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) {
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
    Some(String::from_utf8_lossy(&buf).trim().to_owned())
}

/// Marks `backing` as `user`'s home (after a successful mount of an unmarked stick), so that
/// with several sticks plugged in the hook picks this one. Failures are only logged.
pub fn write_owner_mark(backing: &Path, user: &str) {
    let path = backing.join(crate::meta::STORE_DIR).join(OWNER_MARK);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags_nofollow()
        .open(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, format!("{user}\n").as_bytes())?;
            f.sync_all()
        });
    match result {
        Ok(()) => tracing::info!("marked {} as the home of {user}", backing.display()),
        Err(e) => tracing::warn!("marking {} as the home of {user}: {e}", path.display()),
    }
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW)
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
            Ok(match verdict(&backing, user) {
                Verdict::Other(name) => Err(Missing::OtherUsers(vec![name])),
                Verdict::Mine | Verdict::Unmarked => Ok(Found {
                    backing,
                    device: None,
                }),
            })
        }
        Source::Devices { sys_block, config } => {
            let fstypes: Vec<String> = config
                .stick
                .filesystems
                .iter()
                .map(|f| f.name().to_owned())
                .collect();
            let candidates = discover::candidates(sys_block, &fstypes)?;
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
        let fs = config
            .is_stick_fs(&c.fstype)
            .with_context(|| format!("{} is not a stick filesystem", c.fstype))?;
        mounts::mount_stick(&c.devnode, mountpoint, &config.stick_mount(fs, uid, gid))
    };
    let release = || {
        if let Err(e) = mounts::unmount_within(mountpoint, std::time::Duration::from_secs(5)) {
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
                    device: Some(c.devnode.clone()),
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
                    device: Some(only.devnode.clone()),
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
    fn pershome_dir_any_case_never_a_symlink() -> Result<()> {
        let t = tempfile::tempdir()?;
        assert_eq!(find_pershome_dir(t.path())?, None, "empty stick");
        std::os::unix::fs::symlink("/etc", t.path().join("pershome"))?;
        assert_eq!(
            find_pershome_dir(t.path())?,
            None,
            "a symlink is not the directory"
        );
        std::fs::create_dir(t.path().join("PerSHome"))?;
        assert_eq!(
            find_pershome_dir(t.path())?,
            Some(t.path().join("PerSHome"))
        );
        Ok(())
    }

    #[test]
    fn directory_source_and_owner_marks() -> Result<()> {
        let t = tempfile::tempdir()?;
        let src = Source::Directory(t.path().to_path_buf());
        let mp = t.path().join("unused");
        let got = find(&src, "alice", 1, 1, &mp)?;
        assert_eq!(
            got,
            Err(Missing::NoPershomeDir(t.path().display().to_string()))
        );
        let backing = t.path().join("pershome");
        std::fs::create_dir_all(backing.join(".pershome"))?;
        let expected = Ok(Found {
            backing: backing.clone(),
            device: None,
        });
        assert_eq!(find(&src, "alice", 1, 1, &mp)?, expected, "unmarked: used");
        write_owner_mark(&backing, "alice");
        assert_eq!(read_owner_mark(&backing).as_deref(), Some("alice"));
        assert_eq!(
            find(&src, "alice", 1, 1, &mp)?,
            expected,
            "marked for alice"
        );
        let got = find(&src, "bob", 1, 1, &mp)?;
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
}
