//! Memory at scale (issue 14, Scale): the daemon holds the store's records of a directory only
//! once that directory is needed, not every record of the store from the mount on. The counts
//! come from `Fs::resident` (inodes in the table, store records held in memory): counts, not
//! timings or RSS, so they are exact on a busy machine.
//!
//! Also the correctness of reading records lazily: metadata set before a compaction
//! (checkpoint) and after it (journal), directories renamed before they were ever loaded, and
//! a compaction made while most directories were not loaded all come back at the next mount.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use pershome::fs::{Ctx, Fs, SetAttr, ROOT};

const DIRS: u32 = 40;
const FILES: u32 = 50;

fn ctx() -> Ctx {
    Ctx {
        uid: 1000,
        gid: 1000,
        pid: 1,
        umask: 0,
    }
}

fn dir_name(d: u32) -> Vec<u8> {
    format!("d{d:02}").into_bytes()
}

fn file_name(f: u32) -> Vec<u8> {
    format!("f{f:03}.dat").into_bytes()
}

/// A permission each file gets, so that a lost record shows (the default is 0644).
fn perm_of(d: u32, f: u32) -> u32 {
    0o600 | ((d + f) % 8) << 3
}

/// DIRS directories of FILES files each, every file with its own mode, all in the store's
/// checkpoint (compacted), nothing in the journal.
fn build_store(backing: &std::path::Path) {
    let fs = common::open(backing);
    for d in 0..DIRS {
        let dir = fs.mkdir(ctx(), ROOT, &dir_name(d), 0o750).unwrap().ino;
        for f in 0..FILES {
            let (attr, fh) = fs
                .create(ctx(), dir, &file_name(f), perm_of(d, f), libc::O_WRONLY)
                .unwrap();
            fs.release(fh).unwrap();
            assert_eq!(attr.perm, perm_of(d, f));
        }
    }
    fs.compact().unwrap();
    fs.shutdown();
}

fn lookup_path(fs: &Fs, path: &[&[u8]]) -> pershome::fs::Attr {
    let mut ino = ROOT;
    let mut attr = None;
    for name in path {
        let a = fs
            .lookup(ino, name)
            .unwrap_or_else(|e| panic!("looking up {:?}: {e}", String::from_utf8_lossy(name)));
        ino = a.ino;
        attr = Some(a);
    }
    attr.expect("a path of at least one name")
}

