//! What a FAT (vfat / Windows) long file name may be: the rules every backing name must pass.
//!
//! This module owns the single definition of "FAT-legal" used by the name mapping (`names`), the
//! backing-tree audit (`audit`) and, later, `pershome fsck`. It is pure: it never does I/O and
//! never panics on any input, since it is fed names read from an attacker-controlled stick.
//!
//! Where Linux vfat and Windows disagree it applies the stricter rule: Linux vfat rejects control
//! characters and `* ? < > | " : / \`, silently strips a trailing dot (so `a.` and `a` collide),
//! and with `utf8=1` folds only ASCII case; Windows additionally refuses the DOS device names and
//! folds all of Unicode.

use thiserror::Error;

/// The largest file FAT32 can hold: its size field is 32 bits.
pub const MAX_FILE_SIZE: u64 = 4 * 1024 * 1024 * 1024 - 1;

/// The most UTF-16 code units a VFAT long name may have.
pub const MAX_NAME_UTF16_UNITS: usize = 255;

/// The most 32-byte entries a FAT directory may have (a directory is at most 2 MiB).
pub const MAX_DIR_ENTRIES: usize = 65_536;

/// Why a name is not a legal FAT long name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Violation {
    #[error("the name is empty")]
    Empty,
    #[error("the name is not valid UTF-8")]
    NotUtf8,
    #[error("the name contains the control character U+{0:04X}")]
    ControlChar(u32),
    #[error("the name contains the character {0:?}, which FAT forbids")]
    ForbiddenChar(char),
    #[error("the name ends in a dot or a space, which FAT strips")]
    TrailingDotOrSpace,
    #[error("the name is {utf16_units} UTF-16 units long, FAT allows at most 255")]
    TooLong { utf16_units: usize },
    #[error("the name is a DOS device name, which Windows cannot open as a file")]
    ReservedDeviceName,
    #[error("the name is `.` or `..`")]
    DotName,
}

/// The printable characters no FAT long name may contain (`/` is the path separator as well).
const FORBIDDEN: [char; 9] = ['*', '?', '<', '>', '|', '"', ':', '/', '\\'];

/// Whether `name` is a legal FAT long name; the first rule it breaks otherwise.
pub fn check_name(name: &[u8]) -> Result<(), Violation> {
    if name.is_empty() {
        return Err(Violation::Empty);
    }
    let Ok(name) = std::str::from_utf8(name) else {
        return Err(Violation::NotUtf8);
    };
    if name == "." || name == ".." {
        return Err(Violation::DotName);
    }
    for c in name.chars() {
        // Every char below U+0020 is a single UTF-16 unit below 0x20; no other char produces
        // one (surrogates are 0xD800 and up), so checking chars is checking UTF-16 units.
        if (c as u32) < 0x20 {
            return Err(Violation::ControlChar(c as u32));
        }
        if FORBIDDEN.contains(&c) {
            return Err(Violation::ForbiddenChar(c));
        }
    }
    if name.ends_with(['.', ' ']) {
        return Err(Violation::TrailingDotOrSpace);
    }
    let utf16_units = utf16_len(name);
    if utf16_units > MAX_NAME_UTF16_UNITS {
        return Err(Violation::TooLong { utf16_units });
    }
    if is_reserved_device_name(name) {
        return Err(Violation::ReservedDeviceName);
    }
    Ok(())
}

/// The characters an MS-DOS 8.3 short name may hold besides `A-Z` and `0-9` (Microsoft's FAT
/// specification, "Short directory entries"). Lower-case letters, spaces, dots inside the base,
/// `+ , ; = [ ]` and every byte above 0x7F are left out: DOS stores upper case only, the
/// others need a long name on vfat, and bytes above 0x7F depend on the OEM code page.
pub const SHORT_NAME_SPECIALS: &str = "!#$%&'()-@^_`{}~";

/// Whether `c` may appear in an 8.3 short name as pershome writes them.
pub fn is_short_name_char(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || SHORT_NAME_SPECIALS.as_bytes().contains(&c)
}

