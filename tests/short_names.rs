//! The `names=8.3` mode: a stick that only holds upper-case MS-DOS `NAME.EXT` names. In-process
//! tests of the filesystem over a temporary backing directory (as `fs_ops.rs`), then real
//! mounts of the binary (as `mount.rs`). Every test that writes ends with the 8.3 audit of the
//! whole backing tree, pershome's own store (`PERSHOME.DB/`, docs/format.md § Naming modes)
//! included.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pershome::audit::{assert_fat_clean_in, audit_tree_in};
use pershome::fs::{Attr, Ctx, Errno, Fs, FsOptions, Ino, OpenError, PartsMode, ROOT};
use pershome::names::NameMode;

mod common;
use common::{can_mount, opts, Mount, Scratch};

const USER: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 1,
    umask: 0,
};

fn show(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}

fn open_with(backing: &Path, names: Option<NameMode>) -> Result<Fs, OpenError> {
    Fs::open_backing(backing, FsOptions { names, ..opts() })
}

fn open83(backing: &Path) -> Fs {
    open_with(backing, Some(NameMode::Short83)).expect("open with names=8.3")
}

/// Unmount and mount again without the option: the stick's recorded mode must be adopted.
fn remount(fs: Fs, backing: &Path) -> Fs {
    fs.shutdown();
    drop(fs);
    let fs = open_with(backing, None).expect("reopen without names=");
    assert_eq!(
        fs.name_mode(),
        NameMode::Short83,
        "expected the stick's recorded mode 8.3 to be adopted, got {:?}",
        fs.name_mode()
    );
    fs
}

fn create_file(fs: &Fs, parent: Ino, name: &[u8], mode: u32, content: &[u8]) -> Attr {
    let (attr, fh) = fs
        .create(USER, parent, name, mode, libc::O_RDWR)
        .unwrap_or_else(|e| panic!("create {}: {e}", show(name)));
    if !content.is_empty() {
        fs.write(fh, 0, content).expect("write");
    }
    fs.release(fh).expect("release");
    attr
}

fn read_all(fs: &Fs, ino: Ino) -> Vec<u8> {
    let fh = fs.open(ino, libc::O_RDONLY).expect("open");
    let data = fs.read(fh, 0, 1 << 20).expect("read");
    fs.release(fh).expect("release");
    data
}

fn list(fs: &Fs, ino: Ino) -> Vec<Vec<u8>> {
    let fh = fs.opendir(ino).expect("opendir");
    let mut names: Vec<Vec<u8>> = fs
        .readdir(fh, 0)
        .expect("readdir")
        .into_iter()
        .map(|(_, e)| e.name)
        .filter(|n| n != b"." && n != b"..")
        .collect();
    fs.releasedir(fh);
    names.sort();
    names
}

/// Every name in the tree with its kind, mode and content (or symlink target).
fn snapshot(fs: &Fs) -> BTreeMap<Vec<Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT, Vec::new())];
    while let Some((dir, path)) = stack.pop() {
        for name in list(fs, dir) {
            let a = fs.lookup(dir, &name).expect("lookup of a listed name");
            let mut p: Vec<Vec<u8>> = path.clone();
            p.push(name);
            let what = match a.kind {
                pershome::fs::Kind::File => format!("{:?}", read_all(fs, a.ino)),
                pershome::fs::Kind::Symlink => format!("-> {:?}", fs.readlink(a.ino)),
                pershome::fs::Kind::Dir => {
                    stack.push((a.ino, p.clone()));
                    String::new()
                }
                _ => String::new(),
            };
            out.insert(
                p,
                format!("{:?} {:o} nlink {} {what}", a.kind, a.perm, a.nlink),
            );
        }
    }
    out
}

