use super::format::*;
use super::*;
use crate::meta::codec::{decode_all, encode_record};
use crate::meta::Meta;
use crate::meta::STORE_DIR;
use nix::sys::stat::Mode;
use nix::sys::uio::pwrite;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn put(i: u32) -> Record {
    Record::Put {
        path: vec![
            format!("dir{}", i % 7).into_bytes(),
            format!("file{i}").into_bytes(),
        ],
        meta: Meta {
            mode: 0o100644,
            uid: i,
            mtime: crate::meta::Timespec {
                sec: 1_700_000_000 + i64::from(i),
                nsec: i,
            },
            ..Meta::default()
        },
    }
}

fn batch(from: u32, n: u32) -> Vec<Record> {
    (from..from + n).map(put).collect()
}

fn state(batches: &[&[Record]]) -> Replayed {
    let mut s = Replayed::default();
    for b in batches {
        for r in b.iter() {
            s.apply(r.clone());
        }
    }
    s
}

fn store(root: &TempDir) -> PathBuf {
    root.path().join(STORE_DIR)
}

fn open(root: &TempDir, mode: OpenMode) -> Result<(Journal, Recovered), StoreError> {
    let dir = fs::File::open(root.path()).expect("open temp root");
    Journal::open(dir.as_fd(), mode)
}

fn open_ok(root: &TempDir, mode: OpenMode) -> (Journal, Recovered) {
    match open(root, mode) {
        Ok(x) => x,
        Err(e) => panic!("expected the store to open ({mode:?}), got: {e}"),
    }
}

