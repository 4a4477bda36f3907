//! A crafted stick against the daemon (issue 10, holes 4 and 5): what a stick may hold must
//! never hang a daemon thread, overflow its stack, or make it loop or allocate without bound.
//! In-process tests of `Fs` and the store over a temporary backing directory, standing for a
//! directory or sshfs "stick" whose far side is hostile.
//!
//! A hang is caught by a guard thread rather than by a timing threshold: the operation runs
//! on its own thread, and if it has not returned after a long grace period the test unblocks
//! it (where it can) and fails, naming what hung.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use pershome::fs::{Ctx, Errno, Fs, Ino, ROOT};

mod common;
use common::open;

const USER: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 1,
    umask: 0,
};

/// How long a guarded operation may take before the test calls it hung: far above what any
/// of them needs (milliseconds), so only a real hang trips it.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Runs `op` on its own thread; if it has not returned within `HANG_GUARD`, runs `unblock`
/// (so that the thread can end) and fails the test with `what`.
fn guarded<T: Send + 'static>(
    what: &str,
    op: impl FnOnce() -> T + Send + 'static,
    unblock: impl FnOnce(),
) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(op());
    });
    match rx.recv_timeout(HANG_GUARD) {
        Ok(value) => {
            worker.join().unwrap();
            value
        }
        Err(_) => {
            unblock();
            panic!("{what} did not return within {HANG_GUARD:?}: a daemon thread hangs");
        }
    }
}

/// Opens the other end of fifo `path` without blocking, which wakes a thread blocked in
/// opening it.
fn wake_fifo(path: &Path, flags: libc::c_int) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path; the descriptor is closed at once.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: fd was just opened here.
        unsafe { libc::close(fd) };
    }
}

fn create_file(fs: &Fs, name: &[u8], content: &[u8]) -> Ino {
    let (attr, fh) = fs
        .create(USER, ROOT, name, 0o644, libc::O_RDWR)
        .expect("create");
    fs.write(fh, 0, content).expect("write");
    fs.release(fh).expect("release");
    attr.ino
}

/// Hole 5: a backing file swapped for a fifo after pershome listed it. Opening it for
/// reading or writing used to block in open(2) forever, holding the state lock, so every
/// other operation of the mount hung behind it.
#[test]
fn a_backing_file_swapped_for_a_fifo_never_hangs_open() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(open(dir.path()));
    for (name, flags, wake) in [
        (&b"read.txt"[..], libc::O_RDONLY, libc::O_WRONLY),
        (b"write.txt", libc::O_WRONLY, libc::O_RDONLY),
        (b"both.txt", libc::O_RDWR, libc::O_WRONLY),
    ] {
        let ino = create_file(&fs, name, b"hello");
        // The far side of the "stick" swaps the file for a fifo.
        let backing: PathBuf = dir.path().join(std::ffi::OsStr::from_bytes(name));
        std::fs::remove_file(&backing).unwrap();
        mkfifo(&backing);
        let worker_fs = fs.clone();
        let result = guarded(
            &format!(
                "open({}) of a file swapped for a fifo",
                String::from_utf8_lossy(name)
            ),
            move || worker_fs.open(ino, flags),
            || wake_fifo(&backing, wake),
        );
        assert_eq!(
            result,
            Err(Errno::EIO),
            "opening {} (now a fifo) must fail with EIO",
            String::from_utf8_lossy(name)
        );
        // The mount goes on serving.
        assert!(fs.getattr(ROOT).is_ok());
    }
}

/// Options of a mount that stores files in parts of 4 KiB (as `tests/parts.rs`), so that
/// part indexes run high with few bytes.
fn parted_opts() -> pershome::fs::FsOptions {
    pershome::fs::FsOptions {
        part_size: 4096,
        parts: pershome::fs::PartsMode::Always,
        ..common::opts()
    }
}

/// The one parts directory of the store (`.pershome/parts/<id>/`).
fn parts_dir(backing: &Path) -> PathBuf {
    let parts = backing.join(".pershome/parts");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "one parted file, one parts directory: {dirs:?}"
    );
    dirs.pop().unwrap()
}