fn assert_same(before: &BTreeMap<Vec<Vec<u8>>, String>, after: &BTreeMap<Vec<Vec<u8>>, String>) {
    let show_path = |p: &Vec<Vec<u8>>| {
        p.iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut diffs = Vec::new();
    for (p, want) in before {
        match after.get(p) {
            Some(got) if got == want => {}
            Some(got) => diffs.push(format!("{}: expected {want}, got {got}", show_path(p))),
            None => diffs.push(format!("{}: vanished", show_path(p))),
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        diffs.push(format!("{}: appeared", show_path(p)));
    }
    assert!(
        diffs.is_empty(),
        "{} differences after a remount:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Backing names directly in `dir`, sorted.
fn backing_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list backing")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn hostile_names_round_trip_on_8_3_names() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open83(backing);
    assert_eq!(fs.name_mode(), NameMode::Short83);
    let sub = fs.mkdir(USER, ROOT, b"a directory", 0o750).unwrap();
    let mut expected = pershome::names::hostile_examples();
    expected.extend(
        [
            "report.txt",
            "longername.txt",
            "longername of mine.txt",
            ".bashrc",
            "pershome.db",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec()),
    );
    for (i, name) in expected.iter().enumerate() {
        for parent in [ROOT, sub.ino] {
            create_file(&fs, parent, name, 0o600 + (i as u32 % 8), name);
        }
    }
    create_file(&fs, ROOT, b".pershome", 0o600, b"mine");
    fs.symlink(USER, sub.ino, b"a link to the report", b"../report.txt")
        .unwrap();
    let before = snapshot(&fs);
    expected.sort();
    let mut in_sub = expected.clone();
    in_sub.push(b"a link to the report".to_vec());
    in_sub.sort();
    assert_eq!(list(&fs, sub.ino), in_sub, "names listed in a subdirectory");

    let fs = remount(fs, backing);
    assert_same(&before, &snapshot(&fs));
    assert_fat_clean_in(backing, NameMode::Short83);
    // Readable where possible: a lower-case 8.3 name is its own name upper-cased, and the
    // case twins of `Makefile` get distinct short names.
    let names = backing_names(&backing.join("ADIREC~1"));
    for want in [
        "REPORT.TXT",
        "MAKEFILE",
        "MAKEFI~1",
        "MAKEFI~2",
        "LONGER~1.TXT",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "expected {want} on the stick, got {names:?}"
        );
    }
    assert_eq!(
        std::fs::read(backing.join("ADIREC~1/REPORT.TXT")).unwrap(),
        b"report.txt"
    );
}

#[test]
fn the_naming_mode_is_recorded_on_the_stick() {
    let short = tempfile::tempdir().unwrap();
    let fs = open83(short.path());
    create_file(&fs, ROOT, b"Notes.txt", 0o644, b"x");
    fs.shutdown();
    drop(fs);
    match open_with(short.path(), Some(NameMode::Long)) {
        Err(e @ OpenError::NameMode { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("names=8.3") && msg.contains("without the names= option"),
                "expected an actionable refusal, got {msg:?}"
            );
        }
        Err(e) => panic!("expected a NameMode refusal, got {e}"),
        Ok(_) => panic!("expected names=long to be refused on an 8.3 stick, got a mount"),
    }
    let fs = open_with(short.path(), None).unwrap();
    assert_eq!(fs.name_mode(), NameMode::Short83);
    assert_eq!(list(&fs, ROOT), vec![b"Notes.txt".to_vec()]);
    drop(fs);

    let long = tempfile::tempdir().unwrap();
    let fs = open_with(long.path(), None).unwrap();
    assert_eq!(fs.name_mode(), NameMode::Long, "the default on a new stick");
    create_file(&fs, ROOT, b"Notes.txt", 0o644, b"x");
    fs.shutdown();
    drop(fs);
    let got = open_with(long.path(), Some(NameMode::Short83)).map(|_| ());
    assert!(
        matches!(
            got,
            Err(OpenError::NameMode {
                stick: NameMode::Long,
                asked: NameMode::Short83
            })
        ),
        "expected names=8.3 to be refused on a long-name stick, got {got:?}"
    );
    let fs = open_with(long.path(), Some(NameMode::Long)).unwrap();
    assert_eq!(list(&fs, ROOT), vec![b"Notes.txt".to_vec()]);
    drop(fs);
    assert_eq!(
        (backing_names(short.path()), backing_names(long.path())),
        (
            vec!["NOTES.TXT".to_string(), "PERSHOME.DB".to_string()],
            vec![".pershome".to_string(), "Notes.txt".to_string()]
        ),
        "expected the 8.3 store on the 8.3 stick and the long one on the other"
    );
    assert_fat_clean_in(short.path(), NameMode::Short83);
}

#[test]
fn names_made_elsewhere_show_as_a_dos_stick_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    drop(open83(backing));
    std::fs::write(backing.join("README.TXT"), b"dos").unwrap();
    std::fs::write(backing.join("Notes from Windows.txt"), b"vfat").unwrap();
    let fs = open_with(backing, None).unwrap();
    assert_eq!(
        list(&fs, ROOT),
        vec![b"Notes from Windows.txt".to_vec(), b"readme.txt".to_vec()],
        "a short name shows lower-cased, a long one as it is"
    );
    // The short name is taken: the same name cannot be made again, another case can.
    assert_eq!(
        fs.create(USER, ROOT, b"readme.txt", 0o644, libc::O_RDWR)
            .err(),
        Some(Errno::EEXIST)
    );
    create_file(&fs, ROOT, b"README.txt", 0o644, b"mine");
    let fs = remount(fs, backing);
    let readme = fs.lookup(ROOT, b"readme.txt").unwrap();
    assert_eq!(read_all(&fs, readme.ino), b"dos");
    let mine = fs.lookup(ROOT, b"README.txt").unwrap();
    assert_eq!(read_all(&fs, mine.ino), b"mine");
    // The long name made elsewhere is the only problem the 8.3 audit sees.
    let problems = audit_tree_in(backing, NameMode::Short83).unwrap();
    let paths: Vec<PathBuf> = problems.iter().map(|p| p.path.clone()).collect();
    assert_eq!(
        paths,
        vec![backing.join("Notes from Windows.txt")],
        "expected only the Windows name flagged, got {problems:?}"
    );
}

#[test]
fn renames_links_and_case_changes_keep_8_3_names() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open83(backing);
    let docs = fs.mkdir(USER, ROOT, b"Documents", 0o755).unwrap();
    let make = create_file(&fs, ROOT, b"Makefile", 0o644, b"all:");
    create_file(&fs, ROOT, b"makefile", 0o600, b"lower");
    // A case-only rename onto a free name, a move into a directory, an exchange.
    fs.rename(ROOT, b"Makefile", ROOT, b"MAKEFILE.old", 0)
        .unwrap();
    fs.rename(ROOT, b"makefile", docs.ino, b"Makefile", 0)
        .unwrap();
    fs.rename(ROOT, b"MAKEFILE.old", ROOT, b"makefile", 0)
        .unwrap();
    fs.link(make.ino, docs.ino, b"the same makefile, linked")
        .unwrap();
    create_file(&fs, docs.ino, b"a.txt", 0o644, b"a");
    create_file(&fs, docs.ino, b"b.txt", 0o644, b"b");
    fs.rename(
        docs.ino,
        b"a.txt",
        docs.ino,
        b"b.txt",
        libc::RENAME_EXCHANGE,
    )
    .unwrap();
    let before = snapshot(&fs);
    let fs = remount(fs, backing);
    assert_same(&before, &snapshot(&fs));
    let docs = fs.lookup(ROOT, b"Documents").unwrap();
    let a = fs.lookup(docs.ino, b"a.txt").unwrap();
    assert_eq!(read_all(&fs, a.ino), b"b", "exchanged contents");
    fs.unlink(docs.ino, b"the same makefile, linked").unwrap();
    let fs = remount(fs, backing);
    let make = fs.lookup(ROOT, b"makefile").unwrap();
    assert_eq!((read_all(&fs, make.ino), make.nlink), (b"all:".to_vec(), 1));
    assert_fat_clean_in(backing, NameMode::Short83);
}

