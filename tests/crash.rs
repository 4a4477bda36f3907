//! Crash and yank safety (design property 6), tested at every write to the stick.
//!
//! In-process: a deterministic workload runs through `Fs` with `pershome::faults::Faults`
//! under everything it writes to the stick — file data, directory operations (create, mkdir,
//! unlink, rename, truncate, fsync) and the metadata store alike, counted in the order they
//! happen — which lets `n` write-like system calls through and fails the next one (torn: half
//! its buffer written) and every later one with EIO, as a pulled stick or a power cut does. The
//! `Fs` is then dropped without `shutdown()` (the daemon died) and the backing is opened again
//! without faults. That is done for every `n` from 0 to K, the number of write operations of
//! the whole workload.
//!
//! What is checked after each crash, with `S_last` the tree right after the last `fsync` that
//! returned Ok (the empty tree if none did) and "candidates" every tree the workload passed
//! through from `S_last` to its end:
//! - the open succeeds;
//! - every entry (path, type, permissions, owner, mtime, ctime, nlink, size, content, symlink
//!   target, xattrs; not atime) that is the same in all candidates — fsync'ed and not touched
//!   since — is there exactly so (this covers every fsync'ed byte of data that was not
//!   changed later);
//! - every path in the recovered tree exists in some candidate with the same type and the
//!   same content or symlink target (nothing invented, no stale or half-written data);
//! - when no fault fired (n = K), the tree is exactly the final one;
//! - the FAT audit passes; `fsck` finds nothing unrepairable; after `--repair`, a second
//!   `fsck` finds nothing at all.
//!
//! Metadata changed after the last fsync may be lost (recovery goes back to the last commit,
//! and a file created or renamed after it gets the metadata of a file found on the stick), so
//! the recovered tree as a whole is not always one of the candidates; how often it is, is
//! printed.
//!
//! The power-loss mode (`Faults::with_power_loss`): the same workload and checks, but at the
//! crash point the backing tree is also turned into what a pulled stick keeps, only what an
//! fsync or fdatasync made durable (`backing::power_loss`); there, data that no fsync of its
//! own file covered may be gone (its metadata may not). And a split of a file fsync'ed whole,
//! with a power cut at each of its writes.
//!
//! With a real mount: `kill -9` of the daemon in the middle of a busy workload, then a
//! remount, which must show every fsync'ed file with its fsync'ed content.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pershome::audit::assert_fat_clean;
use pershome::backing::power_loss::PowerLoss;

mod common;
use common::{can_mount, daemons_serving, opts, Mount};
use pershome::fs::{Ctx, Errno, Fs, FsOptions, Ino, Kind, PartsMode, SetAttr, SetTime, ROOT};
use pershome::fsck::{fsck, Class, FsckOptions};
use pershome::meta::{Faults, Timespec};

const USER: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 1,
    umask: 0,
};

fn long_tests() -> bool {
    std::env::var("PERSHOME_LONG_TESTS").is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------------------------------------
// Snapshots of the tree as `Fs` shows it
// ---------------------------------------------------------------------------------------------

/// Everything observable about one entry, except atime (reads may move it).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    size: u64,
    mtime: Timespec,
    ctime: Timespec,
    link: Option<Vec<u8>>,
    content: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

type Tree = BTreeMap<Vec<Vec<u8>>, Seen>;

fn list(fs: &Fs, ino: Ino) -> Vec<Vec<u8>> {
    let fh = fs.opendir(ino).expect("opendir");
    let names = fs
        .readdir(fh, 0)
        .expect("readdir")
        .into_iter()
        .map(|(_, e)| e.name)
        .filter(|n| n != b"." && n != b"..")
        .collect();
    fs.releasedir(fh);
    names
}

fn read_all(fs: &Fs, ino: Ino) -> Result<Vec<u8>, Errno> {
    let fh = fs.open(ino, libc::O_RDONLY)?;
    let data = fs.read(fh, 0, 1 << 20);
    fs.release(fh)?;
    data
}

fn xattrs(fs: &Fs, ino: Ino) -> Vec<(Vec<u8>, Vec<u8>)> {
    use pershome::fs::xattr::XattrReply;
    match fs.listxattr(ino, 1 << 16).expect("listxattr") {
        XattrReply::Data(list) => list
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| match fs.getxattr(ino, n, 1 << 16).expect("getxattr") {
                XattrReply::Data(v) => (n.to_vec(), v),
                other => panic!("getxattr gave {other:?}"),
            })
            .collect(),
        XattrReply::Size(_) => Vec::new(),
    }
}

