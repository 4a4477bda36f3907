//! `/etc/ltsp/persistent_homes`: the administrator's list of users who get a stick home. One
//! user name per line; `#` starts a comment (a whole line, or after the name); blank lines are
//! allowed. A user may be listed more than once (it means the same).
//!
//! This module owns the file's syntax, the user-name rule, and its edits. Edits keep every
//! other line byte for byte (comments, blank lines, order), are atomic (a temporary file in the
//! same directory, fsync, rename, fsync of the directory: a crash leaves the old or the new
//! list, never half of one) and are serialised between concurrent runs by an exclusive `flock`
//! on the list's directory (the file itself is replaced by each edit, so it cannot carry the
//! lock). It never writes a list it could not parse: a malformed line is an error naming it.

use std::fs::{self, File};
use std::io;
#[cfg(test)]
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Where the list lives, relative to the root.
pub const LIST_PATH: &str = "etc/ltsp/persistent_homes";

/// The longest user name accepted (as useradd's default `LOGIN_NAME_MAX` - 1 on glibc is 255,
/// but utmp holds 32 bytes, so 32 is the portable limit).
pub const MAX_NAME_LEN: usize = 32;

/// Why a list could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// A line is neither blank, a comment, nor one valid user name. `line` is 1-based.
    #[error("{path}, line {line}: {message}")]
    Malformed {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A name given to add or remove is not a valid user name.
    #[error("{0}")]
    InvalidName(String),
    /// Reading, writing or locking failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks a user name against the POSIX portable user-name rule that `useradd` applies
/// (shadow 4.14+): characters from the portable filename set `A-Z a-z 0-9 . _ -`, not starting
/// with `-`, not `.` or `..`, not all digits (it would read as a uid), at most 32 bytes. A
/// trailing `$` (Samba machine accounts) is refused: a machine has no stick home.
pub fn check_user_name(name: &str) -> Result<(), String> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > MAX_NAME_LEN {
        "is longer than 32 characters"
    } else if name.starts_with('-') {
        "starts with '-'"
    } else if name == "." || name == ".." {
        "is . or .."
    } else if name.bytes().all(|b| b.is_ascii_digit()) {
        "is all digits (it would read as a user id)"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        "has a character outside A-Z a-z 0-9 . _ -"
    } else {
        return Ok(());
    };
    Err(format!("invalid user name {name:?}: it {why}"))
}

/// One line of the file, kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    /// The line without its newline.
    text: String,
    /// The user it names, if any.
    user: Option<String>,
}

/// A parsed list: every line as written, and which user each names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HomesList {
    lines: Vec<Line>,
    /// Whether the text ended without a newline (kept as is when unchanged lines are written).
    missing_final_newline: bool,
}

impl HomesList {
    /// Parses the text of a list; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<HomesList, ListError> {
        let mut lines = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let content = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
            let user = if content.is_empty() {
                None
            } else {
                let malformed = |message: String| ListError::Malformed {
                    path: path.to_owned(),
                    line: i + 1,
                    message,
                };
                if content.split_whitespace().nth(1).is_some() {
                    return Err(malformed(format!(
                        "{content:?} is more than one word; write one user name per line"
                    )));
                }
                check_user_name(content).map_err(malformed)?;
                Some(content.to_owned())
            };
            lines.push(Line {
                text: raw.trim_end_matches('\r').to_owned(),
                user,
            });
        }
        Ok(HomesList {
            lines,
            missing_final_newline: !text.is_empty() && !text.ends_with('\n'),
        })
    }

    /// The listed users, in file order, each once.
    pub fn users(&self) -> Vec<&str> {
        let mut seen = Vec::new();
        for user in self.lines.iter().filter_map(|l| l.user.as_deref()) {
            if !seen.contains(&user) {
                seen.push(user);
            }
        }
        seen
    }

    /// Whether `user` is listed.
    pub fn contains(&self, user: &str) -> bool {
        self.lines.iter().any(|l| l.user.as_deref() == Some(user))
    }

    /// Appends `user` unless it is listed; returns whether the list changed.
    pub fn add(&mut self, user: &str) -> Result<bool, ListError> {
        check_user_name(user).map_err(ListError::InvalidName)?;
        if self.contains(user) {
            return Ok(false);
        }
        self.lines.push(Line {
            text: user.to_owned(),
            user: Some(user.to_owned()),
        });
        // A changed file ends with a newline, as every line-oriented tool expects.
        self.missing_final_newline = false;
        Ok(true)
    }

    /// Removes every line naming `user` (with its trailing comment); returns whether the list
    /// changed. Lines around it, comments included, stay.
    pub fn remove(&mut self, user: &str) -> Result<bool, ListError> {
        check_user_name(user).map_err(ListError::InvalidName)?;
        let before = self.lines.len();
        self.lines.retain(|l| l.user.as_deref() != Some(user));
        let changed = self.lines.len() != before;
        if changed {
            self.missing_final_newline = false;
        }
        Ok(changed)
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            out.push_str(&line.text);
            out.push('\n');
        }
        // Keep an unchanged file byte for byte.
        if self.missing_final_newline {
            out.pop();
        }
        out
    }
}

/// Reads the list under `root`; a missing file is an empty list.
pub fn read(root: &Path) -> Result<HomesList, ListError> {
    let path = root.join(LIST_PATH);
    match fs::read_to_string(&path) {
        Ok(text) => HomesList::parse(&text, &path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HomesList::default()),
        Err(source) => Err(ListError::Io {
            what: "reading",
            path,
            source,
        }),
    }
}