#[test]
fn a_stick_listed_in_lower_case_keeps_its_records() {
    // Linux's `msdos` driver lists short names lower-cased; the records are keyed by the
    // upper-case names pershome made. Simulated on a directory by renaming between mounts.
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open83(backing);
    let d = fs.mkdir(USER, ROOT, b"Projects", 0o700).unwrap();
    create_file(&fs, d.ino, b"Report.txt", 0o640, b"r");
    fs.shutdown();
    drop(fs);
    std::fs::rename(backing.join("PROJECTS"), backing.join("projects")).unwrap();
    std::fs::rename(
        backing.join("projects/REPORT.TXT"),
        backing.join("projects/report.txt"),
    )
    .unwrap();
    let fs = open_with(backing, None).unwrap();
    let d = fs
        .lookup(ROOT, b"Projects")
        .expect("the recorded name of the directory");
    assert_eq!(d.perm, 0o700, "the directory's recorded mode");
    let r = fs.lookup(d.ino, b"Report.txt").expect("the recorded name");
    assert_eq!((r.perm, read_all(&fs, r.ino)), (0o640, b"r".to_vec()));
    drop(fs);
    assert_msdos_stick_clean(backing);
}

fn open83_parts(backing: &Path) -> Fs {
    Fs::open_backing(
        backing,
        FsOptions {
            names: Some(NameMode::Short83),
            parts: PartsMode::Always,
            part_size: 4096,
            ..opts()
        },
    )
    .expect("open with names=8.3,parts=always,part_size=4096")
}

