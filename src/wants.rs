//! Whether a user wants a stick home: listed in `/etc/ltsp/persistent_homes`, or (when
//! `honour_user_file` is on) owner of a `$HOME/.persistent_home` file in the server home.
//! Also the user lookup under another root (`--root`), since `getpwnam` only knows `/`.
//!
//! This runs as root at every login, on a home directory the user controls. It must never
//! follow a symlink inside the home, never open or read the user's file (its existence is the
//! whole signal, so a fifo or a huge file cannot block or slow a login), and never hand a
//! user-controlled string to a shell. The rules for honouring `.persistent_home`:
//!
//! - it is looked up with `fstatat(home_fd, ".persistent_home", AT_SYMLINK_NOFOLLOW)` on a
//!   directory fd of the home, so a symlink is seen as a symlink and refused;
//! - it must be a regular file owned by the user, with one link: a hard link planted by
//!   someone else to a file the user owns (possible where `protected_hardlinks` is off) does
//!   not count;
//! - the home itself must be a directory owned by the user or root and not writable by group
//!   or others: in a home others can write, they could have planted the file.
//!
//! The home path comes from the password database (root's data), so the home directory itself
//! may be a symlink the administrator made (`/home/joseph -> /srv/homes/joseph`); only what is
//! inside it is the user's.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::sys::stat::{fstatat, SFlag};
use nix::unistd::{Gid, Uid, User};

use crate::homes_list::{self, ListError};
use crate::sysconfig::SystemConfig;

/// The file a user creates in the server home to ask for a stick home.
pub const USER_FILE: &str = ".persistent_home";

/// The answer: yes or no, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wants {
    /// The user gets a stick home.
    Yes(WhyYes),
    /// The user keeps the normal home.
    No(WhyNo),
}

/// Why a user wants a stick home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhyYes {
    /// Listed in `/etc/ltsp/persistent_homes`.
    Listed,
    /// Owns `$HOME/.persistent_home`.
    UserFile,
}

/// Why a user does not get a stick home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhyNo {
    /// Not listed, and no `$HOME/.persistent_home`.
    NotRequested,
    /// Not listed; `$HOME/.persistent_home` exists but `honour_user_file = false`.
    UserFileDisabled,
    /// Not listed; `$HOME/.persistent_home` exists but breaks a rule (the text says which).
    UserFileRefused(String),
    /// Not listed; the home could not be checked (e.g. root squashed on NFS). The text says
    /// why. The login goes on with the normal home rather than failing.
    HomeUnreadable(String),
}

impl Wants {
    /// Whether the answer is yes.
    pub fn yes(&self) -> bool {
        matches!(self, Wants::Yes(_))
    }
}

impl fmt::Display for Wants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wants::Yes(WhyYes::Listed) => write!(f, "yes: listed in /{}", homes_list::LIST_PATH),
            Wants::Yes(WhyYes::UserFile) => write!(f, "yes: $HOME/{USER_FILE} exists"),
            Wants::No(WhyNo::NotRequested) => write!(
                f,
                "no: not listed in /{} and no $HOME/{USER_FILE}",
                homes_list::LIST_PATH
            ),
            Wants::No(WhyNo::UserFileDisabled) => write!(
                f,
                "no: $HOME/{USER_FILE} exists but honour_user_file = false in \
                 /etc/pershome/config.toml"
            ),
            Wants::No(WhyNo::UserFileRefused(why)) => {
                write!(f, "no: $HOME/{USER_FILE} ignored: {why}")
            }
            Wants::No(WhyNo::HomeUnreadable(why)) => {
                write!(f, "no: the home could not be checked: {why}")
            }
        }
    }
}