/// Why a name is not a valid upper-case 8.3 short name, or `Ok` when it is one: a base of 1–8
/// and an optional extension of 1–3 characters of `is_short_name_char`, one dot between them,
/// and no DOS device name as the base. A stick mounted `msdos` on Linux (or read by DOS) holds
/// nothing else.
pub fn check_short_name(name: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(name).map_err(|_| "the name is not ASCII".to_string())?;
    let (base, ext) = match text.split_once('.') {
        Some((b, e)) => (b, Some(e)),
        None => (text, None),
    };
    if base.is_empty() || base.len() > 8 {
        return Err(format!("the base {base:?} is not 1 to 8 characters"));
    }
    if let Some(ext) = ext {
        if ext.is_empty() || ext.len() > 3 {
            return Err(format!("the extension {ext:?} is not 1 to 3 characters"));
        }
    }
    let bad = base
        .bytes()
        .chain(ext.unwrap_or_default().bytes())
        .find(|&c| !is_short_name_char(c));
    if let Some(c) = bad {
        return Err(format!(
            "the character {:?} is not an upper-case 8.3 character",
            char::from(c)
        ));
    }
    if is_reserved_device_name(text) {
        return Err("the base is a DOS device name".to_string());
    }
    Ok(())
}

/// The DOS device names Windows resolves to a device in every directory, compared after case
/// folding. `COM0`/`LPT0` and the superscript digits are in Windows' own list
/// (`RtlIsDosDeviceName_U`), and `CONIN$`/`CONOUT$` open the console.
const RESERVED_BASES: [&str; 6] = ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"];

/// Whether Windows treats `name` as a device rather than a file: `CON`, `PRN`, `AUX`, `NUL`,
/// `COM0`–`COM9`, `LPT0`–`LPT9`, `COM¹²³`, `LPT¹²³`, `CONIN$`, `CONOUT$`, in any case, with or
/// without an extension. The part before the first dot is what counts (`nul.tar.gz` is a
/// device), after removing the trailing spaces Windows strips (`CON .txt` is a device too).
pub fn is_reserved_device_name(name: &str) -> bool {
    let base = name.split('.').next().unwrap_or(name).trim_end_matches(' ');
    // Fold with the same per-char rule as `fold_key` so the check is at least as strict as
    // Windows' own upper-casing; no char outside ASCII folds onto the letters used here except
    // `ı` (onto `I`, which only `CONIN$` has, in its fourth place).
    let folded: String = base.chars().map(simple_uppercase).collect();
    if RESERVED_BASES.contains(&folded.as_str()) {
        return true;
    }
    let mut chars = folded.chars();
    let prefix: String = chars.by_ref().take(3).collect();
    if prefix != "COM" && prefix != "LPT" {
        return false;
    }
    matches!(
        (chars.next(), chars.next()),
        (Some('0'..='9' | '\u{B9}' | '\u{B2}' | '\u{B3}'), None)
    )
}

/// The length of `name` in UTF-16 code units, the unit FAT counts long names in.
pub fn utf16_len(name: &str) -> usize {
    name.chars().map(char::len_utf16).sum()
}

/// How many 32-byte directory entries a long name costs: one per 13 UTF-16 units of the long
/// name, plus the short (8.3) entry. A name that is itself a valid 8.3 name costs only one on a
/// real stick; counting it as a long name keeps the audit on the safe side.
pub fn dir_entry_slots(name: &str) -> usize {
    utf16_len(name).div_ceil(13) + 1
}

/// The key under which Windows considers two names equal: each char upper-cased when Unicode
/// gives it a single-char uppercase (`ß` has none, so it stays), then re-encoded as UTF-8.
/// Bytes that are not UTF-8 are kept as they are, with ASCII letters upper-cased, so that a
/// stray non-UTF-8 name still collides with its ASCII-case twin in the audit.
pub fn fold_key(name: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(name) {
        Ok(name) => name
            .chars()
            .map(simple_uppercase)
            .collect::<String>()
            .into_bytes(),
        Err(_) => name.to_ascii_uppercase(),
    }
}

