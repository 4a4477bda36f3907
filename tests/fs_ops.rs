//! In-process tests of the filesystem operations over a temporary backing directory: no
//! kernel mount, so they run anywhere and fast. Every test that writes ends with the FAT audit
//! of the backing tree, and most with a "remount" (a fresh `Fs` over the same backing) that
//! must show exactly what was there before.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use pershome::audit::assert_fat_clean;
use pershome::fs::{Attr, Ctx, Errno, Fs, FsOptions, Ino, Kind, SetAttr, SetTime, ROOT};
use pershome::meta::Timespec;

mod common;
use common::{open, opts};

const USER: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 1,
    umask: 0,
};

/// Unmount and mount again: commit everything, then read it all back from the stick.
fn remount(fs: Fs, backing: &Path) -> Fs {
    fs.shutdown();
    drop(fs);
    open(backing)
}

fn lookup(fs: &Fs, path: &[&[u8]]) -> Attr {
    let mut ino = ROOT;
    let mut attr = fs.getattr(ROOT).unwrap();
    for part in path {
        attr = fs
            .lookup(ino, part)
            .unwrap_or_else(|e| panic!("lookup {:?}: {e}", String::from_utf8_lossy(part)));
        ino = attr.ino;
    }
    attr
}

fn create_file(fs: &Fs, parent: Ino, name: &[u8], mode: u32, content: &[u8]) -> Attr {
    let (attr, fh) = fs.create(USER, parent, name, mode, libc::O_RDWR).unwrap();
    if !content.is_empty() {
        fs.write(fh, 0, content).unwrap();
    }
    fs.release(fh).unwrap();
    fs.getattr(attr.ino).unwrap()
}

fn read_all(fs: &Fs, ino: Ino) -> Vec<u8> {
    let fh = fs.open(ino, libc::O_RDONLY).unwrap();
    let data = fs.read(fh, 0, 1 << 20).unwrap();
    fs.release(fh).unwrap();
    data
}

fn list(fs: &Fs, ino: Ino) -> Vec<Vec<u8>> {
    let fh = fs.opendir(ino).unwrap();
    let names = fs
        .readdir(fh, 0)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.name)
        .filter(|n| n != b"." && n != b"..")
        .collect();
    fs.releasedir(fh);
    names
}

/// Everything observable about a tree, for before/after comparisons.
#[derive(Debug, PartialEq)]
struct Seen {
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    size: u64,
    mtime: Timespec,
    atime: Timespec,
    ctime: Timespec,
    rdev: u64,
    link: Option<Vec<u8>>,
    content: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn snapshot(fs: &Fs) -> BTreeMap<Vec<Vec<u8>>, Seen> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT, Vec::new())];
    while let Some((dir, path)) = stack.pop() {
        for name in list(fs, dir) {
            let a = fs.lookup(dir, &name).unwrap();
            let mut p: Vec<Vec<u8>> = path.clone();
            p.push(name.clone());
            let xattrs = match fs.listxattr(a.ino, 1 << 16).unwrap() {
                pershome::fs::xattr::XattrReply::Data(list) => list
                    .split(|&b| b == 0)
                    .filter(|n| !n.is_empty())
                    .map(|n| {
                        let v = match fs.getxattr(a.ino, n, 1 << 16).unwrap() {
                            pershome::fs::xattr::XattrReply::Data(v) => v,
                            other => panic!("getxattr gave {other:?}"),
                        };
                        (n.to_vec(), v)
                    })
                    .collect(),
                pershome::fs::xattr::XattrReply::Size(_) => Vec::new(),
            };
            out.insert(
                p.clone(),
                Seen {
                    kind: a.kind,
                    perm: a.perm,
                    uid: a.uid,
                    gid: a.gid,
                    nlink: a.nlink,
                    size: a.size,
                    mtime: a.mtime,
                    atime: a.atime,
                    ctime: a.ctime,
                    rdev: a.rdev,
                    link: (a.kind == Kind::Symlink).then(|| fs.readlink(a.ino).unwrap()),
                    content: (a.kind == Kind::File).then(|| read_all(fs, a.ino)),
                    xattrs,
                },
            );
            if a.kind == Kind::Dir {
                stack.push((a.ino, p));
            }
        }
    }
    out
}

