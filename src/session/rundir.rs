//! The login hook's runtime directory, `/run/pershome/USER/` (under `--root` in tests): the
//! stick's mount point, the session count, what the hook mounted, and the message for the
//! desktop dialog.
//!
//! Layout, all created by root:
//! - `/run/pershome/` and `/run/pershome/USER/`: root-owned, mode 0711 (no listing, so other
//!   users cannot see who is logged in with a stick; traversable, so the user reaches the notice)
//! - `raw/`: root-owned 0700, and in it `raw/stick/`, the stick's mount point. The mount's
//!   own root takes the stick's modes (a vfat stick's belongs to the user), so the closed
//!   directory is the one *above* it: only root (the pershomefs daemon) reaches the raw stick,
//!   and nobody changes it behind the daemon's back
//! - `sessions`: root 0600, the number of open sessions of USER, guarded by `flock`
//! - `state`: root 0600, what the hook mounted (backing path, whether it mounted a stick)
//! - `notice`: owned by USER, 0400, the message the desktop dialog shows
//!
//! This module owns that layout. It never follows a symlink (every open is `O_NOFOLLOW`
//! relative to a directory descriptor it checked) and never accepts an existing entry that root
//! did not create: only root can write under /run, so anything else means tampering.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, fstat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Uid};

/// The runtime directory relative to the root (`/` on a real system).
pub const RUN_DIR: &str = "run/pershome";

/// The largest notice accepted when reading it back (it is a few lines of text).
const NOTICE_LIMIT: u64 = 64 * 1024;

/// Whether `name` may be used as a directory name under /run/pershome. PAM hands the hook
/// whatever user name a login program got; only names that are plain path components and
/// that the passwd database knows ever reach this module.
pub fn is_safe_component(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 256
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_control())
}

/// `/run/pershome/USER` of one user, opened and checked.
pub struct UserRunDir {
    path: PathBuf,
    dir: OwnedFd,
}

/// Opens (creating if needed) a root-owned directory `name` under `parent` with `mode`,
/// refusing anything that is not a directory owned by root.
fn ensure_root_dir(parent: &OwnedFd, parent_path: &Path, name: &str, mode: u32) -> Result<OwnedFd> {
    let shown = parent_path.join(name);
    match nix::sys::stat::mkdirat(
        Some(parent.as_raw_fd()),
        name,
        Mode::from_bits_truncate(mode),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(anyhow!("creating {}: {e}", shown.display())),
    }
    let fd = openat(
        Some(parent.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| {
        format!(
            "opening {} (it must be a directory, not a symlink)",
            shown.display()
        )
    })?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(fd.as_raw_fd()).with_context(|| format!("examining {}", shown.display()))?;
    if st.st_uid != 0 {
        bail!(
            "{} is owned by uid {}, not root: it was not made by pershome; remove it",
            shown.display(),
            st.st_uid
        );
    }
    if st.st_mode & 0o7777 != mode {
        fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
            .with_context(|| format!("setting the mode of {}", shown.display()))?;
    }
    Ok(fd)
}

/// `stick/` under the user's run directory: made and checked like the others, except while a
/// stick is mounted on it (a session is open). Then its owner and mode are the stick's root
/// directory's (the user's uid, from the mount's `uid=`), not the directory's, and must be
/// neither refused nor chmod'ed. Only root can mount there (the parent is root's and `stick/`
/// was 0700 root when the hook mounted it), so a mount on it is pershome's own. Found by the
/// QEMU login tests (vm-tests `day`: session close refused a real vfat stick's mount).
fn ensure_stick_dir(parent: &OwnedFd, parent_path: &Path) -> Result<()> {
    let shown = parent_path.join("stick");
    if let Ok(st) = nix::sys::stat::fstatat(
        Some(parent.as_raw_fd()),
        "stick",
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        let parent_st = fstat(parent.as_raw_fd())
            .with_context(|| format!("examining {}", parent_path.display()))?;
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && st.st_dev != parent_st.st_dev {
            return Ok(());
        }
    }
    ensure_root_dir(parent, parent_path, "stick", 0o700)
        .with_context(|| format!("preparing the stick mount point {}", shown.display()))
        .map(drop)
}

fn open_dir_path(path: &Path) -> Result<OwnedFd> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(OwnedFd::from(f))
}

