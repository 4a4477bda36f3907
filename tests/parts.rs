//! In-process tests of files stored in parts (no kernel mount): tiny 4 KiB parts over a
//! temporary backing directory, so every operation crosses part boundaries; each test checks
//! the data against a plain in-memory model, the layout on the backing, a remount, and the
//! FAT audit. The last test writes just past 4 GiB, sparsely, with the default part size.

use std::path::{Path, PathBuf};

use pershome::audit::assert_fat_clean;
use pershome::fs::{Attr, Ctx, Errno, Fs, FsOptions, Ino, PartsMode, SetAttr, ROOT};

mod common;

const USER: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 1,
    umask: 0,
};

const P: u64 = 4096;

fn tiny() -> FsOptions {
    FsOptions {
        parts: PartsMode::Always,
        part_size: P,
        ..common::opts()
    }
}

fn open_with(backing: &Path, opts: FsOptions) -> Fs {
    Fs::open_backing(backing, opts).expect("open backing")
}

fn remount(fs: Fs, backing: &Path) -> Fs {
    fs.shutdown();
    drop(fs);
    open_with(backing, tiny())
}

fn lookup(fs: &Fs, name: &[u8]) -> Attr {
    fs.lookup(ROOT, name)
        .unwrap_or_else(|e| panic!("lookup {}: {e}", String::from_utf8_lossy(name)))
}

fn read_all(fs: &Fs, ino: Ino) -> Vec<u8> {
    let fh = fs.open(ino, libc::O_RDONLY).unwrap();
    let size = fs.getattr(ino).unwrap().size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let chunk = fs.read(fh, out.len() as u64, 10_000).unwrap();
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    fs.release(fh).unwrap();
    out
}

/// Bytes that differ at every offset, so a misplaced part shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(31).wrapping_add(seed * 7)) % 251) as u8)
        .collect()
}

/// The parts directories under `.pershome/parts`, each with its part files' (index, length).
fn parts_on_disk(backing: &Path) -> Vec<(String, Vec<(u64, u64)>)> {
    let dir = backing.join(".pershome/parts");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.unwrap();
        let mut parts: Vec<(u64, u64)> = std::fs::read_dir(e.path())
            .unwrap()
            .map(|p| {
                let p = p.unwrap();
                let k = u64::from_str_radix(p.file_name().to_str().unwrap(), 16).unwrap();
                (k, p.metadata().unwrap().len())
            })
            .collect();
        parts.sort();
        out.push((e.file_name().to_string_lossy().into_owned(), parts));
    }
    out.sort();
    out
}

/// The (index, length) of every part a file of `size` bytes must have beyond its first.
fn expected_parts(size: u64) -> Vec<(u64, u64)> {
    (1..size.div_ceil(P))
        .map(|k| (k, (size - k * P).min(P)))
        .collect()
}

fn check_model(fs: &Fs, ino: Ino, model: &[u8], what: &str) {
    let got = read_all(fs, ino);
    assert_eq!(
        fs.getattr(ino).unwrap().size,
        model.len() as u64,
        "{what}: size: expected {}, got {}",
        model.len(),
        fs.getattr(ino).unwrap().size
    );
    if got != model {
        let at = got.iter().zip(model).position(|(a, b)| a != b);
        panic!(
            "{what}: content differs: expected {} bytes, got {}; first difference at {at:?}",
            model.len(),
            got.len()
        );
    }
}

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("pershome");
    std::fs::create_dir(&backing).unwrap();
    (dir, backing)
}

