//! Fuzz target: a whole mount over a hostile stick. The input builds a backing tree (dirs,
//! files, sparse files, symlink-format files, fifos, real symlinks, under names from a small
//! alphabet or the fuzzer's bytes), a store written through the real `Journal` whose records
//! name those entries (or others) with any metadata (kinds that disagree with the backing,
//! hard-link ids, files in parts), the hard-link content files and the parts directories with
//! part files at any index (2^32 − 1 included), and optionally damages a store file. Then it
//! opens an `Fs` over it and walks it as a program would: readdir, lookup, getattr, readlink,
//! open, read, lseek (SEEK_DATA, SEEK_HOLE, SEEK_END), fsync, release, fsyncdir, and the
//! unmount's final commit; then reopens the store read-only.
//!
//! Asserts no panic, no hang (libFuzzer's `-timeout`: a loop the stick can make as long as it
//! likes is a finding), no unbounded memory (`-rss_limit_mb`), and that the store the mount
//! left behind opens again.
#![no_main]

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pershome::fs::{Fs, FsOptions, Kind, PartsMode, ROOT};
use pershome::meta::{Journal, Meta, OpenMode, Parts, Record, Timespec, OWNER_ID, STORE_DIR};

const NAMES: [&[u8]; 6] = [b"a", b"B", b"c.txt", b"Dir", b"x y", "é".as_bytes()];
const PART_SIZE: u64 = 4096;
/// Entries the walk visits at most: the point is what each operation does with what the
/// stick says, not the size of the tree.
const MAX_VISITS: usize = 64;

/// Up to `max` of the input's bytes, as many as the input chooses.
fn take<'a>(u: &mut Unstructured<'a>, max: usize) -> Result<&'a [u8]> {
    let len = u.int_in_range(0..=max)?;
    u.bytes(len)
}

fn name(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    if u.ratio(3, 4)? {
        return Ok(u.choose(&NAMES)?.to_vec());
    }
    let len = u.int_in_range(1..=16)?;
    let cleaned: Vec<u8> = u
        .bytes(len)?
        .iter()
        .map(|&b| if b == b'/' || b == 0 { b'_' } else { b })
        .collect();
    Ok(match cleaned.as_slice() {
        b"." | b".." => b"dot".to_vec(),
        _ if cleaned.eq_ignore_ascii_case(STORE_DIR.as_bytes()) => b"store".to_vec(),
        _ => cleaned,
    })
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
}

fn ts(u: &mut Unstructured<'_>) -> Result<Timespec> {
    Ok(Timespec {
        sec: u.arbitrary::<i32>()?.into(),
        nsec: u.int_in_range(0..=999_999_999)?,
    })
}

fn meta(u: &mut Unstructured<'_>) -> Result<Meta> {
    let kind = *u.choose(&[
        libc::S_IFREG,
        libc::S_IFREG,
        libc::S_IFDIR,
        libc::S_IFLNK,
        libc::S_IFIFO,
        libc::S_IFCHR,
        0,
    ])?;
    let t = ts(u)?;
    let mut m = Meta {
        mode: kind | (u.arbitrary::<u32>()? & 0o7777),
        uid: if u.arbitrary()? {
            OWNER_ID
        } else {
            u.arbitrary()?
        },
        gid: if u.arbitrary()? {
            OWNER_ID
        } else {
            u.arbitrary()?
        },
        rdev: u.arbitrary()?,
        mtime: t,
        atime: ts(u)?,
        ctime: t,
        btime: t,
        backing_size: if u.arbitrary()? {
            u.arbitrary::<u16>()?.into()
        } else {
            u.arbitrary()?
        },
        backing_mtime: if u.arbitrary()? { t } else { ts(u)? },
        nlink: u.arbitrary::<u8>()?.into(),
        ..Meta::default()
    };
    if u.ratio(1, 5)? {
        m.link = Some(u.int_in_range(1..=3)?);
    }
    if u.ratio(1, 6)? {
        m.name = Some(name(u)?);
    }
    if u.ratio(1, 4)? {
        m.parts = Some(Parts {
            id: u.int_in_range(1..=3)?,
            size: PART_SIZE,
        });
    }
    if u.ratio(1, 6)? {
        m.xattrs = vec![(b"user.x".to_vec(), take(u, 16)?.to_vec())];
    }
    Ok(m)
}

