//! The memory a hostile store can make the daemon use (issue 10, hole 4): store files are read
//! one frame at a time, never whole, so a store file costs at most what one frame costs
//! (`MAX_FRAME_LEN`, 16 MiB), not its size (up to 1 GiB; `docs/format.md` § Memory). Its own
//! test binary:
//! it measures the process's peak resident memory, which other tests running beside it in
//! one process would blur.

use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use pershome::fs::{Fs, FsOptions};
use pershome::meta::journal::MAX_FILE_LEN;
use pershome::meta::{Journal, Meta, OpenMode, Record};

/// The peak resident memory of this process so far, in bytes.
fn peak_rss() -> u64 {
    // SAFETY: getrusage fills the struct it is given; the result is checked.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    // ru_maxrss is in KiB on Linux.
    usage.ru_maxrss as u64 * 1024
}

/// The hostile journal's size: 256 MiB, as a stick can make with one sparse file (up to
/// `MAX_FILE_LEN`, 1 GiB; smaller here only so that the scan for intact frames after the
/// damage stays quick in a debug build).
const HOSTILE_LEN: u64 = 256 << 20;

/// A journal of `HOSTILE_LEN` bytes: one real batch, then a frame claiming nearly the whole
/// file (zeros, so its checksum fails). The daemon must read past it without ever holding it:
/// it used to read the whole file into memory.
#[test]
fn a_store_file_of_256_mib_costs_one_frame_of_memory_not_the_file() {
    let dir = tempfile::tempdir().unwrap();
    {
        let root = std::fs::File::open(dir.path()).unwrap();
        let (mut journal, _) = Journal::open(root.as_fd(), OpenMode::ReadWrite).unwrap();
        journal
            .append(&[Record::Put {
                path: vec![b"kept".to_vec()],
                meta: Meta {
                    mode: libc::S_IFREG | 0o640,
                    ..Meta::default()
                },
            }])
            .unwrap();
    }
    let path = dir.path().join(".pershome/journal.0000000000000001");
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let end = file.seek(SeekFrom::End(0)).unwrap();
    let claimed = (HOSTILE_LEN - end - 12) as u32;
    let mut frame = b"PSHB".to_vec();
    frame.extend(claimed.to_le_bytes());
    frame.extend(0u32.to_le_bytes());
    file.write_all(&frame).unwrap();
    file.set_len(HOSTILE_LEN).unwrap();
    const { assert!(HOSTILE_LEN <= MAX_FILE_LEN, "a size the reader accepts") };
    drop(file);

    let before = peak_rss();
    let fs = Fs::open_backing(dir.path(), FsOptions::new(1000, 1000)).unwrap();
    let attr = fs.lookup(pershome::fs::ROOT, b"kept");
    let warnings = fs.recovery_warnings();
    fs.shutdown();
    drop(fs);
    let grew = peak_rss().saturating_sub(before);
    // The ceiling of docs/format.md § Memory for a store this small: one frame buffer, one
    // scan window, and the tree.
    const CEILING: u64 = 64 << 20;
    assert!(
        grew < CEILING,
        "opening a 256 MiB store file raised the peak memory by {} MiB (ceiling {} MiB)",
        grew >> 20,
        CEILING >> 20
    );
    // The batch before the damage is kept; the damage is reported.
    assert!(
        attr.is_err(),
        "no backing entry `kept` exists, so no lookup finds it"
    );
    assert!(
        warnings.iter().any(|w| w.contains("more than the")),
        "the oversized frame is reported: {warnings:?}"
    );
}