/// The tree as `fs` shows it. Every read must succeed, except in the view of a running `Fs`
/// whose stick has been "pulled" (`after_fault`): there what the stick lost may fail to read,
/// and is recorded as an unreadable marker that no recovered state can match.
fn snapshot(fs: &Fs) -> Tree {
    snapshot_as(fs, false)
}

fn snapshot_as(fs: &Fs, after_fault: bool) -> Tree {
    let unreadable = |what: &str, e: Errno| -> Vec<u8> {
        assert!(after_fault, "{what} failed: {e}");
        format!("<unreadable: {e}>").into_bytes()
    };
    let mut out = Tree::new();
    let mut stack = vec![(ROOT, Vec::new())];
    while let Some((dir, path)) = stack.pop() {
        for name in list(fs, dir) {
            let a = match fs.lookup(dir, &name) {
                Ok(a) => a,
                Err(e) => {
                    unreadable(&format!("lookup of {:?} (listed)", show(&path)), e);
                    continue;
                }
            };
            let mut p: Vec<Vec<u8>> = path.clone();
            p.push(name);
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
                    ctime: a.ctime,
                    link: (a.kind == Kind::Symlink).then(|| {
                        fs.readlink(a.ino)
                            .unwrap_or_else(|e| unreadable("readlink", e))
                    }),
                    content: (a.kind == Kind::File)
                        .then(|| read_all(fs, a.ino).unwrap_or_else(|e| unreadable("read", e))),
                    xattrs: xattrs(fs, a.ino),
                },
            );
            if a.kind == Kind::Dir {
                stack.push((a.ino, p));
            }
        }
    }
    out
}

/// An entry for a failure message: long contents shortened.
fn brief(seen: &Seen) -> String {
    let mut s = seen.clone();
    let content = s.content.take().map(|c| {
        let head = String::from_utf8_lossy(&c[..c.len().min(40)]).into_owned();
        format!("{} bytes {head:?}…", c.len())
    });
    format!("{s:?} content: {content:?}")
}