fn list(fs: &Fs, ino: u64) -> Vec<Vec<u8>> {
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

/// After a mount of a store of 2,000 files in 40 directories and a listing of the top and of
/// one directory, the daemon holds inodes for what was listed and no store record of the 39
/// directories nobody looked into. It used to hold all 2,000 records from the mount on.
#[test]
fn listing_one_directory_holds_only_that_directorys_records() {
    let dir = tempfile::tempdir().unwrap();
    build_store(dir.path());

    let fs = common::open(dir.path());
    let idle = fs.resident();
    assert!(
        idle.records == 0 && idle.inodes == 1,
        "an idle mount should hold no store record and only the root inode, got {idle:?}"
    );
    assert_eq!(list(&fs, ROOT).len(), DIRS as usize);
    let d07 = lookup_path(&fs, &[b"d07"]);
    let names = list(&fs, d07.ino);
    assert_eq!(names.len(), FILES as usize);
    for f in 0..FILES {
        let attr = fs.lookup(d07.ino, &file_name(f)).unwrap();
        assert_eq!(attr.perm, perm_of(7, f), "d07/{}", f);
    }
    let held = fs.resident();
    // The root, its DIRS directories, d07's FILES files.
    let looked_up = 1 + u64::from(DIRS) + u64::from(FILES);
    assert!(
        held.inodes <= looked_up,
        "expected at most {looked_up} inodes after listing the top and d07, got {held:?}"
    );
    assert!(
        held.records == 0,
        "expected no store record held for the {} directories not listed (their records \
         stay on the stick until needed), got {held:?}",
        DIRS - 1
    );
    fs.shutdown();
}

/// Records from the checkpoint and the journal meet correctly when read lazily: a mode set
/// after the compaction, a directory renamed before it was loaded, a directory removed, and
/// then a compaction taken while most directories are not loaded; every file keeps its mode
/// through two more mounts.
#[test]
fn lazily_read_records_survive_renames_journal_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    build_store(dir.path());

    // Session 1: changes go to the journal, on top of the checkpoint.
    let fs = common::open(dir.path());
    let f3 = lookup_path(&fs, &[b"d03", b"f004.dat"]);
    fs.setattr(
        f3.ino,
        SetAttr {
            mode: Some(0o711),
            ..SetAttr::default()
        },
    )
    .unwrap();
    // d05 is never loaded before its rename: its records must move with it.
    fs.rename(ROOT, b"d05", ROOT, b"moved", 0).unwrap();
    // d06 is renamed into d08 (loaded: the target's parent), then d08 is renamed back out.
    let d08 = lookup_path(&fs, &[b"d08"]);
    fs.rename(ROOT, b"d06", d08.ino, b"inner", 0).unwrap();
    fs.rename(ROOT, b"d08", ROOT, b"outer", 0).unwrap();
    // d09 is emptied and removed.
    let d09 = lookup_path(&fs, &[b"d09"]);
    for f in 0..FILES {
        fs.unlink(d09.ino, &file_name(f)).unwrap();
    }
    fs.rmdir(ROOT, b"d09").unwrap();
    fs.shutdown();
    drop(fs);

    let expect = |fs: &Fs| {
        let mut top = list(fs, ROOT);
        top.sort();
        let mut want: Vec<Vec<u8>> = (0..DIRS)
            .filter(|d| ![5, 6, 8, 9].contains(d))
            .map(dir_name)
            .chain([b"moved".to_vec(), b"outer".to_vec()])
            .collect();
        want.sort();
        assert_eq!(top, want);
        for d in (0..DIRS).filter(|d| ![5, 6, 8, 9].contains(d)) {
            for f in 0..FILES {
                let attr = lookup_path(fs, &[&dir_name(d), &file_name(f)]);
                let want = if (d, f) == (3, 4) {
                    0o711
                } else {
                    perm_of(d, f)
                };
                assert_eq!(attr.perm, want, "{}/{}", d, f);
            }
        }
        for (path, d) in [
            (vec![&b"moved"[..]], 5),
            (vec![&b"outer"[..], &b"inner"[..]], 6),
            (vec![&b"outer"[..]], 8),
        ] {
            let dir = lookup_path(fs, &path);
            assert_eq!(dir.perm, 0o750, "{path:?}");
            for f in 0..FILES {
                let attr = fs.lookup(dir.ino, &file_name(f)).unwrap();
                assert_eq!(attr.perm, perm_of(d, f), "{path:?}/{f}");
            }
        }
    };

    // Session 2: compact while only the top is loaded, then rename an unloaded directory
    // after the compaction (journal on top of the new checkpoint).
    let fs = common::open(dir.path());
    assert_eq!(list(&fs, ROOT).len(), DIRS as usize - 2);
    fs.compact().unwrap();
    fs.rename(ROOT, b"d10", ROOT, b"d10x", 0).unwrap();
    fs.rename(ROOT, b"d10x", ROOT, b"d10", 0).unwrap();
    fs.shutdown();
    drop(fs);

    let fs = common::open(dir.path());
    expect(&fs);
    fs.shutdown();
}