fn show(path: &[Vec<u8>]) -> String {
    path.iter()
        .map(|p| format!("{:?}", String::from_utf8_lossy(p)))
        .collect::<Vec<_>>()
        .join("/")
}

/// Compares two snapshots and fails listing only the entries that differ.
fn assert_same_tree(
    before: &BTreeMap<Vec<Vec<u8>>, Seen>,
    after: &BTreeMap<Vec<Vec<u8>>, Seen>,
    what: &str,
) {
    let mut problems = Vec::new();
    for (path, seen) in before {
        match after.get(path) {
            None => problems.push(format!("{} is missing", show(path))),
            Some(now) if now != seen => problems.push(format!(
                "{}:\n  expected {seen:?}\n  got      {now:?}",
                show(path)
            )),
            _ => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        problems.push(format!("{} appeared", show(path)));
    }
    assert!(
        problems.is_empty(),
        "{what}: {} differences:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

fn hostile_names() -> Vec<Vec<u8>> {
    pershome::names::hostile_examples()
}

#[test]
fn hostile_names_round_trip_and_stay_fat_legal() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let sub = fs.mkdir(USER, ROOT, b"sub", 0o755).unwrap();
    let mut expected = Vec::new();
    for (i, name) in hostile_names().into_iter().enumerate() {
        for parent in [ROOT, sub.ino] {
            let content = format!("file {i}").into_bytes();
            create_file(&fs, parent, &name, 0o640, &content);
        }
        expected.push(name);
    }
    // The store directory's own name is an ordinary name for the user.
    create_file(&fs, ROOT, b".pershome", 0o600, b"mine");
    create_file(&fs, ROOT, b".PERSHOME", 0o600, b"mine too");
    let before = snapshot(&fs);
    let mut names = list(&fs, sub.ino);
    names.sort();
    expected.sort();
    assert_eq!(names, expected, "names listed in a subdirectory");
    let fs = remount(fs, backing);
    assert_same_tree(&before, &snapshot(&fs), "the tree after a remount");
    assert_eq!(read_all(&fs, lookup(&fs, &[b".pershome"]).ino), b"mine");
    assert_fat_clean(backing);
    // A FAT-legal name keeps its name on the stick, byte for byte.
    assert_eq!(
        std::fs::read(backing.join("sub/report.odt")).unwrap(),
        b"file 24"
    );
}

#[test]
fn name_too_long_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fs = open(dir.path());
    let r = fs.create(USER, ROOT, &[b'x'; 256], 0o644, libc::O_RDWR);
    assert_eq!(r.err(), Some(Errno::ENAMETOOLONG));
}

#[test]
fn metadata_survives_remount_to_the_nanosecond() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let f = create_file(&fs, ROOT, b"f", 0o644, b"hello");
    let t = Timespec {
        sec: 1_234_567_890,
        nsec: 123_456_789,
    };
    let set = SetAttr {
        mode: Some(0o4751),
        uid: Some(4242),
        gid: Some(77),
        atime: Some(SetTime::At(Timespec { sec: -5, nsec: 1 })),
        mtime: Some(SetTime::At(t)),
        ..SetAttr::default()
    };
    fs.setattr(f.ino, set).unwrap();
    fs.setxattr(f.ino, b"user.colour", b"blue", 0).unwrap();
    fs.setxattr(f.ino, b"trusted.x", &[0, 1, 2], 0).unwrap();
    fs.setxattr(
        f.ino,
        b"system.posix_acl_access",
        &acl_bytes(&[(1, 7, 0), (2, 5, 77), (4, 5, 0), (0x10, 5, 0), (0x20, 1, 0)]),
        0,
    )
    .unwrap();
    let d = fs.mkdir(USER, ROOT, b"d", 0o1777).unwrap();
    fs.mknod(USER, d.ino, b"fifo", libc::S_IFIFO | 0o600, 0)
        .unwrap();
    fs.mknod(USER, d.ino, b"sock", libc::S_IFSOCK | 0o600, 0)
        .unwrap();
    fs.mknod(
        USER,
        d.ino,
        b"tty",
        libc::S_IFCHR | 0o620,
        libc::makedev(4, 1),
    )
    .unwrap();
    fs.mknod(
        USER,
        d.ino,
        b"sda",
        libc::S_IFBLK | 0o660,
        libc::makedev(8, 0),
    )
    .unwrap();
    fs.symlink(USER, d.ino, b"link", b"../f").unwrap();
    fs.symlink(USER, d.ino, b"bad-utf8", &[b'x', 0xff]).unwrap();
    let before = snapshot(&fs);
    let fs = remount(fs, backing);
    let after = snapshot(&fs);
    assert_same_tree(&before, &after, "after a remount");
    let f = &after[&vec![b"f".to_vec()]];
    assert_eq!((f.perm, f.uid, f.gid, f.mtime), (0o4751, 4242, 77, t));
    assert_eq!(f.atime, Timespec { sec: -5, nsec: 1 });
    assert_fat_clean(backing);
}