/// Every path under `root`, relative, sorted (directories end in `/`).
fn backing_tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                out.push(format!("{rel}/"));
                stack.push(p);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// Renames every entry under `root` to `f(name)`, deepest first so that each parent path is
/// still the old one: `to_ascii_lowercase` shows a stick as Linux's `msdos` driver lists it;
/// `to_ascii_uppercase` gives back the names that driver keeps on the disk.
fn recase_tree(root: &Path, f: impl Fn(&str) -> String) {
    let mut paths: Vec<String> = backing_tree(root)
        .into_iter()
        .map(|p| p.trim_end_matches('/').to_string())
        .collect();
    paths.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for rel in paths {
        let (parent, name) = rel.rsplit_once('/').unwrap_or(("", &rel));
        let from = root.join(parent).join(name);
        let to = root.join(parent).join(f(name));
        if from != to {
            std::fs::rename(&from, &to)
                .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", from.display(), to.display()));
        }
    }
}

/// The 8.3 audit of a stick simulated as a `msdos` mount lists it: what that driver keeps on
/// the disk is the upper-case names, so the audit sees those.
fn assert_msdos_stick_clean(root: &Path) {
    recase_tree(root, |n| n.to_ascii_uppercase());
    assert_fat_clean_in(root, NameMode::Short83);
}

/// What a hard link, a symlink and a file in parts put in the store: all of it 8.3 names.
fn populate_store(fs: &Fs) {
    let docs = fs.mkdir(USER, ROOT, b"Documents", 0o755).unwrap();
    let a = create_file(fs, docs.ino, b"original.txt", 0o644, b"linked content");
    fs.link(a.ino, ROOT, b"a second name.txt").unwrap();
    fs.symlink(USER, ROOT, b"latest", b"Documents/original.txt")
        .unwrap();
    let big: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
    create_file(fs, docs.ino, b"Big Data.bin", 0o600, &big);
}