/// The simple (one char to one char) uppercase of `c`, or `c` itself when Unicode's uppercase
/// is several chars: Windows' upcase table maps one UTF-16 unit to one unit.
fn simple_uppercase(c: char) -> char {
    let mut upper = c.to_uppercase();
    match (upper.next(), upper.next()) {
        (Some(u), None) => u,
        _ => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        let cases: &[(&[u8], bool)] = &[
            (b"REPORT.TXT", true),
            (b"MAKEFILE", true),
            (b"LONGNA~1.TXT", true),
            (b"A", true),
            (b"A.B", true),
            (b"!#$%&'()", true),
            (b"-@^_`{}~.ABC", true),
            (b"report.txt", false),
            (b"REPORTS12.TXT", false),
            (b"REPORT.TEXT", false),
            (b"REPORT.", false),
            (b".REPORT", false),
            (b"A.B.C", false),
            (b"A B", false),
            (b"A+B", false),
            (b"A[1]", false),
            ("\u{C9}T\u{C9}".as_bytes(), false),
            (&[0xff], false),
            (b"", false),
            (b"CON", false),
            (b"COM1.TXT", false),
            (b"CON~1", true),
        ];
        for (name, valid) in cases {
            let got = check_short_name(name);
            assert_eq!(
                got.is_ok(),
                *valid,
                "check_short_name({:?}): expected valid={valid}, got {got:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn check_name_table() {
        let cases: &[(&[u8], Result<(), Violation>)] = &[
            (b"report.odt", Ok(())),
            (b"Documents", Ok(())),
            (b".bashrc", Ok(())),
            (b"...a", Ok(())),
            (b" leading space", Ok(())),
            ("caf\u{e9} \u{1F600}".as_bytes(), Ok(())),
            ("\u{F041}".as_bytes(), Ok(())),
            (b"", Err(Violation::Empty)),
            (b".", Err(Violation::DotName)),
            (b"..", Err(Violation::DotName)),
            (&[0xff, b'a'], Err(Violation::NotUtf8)),
            (b"a\x01b", Err(Violation::ControlChar(1))),
            (b"a\x1fb", Err(Violation::ControlChar(0x1f))),
            (b"a\tb", Err(Violation::ControlChar(9))),
            (b"a\0b", Err(Violation::ControlChar(0))),
            (b"a*b", Err(Violation::ForbiddenChar('*'))),
            (b"a?b", Err(Violation::ForbiddenChar('?'))),
            (b"a<b", Err(Violation::ForbiddenChar('<'))),
            (b"a>b", Err(Violation::ForbiddenChar('>'))),
            (b"a|b", Err(Violation::ForbiddenChar('|'))),
            (b"a\"b", Err(Violation::ForbiddenChar('"'))),
            (b"a:b", Err(Violation::ForbiddenChar(':'))),
            (b"a/b", Err(Violation::ForbiddenChar('/'))),
            (b"a\\b", Err(Violation::ForbiddenChar('\\'))),
            (b"a.", Err(Violation::TrailingDotOrSpace)),
            (b"a ", Err(Violation::TrailingDotOrSpace)),
            (b"a. .", Err(Violation::TrailingDotOrSpace)),
            (b"...", Err(Violation::TrailingDotOrSpace)),
            (b"CON", Err(Violation::ReservedDeviceName)),
            (b"con.txt", Err(Violation::ReservedDeviceName)),
            (b"COM1", Err(Violation::ReservedDeviceName)),
            ("LPT\u{B9}".as_bytes(), Err(Violation::ReservedDeviceName)),
            (b"CONIN$", Err(Violation::ReservedDeviceName)),
            (b"CON .txt", Err(Violation::ReservedDeviceName)),
            (b"CONX", Ok(())),
            (b"COM10", Ok(())),
        ];
        for (name, expected) in cases {
            let got = check_name(name);
            assert_eq!(
                &got,
                expected,
                "check_name({:?}): expected {expected:?}, got {got:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn length_limit_counts_utf16_units() {
        let ok = "a".repeat(255);
        assert_eq!(check_name(ok.as_bytes()), Ok(()));
        let long = "a".repeat(256);
        assert_eq!(
            check_name(long.as_bytes()),
            Err(Violation::TooLong { utf16_units: 256 })
        );
        // An emoji is two UTF-16 units (a surrogate pair): 128 of them are 256 units.
        let emoji = "\u{1F600}".repeat(128);
        assert_eq!(
            check_name(emoji.as_bytes()),
            Err(Violation::TooLong { utf16_units: 256 })
        );
        // 255 three-byte chars are 765 bytes but only 255 units: legal.
        let cjk = "\u{6587}".repeat(255);
        assert_eq!(check_name(cjk.as_bytes()), Ok(()));
    }

    #[test]
    fn reserved_device_names() {
        let reserved = [
            "CON",
            "con",
            "Con",
            "PRN",
            "AUX",
            "NUL",
            "nul.tar.gz",
            "COM0",
            "com9",
            "LPT0",
            "lpt5.txt",
            "COM\u{B9}",
            "com\u{B2}",
            "LPT\u{B3}.x",
            "CONIN$",
            "conout$.log",
            "CON .txt",
            "NUL  .a",
            "CON ",
            "CON.",
        ];
        for name in reserved {
            assert!(
                is_reserved_device_name(name),
                "expected {name:?} to be reserved, got not reserved"
            );
        }
        let free = [
            "CONX",
            "ACON",
            "COM",
            "LPT",
            "COM10",
            "COM\u{B4}",
            "LPT\u{2074}",
            "CO\u{F04E}",
            " CON",
            "CON_",
            "CONIN",
            "conin$$",
            "x.CON",
            "",
        ];
        for name in free {
            assert!(
                !is_reserved_device_name(name),
                "expected {name:?} not to be reserved, got reserved"
            );
        }
    }

    #[test]
    fn fold_key_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"Makefile", b"MAKEFILE"),
            (b"makefile", b"MAKEFILE"),
            ("\u{e9}cole".as_bytes(), "\u{c9}COLE".as_bytes()),
            // `ß` upper-cases to two chars, so it has no simple uppercase and stays.
            ("stra\u{df}e".as_bytes(), "STRA\u{df}E".as_bytes()),
            // Private-use chars have no case.
            ("\u{F06D}".as_bytes(), "\u{F06D}".as_bytes()),
            (&[0xff, b'a'], &[0xff, b'A']),
        ];
        for (name, expected) in cases {
            let got = fold_key(name);
            assert_eq!(
                &got.as_slice(),
                expected,
                "fold_key({name:?}): expected {expected:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn dir_entry_slots_table() {
        let cases = [
            ("a".to_string(), 2),
            ("a".repeat(13), 2),
            ("a".repeat(14), 3),
            ("a".repeat(255), 21),
            ("\u{1F600}".repeat(7), 3),
        ];
        for (name, expected) in cases {
            let got = dir_entry_slots(&name);
            assert_eq!(
                got, expected,
                "dir_entry_slots({name:?}): expected {expected}, got {got}"
            );
        }
    }

    /// `names` escapes the third char of a device name and relies on it being ASCII: no
    /// non-ASCII char may fold onto a letter in the first three places of a device name.
    #[test]
    fn no_non_ascii_char_folds_onto_a_device_name_prefix_letter() {
        let prefix_letters: Vec<char> = "CONPRAUXLMT".chars().collect();
        let offenders: Vec<char> = (0x80..=0x10FFFF)
            .filter_map(char::from_u32)
            .filter(|&c| prefix_letters.contains(&simple_uppercase(c)))
            .collect();
        assert_eq!(
            offenders,
            Vec::<char>::new(),
            "expected none, got {offenders:?}"
        );
    }
}
