//! Issue 12, defect 3: a folder renamed on another computer (Windows, mtools) between two
//! sessions keeps what pershome knew about its contents. Each test builds a store with `Fs`,
//! renames or moves entries in the backing directory by hand as Windows would (plain
//! renames: FAT keeps the files, only the names change), opens the backing again and checks
//! what the next session shows, and what `pershome fsck` says about what it cannot place.

use std::path::Path;

use pershome::fs::xattr::XattrReply;
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

fn create(fs: &Fs, parent: Ino, name: &[u8], mode: u32, content: &[u8]) -> Ino {
    let (attr, fh) = fs
        .create(USER, parent, name, mode, libc::O_RDWR)
        .expect("create");
    if !content.is_empty() {
        fs.write(fh, 0, content).expect("write");
    }
    fs.release(fh).expect("release");
    attr.ino
}

fn read_all(fs: &Fs, ino: Ino) -> Vec<u8> {
    let fh = fs.open(ino, libc::O_RDONLY).expect("open");
    let data = fs.read(fh, 0, 1 << 20).expect("read");
    fs.release(fh).expect("release");
    data
}

fn lookup(fs: &Fs, parent: Ino, name: &str) -> pershome::fs::Attr {
    fs.lookup(parent, name.as_bytes())
        .unwrap_or_else(|e| panic!("lookup {name}: {e}"))
}

fn xattr(fs: &Fs, ino: Ino, name: &str) -> Option<Vec<u8>> {
    match fs.getxattr(ino, name.as_bytes(), 4096) {
        Ok(XattrReply::Data(v)) => Some(v),
        _ => None,
    }
}

/// Runs fsck in-process; returns the exit code and what it printed (stdout and stderr).
fn run_fsck(backing: &Path, repair: bool) -> (u8, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = fsck::run(
        backing,
        &FsckOptions {
            repair,
            force: false,
        },
        &mut out,
        &mut err,
    );
    (
        code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        ),
    )
}

/// `proj/` as the issue describes it: modes 0700 and 0600, xattrs, nested directories and a
/// hard-linked file whose two names are both inside it. Committed and closed.
fn make_proj(backing: &Path) {
    let fs = open(backing);
    let proj = fs.mkdir(USER, ROOT, b"proj", 0o700).expect("mkdir").ino;
    let a = create(&fs, proj, b"notes.txt", 0o600, b"my notes");
    fs.setxattr(a, b"user.tag", b"blue", 0).expect("setxattr");
    create(&fs, proj, b"plan.odt", 0o644, b"the plan, version 1");
    let sub = fs.mkdir(USER, proj, b"src", 0o750).expect("mkdir").ino;
    fs.setxattr(sub, b"user.dir", b"yes", 0).expect("setxattr");
    create(&fs, sub, b"main.rs", 0o640, b"fn main() {}");
    let deep = fs.mkdir(USER, sub, b"deep", 0o700).expect("mkdir").ino;
    create(&fs, deep, b"secret", 0o600, b"42");
    let data = create(&fs, proj, b"data.bin", 0o600, b"shared content");
    fs.link(data, sub, b"data-link").expect("link");
    // A checkpoint, so the next session reads these records lazily from it (a folder's
    // records below its own are read only when needed).
    fs.compact().expect("compact");
    fs.shutdown();
    drop(fs);
}