#[test]
fn the_sticks_owner_maps_to_whoever_mounts_it() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    create_file(&fs, ROOT, b"mine", 0o600, b"x");
    let root_owned = create_file(&fs, ROOT, b"roots", 0o600, b"x");
    fs.setattr(
        root_owned.ino,
        SetAttr {
            uid: Some(0),
            gid: Some(0),
            ..SetAttr::default()
        },
    )
    .unwrap();
    fs.shutdown();
    drop(fs);
    let library = FsOptions {
        uid: 2001,
        gid: 3001,
        ..opts()
    };
    let fs = Fs::open_backing(backing, library).unwrap();
    let mine = lookup(&fs, &[b"mine"]);
    assert_eq!(
        (mine.uid, mine.gid),
        (2001, 3001),
        "the owner on another machine"
    );
    let roots = lookup(&fs, &[b"roots"]);
    assert_eq!(
        (roots.uid, roots.gid),
        (0, 0),
        "other owners are kept as stored"
    );
}

#[test]
fn hard_links_share_content_and_survive_any_name_going() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let d = fs.mkdir(USER, ROOT, b"d", 0o755).unwrap();
    let a = create_file(&fs, ROOT, b"a", 0o644, b"shared");
    fs.link(a.ino, d.ino, b"b").unwrap();
    let c = fs.link(a.ino, ROOT, b"c").unwrap();
    assert_eq!(c.nlink, 3);
    assert_eq!(c.ino, a.ino);
    let fh = fs.open(a.ino, libc::O_WRONLY).unwrap();
    fs.write(fh, 6, b" content").unwrap();
    fs.release(fh).unwrap();
    assert_fat_clean(backing);
    let fs = remount(fs, backing);
    let b = lookup(&fs, &[b"d", b"b"]);
    assert_eq!(b.nlink, 3);
    assert_eq!(read_all(&fs, b.ino), b"shared content");
    fs.unlink(ROOT, b"a").unwrap();
    let d = lookup(&fs, &[b"d"]);
    fs.rename(d.ino, b"b", ROOT, b"renamed", 0).unwrap();
    fs.commit().unwrap();
    let fs = remount(fs, backing);
    let r = lookup(&fs, &[b"renamed"]);
    let c = lookup(&fs, &[b"c"]);
    assert_eq!((r.ino, r.nlink), (c.ino, 2));
    fs.unlink(ROOT, b"c").unwrap();
    let r = lookup(&fs, &[b"renamed"]);
    assert_eq!(r.nlink, 1);
    // Down to one name: the content is an ordinary file on the stick again.
    assert_eq!(
        std::fs::read(backing.join("renamed")).unwrap(),
        b"shared content"
    );
    let fs = remount(fs, backing);
    assert_eq!(
        read_all(&fs, lookup(&fs, &[b"renamed"]).ino),
        b"shared content"
    );
    assert_fat_clean(backing);
}

