//! Fuzz target: the login hook's owner-mark and claim reader (`session::claim::look`, which
//! also decides whether a stick is fresh), run as root on a stick anyone can write.
//!
//! The input chooses the store directory (long `.pershome`, 8.3 `PERSHOME.DB` in either
//! case, or a file or symlink in its place), what stands at the mark's name (a regular file
//! with the fuzzer's bytes, a directory, a symlink, a fifo, nothing) and the bytes.
//!
//! Asserts no panic and no hang (a fifo must not block the reader), and the reader's promises:
//! no store or no mark is `None`; anything but a regular file is a mark naming nobody (refuse,
//! never guess); a mark's name is one line without control characters, from at most 4096
//! bytes, with at most 16 claims; a plain `name\n` mark reads as `name`; and no claim in a
//! fuzzed mark verifies under a key the input never saw.
#![no_main]

use std::os::unix::fs::symlink;
use std::path::Path;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pershome::session::claim::{look, Mark, SiteKey};

#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    Nothing,
    File,
    Dir,
    Symlink,
    Fifo,
}

/// Up to `max` of the input's bytes, as many as the input chooses.
fn take<'a>(u: &mut Unstructured<'a>, max: usize) -> Result<&'a [u8]> {
    let len = u.int_in_range(0..=max)?;
    u.bytes(len)
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo {}", path.display());
}

fn run(u: &mut Unstructured<'_>, backing: &Path) -> Result<()> {
    // The 8.3 store in the case a `msdos` mount lists it too, and its mark in either case.
    let (store, mark) = *u.choose(&[
        (".pershome", "owner-name"),
        ("PERSHOME.DB", "OWNER.TXT"),
        ("pershome.db", "owner.txt"),
        ("PERSHOME.DB", "owner.txt"),
    ])?;
    let store_kind = *u.choose(&[
        At::Dir,
        At::Dir,
        At::Dir,
        At::File,
        At::Symlink,
        At::Nothing,
    ])?;
    let mark_kind = *u.choose(&[
        At::File,
        At::File,
        At::Nothing,
        At::Dir,
        At::Symlink,
        At::Fifo,
    ])?;
    let plain = u.arbitrary::<bool>()?;
    let body: Vec<u8> = if plain {
        let len = u.int_in_range(1..=32)?;
        let mut name: Vec<u8> = (0..len)
            .map(|_| Ok(*u.choose(b"abcdefghijklmnopqrstuvwxyz0123456789_-")?))
            .collect::<Result<_>>()?;
        name.push(b'\n');
        name
    } else {
        take(u, 5000)?.to_vec()
    };
    let store_path = backing.join(store);
    match store_kind {
        At::Dir => std::fs::create_dir(&store_path).expect("store dir"),
        At::File => std::fs::write(&store_path, b"not a directory").expect("store file"),
        At::Symlink => {
            let elsewhere = backing.join("elsewhere");
            std::fs::create_dir(&elsewhere).expect("elsewhere");
            std::fs::write(elsewhere.join(mark), b"victim\n").expect("mark elsewhere");
            symlink(&elsewhere, &store_path).expect("store symlink");
        }
        _ => {}
    }
    if store_kind == At::Dir {
        let mark_path = store_path.join(mark);
        match mark_kind {
            At::File => std::fs::write(&mark_path, &body).expect("mark"),
            At::Dir => std::fs::create_dir(&mark_path).expect("mark dir"),
            At::Symlink => {
                std::fs::write(backing.join("target"), b"victim\n").expect("target");
                symlink(backing.join("target"), &mark_path).expect("mark symlink");
            }
            At::Fifo => mkfifo(&mark_path),
            At::Nothing => {}
        }
    }
    let got = look(backing).mark;
    let store_seen = store_kind != At::Nothing;
    match (store_kind, mark_kind) {
        (At::Nothing, _) => assert_eq!(got, None, "no store, yet a mark {got:?}"),
        (At::Dir, At::Nothing) => assert_eq!(got, None, "no mark, yet {got:?}"),
        (At::Dir, At::File) => {
            let mark = got.clone().expect("a regular mark is read");
            assert!(
                !mark.name.chars().any(char::is_control),
                "control characters in {:?}",
                mark.name
            );
            assert!(
                mark.name.len() <= 3 * 4096,
                "{} bytes from a 4096-byte read",
                mark.name.len()
            );
            assert!(mark.claims.len() <= 16, "{} claims", mark.claims.len());
            // A key the input never saw: no fuzzed claim may verify under it.
            let key = SiteKey::from_bytes(b"a key the fuzzer never sees, 32+");
            assert!(
                !mark.claimed_for(&key, &mark.name),
                "a fuzzed claim verified: {mark:?}"
            );
            if plain {
                let name = String::from_utf8(body[..body.len() - 1].to_vec()).expect("ascii");
                assert_eq!(mark.name, name, "a plain mark reads back");
            }
        }
        // A store or mark that is not what it must be: refused, never followed.
        _ if store_seen => {
            assert_eq!(
                got,
                Some(Mark::default()),
                "{store_kind:?}/{mark_kind:?}: {got:?}"
            );
        }
        _ => {}
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
    .expect("a temporary stick");
    let mut u = Unstructured::new(data);
    let _ = run(&mut u, dir.path());
});
