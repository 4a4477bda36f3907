//! `pershome fsck` over real stores: each test builds a backing with `Fs`, damages it by
//! hand, and checks what fsck reports, its exit code, and what `--repair` leaves behind.

use std::path::{Path, PathBuf};

use pershome::fs::{Ctx, Fs, Ino, ROOT};
use pershome::fsck::{self, exit_code, FsckOptions};

mod common;
use common::open;

const USER: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 1,
    umask: 0o022,
};

fn create(fs: &Fs, parent: Ino, name: &[u8], content: &[u8]) -> Ino {
    let (attr, fh) = fs
        .create(USER, parent, name, 0o640, libc::O_RDWR)
        .expect("create");
    if !content.is_empty() {
        fs.write(fh, 0, content).expect("write");
    }
    fs.release(fh).expect("release");
    attr.ino
}

/// A store with a directory, files and a hard-linked file, committed and closed.
fn realistic(backing: &Path) {
    let fs = open(backing);
    let docs = fs
        .mkdir(USER, ROOT, b"Documents", 0o750)
        .expect("mkdir")
        .ino;
    create(&fs, docs, b"report.odt", b"report");
    create(&fs, ROOT, b"notes.txt", b"notes");
    let shared = create(&fs, ROOT, b"shared", b"shared content");
    fs.link(shared, docs, b"shared-too").expect("link");
    fs.symlink(USER, ROOT, b"link", b"Documents")
        .expect("symlink");
    fs.shutdown();
}

/// Runs fsck in-process; returns the exit code and what it printed.
fn run(backing: &Path, repair: bool, force: bool) -> (u8, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = fsck::run(backing, &FsckOptions { repair, force }, &mut out, &mut err);
    (
        code,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

fn expect(backing: &Path, repair: bool, want: u8, contains: &[&str]) -> String {
    let (code, out, err) = run(backing, repair, false);
    assert_eq!(
        code, want,
        "expected exit {want}, got {code}\nstdout:\n{out}\nstderr:\n{err}"
    );
    for c in contains {
        assert!(
            out.contains(c) || err.contains(c),
            "expected output containing {c:?}, got\nstdout:\n{out}\nstderr:\n{err}"
        );
    }
    out
}

fn store_file(backing: &Path, prefix: &str) -> PathBuf {
    std::fs::read_dir(backing.join(".pershome"))
        .expect("read store")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("expected a {prefix}* file in the store"))
}

fn content_files(backing: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(backing.join(".pershome/inodes"))
        .map(|d| d.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_clean_store_prints_only_a_summary() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    let out = expect(tmp.path(), false, exit_code::CLEAN, &["clean"]);
    assert_eq!(
        out.lines().count(),
        1,
        "expected one summary line, got:\n{out}"
    );
    let out = expect(tmp.path(), true, exit_code::CLEAN, &["clean"]);
    assert_eq!(
        out.lines().count(),
        1,
        "expected one summary line, got:\n{out}"
    );
}

#[test]
fn a_torn_journal_tail_is_reported_and_repaired() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    let journal = store_file(tmp.path(), "journal.");
    let len = std::fs::metadata(&journal).expect("stat").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .expect("open journal");
    file.set_len(len - 3).expect("truncate");
    let before = std::fs::read(&journal).expect("read");
    expect(tmp.path(), false, exit_code::UNREPAIRED, &["torn batch"]);
    assert_eq!(
        std::fs::read(&journal).expect("read"),
        before,
        "a check without --repair must not write"
    );
    expect(
        tmp.path(),
        true,
        exit_code::REPAIRED,
        &["torn batch", "repair:"],
    );
    expect(tmp.path(), false, exit_code::CLEAN, &["clean"]);
    // The files are all still there.
    assert_eq!(
        std::fs::read(tmp.path().join("notes.txt")).expect("notes"),
        b"notes"
    );
}

#[test]
fn stale_records_are_counted_and_dropped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    std::fs::remove_file(tmp.path().join("notes.txt")).expect("rm");
    std::fs::remove_file(tmp.path().join("Documents/report.odt")).expect("rm");
    expect(
        tmp.path(),
        false,
        exit_code::UNREPAIRED,
        &["notes.txt: 1 metadata record", "Documents/report.odt"],
    );
    expect(
        tmp.path(),
        true,
        exit_code::REPAIRED,
        &["dropped 2 stale record"],
    );
    expect(tmp.path(), false, exit_code::CLEAN, &["clean"]);
    // The repair kept the live metadata: Documents is still 0750, the link still a link.
    let fs = open(tmp.path());
    let docs = fs.lookup(ROOT, b"Documents").expect("Documents");
    assert_eq!(docs.perm, 0o750, "expected mode 0750, got {:o}", docs.perm);
    let shared = fs.lookup(ROOT, b"shared").expect("shared");
    assert_eq!(shared.nlink, 2, "expected 2 links, got {}", shared.nlink);
    assert_eq!(
        fs.readlink(fs.lookup(ROOT, b"link").expect("link").ino)
            .expect("readlink"),
        b"Documents"
    );
}