#[test]
fn rename_flags_behave_as_on_ext4() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    create_file(&fs, ROOT, b"x", 0o644, b"X");
    create_file(&fs, ROOT, b"y", 0o644, b"Y");
    let d = fs.mkdir(USER, ROOT, b"d", 0o755).unwrap();
    create_file(&fs, d.ino, b"inner", 0o644, b"I");
    assert_eq!(
        fs.rename(ROOT, b"x", ROOT, b"y", libc::RENAME_NOREPLACE),
        Err(Errno::EEXIST)
    );
    fs.rename(ROOT, b"x", ROOT, b"d", libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(read_all(&fs, lookup(&fs, &[b"d"]).ino), b"X");
    assert_eq!(read_all(&fs, lookup(&fs, &[b"x", b"inner"]).ino), b"I");
    fs.rename(ROOT, b"y", ROOT, b"d", 0).unwrap();
    assert_eq!(read_all(&fs, lookup(&fs, &[b"d"]).ino), b"Y");
    // Case-only rename on a stick that folds case.
    create_file(&fs, ROOT, b"readme", 0o644, b"R");
    fs.rename(ROOT, b"readme", ROOT, b"README", 0).unwrap();
    let fs = remount(fs, backing);
    assert_eq!(read_all(&fs, lookup(&fs, &[b"README"]).ino), b"R");
    assert_eq!(read_all(&fs, lookup(&fs, &[b"x", b"inner"]).ino), b"I");
    assert_eq!(fs.lookup(ROOT, b"y").err(), Some(Errno::ENOENT));
    assert_fat_clean(backing);
}

