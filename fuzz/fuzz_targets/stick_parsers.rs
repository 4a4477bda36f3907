//! Fuzz target: the parsers of what the login hook reads about sticks and mounts as root:
//! `stick::mountinfo::parse_mountinfo` (a mount point's name is chosen by whoever mounted it)
//! and `stick::discover::parse_blkid_export` (blkid reports what the stick's superblock says).
//!
//! The first input byte chooses the mode. Even: the rest is raw text for both parsers, which
//! must not panic, and whose answers must keep their promises (a blkid type is non-empty,
//! trimmed, one line, and is the value of a `TYPE=` line of the text; a mountinfo entry has
//! no unescaped separator in its space-free fields). Odd: the rest describes mount entries
//! and blkid fields, which are formatted the way the kernel and blkid write them (octal
//! escapes; `KEY=value` lines) and must parse back to exactly what was written.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pershome::stick::discover::parse_blkid_export;
use pershome::stick::mountinfo::{parse_mountinfo, MountEntry};
use pershome::stick::StickFs;

/// The kernel's mountinfo escaping (`mangle()` in fs/proc_namespace.c): space, tab, newline
/// and backslash as three octal digits.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\\') {
            out.push_str(&format!("\\{b:03o}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// Bytes that the kernel writes as they are: no separator, and (since the parser works on
/// `&str`) ASCII only, as `String::from_utf8_lossy` would otherwise change them.
fn ascii_field(u: &mut Unstructured<'_>, allow_space: bool) -> Result<Vec<u8>> {
    let len = u.int_in_range(1..=24)?;
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        let b: u8 = u.int_in_range(0x09..=0x7e)?;
        let b = match b {
            b' ' | b'\t' | b'\n' | b'\\' if allow_space => b,
            // Whitespace other than the escaped kind would split a field; a lone `-` field
            // is the separator of the optional fields.
            0x09..=0x20 | b'-' => b'x',
            b => b,
        };
        out.push(b);
    }
    Ok(out)
}

fn plain_field(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(String::from_utf8(ascii_field(u, false)?).expect("ascii"))
}

fn structured_mountinfo(u: &mut Unstructured<'_>) -> Result<()> {
    let count = u.int_in_range(0..=6)?;
    let mut expected = Vec::new();
    let mut text = String::new();
    for id in 0..count {
        let mut mountpoint = b"/".to_vec();
        mountpoint.extend(ascii_field(u, true)?);
        let mut root = b"/".to_vec();
        if u.arbitrary()? {
            root.extend(ascii_field(u, true)?);
        }
        let source = String::from_utf8(ascii_field(u, true)?).expect("ascii");
        let entry = MountEntry {
            dev: (u.arbitrary()?, u.arbitrary()?),
            root: PathBuf::from(OsStr::from_bytes(&root)),
            mountpoint: PathBuf::from(OsStr::from_bytes(&mountpoint)),
            mount_options: plain_field(u)?,
            fstype: plain_field(u)?,
            source: source.clone(),
            super_options: plain_field(u)?,
        };
        let optional = match u.int_in_range(0..=2)? {
            0 => "",
            1 => " shared:1",
            _ => " master:3 shared:9",
        };
        text.push_str(&format!(
            "{id} 1 {}:{} {} {} {}{optional} - {} {} {}\n",
            entry.dev.0,
            entry.dev.1,
            escape(&root),
            escape(&mountpoint),
            entry.mount_options,
            entry.fstype,
            escape(source.as_bytes()),
            entry.super_options,
        ));
        expected.push(entry);
    }
    let got = parse_mountinfo(&text);
    assert_eq!(got, expected, "mountinfo text {text:?}");
    Ok(())
}

fn structured_blkid(u: &mut Unstructured<'_>) -> Result<()> {
    const KEYS: [&str; 6] = [
        "DEVNAME",
        "UUID",
        "LABEL",
        "PTTYPE",
        "BLOCK_SIZE",
        "SEC_TYPE",
    ];
    let mut text = String::new();
    for _ in 0..u.int_in_range(0..=4)? {
        let key = *u.choose(&KEYS)?;
        let value: String = plain_field(u)?;
        // A label may itself look like `TYPE=ext4`: it is a value, not a line.
        let value = if u.arbitrary()? {
            format!("TYPE={value}")
        } else {
            value
        };
        text.push_str(&format!("{key}={value}\n"));
    }
    let fstype = match u.int_in_range(0..=3)? {
        0 => None,
        1 => Some("vfat".to_owned()),
        2 => Some("exfat".to_owned()),
        _ => Some(plain_field(u)?),
    };
    if let Some(t) = &fstype {
        text.push_str(&format!("TYPE={t}\n"));
    }
    let got = parse_blkid_export(&text);
    assert_eq!(got, fstype, "blkid text {text:?}");
    assert_eq!(
        got.as_deref().and_then(StickFs::from_blkid).is_some(),
        matches!(got.as_deref(), Some("vfat" | "exfat")),
        "only vfat and exfat are sticks: {got:?}"
    );
    Ok(())
}

fn raw(text: &str) {
    if let Some(t) = parse_blkid_export(text) {
        assert!(
            !t.is_empty() && t.trim() == t && !t.contains('\n'),
            "type {t:?}"
        );
        assert!(
            text.lines().any(|l| l
                .split_once('=')
                .is_some_and(|(k, v)| k == "TYPE" && v.trim() == t)),
            "type {t:?} is no TYPE= line of {text:?}"
        );
        let _ = StickFs::from_blkid(&t);
    }
    let entries = parse_mountinfo(text);
    assert!(entries.len() <= text.lines().count());
    for e in &entries {
        for field in [&e.mount_options, &e.fstype, &e.super_options] {
            assert!(
                !field.contains(' ') && !field.contains('\n'),
                "field {field:?}"
            );
        }
        let _ = e.read_only();
        let _ = e.super_option("user_id");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        raw(&String::from_utf8_lossy(rest));
        return;
    }
    let mut u = Unstructured::new(rest);
    let _ = if mode & 2 == 0 {
        structured_mountinfo(&mut u)
    } else {
        structured_blkid(&mut u)
    };
});
