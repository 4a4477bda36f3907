//! Fuzz target: sequences of store operations through the real writer and recovery
//! (`meta::Journal`): batches of records of every kind appended, checkpoints (compaction),
//! clean reopens, and crashes that cut the live journal anywhere.
//!
//! The input is decoded (`arbitrary::Unstructured`) into a list of operations on short paths
//! over a small alphabet, so that records meet each other (a rename onto a removed path, an
//! exchange of a parent with its child, a chain of renames that nests a directory ever
//! deeper). Alongside the store, the target keeps the state each committed batch led to, as
//! the same `Replayed::apply` computes it in memory.
//!
//! Asserts no panic, no hang and no stack overflow, and:
//! - a clean reopen recovers exactly the state of the last committed batch, with no warning;
//! - after a crash that cut the live journal at any byte, recovery gives the state of some
//!   batch committed before the cut (never a state that was not committed, never a mix);
//! - a snapshot (what a checkpoint holds) replays to itself.
#![no_main]

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::Path;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pershome::meta::pending::Replayed;
use pershome::meta::{Journal, Meta, OpenMode, Parts, Record, Timespec, OWNER_ID, STORE_DIR};

const NAMES: [&[u8]; 5] = [b"a", b"b", b"c", b"Dir", b"x.txt"];

/// Up to `max` of the input's bytes, as many as the input chooses.
fn take<'a>(u: &mut Unstructured<'a>, max: usize) -> Result<&'a [u8]> {
    let len = u.int_in_range(0..=max)?;
    u.bytes(len)
}

fn path(u: &mut Unstructured<'_>) -> Result<Vec<Vec<u8>>> {
    let depth = u.int_in_range(1..=3)?;
    (0..depth).map(|_| Ok(u.choose(&NAMES)?.to_vec())).collect()
}

fn meta(u: &mut Unstructured<'_>) -> Result<Meta> {
    let kind = *u.choose(&[libc::S_IFREG, libc::S_IFDIR, libc::S_IFLNK, libc::S_IFIFO])?;
    let t = Timespec {
        sec: u.arbitrary::<i32>()?.into(),
        nsec: u.int_in_range(0..=999_999_999)?,
    };
    let mut m = Meta {
        mode: kind | (u.arbitrary::<u32>()? & 0o7777),
        uid: if u.arbitrary()? {
            OWNER_ID
        } else {
            u.arbitrary()?
        },
        gid: OWNER_ID,
        mtime: t,
        atime: t,
        ctime: t,
        btime: t,
        backing_size: u.arbitrary::<u16>()?.into(),
        backing_mtime: t,
        ..Meta::default()
    };
    if u.ratio(1, 4)? {
        m.xattrs = vec![(b"user.k".to_vec(), take(u, 8)?.to_vec())];
    }
    if u.ratio(1, 6)? {
        m.link = Some(u.int_in_range(1..=3)?);
    }
    if u.ratio(1, 6)? {
        m.name = Some(b"Name".to_vec());
    }
    if u.ratio(1, 8)? {
        m.parts = Some(Parts {
            id: u.int_in_range(1..=3)?,
            size: 4096 * u64::from(u.int_in_range(1u8..=4)?),
        });
    }
    Ok(m)
}

fn record(u: &mut Unstructured<'_>) -> Result<Record> {
    Ok(match u.int_in_range(0..=7)? {
        0 | 1 => Record::Put {
            path: path(u)?,
            meta: meta(u)?,
        },
        2 => Record::Remove { path: path(u)? },
        3 => Record::Rename {
            from: path(u)?,
            to: path(u)?,
        },
        // A chain of these nests a directory one level deeper each time.
        4 => {
            let from = vec![u.choose(&NAMES)?.to_vec()];
            let mut to = vec![u.choose(&NAMES)?.to_vec()];
            to.push(from[0].clone());
            Record::Rename { from, to }
        }
        5 => Record::Exchange {
            a: path(u)?,
            b: path(u)?,
        },
        6 => Record::PutInode {
            id: u.int_in_range(1..=3)?,
            meta: meta(u)?,
        },
        _ => Record::RemoveInode {
            id: u.int_in_range(1..=3)?,
        },
    })
}