/// Every path under the root (directories marked), with file contents.
fn snapshot_tree(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            let rel = path
                .strip_prefix(base)
                .expect("prefix")
                .display()
                .to_string();
            let ft = entry.file_type().expect("file type");
            if ft.is_dir() {
                out.insert(rel, None);
                walk(base, &path, out);
            } else if ft.is_file() {
                out.insert(rel, Some(fs::read(&path).expect("read")));
            } else {
                out.insert(rel, Some(b"<special>".to_vec()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The store files by name.
fn store_files(root: &TempDir) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(store(root)).expect("read store") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        out.insert(name, fs::read(entry.path()).expect("read store file"));
    }
    out
}

/// The names in the store, sorted (contents not read: a planted fifo must not block).
fn names(root: &TempDir) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(store(root))
        .expect("read store")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn with_store(files: &BTreeMap<String, Vec<u8>>) -> TempDir {
    let root = TempDir::new().expect("tempdir");
    fs::create_dir(store(&root)).expect("mkdir store");
    for (name, bytes) in files {
        fs::write(store(&root).join(name), bytes).expect("write store file");
    }
    root
}

fn open83(root: &TempDir) -> (Journal, Recovered) {
    let dir = fs::File::open(root.path()).expect("open temp root");
    match Journal::open_in(dir.as_fd(), OpenMode::ReadWrite, StoreLayout::Short83) {
        Ok(x) => x,
        Err(e) => panic!("expected the 8.3 store to open, got: {e}"),
    }
}

fn names83(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read store")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The 8.3 layout: `PERSHOME.DB/<8 hex>.CKP|JNL`, damaged files kept as `.C00`/`.J00`, and
/// a store listed in lower case (as Linux's `msdos` driver shows it) still recovered.
#[test]
fn the_8_3_layout_writes_8_3_names_and_reads_them_in_any_case() {
    let root = TempDir::new().expect("tempdir");
    let (mut jn, rec) = open83(&root);
    assert!(rec.created);
    let a = batch(0, 5);
    jn.append(&a).expect("append");
    jn.checkpoint(&state(&[&a]).snapshot()).expect("checkpoint");
    let b = batch(5, 3);
    jn.append(&b).expect("append");
    drop(jn);
    let store = root.path().join("PERSHOME.DB");
    assert!(!root.path().join(STORE_DIR).exists(), "no long store made");
    assert_eq!(names83(&store), vec!["00000002.CKP", "00000002.JNL"]);

    // As a `msdos` mount lists it: every name lower-cased.
    for name in names83(&store) {
        fs::rename(store.join(&name), store.join(name.to_ascii_lowercase())).expect("rename");
    }
    let lower = root.path().join("pershome.db");
    fs::rename(&store, &lower).expect("rename store");
    let (mut jn, rec) = open83(&root);
    assert_eq!(
        (rec.generation, rec.replayed.clone(), rec.warnings.clone()),
        (2, state(&[&a, &b]), Vec::<String>::new()),
        "expected generation 2 with every batch and no warning (expected vs got)"
    );
    // The next generation replaces the lower-cased files by 8.3 names of its own.
    jn.checkpoint(&rec.replayed.snapshot()).expect("checkpoint");
    drop(jn);
    assert_eq!(names83(&lower), vec!["00000003.CKP", "00000003.JNL"]);

    // A damaged checkpoint is kept under an 8.3 name, never a store file's.
    let ck = lower.join("00000003.CKP");
    let mut bytes = fs::read(&ck).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    fs::write(&ck, bytes).expect("write");
    drop(open83(&root));
    let got = names83(&lower);
    assert!(
        got.contains(&"00000003.C00".to_string())
            && got
                .iter()
                .all(|n| crate::fatrules::check_short_name(n.as_bytes()).is_ok()),
        "expected the damaged checkpoint kept as 00000003.C00 and only 8.3 names, got {got:?}"
    );
}

fn j(g: u64) -> String {
    file_name(Kind::Journal, g)
}

fn c(g: u64) -> String {
    file_name(Kind::Checkpoint, g)
}

/// A gen-1 store with batches A, B, C; returns the root, the batches and the offsets where
/// each batch starts (and the journal end).
fn three_batches() -> (TempDir, [Vec<Record>; 3], [u64; 4]) {
    let root = TempDir::new().expect("tempdir");
    let (mut jn, rec) = open_ok(&root, OpenMode::ReadWrite);
    assert!(rec.created);
    let batches = [batch(0, 3), batch(10, 2), batch(20, 4)];
    let mut offsets = [jn.journal_len(), 0, 0, 0];
    for (i, b) in batches.iter().enumerate() {
        jn.append(b).expect("append");
        offsets[i + 1] = jn.journal_len();
    }
    (root, batches, offsets)
}

#[test]
fn names_are_recognised_exactly() {
    assert_eq!(
        parse_name(b"journal.0000000000000001"),
        Some((Kind::Journal, 1))
    );
    assert_eq!(
        parse_name(b"checkpoint.00000000000000ff"),
        Some((Kind::Checkpoint, 255))
    );
    for bad in [
        &b"journal.1"[..],
        b"journal.000000000000000F",
        b"journal.0000000000000001.corrupt",
        b"checkpoint.000000000000001",
        b"Journal.0000000000000001",
        b"journal.+000000000000001",
    ] {
        assert_eq!(
            parse_name(bad),
            None,
            "expected {bad:?} not to be recognised"
        );
    }
    assert_eq!(file_name(Kind::Journal, 1), "journal.0000000000000001");
}

#[test]
fn reopen_after_append_sees_records() {
    let root = TempDir::new().expect("tempdir");
    let (mut jn, rec) = open_ok(&root, OpenMode::ReadWrite);
    assert!(rec.created && rec.generation == 1 && rec.warnings.is_empty());
    assert_eq!(rec.replayed, Replayed::default());
    let (a, b) = (batch(0, 5), batch(5, 1));
    jn.append(&a).expect("append a");
    jn.append(&b).expect("append b");
    jn.append(&[]).expect("append nothing");
    let len = jn.journal_len();
    drop(jn);
    for mode in [OpenMode::ReadOnly, OpenMode::ReadWrite] {
        let (jn, rec) = open_ok(&root, mode);
        assert_eq!(rec.replayed, state(&[&a, &b]), "{mode:?}");
        assert!(
            rec.warnings.is_empty(),
            "expected no warnings, got {:?}",
            rec.warnings
        );
        assert!(!rec.created);
        assert_eq!((rec.generation, jn.journal_len()), (1, len), "{mode:?}");
    }
    assert_eq!(names(&root), vec![j(1)]);
}

#[test]
fn checkpoint_then_more_appends_then_reopen_sees_everything() {
    let root = TempDir::new().expect("tempdir");
    let (mut jn, _) = open_ok(&root, OpenMode::ReadWrite);
    let (a, b, c3) = (batch(0, 4), batch(4, 3), batch(100, 2));
    jn.append(&a).expect("append");
    jn.checkpoint(&state(&[&a]).snapshot()).expect("checkpoint");
    assert_eq!(jn.generation(), 2);
    assert_eq!(jn.journal_len(), HEADER_LEN as u64);
    assert_eq!(names(&root), vec![c(2), j(2)]);
    jn.append(&b).expect("append");
    drop(jn);
    let (mut jn, rec) = open_ok(&root, OpenMode::ReadWrite);
    assert_eq!(rec.replayed, state(&[&a, &b]));
    assert!(rec.warnings.is_empty(), "got {:?}", rec.warnings);
    assert_eq!(rec.generation, 2);
    jn.checkpoint(&rec.replayed.snapshot())
        .expect("checkpoint 3");
    jn.append(&c3).expect("append");
    drop(jn);
    let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
    assert_eq!(rec.replayed, state(&[&a, &b, &c3]));
    assert_eq!(rec.generation, 3);
    assert_eq!(names(&root), vec![c(3), j(3)]);
}

#[test]
fn write_stats_count_every_write_and_sync() {
    let root = TempDir::new().expect("tempdir");
    let (mut jn, _) = open_ok(&root, OpenMode::ReadWrite);
    // Creating the store: journal header (1 write), file fsync, dir fsync, root fsync.
    let want = WriteStats {
        bytes: HEADER_LEN as u64,
        writes: 1,
        syncs: 3,
    };
    assert_eq!(jn.stats(), want, "after creating the store");
    let a = batch(0, 3);
    let before = jn.journal_len();
    jn.append(&a).expect("append");
    let frame = jn.journal_len() - before;
    let mut payload = Vec::new();
    for r in &a {
        encode_record(r, &mut payload);
    }
    assert_eq!(frame, (FRAME_HEADER_LEN + payload.len()) as u64);
    let want = WriteStats {
        bytes: want.bytes + frame,
        writes: 2,
        syncs: 4,
    };
    assert_eq!(jn.stats(), want, "after one append");
    let snap = state(&[&a]).snapshot();
    jn.checkpoint(&snap).expect("checkpoint");
    let ck_len = build_checkpoint(2, &snap).len() as u64;
    let want = WriteStats {
        bytes: want.bytes + ck_len + HEADER_LEN as u64,
        writes: 4,
        syncs: 8,
    };
    assert_eq!(jn.stats(), want, "after a checkpoint");
    // A clean reopen writes nothing.
    drop(jn);
    let (jn, _) = open_ok(&root, OpenMode::ReadWrite);
    assert_eq!(jn.stats(), WriteStats::default(), "after a clean reopen");
}

#[test]
fn torn_last_batch_at_every_offset_recovers_earlier_batches() {
    let (root, [a, b, _], offsets) = three_batches();
    let files = store_files(&root);
    let full = &files[&j(1)];
    let (start, end) = (offsets[2] as usize, offsets[3] as usize);
    assert_eq!(end, full.len());
    let want = state(&[&a, &b]);
    let d = batch(500, 2);
    for cut in start..end {
        let mut torn = files.clone();
        torn.insert(j(1), full[..cut].to_vec());
        let root = with_store(&torn);
        let before = snapshot_tree(root.path());
        let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
        assert_eq!(rec.replayed, want, "read-only, cut at {cut}");
        assert_eq!(
            rec.warnings.is_empty(),
            cut == start,
            "cut at {cut}: warnings {:?}",
            rec.warnings
        );
        assert_eq!(
            snapshot_tree(root.path()),
            before,
            "read-only open wrote (cut {cut})"
        );

        let (mut jn, rec) = open_ok(&root, OpenMode::ReadWrite);
        assert_eq!(rec.replayed, want, "read-write, cut at {cut}");
        assert_eq!(rec.generation, 1);
        assert_eq!(
            fs::metadata(store(&root).join(j(1))).expect("stat").len(),
            start as u64,
            "expected the torn tail cut off (cut {cut})"
        );
        jn.append(&d).expect("append after recovery");
        drop(jn);
        let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
        assert_eq!(
            rec.replayed,
            state(&[&a, &b, &d]),
            "after append, cut {cut}"
        );
        assert!(rec.warnings.is_empty(), "cut {cut}: {:?}", rec.warnings);
    }
}

#[test]
fn truncated_journal_header_is_an_empty_journal() {
    let (root, _, _) = three_batches();
    let full = store_files(&root)[&j(1)].clone();
    for cut in 0..HEADER_LEN {
        let mut files = BTreeMap::new();
        files.insert(j(1), full[..cut].to_vec());
        let root = with_store(&files);
        let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
        assert_eq!(rec.replayed, Replayed::default(), "cut {cut}");
        let (mut jn, rec) = open_ok(&root, OpenMode::ReadWrite);
        assert_eq!(rec.replayed, Replayed::default(), "cut {cut}");
        jn.append(&batch(0, 1)).expect("append");
        drop(jn);
        let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
        assert_eq!(rec.replayed, state(&[&batch(0, 1)]), "cut {cut}");
        assert!(rec.warnings.is_empty(), "cut {cut}: {:?}", rec.warnings);
    }
}

#[test]
fn bit_flip_in_a_batch_drops_it_and_later_ones() {
    let (root, [a, b, _], offsets) = three_batches();
    let files = store_files(&root);
    let full = &files[&j(1)];
    // Every byte of batch B (frame header included); batch C after it stays intact.
    for at in offsets[1] as usize..offsets[2] as usize {
        let mut flipped = files.clone();
        let mut bytes = full.clone();
        bytes[at] ^= 1 << (at % 8);
        flipped.insert(j(1), bytes);
        let root = with_store(&flipped);
        let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
        assert_eq!(rec.replayed, state(&[&a]), "flip at {at}");
        assert!(
            rec.warnings.iter().any(|w| w.contains("damaged")),
            "flip at {at}: expected a 'damaged' warning, got {:?}",
            rec.warnings
        );
        // Read-write: corruption, not a tear: the journal is kept for fsck and the
        // recovered state is checkpointed as a new generation.
        let (_, rec) = open_ok(&root, OpenMode::ReadWrite);
        assert_eq!(rec.replayed, state(&[&a]), "flip at {at}");
        assert_eq!(rec.generation, 2);
        assert_eq!(
            names(&root),
            vec![c(2), format!("{}.corrupt", j(1)), j(2)],
            "flip at {at}"
        );
        let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
        assert_eq!(rec.replayed, state(&[&a]), "reopen, flip at {at}");
        assert!(rec.warnings.is_empty(), "flip at {at}: {:?}", rec.warnings);
    }
    // A flip in the last batch looks like a torn tail: cut off, no new generation.
    for at in offsets[2] as usize..offsets[3] as usize {
        let mut flipped = files.clone();
        let mut bytes = full.clone();
        bytes[at] ^= 0x80;
        flipped.insert(j(1), bytes);
        let root = with_store(&flipped);
        let (jn, rec) = open_ok(&root, OpenMode::ReadWrite);
        assert_eq!(rec.replayed, state(&[&a, &b]), "flip at {at}");
        assert_eq!(rec.warnings.len(), 1, "flip at {at}: {:?}", rec.warnings);
        assert_eq!(
            (jn.generation(), jn.journal_len()),
            (1, offsets[2]),
            "flip at {at}"
        );
    }
}

/// Builds the directory states a crash at each step of a gen 2 → 3 compaction leaves, and
/// checks each recovers the full state.
#[test]
fn crash_at_every_step_of_compaction_recovers_full_state() {
    let root = TempDir::new().expect("tempdir");
    let (mut jn, _) = open_ok(&root, OpenMode::ReadWrite);
    let (a, b) = (batch(0, 6), batch(50, 3));
    jn.append(&a).expect("append");
    jn.checkpoint(&state(&[&a]).snapshot()).expect("checkpoint");
    jn.append(&b).expect("append");
    let full = state(&[&a, &b]);
    let gen2 = store_files(&root);
    // What a real compaction writes, to be sure the simulation builds the same bytes.
    jn.checkpoint(&full.snapshot()).expect("checkpoint");
    let gen3 = store_files(&root);
    drop(jn);
    let ck3 = gen3[&c(3)].clone();
    let j3 = gen3[&j(3)].clone();
    assert_eq!(ck3, build_checkpoint(3, &full.snapshot()));

    let mut steps: Vec<(String, BTreeMap<String, Vec<u8>>, u64)> = Vec::new();
    // Step 1: checkpoint.3 partly written (every length).
    for cut in 0..ck3.len() {
        let mut s = gen2.clone();
        s.insert(c(3), ck3[..cut].to_vec());
        steps.push((format!("checkpoint.3 cut at {cut}"), s, 2));
    }
    // Step 2: checkpoint.3 complete, journal.3 absent or partly written.
    let mut s = gen2.clone();
    s.insert(c(3), ck3.clone());
    steps.push(("checkpoint.3 complete".into(), s.clone(), 3));
    for cut in 0..=j3.len() {
        let mut s = s.clone();
        s.insert(j(3), j3[..cut].to_vec());
        steps.push((format!("journal.3 cut at {cut}"), s, 3));
    }
    // Step 3: old journal removed, old checkpoint still there.
    let mut s = gen3.clone();
    s.insert(c(2), gen2[&c(2)].clone());
    steps.push(("journal.2 removed".into(), s, 3));
    steps.push(("done".into(), gen3.clone(), 3));

    for (what, files, generation) in steps {
        let root = with_store(&files);
        let before = snapshot_tree(root.path());
        let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
        assert_eq!(rec.replayed, full, "{what}, read-only");
        assert_eq!(rec.generation, generation, "{what}, read-only");
        assert_eq!(
            snapshot_tree(root.path()),
            before,
            "{what}: read-only open wrote"
        );
        let (mut jn, rec) = open_ok(&root, OpenMode::ReadWrite);
        assert_eq!(rec.replayed, full, "{what}, read-write");
        assert_eq!(rec.generation, generation, "{what}, read-write");
        assert_eq!(
            names(&root),
            vec![c(generation), j(generation)],
            "{what}: expected only the live generation left"
        );
        let more = batch(900, 1);
        jn.append(&more).expect("append");
        drop(jn);
        let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
        assert_eq!(rec.replayed, state(&[&a, &b, &more]), "{what}, reopened");
        assert!(rec.warnings.is_empty(), "{what}: {:?}", rec.warnings);
    }
}

fn header_with_version(kind: Kind, generation: u64, version: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(magic_of(kind));
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&generation.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Format 2 only where needed: a parted record never lands in a format-1 journal (a
/// format-1 reader would cut it off as damage), a checkpoint holding one is format 2, and
/// the next checkpoint without one is format 1 again.
#[test]
fn parted_records_need_a_format_2_generation() {
    let root = tempfile::tempdir().unwrap();
    let (mut journal, _) = open_ok(&root, OpenMode::ReadWrite);
    let parted = Record::Put {
        path: vec![b"big".to_vec()],
        meta: crate::meta::Meta {
            mode: libc::S_IFREG | 0o644,
            parts: Some(crate::meta::Parts { id: 5, size: 8192 }),
            ..Default::default()
        },
    };
    journal.append(&[put(1)]).unwrap();
    match journal.append(std::slice::from_ref(&parted)) {
        Err(StoreError::NeedsNewerFormat { current: 1 }) => {}
        other => panic!("expected NeedsNewerFormat {{ current: 1 }}, got {other:?}"),
    }
    let version = |name: &str| u32_at(&store_files(&root)[name], 8);
    journal.checkpoint(&[put(1), parted.clone()]).unwrap();
    assert_eq!(
        (version(&c(2)), version(&j(2))),
        (2, 2),
        "checkpoint and journal of a generation with a parted file"
    );
    journal.append(std::slice::from_ref(&parted)).unwrap();
    drop(journal);
    let (mut journal, rec) = open_ok(&root, OpenMode::ReadWrite);
    assert_eq!(
        rec.replayed.root.children[&b"big".to_vec()]
            .meta
            .as_ref()
            .and_then(|m| m.parts),
        Some(crate::meta::Parts { id: 5, size: 8192 }),
        "the parts survive a reopen"
    );
    journal.checkpoint(&[put(1)]).unwrap();
    assert_eq!(
        (version(&c(3)), version(&j(3))),
        (1, 1),
        "a generation without parted files is format 1 again"
    );
}

#[test]
fn newer_format_is_refused_and_nothing_is_written() {
    let (root, _, _) = three_batches();
    let gen1 = store_files(&root);
    let mut newer_journal = gen1.clone();
    let mut bytes = header_with_version(Kind::Journal, 1, FORMAT_VERSION + 1);
    bytes.extend_from_slice(&gen1[&j(1)][HEADER_LEN..]);
    newer_journal.insert(j(1), bytes);
    let mut newer_checkpoint = gen1.clone();
    let mut bytes = header_with_version(Kind::Checkpoint, 9, 7);
    bytes.extend_from_slice(b"whatever format 7 holds");
    newer_checkpoint.insert(c(9), bytes);
    for (files, found) in [(newer_journal, FORMAT_VERSION + 1), (newer_checkpoint, 7)] {
        let root = with_store(&files);
        let before = snapshot_tree(root.path());
        for mode in [OpenMode::ReadWrite, OpenMode::ReadOnly] {
            match open(&root, mode) {
                Err(StoreError::NewerFormat {
                    found: f,
                    supported: FORMAT_VERSION,
                }) if f == found => {}
                Err(e) => panic!("expected NewerFormat {{ found: {found} }}, got {e}"),
                Ok((_, rec)) => panic!("expected NewerFormat, got an open store: {rec:?}"),
            }
            assert_eq!(snapshot_tree(root.path()), before, "{mode:?} wrote");
        }
    }
    // A flipped bit in the version field is corruption, not a newer format.
    let mut flipped = gen1.clone();
    flipped.get_mut(&j(1)).expect("journal")[8] ^= 0x04;
    let root = with_store(&flipped);
    let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
    assert!(!rec.warnings.is_empty());
}

#[test]
fn read_only_open_writes_nothing() {
    // Missing store: nothing is created, the state is empty.
    let root = TempDir::new().expect("tempdir");
    let (mut jn, rec) = open_ok(&root, OpenMode::ReadOnly);
    assert_eq!((rec.generation, rec.created), (0, false));
    assert!(!store(&root).exists(), "read-only open created the store");
    match jn.append(&batch(0, 1)) {
        Err(StoreError::ReadOnly) => {}
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    match jn.checkpoint(&[]) {
        Err(StoreError::ReadOnly) => {}
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    // Damaged stores of several kinds.
    let (root, _, offsets) = three_batches();
    let gen1 = store_files(&root);
    let mut torn = gen1.clone();
    torn.get_mut(&j(1))
        .expect("journal")
        .truncate(offsets[3] as usize - 1);
    let mut bad_ck = gen1.clone();
    bad_ck.insert(c(2), vec![0xAB; 100]);
    bad_ck.insert(j(2), encode_header(Kind::Journal, 2));
    let mut empty_store = BTreeMap::new();
    empty_store.insert("unrelated".to_string(), b"x".to_vec());
    for files in [gen1, torn, bad_ck, empty_store] {
        let root = with_store(&files);
        let before = snapshot_tree(root.path());
        let (mut jn, _) = open_ok(&root, OpenMode::ReadOnly);
        assert!(matches!(jn.append(&batch(0, 1)), Err(StoreError::ReadOnly)));
        assert_eq!(jn.stats(), WriteStats::default());
        assert_eq!(snapshot_tree(root.path()), before, "read-only open wrote");
    }
}

#[test]
fn corrupt_checkpoint_without_older_one_is_salvaged_and_kept() {
    let root = TempDir::new().expect("tempdir");
    let (mut jn, _) = open_ok(&root, OpenMode::ReadWrite);
    // Enough records for several chunk frames.
    let big = batch(0, 4000);
    let after = vec![put(99_999)];
    jn.checkpoint(&state(&[&big]).snapshot())
        .expect("checkpoint");
    jn.append(&after).expect("append");
    drop(jn);
    let mut files = store_files(&root);
    let ck = files.get_mut(&c(2)).expect("checkpoint");
    let first_len = u32_at(ck, HEADER_LEN + 4) as usize;
    let second_frame = HEADER_LEN + FRAME_HEADER_LEN + first_len;
    assert!(
        second_frame < ck.len() - 100,
        "expected several chunk frames"
    );
    ck[second_frame + FRAME_HEADER_LEN + 5] ^= 0x10;
    let first_chunk =
        decode_all(&ck[HEADER_LEN + FRAME_HEADER_LEN..HEADER_LEN + FRAME_HEADER_LEN + first_len])
            .expect("first chunk decodes");
    let mut want = state(&[&first_chunk]);
    for r in &after {
        want.apply(r.clone());
    }
    let root = with_store(&files);
    let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
    assert_eq!(rec.replayed, want, "read-only salvage");
    assert!(
        rec.warnings
            .iter()
            .any(|w| w.contains("NO INTACT CHECKPOINT")),
        "expected a loud warning, got {:?}",
        rec.warnings
    );
    let (_, rec) = open_ok(&root, OpenMode::ReadWrite);
    assert_eq!(rec.replayed, want, "read-write salvage");
    assert_eq!(rec.generation, 3);
    assert_eq!(
        names(&root),
        vec![format!("{}.corrupt", c(2)), c(3), j(3)],
        "expected the damaged checkpoint kept, its intact journal (now in checkpoint 3) gone"
    );
    let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
    assert_eq!(rec.replayed, want);
    assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
}

#[test]
fn damaged_newer_checkpoint_with_journal_replays_on_older_generation() {
    let root = TempDir::new().expect("tempdir");
    let (mut jn, _) = open_ok(&root, OpenMode::ReadWrite);
    let (a, b, c3) = (batch(0, 3), batch(10, 3), batch(20, 3));
    jn.checkpoint(&state(&[&a]).snapshot()).expect("checkpoint");
    jn.append(&b).expect("append");
    let gen2 = store_files(&root);
    jn.checkpoint(&state(&[&a, &b]).snapshot())
        .expect("checkpoint");
    jn.append(&c3).expect("append");
    drop(jn);
    let mut files = store_files(&root);
    files.extend(gen2);
    let ck3 = files.get_mut(&c(3)).expect("checkpoint 3");
    let last = ck3.len() - 1;
    ck3[last] ^= 1;
    let root = with_store(&files);
    let (_, rec) = open_ok(&root, OpenMode::ReadWrite);
    assert_eq!(rec.replayed, state(&[&a, &b, &c3]));
    assert_eq!(rec.generation, 4);
    assert_eq!(names(&root), vec![format!("{}.corrupt", c(3)), c(4), j(4)]);
}

#[test]
fn store_that_is_a_symlink_or_file_is_refused() {
    let root = TempDir::new().expect("tempdir");
    let elsewhere = TempDir::new().expect("tempdir");
    std::os::unix::fs::symlink(elsewhere.path(), store(&root)).expect("symlink");
    for mode in [OpenMode::ReadWrite, OpenMode::ReadOnly] {
        match open(&root, mode) {
            Err(StoreError::NotADirectory(why)) => assert!(why.contains("symlink"), "{why}"),
            other => panic!("expected NotADirectory, got {other:?}"),
        }
    }
    assert_eq!(fs::read_dir(elsewhere.path()).expect("ls").count(), 0);
    let root = TempDir::new().expect("tempdir");
    fs::write(store(&root), b"").expect("write");
    assert!(matches!(
        open(&root, OpenMode::ReadWrite),
        Err(StoreError::NotADirectory(_))
    ));
}

#[test]
fn unknown_names_and_special_files_are_left_alone() {
    let (root, [a, b, c3], _) = three_batches();
    fs::write(store(&root).join("notes.txt"), b"mine").expect("write");
    fs::write(store(&root).join("checkpoint.ABC"), b"x").expect("write");
    nix::unistd::mkfifo(&store(&root).join(c(2)), Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let (mut jn, rec) = open_ok(&root, OpenMode::ReadWrite);
    assert_eq!(rec.replayed, state(&[&a, &b, &c3]));
    assert!(!rec.warnings.is_empty());
    jn.checkpoint(&rec.replayed.snapshot()).expect("checkpoint");
    let got = names(&root);
    for kept in ["notes.txt", "checkpoint.ABC"] {
        assert!(
            got.contains(&kept.to_string()),
            "expected {kept} kept, got {got:?}"
        );
    }
}

#[test]
fn oversized_store_file_is_refused() {
    let (root, _, _) = three_batches();
    let f = fs::File::create(store(&root).join(c(2))).expect("create");
    f.set_len(MAX_FILE_LEN + 1).expect("sparse file");
    match open(&root, OpenMode::ReadOnly) {
        Err(StoreError::TooLarge { size, .. }) => assert_eq!(size, MAX_FILE_LEN + 1),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn failed_append_leaves_no_stray_bytes_for_the_next() {
    let (root, [a, b, c3], offsets) = three_batches();
    let (mut jn, _) = open_ok(&root, OpenMode::ReadWrite);
    // Simulate a failed append that left garbage past the committed end.
    let fd = jn.file.take().expect("journal fd");
    pwrite(fd.as_fd(), &[0xEE; 300], offsets[3] as i64).expect("pwrite");
    jn.file = Some(fd);
    jn.tail_dirty = true;
    let d = batch(700, 1);
    jn.append(&d).expect("append");
    drop(jn);
    let (_, rec) = open_ok(&root, OpenMode::ReadOnly);
    assert_eq!(rec.replayed, state(&[&a, &b, &c3, &d]));
    assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
}

proptest::proptest! {
    #[test]
    fn arbitrary_file_bodies_never_panic(
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        magic_at in proptest::collection::vec(0usize..400, 0..6),
    ) {
        // Sprinkle frame magics so the frame paths are reached, not just "bad magic".
        let mut body = body;
        for at in magic_at {
            if at + 4 <= body.len() {
                body[at..at + 4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
            }
        }
        let mut j = encode_header(Kind::Journal, 1);
        j.extend_from_slice(&body);
        let mut s = Replayed::default();
        let scan = replay_journal(&j, 1, &mut s).expect("a slice reads");
        proptest::prop_assert!(scan.good_end <= j.len());
        let mut ck = encode_header(Kind::Checkpoint, 1);
        ck.extend_from_slice(&body);
        let _ = scan_checkpoint(&ck, 1, &mut Replayed::default());
        let _ = check_header(&body, Kind::Journal, 1);
    }
}

#[test]
fn stale_frame_of_another_generation_is_not_replayed() {
    // A gen-1 batch frame copied after a gen-2 journal header (as a reused FAT cluster
    // could expose) must not pass.
    let (root, _, offsets) = three_batches();
    let gen1 = store_files(&root)[&j(1)].clone();
    let mut j2 = encode_header(Kind::Journal, 2);
    j2.extend_from_slice(&gen1[offsets[0] as usize..]);
    let mut s = Replayed::default();
    let scan = replay_journal(&j2, 2, &mut s).expect("a slice reads");
    assert_eq!(
        scan.batches, 0,
        "expected no batch accepted, got {}",
        scan.batches
    );
    assert_eq!(s, Replayed::default());
}

#[test]
fn an_unlocked_read_only_open_sees_a_live_store_without_waiting() {
    let root = TempDir::new().expect("tempdir");
    let (mut writer, _) = open_ok(&root, OpenMode::ReadWrite);
    writer.append(&batch(0, 3)).expect("append");
    let started = std::time::Instant::now();
    let (_, rec) = open_ok(&root, OpenMode::ReadOnlyUnlocked);
    let waited = started.elapsed();
    assert!(
        waited < LOCK_WAIT / 2,
        "expected no lock wait, got {waited:?}"
    );
    assert_eq!(
        rec.replayed,
        state(&[&batch(0, 3)]),
        "expected the committed batch"
    );
    assert!(rec.warnings.is_empty(), "got warnings {:?}", rec.warnings);
}

/// A checkpoint large enough for many chunks, read lazily: the directories' children, single
/// records and whole subtrees come back exactly as a full replay gives them, including where
/// chunks lie wholly inside one directory (which `children` passes over without reading), and
/// a journal on top (a rename of a directory never loaded, a remove, a put) applies to what
/// the base holds.
#[test]
fn a_lazily_read_checkpoint_answers_as_a_full_replay_does() {
    let root = TempDir::new().expect("tempdir");
    let meta = |mode: u32, uid: u32| Meta {
        mode,
        uid,
        ..Meta::default()
    };
    let mut full = Replayed::default();
    // Three big directories (thousands of records each, many 64 KiB chunks), files between
    // them at the top, and a nested directory.
    for d in ["alpha", "beta", "gamma"] {
        full.apply(Record::Put {
            path: vec![d.into()],
            meta: meta(0o40750, 7),
        });
        for f in 0..4000u32 {
            full.apply(Record::Put {
                path: vec![
                    d.into(),
                    format!("file-with-a-longish-name-{f:05}").into_bytes(),
                ],
                meta: meta(0o100600 | (f % 64), f),
            });
        }
        full.apply(Record::Put {
            path: vec![format!("{d}.txt").into_bytes()],
            meta: meta(0o100640, 1),
        });
    }
    full.apply(Record::Put {
        path: vec![b"beta".to_vec(), b"sub".to_vec(), b"deep".to_vec()],
        meta: meta(0o100604, 2),
    });
    full.apply(Record::PutInode {
        id: 9,
        meta: meta(0o100600, 3),
    });
    {
        let (mut jn, _) = open_ok(&root, OpenMode::ReadWrite);
        jn.checkpoint(&full.snapshot()).expect("checkpoint");
        let more = [
            Record::Rename {
                from: vec![b"gamma".to_vec()],
                to: vec![b"beta".to_vec(), b"moved".to_vec()],
            },
            Record::Remove {
                path: vec![
                    b"alpha".to_vec(),
                    b"file-with-a-longish-name-00007".to_vec(),
                ],
            },
            Record::Put {
                path: vec![b"alpha".to_vec(), b"new".to_vec()],
                meta: meta(0o100666, 4),
            },
        ];
        jn.append(&more).expect("append");
        for r in more {
            full.apply(r);
        }
    }
    let dir = fs::File::open(root.path()).expect("open temp root");
    let (_jn, rec) = Journal::open_lazy_in(dir.as_fd(), OpenMode::ReadOnly, StoreLayout::Long)
        .expect("open lazily");
    let lazy = rec.replayed;
    let base = lazy
        .root
        .base
        .as_ref()
        .expect("the checkpoint is read lazily");
    assert!(
        base.checkpoint.chunk_count() > 8,
        "many chunks: {}",
        base.checkpoint.chunk_count()
    );
    assert_eq!(lazy.inodes, full.inodes, "the inode table is in memory");
    // Everything the full replay has, the lazy state gives, in the same order.
    let (got, want) = (lazy.try_snapshot().expect("snapshot"), full.snapshot());
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "the lazily read state and the full replay differ first at record {i} (of {} and \
             {}): lazy {:?}, full {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
    // Directory by directory, as the filesystem loads them.
    let mut top = lazy.root.clone();
    top.materialize_level().expect("top level");
    let mut names: Vec<&Vec<u8>> = top.children.keys().collect();
    names.sort();
    let want: Vec<Vec<u8>> = ["alpha", "alpha.txt", "beta", "beta.txt", "gamma.txt"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    assert_eq!(names, want.iter().collect::<Vec<_>>());
    for name in &want {
        assert_eq!(
            top.children[name].meta, full.root.children[name].meta,
            "{name:?}"
        );
    }
    let mut beta = top.children.remove(b"beta".as_slice()).expect("beta");
    beta.materialize_level().expect("beta");
    assert_eq!(beta.children.len(), 4000 + 2, "files, sub, moved");
    let mut moved = beta.children.remove(b"moved".as_slice()).expect("moved");
    assert_eq!(
        moved.meta,
        Some(meta(0o40750, 7)),
        "gamma's own record moved"
    );
    moved.materialize_level().expect("moved");
    assert_eq!(moved.children.len(), 4000);
    assert_eq!(
        moved.children[b"file-with-a-longish-name-03999".as_slice()].meta,
        Some(meta(0o100600 | (3999 % 64), 3999))
    );
    let mut alpha = top.children.remove(b"alpha".as_slice()).expect("alpha");
    alpha.materialize_level().expect("alpha");
    assert_eq!(alpha.children.len(), 4000, "one removed, one added");
    assert!(!alpha
        .children
        .contains_key(b"file-with-a-longish-name-00007".as_slice()));
    assert_eq!(
        alpha.children[b"new".as_slice()].meta,
        Some(meta(0o100666, 4))
    );
}

/// The entries a lazily read checkpoint hands out for directories being loaded draw on a
/// budget, as a replay's nodes do: a hostile store cannot make one listing allocate a node per
/// record without bound (`docs/format.md` § Memory).
#[test]
fn a_lazily_read_checkpoint_hands_out_no_more_entries_than_its_budget() {
    let root = TempDir::new().expect("tempdir");
    let records: Vec<Record> = (0..10u32)
        .map(|f| Record::Put {
            path: vec![b"dir".to_vec(), format!("f{f:02}").into_bytes()],
            meta: Meta {
                mode: 0o100644,
                ..Meta::default()
            },
        })
        .collect();
    {
        let (mut jn, _) = open_ok(&root, OpenMode::ReadWrite);
        jn.checkpoint(&records).expect("checkpoint");
    }
    let dir = fs::File::open(root.path()).expect("open temp root");
    let (_jn, rec) = Journal::open_lazy_in(dir.as_fd(), OpenMode::ReadOnly, StoreLayout::Long)
        .expect("open lazily");
    let base = rec.replayed.root.base.as_ref().expect("read lazily");
    base.checkpoint.set_budget(4);
    let top = base.checkpoint.children(&[]).expect("top");
    assert_eq!(top.len(), 1, "the top holds `dir`");
    let listed = base.checkpoint.children(&[b"dir".to_vec()]).expect("dir");
    assert_eq!(
        listed.len(),
        3,
        "a budget of 4 entries, one spent on `dir`, leaves 3 of its 10 files; got {}",
        listed.len()
    );
}