/// What `make_proj` made, now at `name`: every mode, xattr and the link's content.
fn check_proj(fs: &Fs, name: &str) {
    let proj = lookup(fs, ROOT, name);
    assert_eq!(
        proj.perm, 0o700,
        "{name}: expected 0700, got {:o}",
        proj.perm
    );
    let notes = lookup(fs, proj.ino, "notes.txt");
    assert_eq!(
        notes.perm, 0o600,
        "notes.txt: expected 0600, got {:o}",
        notes.perm
    );
    assert_eq!(
        xattr(fs, notes.ino, "user.tag").as_deref(),
        Some(&b"blue"[..]),
        "notes.txt lost its xattr"
    );
    assert_eq!(read_all(fs, notes.ino), b"my notes");
    let src = lookup(fs, proj.ino, "src");
    assert_eq!(src.perm, 0o750, "src: expected 0750, got {:o}", src.perm);
    assert_eq!(xattr(fs, src.ino, "user.dir").as_deref(), Some(&b"yes"[..]));
    let main = lookup(fs, src.ino, "main.rs");
    assert_eq!(
        main.perm, 0o640,
        "main.rs: expected 0640, got {:o}",
        main.perm
    );
    let deep = lookup(fs, src.ino, "deep");
    assert_eq!(deep.perm, 0o700, "deep: expected 0700, got {:o}", deep.perm);
    let secret = lookup(fs, deep.ino, "secret");
    assert_eq!(
        secret.perm, 0o600,
        "secret: expected 0600, got {:o}",
        secret.perm
    );
    let data = lookup(fs, proj.ino, "data.bin");
    let link = lookup(fs, src.ino, "data-link");
    assert_eq!(data.ino, link.ino, "the two names are one hard-linked file");
    assert_eq!(data.nlink, 2, "expected link count 2, got {}", data.nlink);
    assert_eq!(
        read_all(fs, link.ino),
        b"shared content",
        "the link's content"
    );
}

#[test]
fn a_folder_renamed_on_windows_keeps_its_subtree_metadata() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_proj(tmp.path());
    // Windows renames the folder and edits one file in it (the size changes).
    std::fs::rename(tmp.path().join("proj"), tmp.path().join("Project Files")).expect("ren");
    std::fs::write(
        tmp.path().join("Project Files/plan.odt"),
        b"the plan, version 2, longer",
    )
    .expect("edit");
    let fs = open(tmp.path());
    check_proj(&fs, "Project Files");
    assert!(fs.lookup(ROOT, b"proj").is_err(), "proj is gone");
    let plan = lookup(&fs, lookup(&fs, ROOT, "Project Files").ino, "plan.odt");
    assert_eq!(read_all(&fs, plan.ino), b"the plan, version 2, longer");
    // Something else is changed, so the reconciliation is committed with it.
    create(&fs, ROOT, b"later.txt", 0o644, b"x");
    fs.shutdown();
    drop(fs);
    // The records moved in the store itself: a third session and fsck agree.
    let fs = open(tmp.path());
    check_proj(&fs, "Project Files");
    fs.shutdown();
    drop(fs);
    let (code, out) = run_fsck(tmp.path(), false);
    assert_eq!(code, exit_code::CLEAN, "fsck after the move:\n{out}");
}

#[test]
fn fsck_sees_a_renamed_folder_before_the_next_mount_carries_it_over() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_proj(tmp.path());
    std::fs::rename(tmp.path().join("proj"), tmp.path().join("Project Files")).expect("ren");
    let (code, out) = run_fsck(tmp.path(), false);
    assert_eq!(code, exit_code::CLEAN, "fsck:\n{out}");
    assert!(
        out.contains("renamed to \"Project Files\" on another computer"),
        "expected a note about the rename, got:\n{out}"
    );
    // A repair loads the tree as a mount does and keeps the metadata too.
    let (code, out) = run_fsck(tmp.path(), true);
    assert_eq!(code, exit_code::CLEAN, "fsck --repair:\n{out}");
    let fs = open(tmp.path());
    check_proj(&fs, "Project Files");
}

#[test]
fn two_candidate_folders_are_not_mistaken_for_the_renamed_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_proj(tmp.path());
    // Windows renames proj and makes an identical copy: either could be "the" folder, so
    // neither may take proj's metadata.
    std::fs::rename(tmp.path().join("proj"), tmp.path().join("Copy A")).expect("ren");
    let status = std::process::Command::new("/bin/cp")
        .arg("-r")
        .arg(tmp.path().join("Copy A"))
        .arg(tmp.path().join("Copy B"))
        .env_clear()
        .status()
        .expect("cp");
    assert!(status.success());
    let (code, out) = run_fsck(tmp.path(), false);
    assert_eq!(code, exit_code::UNREPAIRED, "fsck:\n{out}");
    for want in [
        "proj/notes.txt",
        "proj/src/deep/secret",
        "mode 0600",
        "no new folder is clearly the same",
    ] {
        assert!(out.contains(want), "expected {want:?} in:\n{out}");
    }
    assert!(!out.contains("harmless"), "not harmless:\n{out}");
    let fs = open(tmp.path());
    for name in ["Copy A", "Copy B"] {
        let d = lookup(&fs, ROOT, name);
        assert_eq!(
            d.perm, 0o755,
            "{name} must get default metadata, got {:o}",
            d.perm
        );
        let notes = lookup(&fs, d.ino, "notes.txt");
        assert_eq!(notes.perm, 0o644, "{name}/notes.txt: got {:o}", notes.perm);
    }
}

