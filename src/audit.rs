//! The FAT audit of a backing tree: does everything under a directory fit on a FAT stick?
//!
//! This module owns the walk that checks design property 2 ("only FAT-legal things on the
//! stick") against a real directory tree. Tests run it over the backing directory after every
//! test that writes; `pershome fsck` uses it to report. It only reads: it never changes the
//! tree and never follows a symlink (a symlink is itself a finding, and following one could lead
//! the walk out of the tree or round in a loop).

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::fatrules::{self, MAX_DIR_ENTRIES, MAX_FILE_SIZE};
use crate::names::NameMode;

/// One thing in the tree that a FAT stick cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub path: PathBuf,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.what)
    }
}

/// Every problem under `root` (not `root` itself, which is the stick's `pershome/` directory
/// or a stand-in for it), sorted by path. An error is returned only when the tree cannot be
/// read; what is wrong with its contents is in the list.
pub fn audit_tree(root: &Path) -> io::Result<Vec<Problem>> {
    audit_tree_in(root, NameMode::Long)
}

/// As `audit_tree`, for a stick in the given naming mode. In 8.3 mode every name must also be a
/// valid upper-case 8.3 name (`fatrules::check_short_name`), the metadata store and everything
/// in it included: an 8.3 stick's store uses the 8.3 layout (docs/format.md § Naming modes).
pub fn audit_tree_in(root: &Path, mode: NameMode) -> io::Result<Vec<Problem>> {
    audit(root, mode == NameMode::Short83, false)
}

/// As `audit_tree_in`, for a tree as a mount of the stick lists it: in 8.3 mode a name passes
/// when it is an 8.3 name in any letter case, because Linux's `msdos` driver lists the
/// upper-case names it keeps on the disk in lower case (`pershome fsck` audits this way; the
/// tests, which see the disk's own names, use `audit_tree_in`).
pub fn audit_tree_as_listed(root: &Path, mode: NameMode) -> io::Result<Vec<Problem>> {
    audit(root, mode == NameMode::Short83, true)
}

fn audit(root: &Path, short_names: bool, any_case: bool) -> io::Result<Vec<Problem>> {
    let root_meta = fs::symlink_metadata(root).map_err(|e| context(e, "inspecting", root))?;
    if !root_meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", root.display()),
        ));
    }
    let mut problems = Vec::new();
    // An explicit stack rather than recursion: a deep tree must not overflow the stack. Each
    // directory carries whether its names must be 8.3 names.
    let mut pending = vec![(root.to_path_buf(), short_names)];
    while let Some((dir, short_names)) = pending.pop() {
        audit_dir(&dir, short_names, any_case, &mut problems, &mut pending)?;
    }
    problems.sort();
    Ok(problems)
}

fn audit_dir(
    dir: &Path,
    short_names: bool,
    any_case: bool,
    problems: &mut Vec<Problem>,
    pending: &mut Vec<(PathBuf, bool)>,
) -> io::Result<()> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| context(e, "listing", dir))? {
        let entry = entry.map_err(|e| context(e, "listing", dir))?;
        names.push(entry.file_name());
    }
    // Sorted so that which of two colliding names is reported is the same on every run.
    names.sort();

    // Every FAT subdirectory starts with `.` and `..` entries, which count against the limit.
    let mut slots = 2;
    let mut folded: HashMap<Vec<u8>, &[u8]> = HashMap::new();
    for name in &names {
        let name_bytes = name.as_bytes();
        let path = dir.join(name);
        let mut report = |what: String| {
            problems.push(Problem {
                path: path.clone(),
                what,
            })
        };
        if short_names {
            let shown = if any_case {
                name_bytes.to_ascii_uppercase()
            } else {
                name_bytes.to_vec()
            };
            if let Err(why) = fatrules::check_short_name(&shown) {
                report(format!("the name is not an upper-case 8.3 name: {why}"));
            }
        }

        if let Err(violation) = fatrules::check_name(name_bytes) {
            report(format!("the name is not FAT-legal: {violation}"));
        }
        if let Some(first) = folded.insert(fatrules::fold_key(name_bytes), name_bytes) {
            report(format!(
                "Windows folds this name and {:?} to the same name",
                String::from_utf8_lossy(first)
            ));
        }
        slots += fatrules::dir_entry_slots(&String::from_utf8_lossy(name_bytes));

        // `symlink_metadata` is lstat(2): a symlink is reported, never followed.
        let meta = fs::symlink_metadata(&path).map_err(|e| context(e, "inspecting", &path))?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            pending.push((path.clone(), short_names));
        } else if file_type.is_file() {
            if meta.nlink() > 1 {
                report(format!(
                    "a hard link (link count {}); FAT has no hard links",
                    meta.nlink()
                ));
            }
            if meta.len() > MAX_FILE_SIZE {
                report(format!(
                    "{} bytes, more than the {MAX_FILE_SIZE} bytes a FAT32 file can hold",
                    meta.len()
                ));
            }
        } else {
            report(format!(
                "a {}; FAT holds only regular files and directories",
                kind_name(file_type)
            ));
        }
    }
    if slots > MAX_DIR_ENTRIES {
        problems.push(Problem {
            path: dir.to_path_buf(),
            what: format!(
                "its names cost {slots} directory entries, more than the {MAX_DIR_ENTRIES} a FAT \
                 directory can hold"
            ),
        });
    }
    Ok(())
}