impl UserRunDir {
    /// Creates (or opens) `ROOT/run/pershome/USER` and its `raw/stick/` mount point. Root only.
    pub fn create(root: &Path, user: &str) -> Result<UserRunDir> {
        if !is_safe_component(user) {
            bail!("refusing the user name {user:?}: it is not a plain file name");
        }
        let run = root.join("run");
        let run_fd = open_dir_path(&run)?;
        let base = ensure_root_dir(&run_fd, &run, "pershome", 0o711)?;
        let base_path = root.join(RUN_DIR);
        let dir = ensure_root_dir(&base, &base_path, user, 0o711)?;
        let path = base_path.join(user);
        let raw = ensure_root_dir(&dir, &path, "raw", 0o700)?;
        ensure_stick_dir(&raw, &path.join("raw"))?;
        Ok(UserRunDir { path, dir })
    }

    /// Opens an existing `ROOT/run/pershome/USER`; `None` when it does not exist.
    pub fn open(root: &Path, user: &str) -> Result<Option<UserRunDir>> {
        if !is_safe_component(user) {
            bail!("refusing the user name {user:?}: it is not a plain file name");
        }
        let path = root.join(RUN_DIR).join(user);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        Self::create(root, user).map(Some)
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the stick is mounted: `/run/pershome/USER/raw/stick`.
    pub fn stick_mountpoint(&self) -> PathBuf {
        self.path.join("raw/stick")
    }

    fn open_file(&self, name: &str, flags: OFlag, mode: u32) -> Result<File> {
        let fd = openat(
            Some(self.dir.as_raw_fd()),
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .with_context(|| format!("opening {}", self.path.join(name).display()))?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let st = fstat(file.as_raw_fd())
            .with_context(|| format!("examining {}", self.path.join(name).display()))?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            bail!("{} is not a regular file", self.path.join(name).display());
        }
        Ok(file)
    }

    /// Takes the user's session lock (an exclusive `flock` on `sessions`), which serializes
    /// the open and close of concurrent logins of the same user; it is released on drop.
    pub fn lock_sessions(&self) -> Result<SessionCount> {
        let file = self.open_file("sessions", OFlag::O_RDWR | OFlag::O_CREAT, 0o600)?;
        // SAFETY: flock on a descriptor we own; the result is checked. (The lock goes with
        // the descriptor when `SessionCount` is dropped.)
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}/sessions", self.path.display()));
        }
        Ok(SessionCount { file })
    }

    /// Writes `text` as a file `name` (mode `mode`, owner `owner`), replacing it atomically.
    fn write_file(
        &self,
        name: &str,
        text: &str,
        mode: u32,
        owner: Option<(Uid, Gid)>,
    ) -> Result<()> {
        let tmp = format!(".{name}.tmp");
        let _ = nix::unistd::unlinkat(
            Some(self.dir.as_raw_fd()),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        let mut f = self.open_file(
            &tmp,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            0o600,
        )?;
        let shown = self.path.join(name);
        f.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", shown.display()))?;
        if let Some((uid, gid)) = owner {
            fchown(f.as_raw_fd(), Some(uid), Some(gid))
                .with_context(|| format!("giving {} to uid {uid}", shown.display()))?;
        }
        fchmod(f.as_raw_fd(), Mode::from_bits_truncate(mode))
            .with_context(|| format!("setting the mode of {}", shown.display()))?;
        nix::fcntl::renameat(
            Some(self.dir.as_raw_fd()),
            tmp.as_str(),
            Some(self.dir.as_raw_fd()),
            name,
        )
        .with_context(|| format!("renaming into {}", shown.display()))?;
        Ok(())
    }

    fn remove_file(&self, name: &str) -> Result<()> {
        match nix::unistd::unlinkat(
            Some(self.dir.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(anyhow!("removing {}: {e}", self.path.join(name).display())),
        }
    }

    /// Leaves `text` for the desktop dialog, readable by the user only.
    pub fn write_notice(&self, text: &str, uid: Uid, gid: Gid) -> Result<()> {
        self.write_file("notice", text, 0o400, Some((uid, gid)))
    }

    /// Removes a notice of an earlier login.
    pub fn clear_notice(&self) -> Result<()> {
        self.remove_file("notice")
    }

    /// Records what the hook mounted, for the close.
    pub fn write_state(&self, state: &State) -> Result<()> {
        self.write_file("state", &state.to_text(), 0o600, None)
    }

    /// What the hook mounted, `None` when nothing is recorded.
    pub fn read_state(&self) -> Result<Option<State>> {
        match nix::sys::stat::fstatat(
            Some(self.dir.as_raw_fd()),
            "state",
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => bail!("examining {}/state: {e}", self.path.display()),
            Ok(_) => {}
        }
        let mut f = self.open_file("state", OFlag::O_RDONLY, 0)?;
        let mut text = String::new();
        f.read_to_string(&mut text)
            .with_context(|| format!("reading {}/state", self.path.display()))?;
        State::from_text(&text).map(Some)
    }

    /// Forgets the recorded state (after a complete close).
    pub fn clear_state(&self) -> Result<()> {
        self.remove_file("state")
    }
}

/// The session count of one user, held under its lock.
pub struct SessionCount {
    file: File,
}

impl SessionCount {
    /// The number of open sessions recorded (0 when the file is new or unreadable as a number,
    /// which errs towards unmounting at the next close rather than never).
    pub fn get(&mut self) -> Result<u32> {
        let mut text = String::new();
        self.file
            .seek(SeekFrom::Start(0))
            .context("reading the session count")?;
        self.file
            .read_to_string(&mut text)
            .context("reading the session count")?;
        Ok(text.trim().parse().unwrap_or(0))
    }

    /// Records `n` open sessions.
    pub fn set(&mut self, n: u32) -> Result<()> {
        self.file.set_len(0).context("writing the session count")?;
        self.file
            .seek(SeekFrom::Start(0))
            .context("writing the session count")?;
        self.file
            .write_all(format!("{n}\n").as_bytes())
            .context("writing the session count")
    }
}

/// What the hook mounted for a user, kept in `state` between open and close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The home directory pershomefs was mounted on.
    pub home: PathBuf,
    /// The backing directory (the stick's `pershome/`).
    pub backing: PathBuf,
    /// What the hook mounted at `stick/` (a device, or a stick directory bound there);
    /// `None` when nothing was mounted there.
    pub stick_mounted: Option<PathBuf>,
}