#[test]
fn hard_links_symlinks_and_parts_keep_the_whole_backing_8_3() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open83_parts(backing);
    populate_store(&fs);
    let before = snapshot(&fs);
    fs.shutdown();
    drop(fs);
    let tree = backing_tree(backing);
    for want in [
        "PERSHOME.DB/",
        "PERSHOME.DB/INODES/",
        "PERSHOME.DB/INODES/00000001.LNK",
        "PERSHOME.DB/PARTS/",
    ] {
        assert!(
            tree.contains(&want.to_string()),
            "expected {want} in the backing, got {tree:#?}"
        );
    }
    let parts: Vec<&String> = tree
        .iter()
        .filter(|p| p.starts_with("PERSHOME.DB/PARTS/") && p.ends_with("/00000003"))
        .collect();
    assert_eq!(
        parts.len(),
        1,
        "expected part 3 of the big file, got {tree:#?}"
    );
    assert_fat_clean_in(backing, NameMode::Short83);
    let fs = open83_parts(backing);
    assert_same(&before, &snapshot(&fs));
    // Undo the link and remove the parted file: the store stays 8.3 (and tidy).
    fs.unlink(ROOT, b"a second name.txt").unwrap();
    let docs = fs.lookup(ROOT, b"Documents").unwrap();
    fs.unlink(docs.ino, b"Big Data.bin").unwrap();
    let fs = remount(fs, backing);
    let docs = fs.lookup(ROOT, b"Documents").unwrap();
    let a = fs.lookup(docs.ino, b"original.txt").unwrap();
    assert_eq!(
        (read_all(&fs, a.ino), a.nlink),
        (b"linked content".to_vec(), 1)
    );
    drop(fs);
    assert_fat_clean_in(backing, NameMode::Short83);
}

#[test]
fn a_whole_stick_listed_in_lower_case_is_still_found_and_read() {
    // Linux's `msdos` driver shows every short name in lower case, pershome's own included:
    // simulated by renaming everything, store and all, between mounts.
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open83_parts(backing);
    populate_store(&fs);
    let before = snapshot(&fs);
    fs.shutdown();
    drop(fs);
    recase_tree(backing, |n| n.to_ascii_lowercase());
    assert!(backing.join("pershome.db/inodes/00000001.lnk").is_file());
    let fs = open_with(backing, None).expect("reopen a lower-cased 8.3 stick");
    assert_eq!(
        fs.name_mode(),
        NameMode::Short83,
        "expected pershome.db to be recognised as the 8.3 store"
    );
    assert_same(&before, &snapshot(&fs));
    assert!(
        fs.recovery_warnings().is_empty(),
        "expected a clean recovery, got {:?}",
        fs.recovery_warnings()
    );
    // The store goes on in the names the stick already has: no second store, no second
    // inodes directory beside the lower-case ones.
    create_file(&fs, ROOT, b"after.txt", 0o644, b"new");
    let a = fs.lookup(ROOT, b"latest").unwrap();
    assert_eq!(fs.readlink(a.ino).unwrap(), b"Documents/original.txt");
    fs.shutdown();
    drop(fs);
    let root = backing_names(backing);
    assert!(
        root.contains(&"pershome.db".to_string()) && !root.contains(&"PERSHOME.DB".to_string()),
        "expected only the lower-case store, got {root:?}"
    );
    let store = backing_names(&backing.join("pershome.db"));
    assert!(
        !store.iter().any(|n| n == "INODES" || n == "PARTS"),
        "expected no second store directory, got {store:?}"
    );
    let fs = open_with(backing, None).expect("reopen");
    let got = fs
        .lookup(ROOT, b"after.txt")
        .expect("the file made after the rename");
    assert_eq!(read_all(&fs, got.ino), b"new");
    // And fsck reads it as the fs shows it.
    drop(fs);
    let report = pershome::fsck::fsck(backing, &pershome::fsck::FsckOptions::default())
        .expect("fsck of a lower-cased stick");
    let left: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.class != pershome::fsck::Class::Note)
        .collect();
    assert!(left.is_empty(), "expected no problems, got {left:#?}");
    assert_msdos_stick_clean(backing);
}