fn show(path: &[Vec<u8>]) -> String {
    path.iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

// ---------------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------------

fn at(fs: &Fs, path: &[&[u8]]) -> Result<Ino, Errno> {
    let mut ino = ROOT;
    for part in path {
        ino = fs.lookup(ino, part)?.ino;
    }
    Ok(ino)
}

/// Creates `path` with `data`; fsyncs it before closing when `sync`.
fn put_file(
    fs: &Fs,
    dir: &[&[u8]],
    name: &[u8],
    mode: u32,
    data: &[u8],
    sync: bool,
) -> Result<bool, Errno> {
    let parent = at(fs, dir)?;
    let (_, fh) = fs.create(USER, parent, name, mode, libc::O_RDWR)?;
    let result = fs
        .write(fh, 0, data)
        .and_then(|_| if sync { fs.fsync(fh, false) } else { Ok(()) });
    fs.release(fh)?;
    if sync && result.is_ok() {
        let mut path: Vec<&[u8]> = dir.to_vec();
        path.push(name);
        data_synced(&path);
    }
    result.map(|_| sync)
}

thread_local! {
    /// The paths of the files whose data an fsync or fdatasync made durable during the step
    /// running now (`run_workload` collects them).
    static DATA_SYNCED: std::cell::RefCell<Vec<Vec<Vec<u8>>>> = const {
        std::cell::RefCell::new(Vec::new())
    };
}

fn data_synced(path: &[&[u8]]) {
    DATA_SYNCED.with(|d| {
        d.borrow_mut()
            .push(path.iter().map(|p| p.to_vec()).collect())
    });
}

fn append(fs: &Fs, path: &[&[u8]], data: &[u8], sync: bool) -> Result<bool, Errno> {
    let ino = at(fs, path)?;
    let fh = fs.open(ino, libc::O_WRONLY)?;
    let size = fs.getattr(ino)?.size;
    let result = fs
        .write(fh, size, data)
        .and_then(|_| if sync { fs.fsync(fh, true) } else { Ok(()) });
    fs.release(fh)?;
    if sync && result.is_ok() {
        data_synced(path);
    }
    result.map(|_| sync)
}

/// An fsync of a directory: commits all pending metadata.
fn sync_dir(fs: &Fs, path: &[&[u8]]) -> Result<bool, Errno> {
    fs.fsyncdir(at(fs, path)?)?;
    Ok(true)
}

fn ts(sec: i64, nsec: u32) -> SetTime {
    SetTime::At(Timespec { sec, nsec })
}

type Step = (&'static str, fn(&Fs) -> Result<bool, Errno>);

/// The workload: each step does one thing and then either fsyncs (returns Ok(true)) or not
/// (Ok(false)). Together they write every record kind (Put, Remove, Rename, Exchange,
/// PutInode, RemoveInode) and compact once in the middle.
fn steps() -> Vec<Step> {
    vec![
        ("mkdir d", |fs| {
            fs.mkdir(USER, ROOT, b"d", 0o750)?;
            sync_dir(fs, &[])
        }),
        ("create d/f1, fsync", |fs| {
            put_file(
                fs,
                &[b"d"],
                b"f1",
                0o640,
                b"alpha: fsynced data of f1\n",
                true,
            )
        }),
        ("create g", |fs| {
            put_file(fs, &[], b"g", 0o644, &[b'g'; 5000], false)
        }),
        ("chmod g 0600", |fs| {
            let set = SetAttr {
                mode: Some(0o600),
                ..SetAttr::default()
            };
            fs.setattr(at(fs, &[b"g"])?, set)?;
            sync_dir(fs, &[])
        }),
        ("chown g 1234:4321", |fs| {
            let set = SetAttr {
                uid: Some(1234),
                gid: Some(4321),
                ..SetAttr::default()
            };
            fs.setattr(at(fs, &[b"g"])?, set)?;
            Ok(false)
        }),
        ("utimens d/f1 with nanoseconds", |fs| {
            let set = SetAttr {
                atime: Some(ts(1_600_000_000, 123_456_789)),
                mtime: Some(ts(1_500_000_000, 987_654_321)),
                ..SetAttr::default()
            };
            fs.setattr(at(fs, &[b"d", b"f1"])?, set)?;
            sync_dir(fs, &[b"d"])
        }),
        ("setxattr d/f1", |fs| {
            fs.setxattr(at(fs, &[b"d", b"f1"])?, b"user.colour", b"blue", 0)?;
            Ok(false)
        }),
        ("setxattr g", |fs| {
            fs.setxattr(at(fs, &[b"g"])?, b"user.tag", &[0u8, 1, 2, 255], 0)?;
            sync_dir(fs, &[])
        }),
        ("symlink d/ln -> ../g", |fs| {
            fs.symlink(USER, at(fs, &[b"d"])?, b"ln", b"../g")?;
            Ok(false)
        }),
        ("compact", |fs| {
            fs.compact()?;
            Ok(false)
        }),
        ("hard link d/f1 as h", |fs| {
            fs.link(at(fs, &[b"d", b"f1"])?, ROOT, b"h")?;
            sync_dir(fs, &[])
        }),
        ("append to h, fdatasync", |fs| {
            append(fs, &[b"h"], b"beta: more of it\n", true)
        }),
        ("unlink d/f1 (h stays)", |fs| {
            fs.unlink(at(fs, &[b"d"])?, b"f1")?;
            Ok(false)
        }),
        ("rename g to d/g2", |fs| {
            fs.rename(ROOT, b"g", at(fs, &[b"d"])?, b"g2", 0)?;
            sync_dir(fs, &[])
        }),
        ("mkdir e, create e/x", |fs| {
            fs.mkdir(USER, ROOT, b"e", 0o700)?;
            put_file(fs, &[b"e"], b"x", 0o604, b"gamma", false)
        }),
        ("exchange d and e", |fs| {
            fs.rename(ROOT, b"d", ROOT, b"e", libc::RENAME_EXCHANGE)?;
            sync_dir(fs, &[])
        }),
        ("chmod e/g2 0640 (was d/g2)", |fs| {
            let set = SetAttr {
                mode: Some(0o640),
                mtime: Some(ts(1_400_000_000, 1)),
                ..SetAttr::default()
            };
            fs.setattr(at(fs, &[b"e", b"g2"])?, set)?;
            Ok(false)
        }),
        ("unlink d/x", |fs| {
            fs.unlink(at(fs, &[b"d"])?, b"x")?;
            sync_dir(fs, &[])
        }),
        ("mkdir and rmdir t", |fs| {
            fs.mkdir(USER, ROOT, b"t", 0o755)?;
            fs.rmdir(ROOT, b"t")?;
            Ok(false)
        }),
        ("create k, fsync", |fs| {
            put_file(fs, &[b"d"], b"k", 0o600, b"delta", true)
        }),
        // An editor's save, in two steps: the fsync of the new version is a point the stick
        // may be left at (after a power cut, the rename that follows may be lost).
        ("editor save: d/k.tmp written, fsync", |fs| {
            put_file(
                fs,
                &[b"d"],
                b"k.tmp",
                0o600,
                b"delta, edited and saved",
                true,
            )
        }),
        ("editor save: d/k.tmp renamed over d/k", |fs| {
            fs.rename(at(fs, &[b"d"])?, b"k.tmp", at(fs, &[b"d"])?, b"k", 0)?;
            Ok(false)
        }),
        ("truncate e/g2 to 100 bytes", |fs| {
            let set = SetAttr {
                size: Some(100),
                ..SetAttr::default()
            };
            fs.setattr(at(fs, &[b"e", b"g2"])?, set)?;
            Ok(false)
        }),
        ("removexattr e/g2, final fsync", |fs| {
            fs.removexattr(at(fs, &[b"e", b"g2"])?, b"user.tag")?;
            sync_dir(fs, &[])
        }),
    ]
}

/// What one run of the workload passed through.
struct Run {
    /// The tree before the first step, then after every step.
    states: Vec<Tree>,
    /// Index in `states` of the tree right after the last fsync that returned Ok.
    last_synced: usize,
    /// The first step that failed, and how.
    first_error: Option<(usize, Errno)>,
    /// Files whose data an fsync or fdatasync of their own made durable: the index in
    /// `states` of the tree right after, and the path.
    data_synced: Vec<(usize, Vec<Vec<u8>>)>,
}

impl Run {
    /// Whether the data `path` has at the end of the run was made durable by an fsync of the
    /// file itself (at or after the last fsync of any kind): else a power cut may take it
    /// back to older or no data. The `commit` of an `fsyncdir` makes metadata durable, not
    /// other files' data (POSIX; and a pulled stick is held to it).
    fn data_durable(&self, path: &[Vec<u8>]) -> bool {
        let content = |t: &Tree| t.get(path).map(|s| s.content.clone());
        let last = self.states.last().and_then(content);
        self.data_synced.iter().any(|(i, p)| {
            p.as_slice() == path && self.states[*i..].iter().all(|t| content(t) == last)
        })
    }
}

/// Runs the workload on `fs`. Before a fault fires every step must succeed; after, errors
/// (EIO from a commit, or a step that depends on one that failed) are expected.
fn run_workload(fs: &Fs, faults: &Faults) -> Run {
    let mut run = Run {
        states: vec![snapshot(fs)],
        last_synced: 0,
        first_error: None,
        data_synced: Vec::new(),
    };
    for (i, (what, step)) in steps().into_iter().enumerate() {
        let result = step(fs);
        for path in DATA_SYNCED.with(|d| std::mem::take(&mut *d.borrow_mut())) {
            run.data_synced.push((run.states.len(), path));
        }
        match result {
            Ok(synced) => {
                run.states.push(snapshot_as(fs, faults.tripped()));
                if synced {
                    run.last_synced = run.states.len() - 1;
                }
            }
            Err(e) => {
                assert!(
                    faults.tripped(),
                    "step {i} ({what}) failed with {e} though no fault was injected"
                );
                run.first_error.get_or_insert((i, e));
                run.states.push(snapshot_as(fs, true));
            }
        }
    }
    run
}

fn fresh() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("pershome");
    std::fs::create_dir(&backing).expect("mkdir backing");
    (dir, backing)
}

/// How the workload's files are stored: whole, or in 4 KiB parts (as files past 4 GiB are on
/// FAT), so that splitting a file, writing across parts and removing parts are crashed too.
#[derive(Debug, Clone, Copy)]
enum Storage {
    Whole,
    Parts,
}

fn opts_for(storage: Storage) -> FsOptions {
    match storage {
        Storage::Whole => opts(),
        Storage::Parts => FsOptions {
            parts: PartsMode::Always,
            part_size: 4096,
            ..opts()
        },
    }
}

/// One crash: the workload with `n` write operations allowed, a crash, a clean reopen, and
/// every check. Returns whether the recovered tree was exactly one of the candidates.
///
/// `clean` is the fault-free run of the workload: what each step meant to write, for the
/// data a failed step left in part.
/// How the stick stops: the daemon dies (what reached the kernel stays, torn or not), or the
/// power goes (only what was synced stays).
#[derive(Debug, Clone, Copy)]
enum Crash {
    Kill { torn: bool },
    PowerLoss,
}

fn crash_at(storage: Storage, n: u64, crash: Crash, k: u64, clean: &Run) -> bool {
    let case = format!("{storage:?}: {crash:?} after {n} of {k} write operations");
    let (_dir, backing) = fresh();
    let fs = Fs::open_backing(&backing, opts_for(storage))
        .unwrap_or_else(|e| panic!("{case}: open: {e}"));
    let (faults, power) = match crash {
        Crash::Kill { torn } => (Arc::new(Faults::new(n, torn)), None),
        Crash::PowerLoss => {
            // Everything on the stick now was synced by the open (a new, empty store).
            let power = Arc::new(PowerLoss::new(&backing).expect("start the power-loss model"));
            (
                Arc::new(Faults::with_power_loss(n, power.clone())),
                Some(power),
            )
        }
    };
    fs.set_faults(faults.clone());
    let run = run_workload(&fs, &faults);
    drop(fs); // the daemon dies: nothing more is written
    if let Some(power) = power {
        // The power goes: the stick keeps only what was synced.
        power
            .pull()
            .unwrap_or_else(|e| panic!("{case}: the power cut: {e}"));
    }

    let fs = Fs::open_backing(&backing, opts_for(storage))
        .unwrap_or_else(|e| panic!("{case}: the reopen failed: {e}"));
    let got = snapshot(&fs);
    drop(fs);
    // A read-write mount removes what an interrupted staged write left behind.
    let staging = backing.join(".pershome/staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "{case}: expected an empty {}, found {left:?}",
        staging.display()
    );
    let candidates = &run.states[run.last_synced..];
    let mut problems = Vec::new();
    // Entries the same in every candidate: fsync'ed and untouched since. After a power cut,
    // a file whose data no fsync of its own made durable may have lost it: then only its
    // metadata must be exact (its size and times follow the data it kept), and its data is
    // judged below with everything else.
    let power_cut = matches!(crash, Crash::PowerLoss);
    for (path, seen) in &candidates[0] {
        if candidates.iter().any(|t| t.get(path) != Some(seen)) {
            continue;
        }
        let seen = &if power_cut && seen.kind == Kind::File && !run.data_durable(path) {
            match got.get(path) {
                Some(g) => Seen {
                    size: g.size,
                    mtime: g.mtime,
                    ctime: g.ctime,
                    content: g.content.clone(),
                    ..seen.clone()
                },
                None => seen.clone(),
            }
        } else {
            seen.clone()
        };
        match got.get(path) {
            None => problems.push(format!(
                "{} (fsync'ed, untouched since) is missing",
                show(path)
            )),
            Some(g) if g != seen => problems.push(format!(
                "{} (fsync'ed, untouched since):\n    expected {}\n    got      {}",
                show(path),
                brief(seen),
                brief(g)
            )),
            Some(_) => {}
        }
    }
    // Nothing invented: type and data as in some candidate. Data written and not fsync'ed
    // may survive in part (a prefix of a write, the first part of a file being split): each
    // byte must then be one that some candidate has at that offset, or a hole's zero.
    for (path, g) in &got {
        let meant = &clean.states[run.last_synced.min(clean.states.len() - 1)..];
        // After a power cut, data no fsync of the file's own made durable may also be older
        // data (`Run::data_durable`): what it had at some earlier point, made durable by a
        // sync the commit gave it (a renamed file is synced, for vfat's sake).
        let older: &[Tree] = if power_cut && !run.data_durable(path) {
            &run.states[..run.last_synced]
        } else {
            &[]
        };
        let at_path: Vec<&Seen> = candidates
            .iter()
            .chain(meant)
            .chain(older)
            .filter_map(|t| t.get(path))
            .collect();
        let known = at_path
            .iter()
            .any(|s| s.kind == g.kind && s.content == g.content && s.link == g.link)
            || (g.kind == Kind::File
                && at_path.iter().any(|s| s.kind == Kind::File)
                && g.content.as_ref().is_some_and(|c| {
                    c.iter().enumerate().all(|(i, b)| {
                        *b == 0
                            || at_path
                                .iter()
                                .any(|s| s.content.as_ref().is_some_and(|sc| sc.get(i) == Some(b)))
                    })
                }));
        if !known {
            problems.push(format!(
                "{} is {:?} with content {:?} / target {:?}, as in no state at or after the \
                 last fsync",
                show(path),
                g.kind,
                g.content
                    .as_ref()
                    .map(|c| String::from_utf8_lossy(c).into_owned()),
                g.link
            ));
        }
    }
    let exact = candidates.contains(&got);
    // (After a power cut, even with no fault, data no fsync covered may be gone: the checks
    // above judge that.)
    if !power_cut && !faults.tripped() && Some(&got) != run.states.last() {
        problems.push("no fault fired, yet the tree is not the final one".into());
    }
    assert!(
        problems.is_empty(),
        "{case} (first failed step: {:?}; last fsync: state {}):\n{}",
        run.first_error,
        run.last_synced,
        problems.join("\n")
    );
    assert_fat_clean(&backing);
    assert_nothing_unrepairable(&backing, &case);
    let check = FsckOptions {
        repair: false,
        force: false,
    };
    let repair = FsckOptions {
        repair: true,
        force: false,
    };
    let repaired = fsck(&backing, &repair).unwrap_or_else(|e| panic!("{case}: fsck --repair: {e}"));
    let left: Vec<_> = repaired.problems_left().collect();
    assert!(
        left.is_empty(),
        "{case}: expected a clean repair, left {left:?}"
    );
    let again = fsck(&backing, &check).unwrap_or_else(|e| panic!("{case}: second fsck: {e}"));
    let left: Vec<_> = again.problems_left().collect();
    assert!(
        left.is_empty(),
        "{case}: expected a clean fsck after --repair, got {left:?}"
    );
    exact
}

/// After a crash, `pershome fsck` may find things to repair, never anything it cannot.
fn assert_nothing_unrepairable(backing: &Path, case: &str) {
    let check = FsckOptions {
        repair: false,
        force: false,
    };
    let report = fsck(backing, &check).unwrap_or_else(|e| panic!("{case}: fsck: {e}"));
    let unrepairable: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.class == Class::Unrepairable)
        .collect();
    assert!(
        unrepairable.is_empty(),
        "{case}: expected nothing unrepairable, fsck found {unrepairable:?}"
    );
}