#[test]
fn a_folder_with_no_good_match_leaves_records_that_fsck_names_and_recovers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_proj(tmp.path());
    // Renamed and mostly emptied on Windows: the hard link's two placeholders are deleted,
    // so its content in the store has no name left, and new files are added.
    let new = tmp.path().join("Other");
    std::fs::rename(tmp.path().join("proj"), &new).expect("ren");
    std::fs::remove_file(new.join("data.bin")).expect("rm");
    std::fs::remove_file(new.join("src/data-link")).expect("rm");
    std::fs::remove_dir_all(new.join("src")).expect("rm");
    std::fs::remove_file(new.join("plan.odt")).expect("rm");
    for n in ["a", "b", "c"] {
        std::fs::write(new.join(n), n).expect("write");
    }
    let (code, out) = run_fsck(tmp.path(), false);
    assert_eq!(code, exit_code::UNREPAIRED, "fsck:\n{out}");
    for want in [
        "proj/notes.txt",
        "proj/data.bin",
        "proj/src/data-link",
        "hard link",
    ] {
        assert!(out.contains(want), "expected {want:?} in:\n{out}");
    }
    assert!(!out.contains("harmless"), "not harmless:\n{out}");
    let (code, out) = run_fsck(tmp.path(), true);
    assert_eq!(code, exit_code::REPAIRED, "fsck --repair:\n{out}");
    assert!(
        out.contains("pershome-recovered/inode-")
            && out.contains("proj/data.bin")
            && out.contains("deleted or renamed on another computer"),
        "the repair must say where the content went and why:\n{out}"
    );
    let recovered: Vec<_> = std::fs::read_dir(tmp.path().join("pershome-recovered"))
        .expect("recovery folder")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(
        std::fs::read(&recovered[0]).expect("read"),
        b"shared content"
    );
    let (code, out) = run_fsck(tmp.path(), false);
    assert_eq!(code, exit_code::CLEAN, "fsck after repair:\n{out}");
}

#[test]
fn a_hard_link_moved_to_another_folder_finds_its_content() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_proj(tmp.path());
    // The link's second name moves to a new folder elsewhere: no record knows that place.
    std::fs::create_dir(tmp.path().join("Elsewhere")).expect("mkdir");
    std::fs::rename(
        tmp.path().join("proj/src/data-link"),
        tmp.path().join("Elsewhere/moved link"),
    )
    .expect("move");
    let (code, out) = run_fsck(tmp.path(), false);
    assert!(
        out.contains("Elsewhere/moved link: a name of hard link") && !out.contains("has no name"),
        "fsck must find the moved name:\n{out}"
    );
    assert_eq!(
        code,
        exit_code::UNREPAIRED,
        "the old name's record is stale:\n{out}"
    );
    let fs = open(tmp.path());
    let moved = lookup(&fs, lookup(&fs, ROOT, "Elsewhere").ino, "moved link");
    let data = lookup(&fs, lookup(&fs, ROOT, "proj").ino, "data.bin");
    assert_eq!(
        moved.ino, data.ino,
        "the moved name is the same hard-linked file"
    );
    assert_eq!(read_all(&fs, moved.ino), b"shared content");
    // Visiting the old folder finds the old name gone; the next commit drops its record.
    let src = lookup(&fs, lookup(&fs, ROOT, "proj").ino, "src");
    assert!(
        fs.lookup(src.ino, b"data-link").is_err(),
        "the old name is gone"
    );
    create(&fs, ROOT, b"later.txt", 0o644, b"x");
    fs.shutdown();
    drop(fs);
    let fs = open(tmp.path());
    let moved = lookup(&fs, lookup(&fs, ROOT, "Elsewhere").ino, "moved link");
    assert_eq!(read_all(&fs, moved.ino), b"shared content");
    assert_eq!(moved.nlink, 2, "link count: got {}", moved.nlink);
    fs.shutdown();
    drop(fs);
    let (code, out) = run_fsck(tmp.path(), false);
    assert_eq!(code, exit_code::CLEAN, "fsck:\n{out}");
}