#[test]
fn a_dangling_link_is_reported_and_made_ordinary() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    let contents = content_files(tmp.path());
    assert_eq!(
        contents.len(),
        1,
        "expected one content file, got {contents:?}"
    );
    std::fs::remove_file(&contents[0]).expect("rm content");
    expect(
        tmp.path(),
        false,
        exit_code::UNREPAIRED,
        &["shared: a hard-link name", "is missing"],
    );
    expect(tmp.path(), true, exit_code::REPAIRED, &[]);
    expect(tmp.path(), false, exit_code::CLEAN, &["clean"]);
}

#[test]
fn orphaned_content_is_moved_to_pershome_recovered_byte_for_byte() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let orphan = tmp.path().join(".pershome/inodes/00000000000000aa");
    std::fs::write(&orphan, &data).expect("plant orphan");
    expect(
        tmp.path(),
        false,
        exit_code::UNREPAIRED,
        &["orphaned hard-link content (100000 bytes)"],
    );
    expect(
        tmp.path(),
        true,
        exit_code::REPAIRED,
        &["pershome-recovered/inode-00000000000000aa"],
    );
    let recovered = tmp.path().join("pershome-recovered/inode-00000000000000aa");
    let got = std::fs::read(&recovered).expect("recovered file");
    assert!(
        got == data,
        "expected the orphan's {} bytes, got {} bytes",
        data.len(),
        got.len()
    );
    assert!(!orphan.exists(), "the orphan should have moved");
    expect(tmp.path(), false, exit_code::CLEAN, &["clean"]);
    // The live hard link was left alone.
    assert_eq!(
        content_files(tmp.path()).len(),
        1,
        "the live link's content stays"
    );
}

#[test]
fn a_wrong_link_count_is_fixed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    // A third name for the link, made by hand: a copy of a placeholder, whose record says
    // nothing, is an ordinary file; so instead remove one placeholder behind pershome's back.
    std::fs::remove_file(tmp.path().join("Documents/shared-too")).expect("rm placeholder");
    expect(
        tmp.path(),
        false,
        exit_code::UNREPAIRED,
        &["link count 2 in the store but 1 name(s)"],
    );
    expect(tmp.path(), true, exit_code::REPAIRED, &["link count 2 → 1"]);
    expect(tmp.path(), false, exit_code::CLEAN, &["clean"]);
    let fs = open(tmp.path());
    let shared = fs.lookup(ROOT, b"shared").expect("shared");
    assert_eq!(shared.nlink, 1, "expected 1 link, got {}", shared.nlink);
    let fh = fs.open(shared.ino, libc::O_RDONLY).expect("open");
    assert_eq!(fs.read(fh, 0, 100).expect("read"), b"shared content");
}

#[test]
fn a_fat_illegal_name_is_left_for_the_user() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    std::fs::write(tmp.path().join("a:b"), b"x").expect("plant");
    expect(
        tmp.path(),
        false,
        exit_code::UNREPAIRED,
        &["a:b: cannot be on a FAT stick"],
    );
    let out = expect(tmp.path(), true, exit_code::UNREPAIRED, &["a:b"]);
    assert!(!out.contains("repair:"), "nothing to repair, got:\n{out}");
    assert!(tmp.path().join("a:b").exists(), "the file must stay");
}