/// Builds the backing tree; returns the backing paths made (as record paths).
fn backing_tree(u: &mut Unstructured<'_>, root: &Path) -> Result<Vec<Vec<Vec<u8>>>> {
    let mut dirs: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    let mut made = Vec::new();
    for _ in 0..u.int_in_range(0..=12)? {
        let parent = u.choose(&dirs)?.clone();
        let mut path = parent.clone();
        path.push(name(u)?);
        let fs_path: PathBuf = path.iter().fold(root.to_path_buf(), |p, c| {
            p.join(std::ffi::OsStr::from_bytes(c))
        });
        if fs_path.symlink_metadata().is_ok() {
            continue;
        }
        match u.int_in_range(0..=7)? {
            0 | 1 => {
                std::fs::create_dir(&fs_path).expect("mkdir");
                dirs.push(path.clone());
            }
            2 | 3 => {
                let len = u.int_in_range(0..=300)?;
                std::fs::write(&fs_path, u.bytes(len)?).expect("file");
            }
            4 => {
                // Sparse, a few parts long.
                let f = std::fs::File::create(&fs_path).expect("sparse file");
                f.set_len(u.int_in_range(0..=3 * PART_SIZE + 17)?)
                    .expect("set_len");
            }
            5 => {
                let mut body = b"!<symlink>\xff\xfe".to_vec();
                body.extend(take(u, 20)?);
                std::fs::write(&fs_path, body).expect("symlink file");
            }
            6 => mkfifo(&fs_path),
            _ => symlink("/etc", &fs_path).expect("symlink"),
        }
        made.push(path);
    }
    Ok(made)
}

fn record_path(u: &mut Unstructured<'_>, made: &[Vec<Vec<u8>>]) -> Result<Vec<Vec<u8>>> {
    if !made.is_empty() && u.ratio(3, 4)? {
        return Ok(u.choose(made)?.clone());
    }
    let depth = u.int_in_range(1..=3)?;
    (0..depth).map(|_| name(u)).collect()
}

fn store(u: &mut Unstructured<'_>, root: &Path, made: &[Vec<Vec<u8>>]) -> Result<Vec<Parts>> {
    let fd = std::fs::File::open(root).expect("backing root");
    let (mut journal, _) =
        Journal::open(fd.as_fd(), OpenMode::ReadWrite).expect("creating a store");
    let mut parts = Vec::new();
    let mut links = Vec::new();
    let mut all = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let mut batch = Vec::new();
        for _ in 0..u.int_in_range(1..=6)? {
            let record = match u.int_in_range(0..=9)? {
                0..=5 => Record::Put {
                    path: record_path(u, made)?,
                    meta: meta(u)?,
                },
                6 => Record::PutInode {
                    id: u.int_in_range(1..=3)?,
                    meta: meta(u)?,
                },
                7 => Record::Rename {
                    from: record_path(u, made)?,
                    to: record_path(u, made)?,
                },
                8 => Record::Remove {
                    path: record_path(u, made)?,
                },
                _ => Record::Exchange {
                    a: record_path(u, made)?,
                    b: record_path(u, made)?,
                },
            };
            if let Record::Put { meta, .. } | Record::PutInode { meta, .. } = &record {
                parts.extend(meta.parts);
                links.extend(meta.link);
            }
            if let Record::PutInode { id, .. } = &record {
                links.push(*id);
            }
            batch.push(record);
        }
        all.extend(batch.iter().cloned());
        if batch.iter().any(Record::needs_format_2) {
            // As `Fs::commit` does: parted records go to a format-2 generation.
            let mut state = pershome::meta::pending::Replayed::default();
            for r in &all {
                state.apply(r.clone());
            }
            journal
                .checkpoint(&state.snapshot())
                .expect("format-2 generation");
        } else {
            journal.append(&batch).expect("appending");
        }
    }
    drop(journal);
    let store_dir = root.join(STORE_DIR);
    for id in links {
        if u.arbitrary()? {
            let dir = store_dir.join("inodes");
            let _ = std::fs::create_dir(&dir);
            let len = u.int_in_range(0..=64)?;
            let _ = std::fs::write(dir.join(format!("{id:016x}")), u.bytes(len)?);
        }
    }
    for p in &parts {
        if u.ratio(1, 4)? {
            continue;
        }
        let dir = store_dir.join("parts").join(format!("{:016x}", p.id));
        let _ = std::fs::create_dir_all(&dir);
        for _ in 0..u.int_in_range(0..=3)? {
            let k: u32 = match u.int_in_range(0..=3)? {
                0 => 1,
                1 => 2,
                2 => u32::MAX,
                _ => u.arbitrary()?,
            };
            if let Ok(f) = std::fs::File::create(dir.join(format!("{k:08x}"))) {
                let _ = f.set_len(u.int_in_range(0..=PART_SIZE)?);
            }
        }
    }
    // Damage: a flipped byte or garbage at the end of one store file.
    if u.ratio(1, 4)? {
        if let Ok(entries) = std::fs::read_dir(&store_dir) {
            let files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            if !files.is_empty() {
                let file = u.choose(&files)?;
                let mut bytes = std::fs::read(file).expect("store file");
                if !bytes.is_empty() && u.arbitrary()? {
                    let at = u.choose_index(bytes.len())?;
                    bytes[at] ^= u.int_in_range(1..=255)?;
                } else {
                    bytes.extend(take(u, 64)?);
                }
                std::fs::write(file, bytes).expect("damaging a store file");
            }
        }
    }
    Ok(parts)
}