/// What reconciliation finds is recorded in its place among the session's own changes: here
/// the parent is renamed through pershome before the folder renamed elsewhere is seen, and a
/// file in it is changed afterwards, all in one commit.
#[test]
fn a_folder_renamed_elsewhere_inside_one_renamed_here_keeps_its_metadata() {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_proj(tmp.path());
    let fs = open(tmp.path());
    let outer = fs.mkdir(USER, ROOT, b"outer", 0o755).expect("mkdir").ino;
    fs.rename(ROOT, b"proj", outer, b"proj", 0).expect("rename");
    fs.shutdown();
    drop(fs);
    std::fs::rename(
        tmp.path().join("outer/proj"),
        tmp.path().join("outer/Project Files"),
    )
    .expect("ren");
    let fs = open(tmp.path());
    // `outer` is not loaded yet: its records move with it.
    fs.rename(ROOT, b"outer", ROOT, b"outer2", 0)
        .expect("rename");
    let outer2 = lookup(&fs, ROOT, "outer2");
    let proj = lookup(&fs, outer2.ino, "Project Files");
    assert_eq!(proj.perm, 0o700, "got {:o}", proj.perm);
    let notes = lookup(&fs, proj.ino, "notes.txt");
    fs.setattr(
        notes.ino,
        pershome::fs::SetAttr {
            mode: Some(0o400),
            ..Default::default()
        },
    )
    .expect("chmod");
    fs.shutdown();
    drop(fs);
    let fs = open(tmp.path());
    let outer2 = lookup(&fs, ROOT, "outer2");
    let proj = lookup(&fs, outer2.ino, "Project Files");
    assert_eq!(proj.perm, 0o700, "Project Files: got {:o}", proj.perm);
    let notes = lookup(&fs, proj.ino, "notes.txt");
    assert_eq!(notes.perm, 0o400, "notes.txt: got {:o}", notes.perm);
    let plan = lookup(&fs, proj.ino, "plan.odt");
    assert_eq!(plan.perm, 0o644);
    let src = lookup(&fs, proj.ino, "src");
    assert_eq!(src.perm, 0o750, "src: got {:o}", src.perm);
    fs.shutdown();
}

/// A name the store kept for the folder (here an 8.3 stick's mixed-case name) belonged to the
/// old name: the renamed folder is shown under its new name, with its metadata.
#[test]
fn a_renamed_folder_on_an_8_3_stick_takes_its_new_name() {
    use pershome::fs::FsOptions;
    use pershome::names::NameMode;
    let tmp = tempfile::tempdir().expect("tempdir");
    let opts = FsOptions {
        names: Some(NameMode::Short83),
        ..common::opts()
    };
    let fs = Fs::open_backing(tmp.path(), opts.clone()).expect("open 8.3");
    let proj = fs.mkdir(USER, ROOT, b"Proj", 0o700).expect("mkdir").ino;
    create(&fs, proj, b"notes.txt", 0o600, b"my notes");
    create(&fs, proj, b"plan.txt", 0o640, b"plan");
    fs.shutdown();
    drop(fs);
    assert!(tmp.path().join("PROJ").is_dir(), "8.3 backing name PROJ");
    std::fs::rename(tmp.path().join("PROJ"), tmp.path().join("WORK")).expect("ren");
    let fs = Fs::open_backing(tmp.path(), opts).expect("reopen 8.3");
    assert!(fs.lookup(ROOT, b"Proj").is_err(), "the old name is gone");
    let work = lookup(&fs, ROOT, "work");
    assert_eq!(work.perm, 0o700, "work: got {:o}", work.perm);
    let notes = lookup(&fs, work.ino, "notes.txt");
    assert_eq!(notes.perm, 0o600, "notes.txt: got {:o}", notes.perm);
    fs.shutdown();
}