#[test]
fn fsck_repair_recovers_into_8_3_names() {
    use pershome::fsck::{fsck, FsckOptions};
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open83_parts(backing);
    populate_store(&fs);
    fs.shutdown();
    drop(fs);
    // A crash left content no record names, and parts no file has.
    let store = backing.join("PERSHOME.DB");
    std::fs::write(store.join("INODES/000000AA.LNK"), b"orphan").unwrap();
    std::fs::create_dir(store.join("PARTS/000000AB")).unwrap();
    std::fs::write(store.join("PARTS/000000AB/00000001"), b"lost part").unwrap();
    let report = fsck(backing, &FsckOptions::default()).unwrap();
    let shown: Vec<&str> = report.findings.iter().map(|f| f.path.as_str()).collect();
    for want in [
        "PERSHOME.DB/INODES/000000AA.LNK",
        "PERSHOME.DB/PARTS/000000AB",
    ] {
        assert!(
            shown.contains(&want),
            "expected a finding at {want}, got {:#?}",
            report.findings
        );
    }
    let repaired = fsck(
        backing,
        &FsckOptions {
            repair: true,
            force: false,
        },
    )
    .unwrap();
    let left: Vec<_> = repaired.problems_left().collect();
    assert!(
        left.is_empty(),
        "problems left after a repair: {left:#?}; did {:#?}",
        repaired.repairs
    );
    assert_eq!(
        std::fs::read(backing.join("PHRECOV/000000AA.LNK")).ok(),
        Some(b"orphan".to_vec()),
        "the orphaned content moved; did {:#?}",
        repaired.repairs
    );
    assert_eq!(
        std::fs::read(backing.join("PHRECOV/000000AB.PRT/00000001")).ok(),
        Some(b"lost part".to_vec()),
        "the orphaned parts moved; did {:#?}",
        repaired.repairs
    );
    assert_fat_clean_in(backing, NameMode::Short83);
    // The home shows them as the stick does.
    let fs = open_with(backing, None).unwrap();
    let rec = fs.lookup(ROOT, b"phrecov").expect("the recovery directory");
    assert_eq!(
        list(&fs, rec.ino),
        vec![b"000000aa.lnk".to_vec(), b"000000ab.prt".to_vec()]
    );
}

#[test]
fn a_root_name_like_the_store_gets_another_short_name() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open83(backing);
    create_file(&fs, ROOT, b"pershome.db", 0o644, b"mine");
    let fs = remount(fs, backing);
    let mine = fs.lookup(ROOT, b"pershome.db").expect("the user's file");
    assert_eq!(read_all(&fs, mine.ino), b"mine");
    drop(fs);
    let root = backing_names(backing);
    assert_eq!(
        root.len(),
        2,
        "expected the store and the file, got {root:?}"
    );
    assert!(root.contains(&"PERSHOME.DB".to_string()), "got {root:?}");
    assert!(
        std::fs::symlink_metadata(backing.join("PERSHOME.DB"))
            .unwrap()
            .is_dir(),
        "the store stays the store"
    );
    assert_fat_clean_in(backing, NameMode::Short83);
}

#[test]
fn an_empty_long_store_becomes_an_8_3_store_at_the_first_8_3_mount() {
    // An interrupted first open can leave an empty `.pershome/`: nothing is recorded in it,
    // so the first mount still chooses.
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    std::fs::create_dir(backing.join(".pershome")).unwrap();
    let fs = open83(backing);
    create_file(&fs, ROOT, b"a.txt", 0o644, b"a");
    drop(fs);
    assert_eq!(backing_names(backing), vec!["A.TXT", "PERSHOME.DB"]);
    assert_fat_clean_in(backing, NameMode::Short83);
}