/// The workload without faults: its states, and the write operations it made.
fn clean_run(storage: Storage) -> (Run, u64) {
    let (_dir, backing) = fresh();
    let fs = Fs::open_backing(&backing, opts_for(storage)).expect("open");
    let faults = Arc::new(Faults::counting());
    fs.set_faults(faults.clone());
    let run = run_workload(&fs, &faults);
    assert!(run.first_error.is_none());
    assert_eq!(
        run.last_synced,
        run.states.len() - 1,
        "the workload must end with an fsync"
    );
    let k = faults.operations();
    (run, k)
}

#[test]
fn recovery_holds_at_every_write() {
    for storage in [Storage::Whole, Storage::Parts] {
        let started = Instant::now();
        let (clean, k) = clean_run(storage);
        assert!(
            k > 20,
            "expected a workload of many write operations, got {k}"
        );
        let (mut cases, mut exact) = (0, 0);
        for torn in [false, true] {
            for n in 0..=k {
                cases += 1;
                if crash_at(storage, n, Crash::Kill { torn }, k, &clean) {
                    exact += 1;
                }
            }
        }
        eprintln!(
            "{storage:?}: K = {k} write operations (file data, directories, store); {cases} \
             crash points checked ({exact} recovered to exactly a state at or after the last \
             fsync) in {:.1?}",
            started.elapsed()
        );
    }
}