#[test]
fn setgid_directories_pass_on_their_group() {
    let dir = tempfile::tempdir().unwrap();
    let fs = open(dir.path());
    let d = fs.mkdir(USER, ROOT, b"shared", 0o2775).unwrap();
    fs.setattr(
        d.ino,
        SetAttr {
            gid: Some(500),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let f = create_file(&fs, d.ino, b"f", 0o644, b"");
    assert_eq!(f.gid, 500);
    let sub = fs.mkdir(USER, d.ino, b"sub", 0o755).unwrap();
    assert_eq!((sub.gid, sub.perm & 0o2000), (500, 0o2000));
}

#[test]
fn reads_and_stats_never_write_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let d = fs.mkdir(USER, ROOT, b"d", 0o755).unwrap();
    for i in 0..20 {
        create_file(&fs, d.ino, format!("f{i}").as_bytes(), 0o644, b"data");
    }
    let fs = remount(fs, backing);
    let before = fs.write_stats();
    let snap = snapshot(&fs);
    assert_eq!(snap.len(), 21);
    fs.commit().unwrap();
    assert_eq!(
        fs.write_stats(),
        before,
        "(data bytes, data writes, metadata bytes, metadata writes)"
    );
}

#[test]
fn edits_made_elsewhere_are_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let docs = fs.mkdir(USER, ROOT, b"Docs", 0o700).unwrap();
    let kept = create_file(&fs, docs.ino, b"kept.txt", 0o600, b"old");
    fs.setxattr(kept.ino, b"user.tag", b"t", 0).unwrap();
    create_file(&fs, docs.ino, b"gone.txt", 0o600, b"bye");
    create_file(&fs, docs.ino, b"changed.txt", 0o600, b"short");
    let notes = fs.mkdir(USER, ROOT, b"Notes", 0o700).unwrap();
    create_file(&fs, notes.ino, b"edited.txt", 0o640, b"v1");
    fs.shutdown();
    drop(fs);
    // Another computer: a new file and directory, a changed file, a deleted file, and a
    // directory renamed.
    std::fs::write(backing.join("Docs/new.txt"), b"from windows").unwrap();
    std::fs::create_dir(backing.join("Docs/NewDir")).unwrap();
    std::fs::remove_file(backing.join("Docs/gone.txt")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(backing.join("Docs/changed.txt"), b"much longer now").unwrap();
    std::fs::write(backing.join("Notes/edited.txt"), b"version 2").unwrap();
    std::fs::rename(backing.join("Docs"), backing.join("Documents")).unwrap();
    let fs = open(backing);
    assert_eq!(fs.lookup(ROOT, b"Docs").err(), Some(Errno::ENOENT));
    let new = lookup(&fs, &[b"Documents", b"new.txt"]);
    assert_eq!(
        (new.perm, new.uid, new.gid, new.kind),
        (0o644, 1000, 1000, Kind::File)
    );
    let nd = lookup(&fs, &[b"Documents", b"NewDir"]);
    assert_eq!((nd.perm, nd.kind), (0o755, Kind::Dir));
    let changed = lookup(&fs, &[b"Documents", b"changed.txt"]);
    assert_eq!(changed.size, 15);
    let on_disk = std::fs::metadata(backing.join("Documents/changed.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!({ changed.mtime.sec }, on_disk.mtime());
    let documents = lookup(&fs, &[b"Documents"]);
    let mut names = list(&fs, documents.ino);
    names.sort();
    assert_eq!(
        names,
        vec![
            b"NewDir".to_vec(),
            b"changed.txt".to_vec(),
            b"kept.txt".to_vec(),
            b"new.txt".to_vec()
        ]
    );
    // Records are kept by path: a file edited in place keeps its mode and gets the new size
    // and mtime; the contents of a directory renamed elsewhere get default metadata.
    let edited = lookup(&fs, &[b"Notes", b"edited.txt"]);
    assert_eq!((edited.perm, edited.size), (0o640, 9));
    assert_eq!(changed.perm, 0o644);
    assert_fat_clean(backing);
}

#[test]
fn a_symlink_survives_the_loss_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    fs.symlink(USER, ROOT, b"to-docs", b"Documents/report.odt")
        .unwrap();
    fs.shutdown();
    drop(fs);
    std::fs::remove_dir_all(backing.join(".pershome")).unwrap();
    let fs = open(backing);
    let a = lookup(&fs, &[b"to-docs"]);
    assert_eq!(a.kind, Kind::Symlink);
    assert_eq!(fs.readlink(a.ino).unwrap(), b"Documents/report.odt");
}

#[test]
fn read_only_mount_refuses_changes_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    create_file(&fs, ROOT, b"f", 0o644, b"x");
    fs.shutdown();
    drop(fs);
    let fs = Fs::open_backing(
        backing,
        FsOptions {
            read_only: true,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(read_all(&fs, lookup(&fs, &[b"f"]).ino), b"x");
    assert_eq!(fs.mkdir(USER, ROOT, b"d", 0o755).err(), Some(Errno::EROFS));
    assert_eq!(
        fs.open(lookup(&fs, &[b"f"]).ino, libc::O_WRONLY).err(),
        Some(Errno::EROFS)
    );
}

fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

#[test]
fn the_umask_applies_unless_a_default_acl_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let masked = Ctx {
        umask: 0o027,
        ..USER
    };
    let (f, fh) = fs.create(masked, ROOT, b"f", 0o666, libc::O_RDWR).unwrap();
    fs.release(fh).unwrap();
    assert_eq!(f.perm, 0o640);
    let shared = fs.mkdir(masked, ROOT, b"shared", 0o777).unwrap();
    assert_eq!(shared.perm, 0o750);
    // setfacl -d -m u::rwx,u:1234:rwx,g::r-x,m::rwx,o::r-x shared
    let default = acl_bytes(&[
        (1, 7, 0),
        (2, 7, 1234),
        (4, 5, 0),
        (0x10, 7, 0),
        (0x20, 5, 0),
    ]);
    fs.setxattr(shared.ino, b"system.posix_acl_default", &default, 0)
        .unwrap();
    let (g, fh) = fs
        .create(masked, shared.ino, b"g", 0o664, libc::O_RDWR)
        .unwrap();
    fs.release(fh).unwrap();
    assert_eq!(
        g.perm, 0o664,
        "the default ACL, not the umask, shapes the mode"
    );
    let access = match fs
        .getxattr(g.ino, b"system.posix_acl_access", 4096)
        .unwrap()
    {
        pershome::fs::xattr::XattrReply::Data(d) => d,
        other => panic!("expected an access ACL, got {other:?}"),
    };
    assert_eq!(
        access,
        acl_bytes(&[
            (1, 6, 0),
            (2, 7, 1234),
            (4, 5, 0),
            (0x10, 6, 0),
            (0x20, 4, 0)
        ])
    );
    let sub = fs.mkdir(masked, shared.ino, b"sub", 0o777).unwrap();
    assert!(
        fs.getxattr(sub.ino, b"system.posix_acl_default", 4096)
            .is_ok(),
        "directories inherit the default ACL"
    );
    // Setting an access ACL sets the mode bits; a minimal one is not kept.
    fs.setxattr(
        f.ino,
        b"system.posix_acl_access",
        &acl_bytes(&[(1, 6, 0), (4, 0, 0), (0x20, 0, 0)]),
        0,
    )
    .unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().perm, 0o600);
    assert_eq!(
        fs.getxattr(f.ino, b"system.posix_acl_access", 4096).err(),
        Some(Errno::ENODATA)
    );
    assert_eq!(
        fs.setxattr(f.ino, b"system.posix_acl_access", b"junk", 0)
            .err(),
        Some(Errno::EINVAL)
    );
    let fs = remount(fs, backing);
    let g = lookup(&fs, &[b"shared", b"g"]);
    assert!(fs.getxattr(g.ino, b"system.posix_acl_access", 4096).is_ok());
}

/// A checkpoint holds the whole state: directories never visited in this mount (still only
/// records), visited ones, hard links, the root's own mode, and names kept only in the store.
#[test]
fn a_checkpoint_holds_the_whole_state() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let deep = fs.mkdir(USER, ROOT, b"deep", 0o700).unwrap();
    let deeper = fs.mkdir(USER, deep.ino, b"er", 0o711).unwrap();
    create_file(&fs, deeper.ino, b"x", 0o604, b"x");
    let visited = fs.mkdir(USER, ROOT, b"visited", 0o750).unwrap();
    let a = create_file(&fs, visited.ino, b"a", 0o640, b"linked");
    fs.link(a.ino, ROOT, b"b").unwrap();
    create_file(&fs, visited.ino, b"Makefile", 0o644, b"M");
    create_file(&fs, visited.ino, b"makefile", 0o600, b"m");
    fs.setattr(
        ROOT,
        SetAttr {
            mode: Some(0o700),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let before = snapshot(&fs);
    let fs = remount(fs, backing);
    // Touch only `visited`: `deep` stays unloaded records in this mount.
    lookup(&fs, &[b"visited", b"a"]);
    fs.compact().unwrap();
    create_file(&fs, ROOT, b"after", 0o600, b"later");
    let fs = remount(fs, backing);
    let mut after = snapshot(&fs);
    after.remove(&vec![b"after".to_vec()]);
    assert_same_tree(&before, &after, "after a checkpoint");
    assert_eq!(fs.getattr(ROOT).unwrap().perm, 0o700);
    let store: Vec<String> = std::fs::read_dir(backing.join(".pershome"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        store.iter().any(|n| n.starts_with("checkpoint.")),
        "store holds {store:?}"
    );
    assert_fat_clean(backing);
}

/// Stick metadata is attacker-controlled: records that contradict the backing tree are
/// overruled by what the backing really holds, and nothing panics.
#[test]
fn records_that_contradict_the_backing_are_overruled() {
    use pershome::meta::journal::{Journal, OpenMode};
    use pershome::meta::{Meta, Record};
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    std::fs::write(backing.join("file"), b"data").unwrap();
    std::fs::create_dir(backing.join("dir")).unwrap();
    std::fs::write(backing.join("linked"), b"content").unwrap();
    {
        let root = std::fs::File::open(backing).unwrap();
        let (mut journal, _) = Journal::open(root.as_fd(), OpenMode::ReadWrite).unwrap();
        let p = |s: &str| vec![s.as_bytes().to_vec()];
        journal
            .append(&[
                Record::Put {
                    path: p("file"),
                    meta: Meta {
                        mode: libc::S_IFDIR | 0o755,
                        ..Meta::default()
                    },
                },
                Record::Put {
                    path: p("dir"),
                    meta: Meta {
                        mode: libc::S_IFREG | 0o644,
                        ..Meta::default()
                    },
                },
                Record::Put {
                    path: p("linked"),
                    meta: Meta {
                        mode: libc::S_IFREG,
                        link: Some(7),
                        ..Meta::default()
                    },
                },
                Record::PutInode {
                    id: 7,
                    meta: Meta {
                        mode: libc::S_IFDIR | 0o777,
                        nlink: 2,
                        ..Meta::default()
                    },
                },
                Record::Put {
                    path: p("ghost"),
                    meta: Meta {
                        mode: libc::S_IFREG | 0o4755,
                        uid: 0,
                        ..Meta::default()
                    },
                },
            ])
            .unwrap();
    }
    let fs = open(backing);
    assert_eq!(lookup(&fs, &[b"file"]).kind, Kind::File);
    assert_eq!(read_all(&fs, lookup(&fs, &[b"file"]).ino), b"data");
    assert_eq!(lookup(&fs, &[b"dir"]).kind, Kind::Dir);
    let linked = lookup(&fs, &[b"linked"]);
    assert_eq!(
        linked.kind,
        Kind::File,
        "a link record whose content file is missing"
    );
    assert_eq!(read_all(&fs, linked.ino), b"content");
    assert_eq!(
        fs.lookup(ROOT, b"ghost").err(),
        Some(Errno::ENOENT),
        "a record without a backing entry"
    );
}

/// Mounting does not walk the stick: only the directories on the way to what is used are
/// listed, however many files the stick holds.
#[test]
fn mounting_a_big_stick_lists_only_what_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    for d in 0..100 {
        let sub = backing.join(format!("dir{d:03}"));
        std::fs::create_dir(&sub).unwrap();
        for f in 0..100 {
            std::fs::write(sub.join(format!("f{f:03}")), b"").unwrap();
        }
    }
    let fs = open(backing);
    assert_eq!(fs.directories_listed(), 0, "opening lists nothing");
    let f = lookup(&fs, &[b"dir042", b"f007"]);
    assert_eq!(f.kind, Kind::File);
    assert_eq!(
        fs.directories_listed(),
        2,
        "the root and dir042 only, of 101 directories"
    );
}

/// One writer per stick: a second mount of the same store is refused while the first is up
/// (after waiting `LOCK_WAIT` for it to go).
#[test]
fn a_stick_can_be_mounted_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let second = Fs::open_backing(backing, opts());
    assert!(
        matches!(
            second,
            Err(pershome::fs::OpenError::Store(
                pershome::meta::journal::StoreError::Busy
            ))
        ),
        "expected Busy, got {second:?}"
    );
    fs.shutdown();
    drop(fs);
    let again = open(backing);
    drop(again);
}

/// Regression: a commit made by fsync while the file was still open recorded the backing
/// file's size from before the write, so after a crash the next mount took pershome's own
/// write for an edit made on another computer and replaced the mtime.
#[test]
fn fsync_before_close_records_the_file_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let (attr, fh) = fs.create(USER, ROOT, b"log", 0o600, libc::O_RDWR).unwrap();
    fs.write(fh, 0, b"entry 1\n").unwrap();
    let t = Timespec {
        sec: 1_700_000_000,
        nsec: 123,
    };
    fs.setattr(
        attr.ino,
        SetAttr {
            mtime: Some(SetTime::At(t)),
            ..SetAttr::default()
        },
    )
    .unwrap();
    fs.fsync(fh, false).unwrap();
    // The daemon dies here: no release, no unmount.
    drop(fs);
    let fs = open(backing);
    let log = lookup(&fs, &[b"log"]);
    assert_eq!((log.size, log.mtime, log.perm), (8, t, 0o600));
}