#[test]
fn a_busy_store_is_refused_unless_forced_and_never_repaired() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    std::fs::remove_file(tmp.path().join("notes.txt")).expect("rm");
    let fs = open(tmp.path());
    expect(
        tmp.path(),
        false,
        exit_code::OPERATIONAL,
        &["in use by a mounted pershomefs", "--force"],
    );
    let (code, out, err) = run(tmp.path(), true, true);
    assert_eq!(
        code,
        exit_code::UNREPAIRED,
        "expected 4 with --force --repair on a live store\n{out}{err}"
    );
    assert!(
        out.contains("not repaired"),
        "expected a refusal to repair, got:\n{out}"
    );
    drop(fs);
}

#[test]
fn a_newer_format_is_refused_untouched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    let journal = store_file(tmp.path(), "journal.");
    let mut bytes = std::fs::read(&journal).expect("read");
    // One past the newest format this pershome reads.
    let newer = pershome::meta::FORMAT_VERSION + 1;
    bytes[8..12].copy_from_slice(&newer.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..20]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&journal, &bytes).expect("write");
    let listing = |dir: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing(&tmp.path().join(".pershome"));
    expect(tmp.path(), true, exit_code::OPERATIONAL, &["newer"]);
    assert_eq!(listing(&tmp.path().join(".pershome")), before);
    assert!(
        std::fs::read(&journal).expect("read") == bytes,
        "the journal must not change"
    );
}

#[test]
fn the_binary_exits_with_the_documented_codes() {
    let bin = env!("CARGO_BIN_EXE_pershome");
    let tmp = tempfile::tempdir().expect("tempdir");
    let status = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(bin)
            .args(args)
            .output()
            .expect("run pershome")
    };
    let backing = tmp.path().as_os_str();
    let out = status(&["fsck".as_ref(), backing]);
    assert_eq!(out.status.code(), Some(8), "no store: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pershomefs"),
        "should say how to create a store: {out:?}"
    );
    realistic(tmp.path());
    let out = status(&["fsck".as_ref(), backing]);
    assert_eq!(out.status.code(), Some(0), "clean: {out:?}");
    std::fs::remove_file(tmp.path().join("notes.txt")).expect("rm");
    let out = status(&["fsck".as_ref(), backing]);
    assert_eq!(out.status.code(), Some(4), "stale, no repair: {out:?}");
    let out = status(&["fsck".as_ref(), "--repair".as_ref(), backing]);
    assert_eq!(out.status.code(), Some(1), "repaired: {out:?}");
    let out = status(&["fsck".as_ref(), "--help".as_ref()]);
    assert_eq!(out.status.code(), Some(0), "help: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Exit codes"),
        "{out:?}"
    );
    let out = status(&["fsck".as_ref()]);
    assert_eq!(out.status.code(), Some(16), "usage: {out:?}");
}

#[test]
fn an_inode_record_with_no_name_is_dropped_and_its_content_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    realistic(tmp.path());
    std::fs::remove_file(tmp.path().join("shared")).expect("rm placeholder");
    std::fs::remove_file(tmp.path().join("Documents/shared-too")).expect("rm placeholder");
    expect(tmp.path(), false, exit_code::UNREPAIRED, &["has no name"]);
    expect(
        tmp.path(),
        true,
        exit_code::REPAIRED,
        &["dropped the record of inode", "pershome-recovered/inode-"],
    );
    expect(tmp.path(), false, exit_code::CLEAN, &["clean"]);
    let recovered: Vec<_> = std::fs::read_dir(tmp.path().join("pershome-recovered"))
        .expect("recovered dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(
        recovered.len(),
        1,
        "expected one recovered file, got {recovered:?}"
    );
    assert_eq!(
        std::fs::read(&recovered[0]).expect("read"),
        b"shared content"
    );
}