fn walk(u: &mut Unstructured<'_>, fs: &Fs) -> Result<()> {
    let mut queue = VecDeque::from([ROOT]);
    let mut visits = 0;
    while let Some(dir) = queue.pop_front() {
        let Ok(fh) = fs.opendir(dir) else { continue };
        let entries = fs.readdir(fh, 0).unwrap_or_default();
        fs.releasedir(fh);
        for (_, entry) in entries {
            if entry.name == b"." || entry.name == b".." {
                continue;
            }
            visits += 1;
            if visits > MAX_VISITS {
                return Ok(());
            }
            let Ok(attr) = fs.lookup(dir, &entry.name) else {
                continue;
            };
            let _ = fs.getattr(attr.ino);
            match attr.kind {
                Kind::Dir => queue.push_back(attr.ino),
                Kind::Symlink => {
                    let _ = fs.readlink(attr.ino);
                }
                Kind::File => {
                    let Ok(fh) = fs.open(attr.ino, libc::O_RDONLY) else {
                        continue;
                    };
                    let _ = fs.read(fh, 0, 4096);
                    let _ = fs.read(fh, attr.size.saturating_sub(10), 100);
                    let far: u64 = u.arbitrary().unwrap_or(0);
                    let _ = fs.read(fh, far, 64);
                    for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
                        let _ = fs.lseek(fh, 0, whence);
                        let off = (far % attr.size.max(1)) as i64;
                        let _ = fs.lseek(fh, off, whence);
                    }
                    let _ = fs.lseek(fh, 0, libc::SEEK_END);
                    let _ = fs.fsync(fh, u.arbitrary().unwrap_or(false));
                    let _ = fs.release(fh);
                }
                _ => {}
            }
        }
    }
    let _ = fs.fsyncdir(ROOT);
    Ok(())
}

fn run(u: &mut Unstructured<'_>, root: &Path) -> Result<()> {
    let made = backing_tree(u, root)?;
    store(u, root, &made)?;
    let mut opts = FsOptions::new(1000, 1000);
    opts.part_size = PART_SIZE;
    opts.parts = PartsMode::Always;
    let Ok(fs) = Fs::open_backing(root, opts) else {
        return Ok(());
    };
    walk(u, &fs)?;
    // The unmount: the last commit, then the daemon lets go of the store.
    fs.shutdown();
    drop(fs);
    let mut ro = FsOptions::new(1000, 1000);
    ro.read_only = true;
    if let Err(e) = Fs::open_backing(root, ro) {
        panic!("the store a mount left behind does not open again: {e}");
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
    .expect("a temporary backing root");
    let mut u = Unstructured::new(data);
    let _ = run(&mut u, dir.path());
});