/// Why the question could not be answered (the login hook logs it and falls back).
#[derive(Debug, thiserror::Error)]
pub enum WantsError {
    /// `/etc/ltsp/persistent_homes` is malformed or unreadable.
    #[error(transparent)]
    List(#[from] ListError),
}

/// Decides whether `user` wants a stick home. `root` is `/` except under `--root`, where the
/// user's home is looked for at `root` + `user.dir`.
pub fn wants_stick_home(root: &Path, user: &User, cfg: &SystemConfig) -> Result<Wants, WantsError> {
    if homes_list::read(root)?.contains(&user.name) {
        return Ok(Wants::Yes(WhyYes::Listed));
    }
    let home = under_root(root, &user.dir);
    let answer = match check_user_file(&home, user.uid) {
        UserFile::Absent => Wants::No(WhyNo::NotRequested),
        UserFile::Valid if cfg.honour_user_file => Wants::Yes(WhyYes::UserFile),
        UserFile::Valid => Wants::No(WhyNo::UserFileDisabled),
        UserFile::Refused(why) => Wants::No(WhyNo::UserFileRefused(why)),
        UserFile::Unreadable(why) => Wants::No(WhyNo::HomeUnreadable(why)),
    };
    Ok(answer)
}

/// `path` (absolute, from the password database) as seen under `root`.
pub fn under_root(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// What was found at `$HOME/.persistent_home`.
#[derive(Debug, PartialEq, Eq)]
enum UserFile {
    Absent,
    Valid,
    Refused(String),
    Unreadable(String),
}

fn check_user_file(home: &Path, uid: Uid) -> UserFile {
    // O_DIRECTORY: a home that is not a directory has no user file. The home path itself is
    // the administrator's (see the module doc), so it is followed; nothing below it is.
    let dir = match File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(home)
    {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return UserFile::Absent,
        Err(e) => return UserFile::Unreadable(format!("opening {}: {e}", home.display())),
    };
    let home_meta = match dir.metadata() {
        Ok(m) => m,
        Err(e) => return UserFile::Unreadable(format!("stat {}: {e}", home.display())),
    };
    let st = match fstatat(
        Some(dir.as_raw_fd()),
        USER_FILE,
        AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return UserFile::Absent,
        Err(e) => {
            return UserFile::Unreadable(format!(
                "stat {}: {}",
                home.join(USER_FILE).display(),
                io::Error::from(e)
            ))
        }
    };
    let kind = SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT);
    if kind != SFlag::S_IFREG {
        let what = if kind == SFlag::S_IFLNK {
            "it is a symlink"
        } else {
            "it is not a regular file"
        };
        return UserFile::Refused(what.into());
    }
    if st.st_uid != uid.as_raw() {
        return UserFile::Refused(format!(
            "it is owned by uid {}, not by the user (uid {})",
            st.st_uid, uid
        ));
    }
    if st.st_nlink != 1 {
        return UserFile::Refused(format!("it has {} hard links (one expected)", st.st_nlink));
    }
    if home_meta.uid() != uid.as_raw() && home_meta.uid() != 0 {
        return UserFile::Refused(format!(
            "the home {} is owned by uid {}, not by the user or root",
            home.display(),
            home_meta.uid()
        ));
    }
    if home_meta.mode() & 0o022 != 0 {
        return UserFile::Refused(format!(
            "the home {} is writable by group or others (mode {:o}), so someone else may \
             have put it there",
            home.display(),
            home_meta.mode() & 0o7777
        ));
    }
    UserFile::Valid
}

/// Looks a user up by name: through the system's NSS when `root` is `/`, else in
/// `root/etc/passwd` (what `useradd --root` edits). `Ok(None)` when there is no such user.
pub fn lookup_user(root: &Path, name: &str) -> io::Result<Option<User>> {
    if root == Path::new("/") {
        return User::from_name(name).map_err(io::Error::from);
    }
    let path = root.join("etc/passwd");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io::Error::new(e.kind(), format!("reading {path:?}: {e}"))),
    };
    Ok(text.lines().find_map(|line| parse_passwd_line(line, name)))
}

/// The user of one `/etc/passwd` line if it names `name` and is well formed.
fn parse_passwd_line(line: &str, name: &str) -> Option<User> {
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() != 7 || fields[0] != name {
        return None;
    }
    Some(User {
        name: fields[0].to_owned(),
        passwd: std::ffi::CString::new(fields[1]).ok()?,
        uid: Uid::from_raw(fields[2].parse().ok()?),
        gid: Gid::from_raw(fields[3].parse().ok()?),
        gecos: std::ffi::CString::new(fields[4]).ok()?,
        dir: PathBuf::from(fields[5]),
        shell: PathBuf::from(fields[6]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn passwd_lines() {
        let user = parse_passwd_line("anna:x:1001:100:Anna,,,:/home/anna:/bin/bash", "anna")
            .expect("parses");
        assert_eq!(
            (user.uid.as_raw(), user.gid.as_raw(), user.dir.clone()),
            (1001, 100, PathBuf::from("/home/anna"))
        );
        assert!(parse_passwd_line("anna:x:1001:100::/home/anna:/bin/sh", "bob").is_none());
        assert!(parse_passwd_line("anna:x:nope:100::/home/anna:/bin/sh", "anna").is_none());
        assert!(parse_passwd_line("anna:x:1:2", "anna").is_none());
    }

    #[test]
    fn user_file_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).expect("mkdir");
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let me = Uid::current();
        assert_eq!(check_user_file(&home, me), UserFile::Absent);
        assert_eq!(
            check_user_file(&dir.path().join("nope"), me),
            UserFile::Absent
        );
        let file = home.join(USER_FILE);
        std::fs::write(&file, "").expect("write");
        assert_eq!(check_user_file(&home, me), UserFile::Valid);
        let other = Uid::from_raw(me.as_raw().wrapping_add(4242));
        assert!(matches!(
            check_user_file(&home, other),
            UserFile::Refused(_)
        ));
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(
            matches!(check_user_file(&home, me), UserFile::Refused(ref w) if w.contains("writable")),
            "a world-writable home is refused"
        );
    }
}