/// The same workload and checks, but the crash is a power cut (`PowerLoss`): at every write
/// point, the stick keeps only what an fsync or fdatasync had made durable: file data as of
/// its file's last sync, directory entries (creations, removals, renames) as of their
/// directory's last sync. A flush missing anywhere on the way to an fsync that returned Ok
/// shows here as lost or invented data, or a store that does not match its tree.
#[test]
fn power_loss_at_every_write() {
    for storage in [Storage::Whole, Storage::Parts] {
        let started = Instant::now();
        let (clean, k) = clean_run(storage);
        let mut exact = 0;
        for n in 0..=k {
            if crash_at(storage, n, Crash::PowerLoss, k, &clean) {
                exact += 1;
            }
        }
        eprintln!(
            "{storage:?}: K = {k} write operations; {} power cuts checked ({exact} recovered to \
             exactly a state at or after the last fsync) in {:.1?}",
            k + 1,
            started.elapsed()
        );
    }
}

/// Splitting a file that was fsync'ed whole (it grew past the part size on a mount that did
/// not split: another computer, `parts=never`, a passthrough writer) is crash-safe under a
/// power cut at every write: the tail is copied into parts, the parts are synced, the commit
/// records them, and only then is the first part cut. Whatever point the power goes at, the
/// file reads as the fsync'ed 6,000 bytes or as those with the append, never shorter or
/// with other bytes.
#[test]
fn power_loss_while_splitting_an_fsynced_file() {
    let old: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
    let new: Vec<u8> = old.iter().copied().chain([b'+'; 100]).collect();
    let setup = |backing: &Path| {
        let fs = Fs::open_backing(
            backing,
            FsOptions {
                parts: PartsMode::Never,
                ..opts()
            },
        )
        .expect("open with parts=never");
        put_file(&fs, &[], b"big", 0o640, &old, true).expect("the whole file");
        fs.fsyncdir(ROOT).expect("fsyncdir");
        fs.shutdown();
    };
    let append_big = |fs: &Fs| append(fs, &[b"big"], &[b'+'; 100], true);
    let k = {
        let (_dir, backing) = fresh();
        setup(&backing);
        let fs = Fs::open_backing(&backing, opts_for(Storage::Parts)).expect("open");
        let faults = Arc::new(Faults::counting());
        fs.set_faults(faults.clone());
        append_big(&fs).expect("the append, without faults");
        assert_eq!(read_all(&fs, at(&fs, &[b"big"]).unwrap()).unwrap(), new);
        faults.operations()
    };
    for n in 0..=k {
        let case = format!("power cut after {n} of {k} write operations of the split");
        let (_dir, backing) = fresh();
        setup(&backing);
        let power = Arc::new(PowerLoss::new(&backing).expect("start the power-loss model"));
        let fs = Fs::open_backing(&backing, opts_for(Storage::Parts)).expect("open");
        let faults = Arc::new(Faults::with_power_loss(n, power.clone()));
        fs.set_faults(faults.clone());
        let appended = append_big(&fs).is_ok();
        drop(fs);
        power
            .pull()
            .unwrap_or_else(|e| panic!("{case}: the power cut: {e}"));
        let fs = Fs::open_backing(&backing, opts_for(Storage::Parts))
            .unwrap_or_else(|e| panic!("{case}: the reopen failed: {e}"));
        let got = read_all(&fs, at(&fs, &[b"big"]).expect("big is there")).expect("read big");
        drop(fs);
        assert!(
            got == new || (!appended && got == old),
            "{case}: expected the {} fsync'ed bytes{}, got {} bytes (first difference at {:?})",
            old.len(),
            if appended {
                " and the fdatasync'ed append"
            } else {
                ""
            },
            got.len(),
            got.iter().zip(&new).position(|(a, b)| a != b)
        );
        assert_fat_clean(&backing);
        assert_nothing_unrepairable(&backing, &case);
    }
    eprintln!("split of an fsync'ed file: {} power cuts checked", k + 1);
}