impl State {
    fn to_text(&self) -> String {
        let mut s = format!(
            "home={}\nbacking={}\n",
            self.home.display(),
            self.backing.display()
        );
        if let Some(d) = &self.stick_mounted {
            s.push_str(&format!("stick={}\n", d.display()));
        }
        s
    }

    fn from_text(text: &str) -> Result<State> {
        let mut home = None;
        let mut backing = None;
        let mut stick_mounted = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("home", v)) => home = Some(PathBuf::from(v)),
                Some(("backing", v)) => backing = Some(PathBuf::from(v)),
                Some(("stick", v)) => stick_mounted = Some(PathBuf::from(v)),
                _ => bail!("unexpected line {line:?} in the session state"),
            }
        }
        Ok(State {
            home: home.ok_or_else(|| anyhow!("session state without home="))?,
            backing: backing.ok_or_else(|| anyhow!("session state without backing="))?,
            stick_mounted,
        })
    }
}

/// Reads the notice the hook left for `user` under `root`, as the user: `None` when there is
/// none. Refuses a symlink, anything but a regular file, and a directory not owned by root.
pub fn read_notice(root: &Path, user: &str) -> Result<Option<String>> {
    if !is_safe_component(user) {
        bail!("refusing the user name {user:?}: it is not a plain file name");
    }
    let dir_path = root.join(RUN_DIR).join(user);
    let dir = match File::open(&dir_path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", dir_path.display())),
    };
    let st = fstat(dir.as_raw_fd()).with_context(|| format!("examining {}", dir_path.display()))?;
    if st.st_uid != 0 {
        bail!("{} is not owned by root: ignoring it", dir_path.display());
    }
    let fd = match openat(
        Some(dir.as_raw_fd()),
        "notice",
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(anyhow!("opening {}/notice: {e}", dir_path.display())),
    };
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let st = fstat(file.as_raw_fd())?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        bail!(
            "{}/notice is not a regular file: ignoring it",
            dir_path.display()
        );
    }
    let mut text = String::new();
    file.take(NOTICE_LIMIT)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}/notice", dir_path.display()))?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_as_components() {
        for ok in ["alice", "a.b", "joseph-2", "x_y"] {
            assert!(is_safe_component(ok), "{ok:?} should be accepted");
        }
        for bad in ["", ".", "..", "a/b", "../etc", "a\0b", "a\nb"] {
            assert!(!is_safe_component(bad), "{bad:?} should be refused");
        }
    }

    #[test]
    fn state_round_trip() -> Result<()> {
        let s = State {
            home: "/home/a".into(),
            backing: "/run/pershome/a/stick/PERSHOME".into(),
            stick_mounted: Some("/dev/sdb1".into()),
        };
        assert_eq!(State::from_text(&s.to_text())?, s);
        let d = State {
            stick_mounted: None,
            ..s
        };
        assert_eq!(State::from_text(&d.to_text())?, d);
        assert!(State::from_text("home=/h\n").is_err(), "backing= missing");
        assert!(State::from_text("junk\n").is_err(), "a junk line");
        Ok(())
    }

    /// Needs root (it creates root-owned directories and gives a file away).
    #[test]
    fn layout_modes_and_notice() -> Result<()> {
        if crate::testing::skip_without_root("layout_modes_and_notice") {
            return Ok(());
        }
        let t = tempfile::tempdir()?;
        std::fs::create_dir(t.path().join("run"))?;
        let run = UserRunDir::create(t.path(), "alice")?;
        let mode = |p: PathBuf| -> Result<u32> {
            use std::os::unix::fs::MetadataExt;
            Ok(std::fs::symlink_metadata(p)?.mode() & 0o7777)
        };
        let got = (
            mode(t.path().join(RUN_DIR))?,
            mode(run.path().to_path_buf())?,
            mode(run.path().join("raw"))?,
        );
        assert_eq!(
            got,
            (0o711, 0o711, 0o700),
            "modes of pershome/, USER/, stick/"
        );
        run.write_notice("no stick\n", Uid::from_raw(1234), Gid::from_raw(1234))?;
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(run.path().join("notice"))?;
        assert_eq!(
            (m.uid(), m.mode() & 0o777),
            (1234, 0o400),
            "notice owner and mode"
        );
        assert_eq!(
            read_notice(t.path(), "alice")?.as_deref(),
            Some("no stick\n")
        );
        run.clear_notice()?;
        assert_eq!(read_notice(t.path(), "alice")?, None);
        // A symlink planted as the notice is never followed.
        std::os::unix::fs::symlink("/etc/shadow", run.path().join("notice"))?;
        let got = read_notice(t.path(), "alice");
        assert!(got.is_err(), "expected a refused symlink, got {got:?}");
        let mut count = run.lock_sessions()?;
        assert_eq!(count.get()?, 0);
        count.set(2)?;
        assert_eq!(count.get()?, 2);
        Ok(())
    }
}