/// A batch holding a record that tries to name a path outside its directory is refused as a
/// whole at recovery, with a warning; the home still mounts, with default metadata there.
#[test]
fn a_record_with_a_slash_in_a_name_is_refused_and_the_home_mounts() {
    use pershome::meta::journal::{Journal, OpenMode};
    use pershome::meta::{Meta, Record};
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    std::fs::write(backing.join("f"), b"data").unwrap();
    {
        let root = std::fs::File::open(backing).unwrap();
        let (mut journal, _) = Journal::open(root.as_fd(), OpenMode::ReadWrite).unwrap();
        let meta = Meta {
            mode: libc::S_IFREG | 0o600,
            name: Some(b"../../etc/passwd".to_vec()),
            ..Meta::default()
        };
        journal
            .append(&[Record::Put {
                path: vec![b"f".to_vec()],
                meta,
            }])
            .unwrap();
    }
    let fs = open(backing);
    assert!(
        !fs.recovery_warnings().is_empty(),
        "the refused batch is reported"
    );
    let f = lookup(&fs, &[b"f"]);
    assert_eq!(
        (f.perm, f.uid),
        (0o644, 1000),
        "default metadata for the file"
    );
    assert_eq!(read_all(&fs, f.ino), b"data");
    assert_eq!(list(&fs, ROOT), vec![b"f".to_vec()]);
}