fn part_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Hole 4, the parts loops: a stick plants part `ffffffff` in a parted file's parts directory.
/// The file's length, read from the parts, becomes 2^32 · 4 KiB = 16 TiB; SEEK_DATA from a
/// hole, fsync and punching a hole used to walk every one of the four billion missing part
/// indexes, opening each, under `parts_lock` (the mount hung for hours). They must visit
/// only the parts the listing shows.
#[test]
fn a_planted_part_at_a_huge_index_is_walked_only_as_far_as_the_listing_shows() {
    let dir = tempfile::tempdir().unwrap();
    {
        let fs = Fs::open_backing(dir.path(), parted_opts()).unwrap();
        create_file(&fs, b"big", &[7u8; 5000]);
        fs.shutdown();
    }
    let planted = parts_dir(dir.path()).join("ffffffff");
    std::fs::write(&planted, b"x").unwrap();
    let fs = Arc::new(Fs::open_backing(dir.path(), parted_opts()).unwrap());
    let attr = fs.lookup(ROOT, b"big").unwrap();
    let far = 0xffff_ffffu64 * 4096;
    assert_eq!(attr.size, far + 1, "the length the planted part implies");
    let fh = fs.open(attr.ino, libc::O_RDWR).unwrap();

    let f = fs.clone();
    let data = guarded(
        "SEEK_DATA across four billion missing parts",
        move || f.lseek(fh, 8192, libc::SEEK_DATA),
        || {},
    );
    assert_eq!(data, Ok(far as i64), "the next data is the planted part's");
    let f = fs.clone();
    let hole = guarded(
        "SEEK_HOLE in a missing part",
        move || f.lseek(fh, 8192, libc::SEEK_HOLE),
        || {},
    );
    assert_eq!(hole, Ok(8192), "a missing part is a hole");
    let f = fs.clone();
    let synced = guarded(
        "fsync of a file of four billion parts",
        move || f.fsync(fh, false),
        || {},
    );
    assert_eq!(synced, Ok(()));
    let f = fs.clone();
    let punched = guarded(
        "punching a hole over four billion parts",
        move || {
            f.fallocate(
                fh,
                4096,
                far,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            )
        },
        || {},
    );
    assert_eq!(punched, Ok(()));
    fs.release(fh).unwrap();
    fs.shutdown();
    drop(fs);
    assert_eq!(
        part_names(&parts_dir(dir.path())),
        ["00000001", "ffffffff"],
        "no part was created by walking the missing ones"
    );
    // `pershome fsck` looks at the same layout: it reports the file from the listing, and
    // its repair does not make four billion hole files.
    let backing = dir.path().to_path_buf();
    let report = guarded(
        "fsck --repair of a file of four billion parts",
        move || {
            let opts = pershome::fsck::FsckOptions {
                repair: true,
                force: false,
            };
            pershome::fsck::fsck(&backing, &opts).map(|r| format!("{r:?}"))
        },
        || {},
    )
    .expect("fsck runs");
    assert!(
        report.contains("names part 4294967295"),
        "fsck reports the planted part: {report}"
    );
    assert_eq!(
        part_names(&parts_dir(dir.path())),
        ["00000001", "ffffffff"],
        "fsck made no hole files"
    );
}

/// Hole 4, the tree walks: renames nest the store's path tree one level per record of a few
/// bytes (`a` → `b/a`, `b` → `a/b`, …). A stick with 100,000 of them (2 MB) used to overflow
/// the stack of the thread that dropped or snapshotted the tree (recursive drop), killing the
/// root daemon at its first readdir. Now the walks are iterative and recovery cuts the tree
/// at the deepest path a record may hold, with a warning.
#[test]
fn a_store_nested_deep_by_renames_does_not_overflow_the_stack() {
    use pershome::meta::{Journal, Meta, OpenMode, Record};
    use std::os::fd::AsFd;
    const DEPTH: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    {
        let root = std::fs::File::open(dir.path()).unwrap();
        let (mut journal, _) = Journal::open(root.as_fd(), OpenMode::ReadWrite).unwrap();
        let names: [&[u8]; 2] = [b"a", b"b"];
        let mut batch = vec![Record::Put {
            path: vec![b"a".to_vec()],
            meta: Meta {
                mode: libc::S_IFDIR | 0o755,
                ..Meta::default()
            },
        }];
        for i in 0..DEPTH {
            let (moved, parent) = (names[i % 2], names[(i + 1) % 2]);
            batch.push(Record::Rename {
                from: vec![moved.to_vec()],
                to: vec![parent.to_vec(), moved.to_vec()],
            });
            if batch.len() == 10_000 {
                journal.append(&batch).unwrap();
                batch.clear();
            }
        }
        journal.append(&batch).unwrap();
    }
    // A FUSE worker thread's stack, not the test harness's.
    let backing = dir.path().to_path_buf();
    let worker = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let fs = open(&backing);
            let fh = fs.opendir(ROOT).unwrap();
            let listed = fs.readdir(fh, 0).unwrap().len();
            fs.releasedir(fh);
            let warnings = fs.recovery_warnings();
            fs.compact().unwrap();
            fs.shutdown();
            drop(fs);
            // The checkpoint written over the cut tree opens again.
            let again = open(&backing);
            drop(again);
            (listed, warnings)
        })
        .unwrap();
    let (listed, warnings) = worker.join().expect("the worker thread survives");
    assert_eq!(
        listed, 2,
        "only . and .. (the records name no backing entry)"
    );
    assert!(
        warnings.iter().any(|w| w.contains("1 records ignored")),
        "the record below the cut is reported: {warnings:?}"
    );
}