fn store_versions(backing: &Path) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = std::fs::read_dir(backing.join(".pershome"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("journal.") || name.starts_with("checkpoint.")) {
                return None;
            }
            let bytes = std::fs::read(e.path()).ok()?;
            Some((name, u32::from_le_bytes(bytes[8..12].try_into().ok()?)))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn writes_across_part_boundaries_read_back_and_survive_a_remount() {
    let (_t, backing) = temp();
    let fs = open_with(&backing, tiny());
    let (attr, fh) = fs.create(USER, ROOT, b"big", 0o644, libc::O_RDWR).unwrap();
    let data = pattern(1, (3 * P + 100) as usize);
    // Unaligned writes straddling every boundary.
    for (off, len) in [(0u64, 1000usize), (1000, 4000), (5000, 7000), (12000, 388)] {
        let n = fs
            .write(fh, off, &data[off as usize..off as usize + len])
            .unwrap();
        assert_eq!(
            n as usize, len,
            "write at {off}: expected {len} bytes, got {n}"
        );
    }
    fs.release(fh).unwrap();
    check_model(&fs, attr.ino, &data, "after writing");
    assert_eq!(
        std::fs::metadata(backing.join("big")).unwrap().len(),
        P,
        "the visible backing file holds the first part"
    );
    assert_eq!(
        std::fs::read(backing.join("big")).unwrap(),
        data[..P as usize],
        "first part content"
    );
    let parts = parts_on_disk(&backing);
    assert_eq!(parts.len(), 1, "one parts directory, got {parts:?}");
    assert_eq!(
        parts[0].1,
        expected_parts(data.len() as u64),
        "part lengths"
    );
    assert!(
        store_versions(&backing).iter().all(|(_, v)| *v == 2),
        "a store holding a parted file is format 2: {:?}",
        store_versions(&backing)
    );
    let fs = remount(fs, &backing);
    check_model(&fs, lookup(&fs, b"big").ino, &data, "after a remount");
    drop(fs);
    assert_fat_clean(&backing);
}

#[test]
fn holes_seek_data_and_seek_hole_cross_parts() {
    let (_t, backing) = temp();
    let fs = open_with(&backing, tiny());
    let (attr, fh) = fs
        .create(USER, ROOT, b"sparse", 0o644, libc::O_RDWR)
        .unwrap();
    // Data in part 0 at [0, 10), nothing in parts 1..=4, data in part 5 at [5P+100, 5P+200).
    fs.write(fh, 0, &[7u8; 10]).unwrap();
    fs.write(fh, 5 * P + 100, &[9u8; 100]).unwrap();
    let mut model = vec![0u8; (5 * P + 200) as usize];
    model[..10].fill(7);
    model[(5 * P + 100) as usize..].fill(9);
    check_model(&fs, attr.ino, &model, "sparse file");
    let seek = |off: u64, whence: i32| fs.lseek(fh, off as i64, whence);
    // The first part's hole starts within its first block at the earliest; a hole must be
    // found before part 5, and data again in part 5.
    let hole = seek(0, libc::SEEK_HOLE).unwrap() as u64;
    assert!(
        (10..=P).contains(&hole),
        "SEEK_HOLE from 0: expected within the first part, got {hole}"
    );
    let data = seek(P, libc::SEEK_DATA).unwrap() as u64;
    assert!(
        (4 * P + 1..=5 * P + 100).contains(&data),
        "SEEK_DATA from {P}: expected in part 5 (at most {}), got {data}",
        5 * P + 100
    );
    assert_eq!(
        seek(5 * P + 150, libc::SEEK_HOLE),
        Ok((5 * P + 200) as i64),
        "SEEK_HOLE in the last part is the end of file"
    );
    assert_eq!(
        seek(5 * P + 200, libc::SEEK_DATA),
        Err(Errno::ENXIO),
        "SEEK_DATA at the end"
    );
    assert_eq!(
        seek(0, libc::SEEK_END),
        Ok((5 * P + 200) as i64),
        "SEEK_END"
    );
    fs.release(fh).unwrap();
    let parts = parts_on_disk(&backing);
    assert_eq!(
        parts[0].1,
        expected_parts(5 * P + 200),
        "hole parts exist, sparse"
    );
    let fs = remount(fs, &backing);
    check_model(&fs, lookup(&fs, b"sparse").ino, &model, "after a remount");
    drop(fs);
    assert_fat_clean(&backing);
}

#[test]
fn truncate_grows_with_holes_and_shrinking_removes_parts() {
    let (_t, backing) = temp();
    let fs = open_with(&backing, tiny());
    let (attr, fh) = fs.create(USER, ROOT, b"t", 0o644, libc::O_RDWR).unwrap();
    let mut model = pattern(3, (2 * P + 5) as usize);
    fs.write(fh, 0, &model).unwrap();
    for size in [7 * P + 3, 3 * P, 2 * P + 1, P + 1, P, 100, 0, 4 * P - 1] {
        fs.setattr(
            attr.ino,
            SetAttr {
                size: Some(size),
                ..SetAttr::default()
            },
        )
        .unwrap();
        model.resize(size as usize, 0);
        check_model(&fs, attr.ino, &model, &format!("truncate to {size}"));
        let parts = parts_on_disk(&backing);
        let got = parts.first().map(|p| p.1.clone()).unwrap_or_default();
        assert_eq!(got, expected_parts(size), "parts after truncate to {size}");
        // Write into the new region so the next shrink has data to drop.
        let tail = pattern(size, 10);
        let at = size.saturating_sub(10);
        fs.write(fh, at, &tail).unwrap();
        model.resize((at + 10).max(size) as usize, 0);
        model[at as usize..at as usize + 10].copy_from_slice(&tail);
    }
    fs.release(fh).unwrap();
    // O_TRUNC removes every part.
    let fh = fs.open(attr.ino, libc::O_RDWR | libc::O_TRUNC).unwrap();
    fs.release(fh).unwrap();
    assert_eq!(fs.getattr(attr.ino).unwrap().size, 0, "size after O_TRUNC");
    let left: Vec<_> = parts_on_disk(&backing)
        .into_iter()
        .flat_map(|p| p.1)
        .collect();
    assert!(left.is_empty(), "parts left after O_TRUNC: {left:?}");
    drop(fs);
    assert_fat_clean(&backing);
}

#[test]
fn rename_unlink_and_hard_links_keep_parts_consistent() {
    let (_t, backing) = temp();
    let fs = open_with(&backing, tiny());
    let (_, fh) = fs.create(USER, ROOT, b"a", 0o644, libc::O_RDWR).unwrap();
    let data = pattern(4, (4 * P + 17) as usize);
    fs.write(fh, 0, &data).unwrap();
    fs.release(fh).unwrap();
    fs.rename(ROOT, b"a", ROOT, b"b", 0).unwrap();
    fs.commit().unwrap();
    let fs = remount(fs, &backing);
    let b = lookup(&fs, b"b");
    check_model(&fs, b.ino, &data, "after rename and remount");
    // A hard link: the first part moves to .pershome/inodes, the parts stay where they are.
    fs.link(b.ino, ROOT, b"c").unwrap();
    let fh = fs.open(b.ino, libc::O_RDWR).unwrap();
    let more = pattern(5, 3000);
    fs.write(fh, 4 * P + 17, &more).unwrap();
    fs.release(fh).unwrap();
    let mut model = data.clone();
    model.extend_from_slice(&more);
    let fs = remount(fs, &backing);
    let c = lookup(&fs, b"c");
    assert_eq!(c.nlink, 2, "link count: expected 2, got {}", c.nlink);
    check_model(
        &fs,
        c.ino,
        &model,
        "through the second name after a remount",
    );
    assert_eq!(parts_on_disk(&backing).len(), 1, "one parts directory");
    // Rename over another parted file removes the replaced file's parts.
    let (_, fh) = fs.create(USER, ROOT, b"x", 0o644, libc::O_RDWR).unwrap();
    fs.write(fh, 0, &pattern(6, (2 * P + 1) as usize)).unwrap();
    fs.release(fh).unwrap();
    assert_eq!(parts_on_disk(&backing).len(), 2, "two parted files");
    fs.rename(ROOT, b"b", ROOT, b"x", 0).unwrap();
    assert_eq!(
        parts_on_disk(&backing).len(),
        1,
        "the replaced file's parts are gone"
    );
    check_model(&fs, lookup(&fs, b"x").ino, &model, "renamed over");
    // Unlinking one name keeps the parts; unlinking a file still open keeps them until the
    // last close.
    fs.unlink(ROOT, b"x").unwrap();
    check_model(
        &fs,
        lookup(&fs, b"c").ino,
        &model,
        "after unlinking one name",
    );
    let c = lookup(&fs, b"c");
    let fh = fs.open(c.ino, libc::O_RDONLY).unwrap();
    fs.unlink(ROOT, b"c").unwrap();
    assert_eq!(
        fs.read(fh, 4 * P, 10).unwrap(),
        model[4 * P as usize..4 * P as usize + 10],
        "reading an unlinked open file"
    );
    assert_eq!(parts_on_disk(&backing).len(), 1, "parts kept while open");
    fs.release(fh).unwrap();
    assert_eq!(
        parts_on_disk(&backing),
        vec![],
        "parts removed at the last close"
    );
    let fs = remount(fs, &backing);
    assert_eq!(
        fs.lookup(ROOT, b"c").err(),
        Some(Errno::ENOENT),
        "c is gone after a remount"
    );
    fs.compact().unwrap();
    assert!(
        store_versions(&backing).iter().all(|(_, v)| *v == 1),
        "without parted files a compaction writes format 1 again: {:?}",
        store_versions(&backing)
    );
    drop(fs);
    assert_fat_clean(&backing);
}

#[test]
fn fallocate_and_copy_file_range_cross_parts() {
    let (_t, backing) = temp();
    let fs = open_with(&backing, tiny());
    let (_, fa) = fs.create(USER, ROOT, b"a", 0o644, libc::O_RDWR).unwrap();
    let data = pattern(7, (3 * P + 11) as usize);
    fs.write(fa, 0, &data).unwrap();
    let (b, fb) = fs.create(USER, ROOT, b"b", 0o644, libc::O_RDWR).unwrap();
    // Copy in pieces as the kernel would, across both files' boundaries.
    let mut model = vec![0u8; 100];
    let mut done = 0u64;
    while done < data.len() as u64 {
        let n = fs
            .copy_file_range(fa, done, fb, 100 + done, data.len() as u64 - done)
            .unwrap();
        assert!(n > 0, "copy_file_range made no progress at {done}");
        done += n;
    }
    model.extend_from_slice(&data);
    check_model(&fs, b.ino, &model, "after copy_file_range");
    // Allocation growing the file, then a punched hole across a boundary.
    fs.fallocate(fb, 0, 6 * P, 0).unwrap();
    model.resize((6 * P) as usize, 0);
    check_model(&fs, b.ino, &model, "after fallocate to 6 parts");
    fs.fallocate(
        fb,
        P - 50,
        200,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    model[(P - 50) as usize..(P + 150) as usize].fill(0);
    check_model(
        &fs,
        b.ino,
        &model,
        "after punching a hole across a boundary",
    );
    assert_eq!(
        fs.fallocate(fb, 0, P, libc::FALLOC_FL_COLLAPSE_RANGE),
        Err(Errno::EOPNOTSUPP),
        "collapsing a range of a parted file"
    );
    fs.release(fa).unwrap();
    fs.release(fb).unwrap();
    let fs = remount(fs, &backing);
    check_model(&fs, lookup(&fs, b"b").ino, &model, "after a remount");
    drop(fs);
    assert_fat_clean(&backing);
}

/// A whole file longer than a part (written while parts were off, or through passthrough) is
/// split when it grows through pershome: its bytes past the part size move into parts.
#[test]
fn a_whole_file_longer_than_a_part_is_split_when_it_grows() {
    for grow_by_truncate in [true, false] {
        let (_t, backing) = temp();
        let fs = open_with(
            &backing,
            FsOptions {
                parts: PartsMode::Never,
                ..tiny()
            },
        );
        let (_, fh) = fs.create(USER, ROOT, b"w", 0o644, libc::O_RDWR).unwrap();
        let mut model = pattern(11, (3 * P + 7) as usize);
        fs.write(fh, 0, &model).unwrap();
        // A hole in the middle of what will be part 1 stays a hole.
        fs.fallocate(
            fh,
            P + 100,
            P,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
        model[(P + 100) as usize..(2 * P + 100) as usize].fill(0);
        fs.release(fh).unwrap();
        fs.shutdown();
        drop(fs);
        let fs = open_with(&backing, tiny());
        let w = lookup(&fs, b"w");
        if grow_by_truncate {
            fs.setattr(
                w.ino,
                SetAttr {
                    size: Some(5 * P + 1),
                    ..SetAttr::default()
                },
            )
            .unwrap();
            model.resize((5 * P + 1) as usize, 0);
        } else {
            let fh = fs.open(w.ino, libc::O_RDWR).unwrap();
            fs.write(fh, 5 * P, b"xy").unwrap();
            fs.release(fh).unwrap();
            model.resize((5 * P) as usize, 0);
            model.extend_from_slice(b"xy");
        }
        let what = if grow_by_truncate {
            "truncate"
        } else {
            "write"
        };
        check_model(&fs, w.ino, &model, &format!("grown by {what}"));
        assert_eq!(
            std::fs::metadata(backing.join("w")).unwrap().len(),
            P,
            "{what}: the first part is cut to one part"
        );
        let parts = parts_on_disk(&backing);
        assert_eq!(
            parts[0].1,
            expected_parts(model.len() as u64),
            "{what}: part lengths"
        );
        let fs = remount(fs, &backing);
        check_model(
            &fs,
            lookup(&fs, b"w").ino,
            &model,
            &format!("{what}, remounted"),
        );
        drop(fs);
        assert_fat_clean(&backing);
    }
}

/// While the kernel has a file open through passthrough it writes the first part itself, so
/// pershome does not split it then: it grows whole, and is split at the next write through
/// pershome once the passthrough handles are closed.
#[test]
fn a_file_open_through_passthrough_is_split_only_after_it_is_closed() {
    let (_t, backing) = temp();
    let fs = open_with(&backing, tiny());
    let (attr, fh) = fs.create(USER, ROOT, b"pt", 0o644, libc::O_RDWR).unwrap();
    fs.set_passthrough(fh);
    let mut model = pattern(12, (2 * P + 9) as usize);
    // What the kernel would write directly, then a truncate through pershome.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(backing.join("pt"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &model, 0).unwrap();
    fs.setattr(
        attr.ino,
        SetAttr {
            size: Some(3 * P),
            ..SetAttr::default()
        },
    )
    .unwrap();
    model.resize((3 * P) as usize, 0);
    assert_eq!(
        parts_on_disk(&backing),
        vec![],
        "no parts while passthrough is open"
    );
    assert_eq!(
        std::fs::metadata(backing.join("pt")).unwrap().len(),
        3 * P,
        "the file grew whole"
    );
    fs.release(fh).unwrap();
    let fh = fs.open(attr.ino, libc::O_RDONLY).unwrap();
    assert!(
        fs.passthrough_file(attr.ino, fh).is_err(),
        "a file of half a part or more is not handed to the kernel on a splitting mount"
    );
    fs.release(fh).unwrap();
    let fh = fs.open(attr.ino, libc::O_RDWR).unwrap();
    fs.write(fh, 3 * P, b"more").unwrap();
    fs.release(fh).unwrap();
    model.extend_from_slice(b"more");
    check_model(
        &fs,
        attr.ino,
        &model,
        "split after the passthrough handle closed",
    );
    assert_eq!(
        parts_on_disk(&backing)[0].1,
        expected_parts(model.len() as u64),
        "part lengths after the split"
    );
    drop(fs);
    assert_fat_clean(&backing);
}

/// Which opens the kernel may serve itself: on a splitting mount only readers of small whole
/// files, and never next to a handle served by pershome (the kernel refuses mixed opens).
#[test]
fn passthrough_is_offered_only_where_pershome_need_not_see_the_data() {
    let (_t, backing) = temp();
    let fs = open_with(&backing, tiny());
    let (attr, fh) = fs
        .create(USER, ROOT, b"small", 0o644, libc::O_RDWR)
        .unwrap();
    fs.write(fh, 0, b"tiny").unwrap();
    assert!(
        fs.passthrough_file(attr.ino, fh).is_err(),
        "a writer on a splitting mount"
    );
    let reader = fs.open(attr.ino, libc::O_RDONLY).unwrap();
    assert!(
        fs.passthrough_file(attr.ino, reader).is_err(),
        "a reader while a writer is served by pershome"
    );
    fs.release(fh).unwrap();
    fs.release(reader).unwrap();
    let reader = fs.open(attr.ino, libc::O_RDONLY).unwrap();
    assert!(
        fs.passthrough_file(attr.ino, reader).is_ok(),
        "a lone reader of a small whole file"
    );
    fs.release(reader).unwrap();
    drop(fs);
    let fs = open_with(
        &backing,
        FsOptions {
            parts: PartsMode::Never,
            ..tiny()
        },
    );
    let ino = lookup(&fs, b"small").ino;
    let writer = fs.open(ino, libc::O_RDWR).unwrap();
    assert!(
        fs.passthrough_file(ino, writer).is_ok(),
        "a writer where nothing is split"
    );
    fs.release(writer).unwrap();
}

#[test]
fn parts_never_and_auto_on_a_large_file_backing_keep_files_whole() {
    for mode in [PartsMode::Never, PartsMode::Auto] {
        let (_t, backing) = temp();
        let fs = open_with(
            &backing,
            FsOptions {
                parts: mode,
                ..tiny()
            },
        );
        let (attr, fh) = fs.create(USER, ROOT, b"w", 0o644, libc::O_RDWR).unwrap();
        let data = pattern(8, (3 * P) as usize);
        fs.write(fh, 0, &data).unwrap();
        fs.release(fh).unwrap();
        check_model(&fs, attr.ino, &data, &format!("{mode:?}"));
        assert_eq!(
            std::fs::metadata(backing.join("w")).unwrap().len(),
            3 * P,
            "{mode:?}: the file stays whole (temporary directories are not FAT)"
        );
        assert_eq!(parts_on_disk(&backing), vec![], "{mode:?}: no parts");
    }
}

#[test]
fn a_first_part_rewritten_elsewhere_drops_the_stale_parts() {
    let (_t, backing) = temp();
    let fs = open_with(&backing, tiny());
    let (_, fh) = fs.create(USER, ROOT, b"doc", 0o644, libc::O_RDWR).unwrap();
    fs.write(fh, 0, &pattern(9, (2 * P + 1) as usize)).unwrap();
    fs.release(fh).unwrap();
    fs.shutdown();
    drop(fs);
    // Windows sees only the first part and saves a shorter file.
    std::fs::write(backing.join("doc"), b"edited on windows").unwrap();
    let fs = open_with(&backing, tiny());
    let doc = lookup(&fs, b"doc");
    check_model(
        &fs,
        doc.ino,
        b"edited on windows",
        "the file as Windows left it",
    );
    let warned = fs
        .recovery_warnings()
        .iter()
        .any(|w| w.contains("changed on another computer"));
    assert!(
        warned,
        "a warning names the change: {:?}",
        fs.recovery_warnings()
    );
    // Growing it again must not resurrect the old parts.
    let fh = fs.open(doc.ino, libc::O_RDWR).unwrap();
    fs.write(fh, 2 * P, b"z").unwrap();
    fs.release(fh).unwrap();
    let mut model = b"edited on windows".to_vec();
    model.resize((2 * P) as usize, 0);
    model.push(b'z');
    check_model(&fs, doc.ino, &model, "grown again");
    drop(fs);
}

/// A deterministic random sequence of writes, truncates, hole punches and remounts against a
/// plain byte vector.
#[test]
fn random_operations_match_a_model() {
    let (_t, backing) = temp();
    let mut fs = open_with(&backing, tiny());
    let (attr, fh) = fs.create(USER, ROOT, b"r", 0o644, libc::O_RDWR).unwrap();
    fs.release(fh).unwrap();
    let mut ino = attr.ino;
    let mut model: Vec<u8> = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for step in 0..400 {
        let op = next(10);
        let fh = fs.open(ino, libc::O_RDWR).unwrap();
        match op {
            0..=4 => {
                let off = next(9 * P);
                let len = next(2 * P) as usize + 1;
                let data = pattern(step, len);
                fs.write(fh, off, &data).unwrap();
                if model.len() < off as usize + len {
                    model.resize(off as usize + len, 0);
                }
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            5 | 6 => {
                let size = next(10 * P);
                fs.setattr(
                    ino,
                    SetAttr {
                        size: Some(size),
                        ..SetAttr::default()
                    },
                )
                .unwrap();
                model.resize(size as usize, 0);
            }
            7 => {
                let off = next(9 * P);
                let len = next(3 * P) + 1;
                fs.fallocate(
                    fh,
                    off,
                    len,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                )
                .unwrap();
                let end = ((off + len) as usize).min(model.len());
                if (off as usize) < end {
                    model[off as usize..end].fill(0);
                }
            }
            8 => {
                let off = next(10 * P);
                let got = fs.read(fh, off, 5000).unwrap();
                let want = model
                    .get(off as usize..(off as usize + 5000).min(model.len()))
                    .unwrap_or(&[]);
                assert_eq!(got, want, "step {step}: read 5000 at {off}");
            }
            _ => {
                fs.release(fh).unwrap();
                fs = remount(fs, &backing);
                ino = lookup(&fs, b"r").ino;
                check_model(&fs, ino, &model, &format!("step {step}: after a remount"));
                continue;
            }
        }
        fs.release(fh).unwrap();
        assert_eq!(
            fs.getattr(ino).unwrap().size,
            model.len() as u64,
            "step {step} (op {op}): size"
        );
    }
    check_model(&fs, ino, &model, "at the end");
    let parts = parts_on_disk(&backing);
    let got = parts.first().map(|p| p.1.clone()).unwrap_or_default();
    assert_eq!(got, expected_parts(model.len() as u64), "layout at the end");
    drop(fs);
    assert_fat_clean(&backing);
}

/// One real file just past 4 GiB with the default part size, written sparsely (a few bytes on
/// each side of the boundary), so it costs no disk space.
#[test]
fn a_sparse_file_past_4_gib_is_split_on_the_default_part_size() {
    let (_t, backing) = temp();
    let opts = FsOptions {
        parts: PartsMode::Always,
        ..common::opts()
    };
    let fs = open_with(&backing, opts.clone());
    let (attr, fh) = fs
        .create(USER, ROOT, b"disk.img", 0o644, libc::O_RDWR)
        .unwrap();
    let four_gib = 4u64 << 30;
    fs.write(fh, 0, b"head").unwrap();
    fs.write(fh, four_gib - 2, b"abcd").unwrap();
    fs.release(fh).unwrap();
    let size = four_gib + 2;
    assert_eq!(fs.getattr(attr.ino).unwrap().size, size, "size");
    let fs = {
        fs.shutdown();
        drop(fs);
        open_with(&backing, opts)
    };
    let ino = lookup(&fs, b"disk.img").ino;
    assert_eq!(fs.getattr(ino).unwrap().size, size, "size after a remount");
    let fh = fs.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(fh, 0, 4).unwrap(), b"head", "the first bytes");
    assert_eq!(
        fs.read(fh, four_gib - 2, 10).unwrap(),
        b"abcd",
        "the bytes across 4 GiB"
    );
    assert_eq!(
        fs.lseek(fh, 4096, libc::SEEK_DATA),
        Ok((four_gib - 2) as i64 & !4095),
        "SEEK_DATA skips the hole"
    );
    fs.release(fh).unwrap();
    let first = std::fs::metadata(backing.join("disk.img")).unwrap().len();
    assert_eq!(
        first,
        pershome::fs::parts::DEFAULT_PART_SIZE,
        "the visible file is one part long"
    );
    assert!(first < four_gib, "the first part is below FAT32's limit");
    drop(fs);
    assert_fat_clean(&backing);
}

/// fsck finds orphaned parts, missing parts and a first part rewritten elsewhere, and a repair
/// leaves a clean stick: orphans moved to `pershome-recovered/`, holes for missing parts.
#[test]
fn fsck_finds_and_repairs_part_problems() {
    use pershome::fsck::{fsck, FsckOptions};
    let (_t, backing) = temp();
    let fs = open_with(&backing, tiny());
    let mut model = pattern(10, (4 * P + 3) as usize);
    for name in [&b"keep"[..], b"edited"] {
        let (_, fh) = fs.create(USER, ROOT, name, 0o644, libc::O_RDWR).unwrap();
        fs.write(fh, 0, &model).unwrap();
        fs.release(fh).unwrap();
    }
    fs.shutdown();
    drop(fs);
    let dirs = parts_on_disk(&backing);
    assert_eq!(dirs.len(), 2, "two parted files: {dirs:?}");
    // A crash left parts of a file that is gone; a part of "keep" is lost; "edited" was
    // rewritten on Windows.
    let orphan = backing.join(".pershome/parts/00000000000000ab");
    std::fs::create_dir(&orphan).unwrap();
    std::fs::write(orphan.join("00000001"), b"lost bytes").unwrap();
    std::fs::write(backing.join("edited"), b"short").unwrap();
    // Part 2 of both files is lost (for "edited" it no longer matters: its parts go).
    for (d, _) in &dirs {
        std::fs::remove_file(backing.join(".pershome/parts").join(d).join("00000002")).unwrap();
    }
    let report = fsck(&backing, &FsckOptions::default()).unwrap();
    let found = |needle: &str| report.findings.iter().any(|f| f.what.contains(needle));
    for needle in [
        "orphaned parts",
        "are missing or short",
        "rewritten on another computer",
    ] {
        assert!(
            found(needle),
            "expected a finding {needle:?}, got {:#?}",
            report.findings
        );
    }
    let repaired = fsck(
        &backing,
        &FsckOptions {
            repair: true,
            force: false,
        },
    )
    .unwrap();
    let left: Vec<_> = repaired.problems_left().collect();
    assert!(
        left.is_empty(),
        "problems left after a repair: {left:#?}; did {:#?}",
        repaired.repairs
    );
    assert!(
        backing
            .join("pershome-recovered/parts-00000000000000ab/00000001")
            .exists(),
        "the orphan moved; did {:#?}",
        repaired.repairs
    );
    let fs = open_with(&backing, tiny());
    model[(2 * P) as usize..(3 * P) as usize].fill(0);
    check_model(
        &fs,
        lookup(&fs, b"keep").ino,
        &model,
        "keep after the repair",
    );
    check_model(
        &fs,
        lookup(&fs, b"edited").ino,
        b"short",
        "edited after the repair",
    );
    drop(fs);
    let report = fsck(&backing, &FsckOptions::default()).unwrap();
    let left: Vec<_> = report.problems_left().collect();
    assert!(left.is_empty(), "a second check finds: {left:#?}");
    assert_fat_clean(&backing);
}