/// A bit flipped in the journal costs at most the damaged batch and what follows it.
#[test]
fn a_bit_flipped_journal_still_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    let a = create_file(&fs, ROOT, b"a", 0o600, b"first");
    fs.commit().unwrap();
    fs.setattr(
        a.ino,
        SetAttr {
            mode: Some(0o640),
            ..SetAttr::default()
        },
    )
    .unwrap();
    fs.shutdown();
    drop(fs);
    let journal = std::fs::read_dir(backing.join(".pershome"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("journal.")
        })
        .unwrap();
    let mut bytes = std::fs::read(&journal).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&journal, &bytes).unwrap();
    let fs = open(backing);
    assert!(!fs.recovery_warnings().is_empty());
    let a = lookup(&fs, &[b"a"]);
    assert_eq!(a.perm, 0o600, "the state of the last intact commit");
    assert_eq!(read_all(&fs, a.ino), b"first");
}

/// Regression: a hard-linked name's record lost the POSIX name a hashed backing name needs
/// (at `link()` and at a rename of a linked name), so after a remount it showed as its hashed
/// backing name.
#[test]
fn hard_linked_hashed_names_keep_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path();
    let fs = open(backing);
    create_file(&fs, ROOT, "É".as_bytes(), 0o644, b"upper");
    let lower = create_file(&fs, ROOT, "é".as_bytes(), 0o644, b"lower");
    fs.link(lower.ino, ROOT, "ÉCOLE".as_bytes()).unwrap();
    create_file(&fs, ROOT, "école".as_bytes(), 0o644, b"other");
    fs.link(lower.ino, ROOT, b"plain").unwrap();
    fs.rename(ROOT, b"plain", ROOT, "Écolé".as_bytes(), 0)
        .unwrap();
    create_file(&fs, ROOT, "écolé".as_bytes(), 0o644, b"third");
    fs.rename(ROOT, "Écolé".as_bytes(), ROOT, "ÉCOLÉ".as_bytes(), 0)
        .unwrap();
    let before = snapshot(&fs);
    let fs = remount(fs, backing);
    assert_same_tree(&before, &snapshot(&fs), "the tree after a remount");
    assert_eq!(lookup(&fs, &["ÉCOLÉ".as_bytes()]).nlink, 3);
    assert_fat_clean(backing);
}