fn replay(records: &[Record]) -> Replayed {
    let mut state = Replayed::default();
    for r in records {
        state.apply(r.clone());
    }
    state.limit_depth();
    state
}

fn open(root: &Path) -> (Journal, pershome::meta::Recovered) {
    let fd = std::fs::File::open(root).expect("opening the backing root");
    Journal::open(fd.as_fd(), OpenMode::ReadWrite).expect("a store this target wrote opens")
}

/// The live journal file (the newest `journal.*`).
fn live_journal(root: &Path) -> Option<std::path::PathBuf> {
    let mut names: Vec<_> = std::fs::read_dir(root.join(STORE_DIR))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("journal.") && !n.contains("corrupt"))
        })
        .collect();
    names.sort();
    names.pop()
}

fn run(u: &mut Unstructured<'_>, root: &Path) -> Result<()> {
    let (mut journal, _) = open(root);
    // The state after each committed batch since the last checkpoint or reopen; the last is
    // the current state.
    let mut history: Vec<Vec<Record>> = vec![Vec::new()];
    let mut state = Replayed::default();
    let mut batch = Vec::new();
    for _ in 0..u.int_in_range(1..=64)? {
        match u.int_in_range(0..=9)? {
            0..=5 => batch.push(record(u)?),
            6 => {
                // A parted record goes to a format-2 generation, as `Fs::commit` does.
                let mut next = state.clone();
                for r in &batch {
                    next.apply(r.clone());
                }
                next.limit_depth();
                match journal.append(&batch) {
                    Err(pershome::meta::StoreError::NeedsNewerFormat { .. }) => {
                        journal
                            .checkpoint(&next.snapshot())
                            .expect("writing a format-2 generation");
                        history.clear();
                    }
                    other => other.expect("appending to a healthy store"),
                }
                batch.clear();
                state = next;
                history.push(state.snapshot());
            }
            7 => {
                journal
                    .checkpoint(&state.snapshot())
                    .expect("checkpointing a healthy store");
                history = vec![state.snapshot()];
            }
            8 => {
                drop(journal);
                let (j, recovered) = open(root);
                journal = j;
                let got = recovered.replayed.snapshot();
                assert_eq!(
                    got,
                    state.snapshot(),
                    "a clean reopen lost or changed state; warnings {:?}",
                    recovered.warnings
                );
                assert!(
                    recovered.warnings.is_empty(),
                    "a clean store reopened with warnings {:?}",
                    recovered.warnings
                );
                history = vec![got];
            }
            _ => {
                // A crash: the end of the live journal is lost.
                drop(journal);
                if let Some(live) = live_journal(root) {
                    let len = std::fs::metadata(&live).map(|m| m.len()).unwrap_or(0);
                    let cut = u.int_in_range(0..=len.min(4096))?;
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&live)
                        .expect("opening the live journal");
                    f.set_len(len - cut).expect("cutting the live journal");
                }
                let (j, recovered) = open(root);
                journal = j;
                let got = recovered.replayed.snapshot();
                let Some(at) = history.iter().rposition(|h| *h == got) else {
                    panic!(
                        "after a crash the store recovered a state no batch committed: \
                         {got:?}; committed states {history:?}; warnings {:?}",
                        recovered.warnings
                    );
                };
                history.truncate(at + 1);
                state = replay(&got);
                batch.clear();
            }
        }
        // A snapshot replays to itself.
        let snap = state.snapshot();
        assert_eq!(
            replay(&snap).snapshot(),
            snap,
            "a snapshot does not replay to itself"
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("creating a temporary backing root");
    let mut u = Unstructured::new(data);
    let _ = run(&mut u, dir.path());
});