/// The listed users under `root`, in file order, each once.
pub fn list(root: &Path) -> Result<Vec<String>, ListError> {
    Ok(read(root)?.users().into_iter().map(str::to_owned).collect())
}

/// Adds `user` to the list under `root` (creating the file and `etc/ltsp/` if needed);
/// returns whether it was added (false: already listed).
pub fn add(root: &Path, user: &str) -> Result<bool, ListError> {
    check_user_name(user).map_err(ListError::InvalidName)?;
    edit(root, |list| list.add(user))
}

/// Removes `user` from the list under `root`; returns whether it was listed.
pub fn remove(root: &Path, user: &str) -> Result<bool, ListError> {
    check_user_name(user).map_err(ListError::InvalidName)?;
    if !root.join(LIST_PATH).exists() {
        return Ok(false);
    }
    edit(root, |list| list.remove(user))
}

/// Reads, changes and atomically replaces the list, all under the directory lock.
fn edit(
    root: &Path,
    change: impl FnOnce(&mut HomesList) -> Result<bool, ListError>,
) -> Result<bool, ListError> {
    let path = root.join(LIST_PATH);
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.to_path_buf());
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| ListError::Io { what, path, source }
    };
    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let dir_file = File::open(&dir).map_err(io_err("opening", &dir))?;
    // Held until the function returns: the read, the change and the rename are one step for
    // every other pershome-config run.
    let _lock = Flock::lock(dir_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err("locking", &dir)(io::Error::from(errno)))?;

    let mut list = read(root)?;
    if !change(&mut list)? {
        return Ok(false);
    }
    crate::atomic_file::replace(&path, list.render().as_bytes(), 0o644).map_err(|source| {
        ListError::Io {
            what: "writing",
            path: path.clone(),
            source,
        }
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HomesList, ListError> {
        HomesList::parse(text, Path::new("persistent_homes"))
    }

    #[test]
    fn names() {
        for good in [
            "joseph",
            "a",
            "Anna.B",
            "_x",
            "x-1",
            "a_b.c",
            "1a",
            &"a".repeat(32),
        ] {
            assert_eq!(check_user_name(good), Ok(()), "expected {good:?} accepted");
        }
        for bad in [
            "",
            "-a",
            ".",
            "..",
            "123",
            "a b",
            "a/b",
            "a:b",
            "é",
            "a$",
            "a\n",
            &"a".repeat(33),
        ] {
            assert!(
                check_user_name(bad).is_err(),
                "expected {bad:?} refused, got Ok"
            );
        }
    }

    #[test]
    fn parse_keeps_everything_and_finds_users() {
        let text = "# students\n\njoseph\n  anna  # the teacher\n#bob\njoseph\nlast";
        let list = parse(text).expect("parses");
        assert_eq!(list.users(), vec!["joseph", "anna", "last"]);
        assert_eq!(list.render(), text, "unchanged list renders byte for byte");
        assert!(list.contains("anna") && !list.contains("bob"));
    }

    #[test]
    fn edits_keep_comments_and_order() {
        let text = "# students\njoseph # 3B\n\n# staff\nanna\n";
        let mut list = parse(text).expect("parses");
        assert!(list.add("zoe").expect("add"));
        assert!(!list.add("anna").expect("add again"));
        assert!(list.remove("joseph").expect("remove"));
        assert!(!list.remove("joseph").expect("remove again"));
        let expected = "# students\n\n# staff\nanna\nzoe\n";
        assert_eq!(list.render(), expected);
        // Adding to a file without a final newline starts a new line.
        let mut list = parse("anna").expect("parses");
        list.add("zoe").expect("add");
        assert_eq!(list.render(), "anna\nzoe\n");
    }

    #[test]
    fn malformed_lines_are_named() {
        let cases = [
            ("anna\njoe smith\n", 2, "more than one word"),
            ("# x\n\n\n-rf\n", 4, "starts with '-'"),
            ("a;b\n", 1, "character outside"),
            ("anna\n1000 # uid\n", 2, "all digits"),
        ];
        for (text, want_line, want_msg) in cases {
            match parse(text) {
                Err(ListError::Malformed { line, message, .. })
                    if line == want_line && message.contains(want_msg) => {}
                other => panic!(
                    "for {text:?}: expected Malformed at line {want_line} with \
                     {want_msg:?}, got {other:?}"
                ),
            }
        }
    }

    #[test]
    fn file_edits_are_atomic_and_keep_mode() {
        let root = tempfile::tempdir().expect("tempdir");
        assert_eq!(list(root.path()).expect("empty"), Vec::<String>::new());
        assert!(!remove(root.path(), "anna").expect("remove from no file"));
        assert!(add(root.path(), "anna").expect("add"));
        let path = root.path().join(LIST_PATH);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(add(root.path(), "bob").expect("add"));
        assert!(!add(root.path(), "bob").expect("add again"));
        assert_eq!(fs::read_to_string(&path).expect("read"), "anna\nbob\n");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640, "expected mode 640 kept, got {mode:o}");
        let leftovers: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, vec!["persistent_homes"], "no temp file left");
    }

    #[test]
    fn a_malformed_file_is_never_rewritten() {
        let root = tempfile::tempdir().expect("tempdir");
        let path = root.path().join(LIST_PATH);
        fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        fs::write(&path, "anna\nbad name\n").expect("write");
        assert!(matches!(
            add(root.path(), "zoe"),
            Err(ListError::Malformed { line: 2, .. })
        ));
        assert_eq!(fs::read_to_string(&path).expect("read"), "anna\nbad name\n");
        assert!(matches!(
            add(root.path(), "-x"),
            Err(ListError::InvalidName(_))
        ));
    }
}