/// A listing read by inode in small batches (as the kernel reads it once OPENDIR is declined)
/// while the directory changes between batches: every entry that exists throughout is listed
/// exactly once, offsets only grow, and hard links in one folder are two entries.
#[test]
fn a_listing_by_offset_survives_changes_between_batches() {
    let dir = tempfile::tempdir().unwrap();
    let fs = open(dir.path());
    let d = fs.mkdir(USER, ROOT, b"d", 0o755).unwrap().ino;
    for i in 0..40 {
        create_file(&fs, d, format!("f{i:02}").as_bytes(), 0o644, b"");
    }
    let f05 = lookup(&fs, &[b"d", b"f05"]).ino;
    fs.link(f05, d, b"f05-link").unwrap();
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut offset = 0;
    let mut round = 0;
    loop {
        let batch = fs.list_dir(d, offset, 3).unwrap();
        if batch.is_empty() {
            break;
        }
        for (off, e) in &batch {
            assert!(
                *off > offset,
                "offset {off} after {offset} for {:?}",
                e.name
            );
            offset = *off;
            seen.push(e.name.clone());
        }
        // Between batches: remove an entry already listed and one not listed yet (f39 is the
        // newest, so listed last), and add new ones.
        round += 1;
        if round == 2 {
            fs.unlink(d, b"f00").unwrap();
            fs.unlink(d, b"f39").unwrap();
        }
        if round <= 5 {
            create_file(&fs, d, format!("new{round:02}").as_bytes(), 0o644, b"");
        }
    }
    let mut expected: Vec<Vec<u8>> = [b".".to_vec(), b"..".to_vec(), b"f05-link".to_vec()]
        .into_iter()
        .chain((0..39).map(|i| format!("f{i:02}").into_bytes()))
        .collect();
    expected.sort();
    let mut stable: Vec<Vec<u8>> = seen
        .iter()
        .filter(|n| !n.starts_with(b"new"))
        .cloned()
        .collect();
    stable.sort();
    assert_eq!(
        stable,
        expected,
        "entries that existed throughout, each once: expected {:?}, got {:?}",
        expected
            .iter()
            .map(|n| String::from_utf8_lossy(n))
            .collect::<Vec<_>>(),
        stable
            .iter()
            .map(|n| String::from_utf8_lossy(n))
            .collect::<Vec<_>>()
    );
    assert_fat_clean(dir.path());
}
