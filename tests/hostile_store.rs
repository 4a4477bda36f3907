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
