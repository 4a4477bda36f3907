//! Fuzz target: the whole store recovery (`meta::journal::Journal::open`) over store files
//! whose bodies are the fuzzer's bytes.
//!
//! Input layout (`cargo xtask fuzz` writes seeds in the same layout from real stores):
//! - byte 0: bits 0–1 give the file count, 1 + (bits % 3); bits 2–3, 4–5, 6–7 pick the name
//!   of file 1, 2, 3 from `NAMES`;
//! - each file but the last: a u16 LE length, then that many body bytes (cut at the end of
//!   the input); the last file takes the rest.
//!
//! Asserts no panic; that ReadOnly and ReadWrite opens of the same files agree on success and
//! on the recovered state (ReadWrite repairs only after replay, docs/format.md § Recovery);
//! and that after a ReadWrite open (which repairs the store) a ReadOnly open recovers that
//! same state again. States are compared as `Replayed::snapshot()` (what a checkpoint
//! holds): a metadata-less, childless node is an artefact of replay, not state.
#![no_main]

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pershome::meta::{Journal, OpenMode, Recovered, StoreError, STORE_DIR};

const NAMES: [&str; 4] = [
    "checkpoint.0000000000000001",
    "journal.0000000000000001",
    "checkpoint.0000000000000002",
    "journal.0000000000000002",
];

/// The (name, body) pairs an input stands for; a later file of the same name replaces an
/// earlier one.
fn split(data: &[u8]) -> Vec<(&'static str, &[u8])> {
    let Some((&head, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let count = 1 + usize::from(head & 3) % 3;
    let mut files = Vec::with_capacity(count);
    for i in 0..count {
        let name = NAMES[usize::from((head >> (2 + 2 * i)) & 3)];
        let body;
        if i + 1 == count {
            body = rest;
            rest = &[];
        } else {
            let len = match rest {
                [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
                _ => 0,
            };
            let after_len = rest.get(2..).unwrap_or(&[]);
            let (b, r) = after_len.split_at(len.min(after_len.len()));
            body = b;
            rest = r;
        }
        files.retain(|(n, _)| *n != name);
        files.push((name, body));
    }
    files
}

/// A fresh backing root on tmpfs when there is one (recovery fsyncs in ReadWrite).
fn backing_root(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("creating a temporary backing root");
    let store = dir.path().join(STORE_DIR);
    std::fs::create_dir(&store).expect("creating the store directory");
    for (name, body) in files {
        std::fs::write(store.join(name), body).expect("writing a store file");
    }
    dir
}

fn open(root: &Path, mode: OpenMode) -> Result<(Journal, Recovered), StoreError> {
    let fd = File::open(root).expect("opening the backing root");
    Journal::open(fd.as_fd(), mode)
}

fuzz_target!(|data: &[u8]| {
    let files = split(data);

    let ro_root = backing_root(&files);
    let ro = open(ro_root.path(), OpenMode::ReadOnly);

    let rw_root = backing_root(&files);
    let rw = open(rw_root.path(), OpenMode::ReadWrite);

    match (&ro, &rw) {
        (Ok((_, ro)), Ok((_, rw))) => {
            assert_eq!(
                ro.replayed.snapshot(),
                rw.replayed.snapshot(),
                "ReadOnly and ReadWrite recovered different states; warnings ro {:?} rw {:?}",
                ro.warnings,
                rw.warnings
            );
        }
        (Err(_), Err(_)) => return,
        (ro, rw) => panic!(
            "ReadOnly and ReadWrite disagree: ro ok {} rw ok {}; ro err {:?}, rw err {:?}",
            ro.is_ok(),
            rw.is_ok(),
            ro.as_ref().err(),
            rw.as_ref().err()
        ),
    }
    // Close the ReadWrite store before reopening it.
    let Ok((journal, recovered)) = rw else {
        return;
    };
    drop(journal);
    match open(rw_root.path(), OpenMode::ReadOnly) {
        Ok((_, again)) => assert_eq!(
            again.replayed.snapshot(),
            recovered.replayed.snapshot(),
            "state after the ReadWrite repair differs from what it recovered; warnings \
             at repair {:?}, at reopen {:?}",
            recovered.warnings,
            again.warnings
        ),
        Err(e) => panic!("reopening the store ReadOnly after a ReadWrite open failed: {e}"),
    }
});