#[test]
fn a_store_of_the_pre_release_8_3_mode_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    std::fs::create_dir(backing.join(".pershome")).unwrap();
    std::fs::write(backing.join(".pershome/NAMES.83"), b"").unwrap();
    match open_with(backing, None) {
        Err(e @ OpenError::OldShortStore) => {
            let msg = e.to_string();
            assert!(
                msg.contains("NAMES.83"),
                "expected the marker named, got {msg:?}"
            );
        }
        Err(e) => panic!("expected OldShortStore, got {e}"),
        Ok(_) => panic!("expected a refusal, got a mount"),
    }
}

// ---------------------------------------------------------------------------------------------
// Real mounts
// ---------------------------------------------------------------------------------------------

fn scratch() -> Scratch {
    common::scratch("pershome-names83")
}

/// Every path under `root` with its mode, size and content.
fn describe(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = String::from_utf8_lossy(p.strip_prefix(root).unwrap().as_os_str().as_bytes())
                .into_owned();
            let content = if m.is_file() {
                format!("{:?}", std::fs::read(&p).unwrap())
            } else {
                String::new()
            };
            out.push(format!(
                "{rel:?} mode {:o} size {} {content}",
                m.mode(),
                m.size()
            ));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_real_mount_with_names_8_3_round_trips_hostile_names() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "names=8.3");
    let hostile = s.mnt.join("Hostile Names");
    std::fs::create_dir(&hostile).unwrap();
    for (i, name) in pershome::names::hostile_examples().into_iter().enumerate() {
        std::fs::write(hostile.join(OsStr::from_bytes(&name)), format!("file {i}")).unwrap();
    }
    std::fs::write(s.mnt.join("report.txt"), b"report").unwrap();
    std::os::unix::fs::symlink("report.txt", s.mnt.join("latest report")).unwrap();
    let before = describe(&s.mnt);
    m.unmount();
    assert_fat_clean_in(&s.backing, NameMode::Short83);
    assert_eq!(
        std::fs::read(s.backing.join("REPORT.TXT")).unwrap(),
        b"report"
    );

    // Without the option the stick's own mode is used.
    let m = Mount::new(&s.backing, &s.mnt, "");
    let after = describe(&s.mnt);
    assert_eq!(after, before, "the tree after a remount");
    m.unmount();

    // With the other mode the mount is refused, with a message that says what to do.
    let out = Command::new(env!("CARGO_BIN_EXE_pershomefs"))
        .arg(&s.backing)
        .arg(&s.mnt)
        .args(["-o", "names=long"])
        .output()
        .expect("run pershomefs");
    // A guard in case it did mount after all, so nothing outlives the test.
    let _guard = common::mounted(&s.mnt).map(|_| Mount {
        mountpoint: s.mnt.clone(),
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("names=8.3"),
        "expected names=long to be refused on an 8.3 stick, got {} with {stderr:?}",
        out.status
    );
}

#[test]
fn a_case_only_rename_keeps_the_short_name_and_records_the_new_name() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open83(backing);
    create_file(&fs, ROOT, b"report.txt", 0o644, b"r");
    let d = fs.mkdir(USER, ROOT, b"docs", 0o755).unwrap();
    create_file(&fs, d.ino, b"inner.txt", 0o600, b"i");
    fs.rename(ROOT, b"report.txt", ROOT, b"Report.TXT", 0)
        .unwrap();
    fs.rename(ROOT, b"docs", ROOT, b"Docs", 0).unwrap();
    let before = snapshot(&fs);
    let fs = remount(fs, backing);
    assert_same(&before, &snapshot(&fs));
    assert_eq!(
        backing_names(backing),
        vec!["DOCS", "PERSHOME.DB", "REPORT.TXT"]
    );
    // And back: the name that needs no record any more.
    fs.rename(ROOT, b"Report.TXT", ROOT, b"report.txt", 0)
        .unwrap();
    let before = snapshot(&fs);
    let fs = remount(fs, backing);
    assert_same(&before, &snapshot(&fs));
    assert_fat_clean_in(backing, NameMode::Short83);
}