/// A checkpoint written by an earlier pershome (its records not in checkpoint order) is
/// replayed into memory as before, every record right; the mount's unmount rewrites it in
/// order, and the next mount holds none of its records until a directory is listed.
#[test]
fn an_unordered_checkpoint_is_read_whole_then_rewritten_in_order_at_unmount() {
    use pershome::meta::{Journal, Meta, OpenMode, Record, OWNER_ID};
    use std::os::fd::AsFd;

    let dir = tempfile::tempdir().unwrap();
    let mut records = Vec::new();
    for d in 0..3u32 {
        std::fs::create_dir(dir.path().join(format!("d{d:02}"))).unwrap();
        records.push(Record::Put {
            path: vec![dir_name(d)],
            meta: Meta {
                mode: libc::S_IFDIR | 0o750,
                uid: OWNER_ID,
                gid: OWNER_ID,
                ..Meta::default()
            },
        });
        for f in 0..5u32 {
            let path = dir.path().join(format!("d{d:02}/f{f:03}.dat"));
            std::fs::write(&path, b"").unwrap();
            let mtime = std::fs::metadata(&path).unwrap();
            use std::os::unix::fs::MetadataExt;
            let t = pershome::meta::Timespec {
                sec: mtime.mtime(),
                nsec: mtime.mtime_nsec() as u32,
            };
            records.push(Record::Put {
                path: vec![dir_name(d), file_name(f)],
                meta: Meta {
                    mode: libc::S_IFREG | perm_of(d, f),
                    uid: OWNER_ID,
                    gid: OWNER_ID,
                    mtime: t,
                    atime: t,
                    ctime: t,
                    btime: t,
                    backing_mtime: t,
                    ..Meta::default()
                },
            });
        }
    }
    // Children before parents, last name first: an order no checkpoint of this pershome has.
    records.reverse();
    {
        let root = std::fs::File::open(dir.path()).unwrap();
        let (mut journal, _) = Journal::open(root.as_fd(), OpenMode::ReadWrite).unwrap();
        journal.checkpoint(&records).unwrap();
    }
    let check = |fs: &Fs| {
        for d in 0..3 {
            for f in 0..5 {
                let attr = lookup_path(fs, &[&dir_name(d), &file_name(f)]);
                assert_eq!(attr.perm, perm_of(d, f), "d{d}/f{f}");
            }
        }
    };

    let fs = common::open(dir.path());
    let held = fs.resident();
    assert_eq!(
        held.records, 18,
        "an unordered checkpoint is held in memory: {held:?}"
    );
    check(&fs);
    fs.shutdown();
    drop(fs);

    let fs = common::open(dir.path());
    let held = fs.resident();
    assert_eq!(
        held.records, 0,
        "rewritten in order at unmount, the checkpoint is read lazily: {held:?}"
    );
    check(&fs);
    fs.shutdown();
}

/// A directory not listed yet shows the link count its listing will show: the backing's
/// count (2 and one per subdirectory on vfat, the kernel's exFAT and ext4), taken before the
/// directory's records are read. The adapter lets the kernel keep attributes for an hour
/// (`fuse::TTL`), so the count must not change when the directory is first listed.
#[test]
fn an_unlisted_directory_shows_the_link_count_of_its_listing() {
    let s = common::scratch("pershome-lazy-nlink");
    build_store(&s.backing);
    // One folder gains two subdirectories on another computer, one of them with a name that
    // FAT would not take from Linux; the other keeps none.
    for sub in ["from windows", "Ünïcode"] {
        std::fs::create_dir(s.backing.join(OsStr::from_bytes(&dir_name(5))).join(sub)).unwrap();
    }
    let fs = common::open(&s.backing);
    for (d, want) in [(5, 4), (6, 2)] {
        let before = lookup_path(&fs, &[&dir_name(d)]);
        assert_eq!(before.nlink, want, "d{d:02} before its listing: {before:?}");
        let _ = list(&fs, before.ino);
        let after = fs.getattr(before.ino).unwrap();
        assert_eq!(after.nlink, want, "d{d:02} after its listing: {after:?}");
        assert_eq!(
            before, after,
            "d{d:02}: every attribute the same once listed"
        );
    }
    fs.shutdown();
}
