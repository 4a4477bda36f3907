//! Fuzz target: how a stick's naming mode and store are found (`meta::layout::detect`,
//! `find_store`, the mount's `name_mode` through `Fs::open_backing`) and the parsers of the
//! store's own file names in both layouts.
//!
//! The input builds a backing root whose entries are store-like names (`.pershome`,
//! `PERSHOME.DB` in any case, the pre-release marker) or the fuzzer's bytes, each a
//! directory, a file or a symlink, then names the `names=` option of a mount. Further bytes
//! are parsed as store file names of both layouts.
//!
//! Asserts no panic and: `detect` says long exactly when `.pershome` exists, 8.3 otherwise
//! exactly when an entry equal to `PERSHOME.DB` ignoring case exists (preferring the exact
//! name); a mount never opens a stick in a mode other than the one its store records; and
//! every name a parser accepts is the name the layout writes for the value it returned
//! (exactly in the long layout, ignoring ASCII case in the 8.3 one).
#![no_main]

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pershome::fs::{Fs, FsOptions, OpenError};
use pershome::meta::layout::{detect_path, StoreLayout};
use pershome::names::NameMode;

const CANDIDATES: [&[u8]; 7] = [
    b".pershome",
    b"PERSHOME.DB",
    b"pershome.db",
    b"Pershome.Db",
    b"PERSHOME.DBX",
    b".PERSHOME",
    b"pershome",
];

fn name(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    if u.ratio(3, 4)? {
        return Ok(u.choose(&CANDIDATES)?.to_vec());
    }
    let len = u.int_in_range(1..=12)?;
    let raw = u.bytes(len)?;
    let cleaned: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'/' || b == 0 { b'_' } else { b })
        .collect();
    Ok(match cleaned.as_slice() {
        b"." | b".." => b"dot".to_vec(),
        _ => cleaned,
    })
}

fn check_parse(layout: StoreLayout, name: &[u8]) {
    let same = |written: &str| match layout {
        StoreLayout::Long => written.as_bytes() == name,
        StoreLayout::Short83 => written.as_bytes().eq_ignore_ascii_case(name),
    };
    if let Some((kind, generation)) = layout.parse_store_file(name) {
        let written = layout
            .store_file(kind, generation)
            .expect("a parsed generation fits");
        assert!(
            same(&written),
            "{layout:?}: {name:02x?} parsed as {kind:?} {generation}, written {written}"
        );
    }
    if let Some(id) = layout.parse_inode_file(name) {
        let written = layout.inode_file(id).expect("a parsed id fits");
        assert!(
            same(&written),
            "{layout:?}: inode {name:02x?} → {id} → {written}"
        );
    }
    if let Some(id) = layout.parse_parts_id_dir(name) {
        let written = layout.parts_id_dir(id).expect("a parsed id fits");
        assert!(
            same(&written),
            "{layout:?}: parts dir {name:02x?} → {id} → {written}"
        );
    }
    if let Some(k) = layout.parse_part_file(name) {
        let written = layout.part_file(k);
        assert!(
            same(&written),
            "{layout:?}: part {name:02x?} → {k} → {written}"
        );
    }
}

fn run(u: &mut Unstructured<'_>, root: &Path) -> Result<()> {
    let mut names: Vec<Vec<u8>> = Vec::new();
    for _ in 0..u.int_in_range(0..=5)? {
        let n = name(u)?;
        if names.contains(&n) {
            continue;
        }
        let path = root.join(std::ffi::OsStr::from_bytes(&n));
        match u.int_in_range(0..=3)? {
            0 | 1 => std::fs::create_dir(&path).expect("mkdir"),
            2 => std::fs::write(&path, b"x").expect("file"),
            _ => symlink("/", &path).expect("symlink"),
        }
        names.push(n);
    }
    let found = detect_path(root).expect("listing a readable root");
    let long = names.iter().any(|n| n == b".pershome");
    assert_eq!(found.long, long, "long store in {names:?}");
    if !long {
        let exact = names.iter().any(|n| n == b"PERSHOME.DB");
        let any = names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(b"PERSHOME.DB"));
        match (&found.short, any) {
            (None, None) => {}
            (Some(s), Some(_)) => {
                assert!(s.eq_ignore_ascii_case(b"PERSHOME.DB"), "short {s:02x?}");
                if exact {
                    assert_eq!(s, b"PERSHOME.DB", "the exact name is preferred");
                }
            }
            (got, want) => panic!("8.3 store: detect says {got:02x?}, entries {want:02x?}"),
        }
    }
    let asked = *u.choose(&[None, Some(NameMode::Long), Some(NameMode::Short83)])?;
    let read_only = u.arbitrary::<bool>()?;
    let mut opts = FsOptions::new(1000, 1000);
    opts.names = asked;
    opts.read_only = read_only;
    let recorded = found.layout();
    match Fs::open_backing(root, opts) {
        Ok(fs) => {
            let mode = fs.name_mode();
            if let Some(layout) = recorded {
                // An empty long store may still be turned into an 8.3 one by the first mount.
                let empty_long = layout == StoreLayout::Long && asked == Some(NameMode::Short83);
                assert!(
                    mode == layout.names() || empty_long,
                    "the stick records {layout:?}, the mount uses {mode:?}"
                );
            }
            if let Some(a) = asked {
                assert_eq!(mode, a, "names={a:?} was asked, the mount uses {mode:?}");
            }
            fs.shutdown();
        }
        Err(OpenError::NameMode { stick, asked: a }) => {
            assert_ne!(stick, a, "a refusal between equal modes");
        }
        Err(_) => {}
    }
    for _ in 0..u.int_in_range(0..=4)? {
        let len = u.int_in_range(0..=28)?;
        let n = u.bytes(len)?;
        check_parse(StoreLayout::Long, n);
        check_parse(StoreLayout::Short83, n);
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