// ---------------------------------------------------------------------------------------------
// kill -9 of a real mount
// ---------------------------------------------------------------------------------------------

/// A file whose fsync returned Ok: its content, and where it may be (two places from the
/// moment its rename is asked for until a later fsync returned Ok).
type Synced = Vec<(Vec<PathBuf>, Vec<u8>)>;

/// Creates, writes, fsyncs, renames and fsyncs again files under `mnt` until an error (the
/// daemon is gone) or `rounds` are done.
fn busy_workload(mnt: &Path, rounds: usize, progress: &std::sync::atomic::AtomicUsize) -> Synced {
    use std::io::Write;
    let mut synced = Synced::new();
    for i in 0..rounds {
        let tmp = mnt.join(format!("w{i}.tmp"));
        let done = mnt.join(format!("w{i}"));
        let content: Vec<u8> = format!("file {i}: ")
            .bytes()
            .chain((0..(i * 37 % 9000) as u32).map(|b| b as u8))
            .collect();
        let mut step = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&content)?;
            f.sync_all()?;
            // A rename in flight when the daemon dies may or may not have happened on the
            // stick (it may have been done without being answered): both names are allowed
            // from the moment it is asked for.
            synced.push((vec![tmp.clone(), done.clone()], content.clone()));
            std::fs::rename(&tmp, &done)?;
            let last = synced.len() - 1;
            // The rename is durable once the file is fsync'ed again.
            std::fs::File::open(&done)?.sync_all()?;
            synced[last].0 = vec![done.clone()];
            progress.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        };
        if step().is_err() {
            break;
        }
    }
    synced
}