fn kind_name(file_type: fs::FileType) -> &'static str {
    if file_type.is_symlink() {
        "symlink"
    } else if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "file of unknown type"
    }
}

fn context(err: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{doing} {}: {err}", path.display()))
}

/// Panics listing every problem under `root`, or if it cannot be read. For tests.
pub fn assert_fat_clean(root: &Path) {
    assert_fat_clean_in(root, NameMode::Long)
}

/// As `assert_fat_clean`, with the 8.3 rules too in 8.3 mode. For tests.
pub fn assert_fat_clean_in(root: &Path, mode: NameMode) {
    match audit_tree_in(root, mode) {
        Ok(problems) if problems.is_empty() => {}
        Ok(problems) => {
            let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
            panic!(
                "expected a FAT-clean tree ({} names) under {}, got {} problem(s):\n{}",
                mode.as_str(),
                root.display(),
                problems.len(),
                list.join("\n")
            );
        }
        Err(err) => panic!("could not audit {}: {err}", root.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::fs::File;

    fn relative(root: &Path, problems: &[Problem]) -> Vec<(String, String)> {
        problems
            .iter()
            .map(|p| {
                let rel = p.path.strip_prefix(root).unwrap_or(&p.path);
                (rel.to_string_lossy().into_owned(), p.what.clone())
            })
            .collect()
    }

    /// Checks that the problems are exactly one per expected (path, fragment of `what`).
    fn assert_problems(root: &Path, expected: &[(&str, &str)]) {
        let problems = audit_tree(root).expect("audit of the test tree");
        let got = relative(root, &problems);
        let matches = got.len() == expected.len()
            && expected
                .iter()
                .all(|(path, what)| got.iter().any(|(p, w)| p == path && w.contains(what)));
        assert!(matches, "expected problems {expected:#?}\ngot {got:#?}");
    }

    #[test]
    fn clean_tree_has_no_problems() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        fs::create_dir_all(root.join("Documents/Projects")).expect("mkdir");
        fs::create_dir(root.join(".pershome")).expect("mkdir");
        File::create(root.join("Documents/report.odt")).expect("create");
        File::create(root.join("Documents/Projects/caf\u{e9} \u{1F600}.txt")).expect("create");
        File::create(root.join("Makefile")).expect("create");
        File::create(root.join("\u{F06D}akefile")).expect("create");
        File::create(root.join("CO\u{F04E}")).expect("create");
        let big = File::create(root.join("big.iso")).expect("create");
        big.set_len(MAX_FILE_SIZE)
            .expect("sparse file of the maximum size");
        assert_problems(root, &[]);
        assert_fat_clean(root);
    }

    #[test]
    fn illegal_names_are_flagged() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        fs::create_dir(root.join("sub")).expect("mkdir");
        for name in ["a:b", "a.", "b ", "CON", "sub/nul.txt", "x\u{1}y"] {
            File::create(root.join(name)).expect("create");
        }
        File::create(root.join(OsStr::from_bytes(&[0xff, b'a']))).expect("create");
        assert_problems(
            root,
            &[
                ("a:b", "':'"),
                ("a.", "ends in a dot or a space"),
                ("b ", "ends in a dot or a space"),
                ("CON", "DOS device name"),
                ("sub/nul.txt", "DOS device name"),
                ("x\u{1}y", "control character U+0001"),
                ("\u{FFFD}a", "not valid UTF-8"),
            ],
        );
    }

    #[test]
    fn short_name_mode_flags_every_name_that_is_not_upper_case_8_3() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        fs::create_dir_all(root.join("DOCS/SUB")).expect("mkdir");
        fs::create_dir_all(root.join("PERSHOME.DB/INODES")).expect("mkdir");
        fs::create_dir_all(root.join(".pershome/inodes")).expect("mkdir");
        fs::create_dir(root.join("DOCS/.pershome")).expect("mkdir");
        for name in [
            "REPORT.TXT",
            "LONGNA~1.TXT",
            "MAKEFILE",
            "DOCS/SUB/A_B.C",
            "DOCS/notes.txt",
            "DOCS/TOOLONGNAME.TXT",
            "DOCS/A.TEXT",
            "DOCS/A B.TXT",
            "PERSHOME.DB/00000001.JNL",
            "PERSHOME.DB/INODES/00000001.LNK",
            ".pershome/journal.0000000000000001",
        ] {
            File::create(root.join(name)).expect("create");
        }
        let got = audit_tree_in(root, NameMode::Short83).expect("audit");
        let got = relative(root, &got);
        // A long-name store is no exception any more: an 8.3 stick's store is 8.3 too.
        let expected = [
            (".pershome", "base \"\" is not 1 to 8"),
            (".pershome/inodes", "'i' is not an upper-case"),
            (
                ".pershome/journal.0000000000000001",
                "extension \"0000000000000001\"",
            ),
            ("DOCS/.pershome", "base \"\" is not 1 to 8"),
            ("DOCS/A B.TXT", "' ' is not an upper-case"),
            ("DOCS/A.TEXT", "extension \"TEXT\""),
            ("DOCS/TOOLONGNAME.TXT", "base \"TOOLONGNAME\""),
            ("DOCS/notes.txt", "'n' is not an upper-case"),
        ];
        let matches = got.len() == expected.len()
            && expected
                .iter()
                .all(|(path, what)| got.iter().any(|(p, w)| p == path && w.contains(what)));
        assert!(matches, "expected problems {expected:#?}\ngot {got:#?}");
        // The long-name audit of the same tree finds nothing.
        assert_problems(root, &[]);
    }

    #[test]
    fn case_folding_collisions_are_flagged() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        fs::create_dir(root.join("d")).expect("mkdir");
        for name in [
            "Makefile",
            "makefile",
            "d/\u{e9}cole",
            "d/\u{c9}COLE",
            "d/stra\u{df}e",
        ] {
            File::create(root.join(name)).expect("create");
        }
        // `Makefile` sorts before `makefile`, `ÉCOLE` before `école`: the later one is reported.
        assert_problems(
            root,
            &[
                ("makefile", "\"Makefile\""),
                ("d/\u{e9}cole", "\"\u{c9}COLE\""),
            ],
        );
    }

    #[test]
    fn special_files_hard_links_and_big_files_are_flagged() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        File::create(root.join("target")).expect("create");
        std::os::unix::fs::symlink("target", root.join("link")).expect("symlink");
        std::os::unix::fs::symlink("/", root.join("escape")).expect("symlink");
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).expect("socket");
        File::create(root.join("one")).expect("create");
        fs::hard_link(root.join("one"), root.join("two")).expect("hard link");
        let big = File::create(root.join("big.iso")).expect("create");
        big.set_len(MAX_FILE_SIZE + 1).expect("sparse file");
        assert_problems(
            root,
            &[
                ("link", "a symlink"),
                ("escape", "a symlink"),
                ("fifo", "a fifo"),
                ("sock", "a socket"),
                ("one", "link count 2"),
                ("two", "link count 2"),
                ("big.iso", "4294967296 bytes"),
            ],
        );
    }

    #[test]
    fn a_directory_with_too_many_entries_is_flagged() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        let full = root.join("full");
        fs::create_dir(&full).expect("mkdir");
        // 255-unit names cost 21 entries each: 3121 of them and `.`/`..` are 65,543 entries.
        for i in 0..3121 {
            let name = format!("{i:05}{}", "a".repeat(250));
            File::create(full.join(name)).expect("create");
        }
        assert_problems(root, &[("full", "65543 directory entries")]);
    }

    #[test]
    fn root_must_be_a_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("file");
        File::create(&file).expect("create");
        let got = audit_tree(&file);
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::InvalidInput),
            "expected InvalidInput, got {got:?}"
        );
    }

    #[test]
    #[should_panic(expected = "1 problem(s)")]
    fn assert_fat_clean_panics_on_a_problem() {
        let tmp = tempfile::tempdir().expect("tempdir");
        File::create(tmp.path().join("a?")).expect("create");
        assert_fat_clean(tmp.path());
    }
}