#[test]
fn kill_dash_nine_loses_nothing_fsynced() {
    if !can_mount() {
        return;
    }
    let kill_points = if long_tests() { 5 } else { 3 };
    for round in 0..kill_points {
        let dir = tempfile::Builder::new()
            .prefix("pershome-crash")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let backing = dir.path().join("stick/pershome");
        let mnt = dir.path().join("home");
        std::fs::create_dir_all(&backing).expect("mkdir backing");
        std::fs::create_dir(&mnt).expect("mkdir mountpoint");
        let mount = Mount::new(&backing, &mnt, "");
        let pids = daemons_serving(&mnt);
        assert_eq!(pids.len(), 1, "expected one daemon, got {pids:?}");
        let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let worker = {
            let mnt = mnt.clone();
            let progress = progress.clone();
            std::thread::spawn(move || busy_workload(&mnt, 100_000, &progress))
        };
        // Different kill points: 50, 200, 400 ms... after the first file was fsync'ed (not
        // after the start: on a busy machine the first fsync may take longer than that).
        let started = Instant::now();
        while progress.load(std::sync::atomic::Ordering::SeqCst) == 0
            && started.elapsed() < Duration::from_secs(120)
            && !worker.is_finished()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50 + 150 * round as u64));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pids[0]),
            nix::sys::signal::SIGKILL,
        )
        .expect("kill -9 the daemon");
        let synced = worker.join().expect("the workload thread panicked");
        drop(mount); // the dead mount is cleaned up
        assert!(
            !synced.is_empty(),
            "round {round}: nothing was fsync'ed before the kill"
        );

        let mount = Mount::new(&backing, &mnt, "");
        let mut problems = Vec::new();
        for (places, want) in &synced {
            let found: Vec<String> = places
                .iter()
                .map(|p| match std::fs::read(p) {
                    Ok(got) if got == *want => "ok".to_string(),
                    Ok(got) => format!("{} bytes, not the {} fsync'ed", got.len(), want.len()),
                    Err(e) => e.to_string(),
                })
                .collect();
            if !found.iter().any(|f| f == "ok") {
                problems.push(format!(
                    "{places:?}: expected the fsync'ed content, got {found:?}"
                ));
            }
        }
        drop(mount);
        assert!(
            problems.is_empty(),
            "round {round} ({} files fsync'ed): {}",
            synced.len(),
            problems.join("\n")
        );
        assert_fat_clean(&backing);
        assert_nothing_unrepairable(&backing, &format!("round {round}"));
        eprintln!(
            "kill -9 round {round}: {} fsync'ed files intact",
            synced.len()
        );
    }
}
