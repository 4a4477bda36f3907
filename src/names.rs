//! The mapping between a POSIX name (what a program sees through pershomefs) and a backing name
//! (what is stored on the FAT stick).
//!
//! This module owns the escape scheme: the Unicode private-use mapping of Cygwin, Services for
//! Macintosh and Linux cifs `mapchars`, where a char FAT cannot hold becomes U+F000 + its byte
//! value. The mapping keeps lengths (one escape is one UTF-16 unit), is readable on Windows, and
//! is understood by Cygwin/MSYS2. It is pure: no I/O, no knowledge of what is in a directory.
//! Choosing a form for a clash and remembering hashed names is the caller's job.
//!
//! Invariants, each checked by the tests below (including a property test):
//! - every output of `encode` for a valid POSIX name passes `fatrules::check_name`;
//! - `decode(encode(n, Natural | CaseEscaped, r), r) == Decoded::Name(n)`;
//! - `Natural` keeps a FAT-legal name byte for byte, so files stay usable on Windows (except a
//!   name holding a char of the escape block U+F000..=U+F0FF, and `.pershome` at the root);
//! - `decode` and `encode` never panic, whatever bytes they are given.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::fatrules::{self, MAX_NAME_UTF16_UNITS};
use crate::meta::STORE_DIR;

/// The start of the private-use block escapes live in: byte `c` is stored as U+F000 + c.
pub const ESCAPE_BASE: u32 = 0xF000;

/// The escape char itself. It never stands for a byte alone (U+F000 + 0 would be NUL, which no
/// POSIX name contains), so it is free to introduce a literal private-use char or a hash.
const ESCAPE: char = '\u{F000}';

/// What follows `ESCAPE` to mark a hashed name.
const HASH_MARK: char = '~';

/// `ESCAPE` then `HASH_MARK`, as text.
const HASH_INTRO: &str = "\u{F000}~";

/// Hex digits of SHA-256 kept in a hashed name: 128 bits, collision-free in practice.
const HASH_HEX_LEN: usize = 32;

/// The ways a POSIX name can be written on the stick, from most to least readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Form {
    /// A FAT-legal name as it is; otherwise only what FAT cannot hold is escaped.
    Natural,
    /// As `Natural`, with every ASCII letter escaped too. Private-use chars have no case, so
    /// this never folds equal to the natural form of a name that has letters: it is the form
    /// for the second of two names differing in ASCII case (`makefile` beside `Makefile`).
    CaseEscaped,
    /// A readable prefix and a hash of the full name, which the caller keeps in the metadata
    /// store. The last resort: names differing only in non-ASCII case (`é` beside `É`).
    Hashed,
}

/// What a backing name stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Decoded {
    /// The POSIX name. For backing names that `encode` did not make (written by Windows, or
    /// crafted) it may not be a valid POSIX name or may not encode back to the same backing
    /// name: see `is_canonical` before trusting it.
    Name(Vec<u8>),
    /// A `Form::Hashed` name: the POSIX name is in the metadata store.
    Hashed,
    /// The metadata store directory at the root; not part of the POSIX view.
    Reserved,
}

/// Whether `name` can be a POSIX directory entry name: 1–255 bytes, no `/`, no NUL, and not
/// `.` or `..`. Invalid UTF-8 is allowed.
pub fn is_valid_posix_name(name: &[u8]) -> bool {
    (1..=255).contains(&name.len())
        && !name.contains(&b'/')
        && !name.contains(&0)
        && name != b"."
        && name != b".."
}

/// One unit of a POSIX name: a char of a valid UTF-8 run, or one byte of an invalid sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Char(char),
    Byte(u8),
}

fn units(name: &[u8]) -> Vec<Unit> {
    let mut out = Vec::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        out.extend(chunk.valid().chars().map(Unit::Char));
        out.extend(chunk.invalid().iter().copied().map(Unit::Byte));
    }
    out
}

/// The escape for byte value `b`. Every value below 0x100 lands in U+F000..=U+F0FF, which is
/// a valid (non-surrogate) char, so the conversion cannot fail.
fn escape(b: u32) -> char {
    char::from_u32(ESCAPE_BASE + (b & 0xFF)).unwrap_or(ESCAPE)
}

fn is_private_escape_range(c: char) -> bool {
    (ESCAPE_BASE..=ESCAPE_BASE + 0xFF).contains(&(c as u32))
}

/// Chars FAT forbids in a name besides control chars. `/` cannot be in a valid POSIX name; it
/// is escaped anyway so that even an invalid input gives a FAT-legal output.
fn is_fat_forbidden(c: char) -> bool {
    matches!(c, '"' | '*' | ':' | '<' | '>' | '?' | '\\' | '|' | '/')
}

/// The backing name for the POSIX name `name` in the given form. `at_root` says whether the
/// name lives in the root of the backing directory, where the store directory is.
///
/// `name` should satisfy `is_valid_posix_name`; for other input the result is FAT-legal where
/// possible but need not decode back (NUL cannot be represented). It never panics.
pub fn encode(name: &[u8], form: Form, at_root: bool) -> Vec<u8> {
    match form {
        Form::Natural | Form::CaseEscaped => {
            let pieces = escaped_pieces(name, form == Form::CaseEscaped, at_root);
            pieces.concat().into_bytes()
        }
        Form::Hashed => encode_hashed(name, at_root),
    }
}

/// The escaped name as one piece per unit of `name`, so callers can cut it without splitting an
/// escape pair.
fn escaped_pieces(name: &[u8], escape_letters: bool, at_root: bool) -> Vec<String> {
    let units = units(name);
    // FAT strips trailing dots and spaces (vfat silently, so `a.` would become `a`). Escaping
    // the whole trailing run rather than only its last char follows Cygwin, and keeps every
    // dot or space that FAT would treat as "trailing" visible as an escape on Windows.
    let trailing_run_start = units
        .iter()
        .rposition(|u| !matches!(u, Unit::Char('.' | ' ')))
        .map_or(0, |i| i + 1);
    let escape_leading_dot =
        at_root && fatrules::fold_key(name) == fatrules::fold_key(STORE_DIR.as_bytes());

    let mut pieces: Vec<String> = Vec::with_capacity(units.len());
    for (i, unit) in units.iter().enumerate() {
        let mut piece = String::with_capacity(6);
        match *unit {
            Unit::Byte(b) => piece.push(escape(u32::from(b))),
            Unit::Char(c) if is_private_escape_range(c) => {
                piece.push(ESCAPE);
                piece.push(c);
            }
            Unit::Char(c)
                if (c as u32) < 0x20
                    || is_fat_forbidden(c)
                    || (i >= trailing_run_start)
                    || (escape_letters && c.is_ascii_alphabetic())
                    || (i == 0 && escape_leading_dot) =>
            {
                piece.push(escape(c as u32));
            }
            Unit::Char(c) => piece.push(c),
        }
        pieces.push(piece);
    }

    // A device name is defused by escaping its third char. Escapes above never touch the first
    // three chars of a device name (letters, and `CaseEscaped` escapes all letters so never
    // yields one), and `fatrules` proves the third char is always an ASCII letter.
    if fatrules::is_reserved_device_name(&pieces.concat()) {
        if let Some(Unit::Char(c)) = units.get(2) {
            if c.is_ascii() {
                pieces[2] = escape(*c as u32).to_string();
            }
        }
    }
    pieces
}

/// The longest backing name in UTF-8 bytes. FAT counts UTF-16 units, but a backing directory
/// may also be an ext4 or sshfs directory standing in for the stick, whose limit is 255 bytes;
/// a name within both limits works on all of them.
pub const MAX_BACKING_BYTES: usize = 255;

/// `Form::Hashed`: a readable prefix of the natural escape, then U+F000 `~` and 32 hex digits
/// of SHA-256 of the POSIX name.
fn encode_hashed(name: &[u8], at_root: bool) -> Vec<u8> {
    let mut suffix = String::with_capacity(2 + HASH_HEX_LEN);
    suffix.push(ESCAPE);
    suffix.push(HASH_MARK);
    let digest = Sha256::digest(name);
    for byte in digest.iter().take(HASH_HEX_LEN / 2) {
        // Writing to a String cannot fail.
        let _ = write!(suffix, "{byte:02x}");
    }
    let budget = MAX_NAME_UTF16_UNITS - fatrules::utf16_len(&suffix);

    let mut prefix = String::new();
    let mut used = 0;
    for piece in escaped_pieces(name, false, at_root) {
        let len = fatrules::utf16_len(&piece);
        if used + len > budget || prefix.len() + piece.len() + suffix.len() > MAX_BACKING_BYTES {
            break;
        }
        used += len;
        prefix.push_str(&piece);
    }
    // A cut prefix may end in a dot or space; they are legal before the suffix, but Windows
    // users would see odd names, so drop them. The suffix's U+F000 keeps any device-name base
    // from forming, since a cut before the first dot makes the suffix part of the base.
    let prefix = prefix.trim_end_matches(['.', ' ']);
    let mut out = String::with_capacity(prefix.len() + suffix.len());
    out.push_str(prefix);
    out.push_str(&suffix);
    out.into_bytes()
}

/// The POSIX name a backing name stands for. Total: any bytes give an answer, never a panic.
///
/// U+F001..=U+F0FF become the byte they escape; U+F000 followed by a char of U+F000..=U+F0FF is
/// that char literally; U+F000 followed by `~` marks a hashed name; anything else (a lone
/// U+F000, invalid UTF-8 written by some other system) is kept as it is.
pub fn decode(backing: &[u8], at_root: bool) -> Decoded {
    if at_root && fatrules::fold_key(backing) == fatrules::fold_key(STORE_DIR.as_bytes()) {
        return Decoded::Reserved;
    }
    let mut name = Vec::with_capacity(backing.len());
    for chunk in backing.utf8_chunks() {
        let mut chars = chunk.valid().chars().peekable();
        while let Some(c) = chars.next() {
            if c == ESCAPE {
                match chars.peek().copied() {
                    Some(HASH_MARK) => return Decoded::Hashed,
                    Some(next) if is_private_escape_range(next) => {
                        chars.next();
                        push_char(&mut name, next);
                    }
                    _ => push_char(&mut name, c),
                }
            } else if is_private_escape_range(c) {
                // The range check makes the difference at most 0xFF.
                name.push((c as u32 - ESCAPE_BASE) as u8);
            } else {
                push_char(&mut name, c);
            }
        }
        name.extend_from_slice(chunk.invalid());
    }
    Decoded::Name(name)
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// Whether `backing` is exactly what `encode` produces for the name it decodes to (in the
/// natural or case-escaped form), or a well-formed hashed name, or the store directory.
///
/// A backing name made on another system may decode to something that is not a POSIX name
/// (too long: 255 UTF-16 units of CJK are 765 bytes; or `/`, `.`, `..` spelt with escapes), or
/// to a name whose canonical backing name is different (`a\u{F02E}b` decodes to `a.b`, which
/// is stored as `a.b`), so that two backing names would show as one. The caller must not
/// present such a name as it decodes.
pub fn is_canonical(backing: &[u8], at_root: bool) -> bool {
    match decode(backing, at_root) {
        Decoded::Reserved => true,
        Decoded::Hashed => is_well_formed_hashed(backing),
        Decoded::Name(name) => {
            is_valid_posix_name(&name)
                && (encode(&name, Form::Natural, at_root) == backing
                    || encode(&name, Form::CaseEscaped, at_root) == backing)
        }
    }
}

fn is_well_formed_hashed(backing: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(backing) else {
        return false;
    };
    let Some((_prefix, hex)) = text.rsplit_once(HASH_INTRO) else {
        return false;
    };
    hex.len() == HASH_HEX_LEN
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && fatrules::check_name(backing).is_ok()
}

// ---------------------------------------------------------------------------------------------
// The 8.3 mode (`names=8.3`)
// ---------------------------------------------------------------------------------------------

/// How POSIX names are written on a stick: the mount option `names=`, recorded in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NameMode {
    /// FAT long names (vfat, exFAT, Windows): the escapes and forms above.
    #[default]
    Long,
    /// MS-DOS 8.3 names only (a stick mounted `msdos`, an old device): every backing name is
    /// an upper-case `NAME.EXT`, and the POSIX name is kept in the store whenever the short
    /// name lower-cased is not it.
    Short83,
}

impl NameMode {
    /// The mode named by the option value (`long` or `8.3`).
    pub fn parse(value: &str) -> Option<NameMode> {
        match value {
            "long" => Some(NameMode::Long),
            "8.3" => Some(NameMode::Short83),
            _ => None,
        }
    }

    /// The option value for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            NameMode::Long => "long",
            NameMode::Short83 => "8.3",
        }
    }
}

/// How many candidates `short_candidate` is asked for before a directory counts as full: the
/// readable name, nine `~N` names, then hashed names. 4,096 hashed tries with 65,536 hash values
/// each only all fail in a directory that is nearly at FAT's 65,536-entry limit anyway.
pub const SHORT_ATTEMPTS: u32 = 10 + 4096;

/// The upper-case 8.3 basis of a POSIX name, as Windows derives one: leading dots dropped, the
/// last dot separates the extension, spaces and other dots dropped, ASCII letters upper-cased,
/// any char an 8.3 name cannot hold (non-ASCII, forbidden, invalid UTF-8) becomes `_`.
fn short_basis(name: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let units = units(name);
    let start = units
        .iter()
        .position(|u| *u != Unit::Char('.'))
        .unwrap_or(units.len());
    let units = &units[start..];
    let last_dot = units.iter().rposition(|u| *u == Unit::Char('.'));
    let (base_units, ext_units) = match last_dot {
        Some(i) => (&units[..i], &units[i + 1..]),
        None => (units, &units[units.len()..]),
    };
    let convert = |part: &[Unit]| -> Vec<u8> {
        part.iter()
            .filter(|u| !matches!(u, Unit::Char('.' | ' ')))
            .map(|u| match *u {
                Unit::Char(c) if c.is_ascii() => {
                    let b = (c as u8).to_ascii_uppercase();
                    if fatrules::is_short_name_char(b) {
                        b
                    } else {
                        b'_'
                    }
                }
                _ => b'_',
            })
            .collect()
    };
    let mut base = convert(base_units);
    if base.is_empty() {
        base.push(b'_');
    }
    let mut ext = convert(ext_units);
    ext.truncate(3);
    (base, ext)
}

fn join_short(base: &[u8], ext: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    if !ext.is_empty() {
        out.push(b'.');
        out.extend_from_slice(ext);
    }
    out
}

/// The `attempt`-th 8.3 backing name for the POSIX name `name`, most readable first; the caller
/// takes the first one that does not clash in its directory and keeps the POSIX name in the
/// store when `decode_in(Short83, ..)` of it is not `name`.
///
/// - attempt 0: the name upper-cased, when that is a valid 8.3 name (`report.txt` →
///   `REPORT.TXT`, `Makefile` → `MAKEFILE`); `None` otherwise;
/// - attempts 1–9: six characters of the basis, `~N` and the extension (`LONGNA~1.TXT`);
/// - attempts 10 and up: two characters of the basis, four hex digits of SHA-256 of the name
///   and the attempt, `~1` (`LO3F2A~1.TXT`), as Windows does past `~4`.
///
/// Every `Some` passes `fatrules::check_short_name` (so also `check_name`); never panics.
pub fn short_candidate(name: &[u8], attempt: u32) -> Option<Vec<u8>> {
    if attempt == 0 {
        let upper = name.to_ascii_uppercase();
        return fatrules::check_short_name(&upper).is_ok().then_some(upper);
    }
    let (base, ext) = short_basis(name);
    let candidate = if attempt <= 9 {
        let mut b = base[..base.len().min(6)].to_vec();
        b.extend_from_slice(format!("~{attempt}").as_bytes());
        join_short(&b, &ext)
    } else {
        let mut hasher = Sha256::new();
        hasher.update(name);
        hasher.update(attempt.to_le_bytes());
        let digest = hasher.finalize();
        let mut b = base[..base.len().min(2)].to_vec();
        b.extend_from_slice(format!("{:02X}{:02X}~1", digest[0], digest[1]).as_bytes());
        join_short(&b, &ext)
    };
    // The `~` keeps the base from being a device name; checked anyway, as the contract says.
    fatrules::check_short_name(&candidate)
        .is_ok()
        .then_some(candidate)
}

/// What a backing name stands for in `mode`, before the store is asked. In 8.3 mode a valid
/// upper-case 8.3 name stands for itself lower-cased, as Linux's `msdos` driver shows it and
/// as a user of a DOS-era stick expects (`REPORT.TXT` → `report.txt`); any other backing name
/// (a long name written by another system) decodes as in the long mode.
pub fn decode_in(mode: NameMode, backing: &[u8], at_root: bool) -> Decoded {
    match mode {
        NameMode::Long => decode(backing, at_root),
        NameMode::Short83 => {
            // The 8.3 store directory, in the case the stick lists it, is pershome's own.
            if at_root
                && (fatrules::fold_key(backing) == fatrules::fold_key(STORE_DIR.as_bytes())
                    || crate::meta::layout::StoreLayout::Short83.is_store_dir(backing))
            {
                Decoded::Reserved
            } else if fatrules::check_short_name(backing).is_ok() {
                Decoded::Name(backing.to_ascii_lowercase())
            } else {
                decode(backing, at_root)
            }
        }
    }
}

/// POSIX names that break FAT's rules in every way the design names: each forbidden and control
/// character, trailing dots and spaces, reserved device names, names differing only in case,
/// 255-byte names, invalid UTF-8, and literal private-use characters. For tests and the demo.
pub fn hostile_examples() -> Vec<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = [
        "Makefile",
        "makefile",
        "MAKEFILE",
        "a.",
        "a",
        "a..",
        "a ",
        "a. .",
        "CON",
        "con.txt",
        "nul",
        "COM1",
        "LPT¹.doc",
        "aux.tar.gz",
        "q:?",
        "star*",
        "<angle>",
        "pipe|",
        "quote\"",
        "back\\slash",
        "tab\tname",
        "new\nline",
        " leading space",
        "...",
        "report.odt",
        "été",
        "ÉTÉ",
        "😀 emoji",
        "\u{F041}pua",
        "\u{F000}",
        "trailing dot.",
        "CONIN$",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    names.push(vec![0xff, b'a', 0x80]);
    names.push(vec![b'x'; 255]);
    names.push("é".repeat(127).into_bytes());
    names.push(vec![b'.'; 255]);
    names.push(vec![0xfe; 255]);
    names.push((1u8..32).collect());
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn show(bytes: &[u8]) -> String {
        format!("{:?}", String::from_utf8_lossy(bytes))
    }

    /// Encodes in `form`, checks the expected backing name, FAT legality and the round trip.
    fn check(name: &[u8], form: Form, at_root: bool, expected: &str) {
        let got = encode(name, form, at_root);
        assert_eq!(
            got,
            expected.as_bytes(),
            "encode({}, {form:?}, at_root={at_root}): expected {expected:?}, got {}",
            show(name),
            show(&got)
        );
        let legal = fatrules::check_name(&got);
        assert_eq!(
            legal,
            Ok(()),
            "encode({}) = {} is not FAT-legal",
            show(name),
            show(&got)
        );
        let back = decode(&got, at_root);
        assert_eq!(
            back,
            Decoded::Name(name.to_vec()),
            "decode({}): expected {}, got {back:?}",
            show(&got),
            show(name)
        );
        assert!(
            is_canonical(&got, at_root),
            "expected {} to be canonical",
            show(&got)
        );
    }

    #[test]
    fn natural_table() {
        let cases: &[(&[u8], &str)] = &[
            // FAT-legal names stay byte for byte.
            (b"report.odt", "report.odt"),
            (b".bashrc", ".bashrc"),
            (b"a b.c", "a b.c"),
            ("caf\u{e9} \u{1F600}".as_bytes(), "caf\u{e9} \u{1F600}"),
            (b"Makefile", "Makefile"),
            (b"CONX", "CONX"),
            // Each forbidden char.
            (b"a\"b", "a\u{F022}b"),
            (b"a*b", "a\u{F02A}b"),
            (b"a:b", "a\u{F03A}b"),
            (b"a<b", "a\u{F03C}b"),
            (b"a>b", "a\u{F03E}b"),
            (b"a?b", "a\u{F03F}b"),
            (b"a\\b", "a\u{F05C}b"),
            (b"a|b", "a\u{F07C}b"),
            // Control chars.
            (b"\x01", "\u{F001}"),
            (b"a\tb\nc", "a\u{F009}b\u{F00A}c"),
            (b"\x1f", "\u{F01F}"),
            // Trailing runs of dots and spaces, and only those.
            (b"a.", "a\u{F02E}"),
            (b"a ", "a\u{F020}"),
            (b"a. .", "a\u{F02E}\u{F020}\u{F02E}"),
            (b"a.b.", "a.b\u{F02E}"),
            (b"...", "\u{F02E}\u{F02E}\u{F02E}"),
            (b" ", "\u{F020}"),
            // Device names: the third char.
            (b"CON", "CO\u{F04E}"),
            (b"con.txt", "co\u{F06E}.txt"),
            (b"nul.txt", "nu\u{F06C}.txt"),
            (b"nul.tar.gz", "nu\u{F06C}.tar.gz"),
            (b"COM1", "CO\u{F04D}1"),
            ("LPT\u{B9}".as_bytes(), "LP\u{F054}\u{B9}"),
            ("lpt\u{B9}.x".as_bytes(), "lp\u{F074}\u{B9}.x"),
            (b"CONIN$", "CO\u{F04E}IN$"),
            (b"CON .txt", "CO\u{F04E} .txt"),
            // The trailing escape already defuses these: Windows sees no device name.
            (b"CON.", "CON\u{F02E}"),
            (b"CON ", "CON\u{F020}"),
            // Invalid UTF-8: each bad byte.
            (&[0xff, b'a'], "\u{F0FF}a"),
            (&[b'a', 0xc3], "a\u{F0C3}"),
            (&[0xe2, 0x82, b'x'], "\u{F0E2}\u{F082}x"),
            // Literal private-use chars of the escape block.
            ("\u{F041}".as_bytes(), "\u{F000}\u{F041}"),
            ("\u{F000}".as_bytes(), "\u{F000}\u{F000}"),
            ("\u{F0FF}~".as_bytes(), "\u{F000}\u{F0FF}~"),
            ("\u{F100}".as_bytes(), "\u{F100}"),
            // `.pershome` is only special at the root.
            (b".pershome", ".pershome"),
        ];
        for &(name, expected) in cases {
            check(name, Form::Natural, false, expected);
        }
    }

    #[test]
    fn store_directory_name_is_escaped_at_the_root() {
        check(b".pershome", Form::Natural, true, "\u{F02E}pershome");
        check(b".PersHome", Form::Natural, true, "\u{F02E}PersHome");
        check(
            b".pershome",
            Form::CaseEscaped,
            true,
            "\u{F02E}\u{F070}\u{F065}\u{F072}\u{F073}\u{F068}\u{F06F}\u{F06D}\u{F065}",
        );
        check(b".pershomex", Form::Natural, true, ".pershomex");
        for backing in [&b".pershome"[..], b".PERSHOME", b".PersHome"] {
            let got = decode(backing, true);
            assert_eq!(
                got,
                Decoded::Reserved,
                "decode({}, root): got {got:?}",
                show(backing)
            );
            let got = decode(backing, false);
            assert_eq!(
                got,
                Decoded::Name(backing.to_vec()),
                "decode({}, not root): got {got:?}",
                show(backing)
            );
        }
    }

    #[test]
    fn case_escaped_table() {
        check(
            b"makefile",
            Form::CaseEscaped,
            false,
            "\u{F06D}\u{F061}\u{F06B}\u{F065}\u{F066}\u{F069}\u{F06C}\u{F065}",
        );
        check(
            b"a:1.",
            Form::CaseEscaped,
            false,
            "\u{F061}\u{F03A}1\u{F02E}",
        );
        check(b"CON", Form::CaseEscaped, false, "\u{F043}\u{F04F}\u{F04E}");
        check(
            "\u{e9}t\u{e9}".as_bytes(),
            Form::CaseEscaped,
            false,
            "\u{e9}\u{F074}\u{e9}",
        );
        let natural = encode(b"Makefile", Form::Natural, false);
        let escaped = encode(b"makefile", Form::CaseEscaped, false);
        assert_ne!(
            fatrules::fold_key(&natural),
            fatrules::fold_key(&escaped),
            "Makefile ({}) and makefile ({}) must not fold together",
            show(&natural),
            show(&escaped)
        );
    }

    #[test]
    fn hashed_form_fits_a_255_byte_directory_too() {
        for name in [
            vec![b'.'; 255],
            vec![0xfe; 255],
            "\u{F041}".repeat(85).into_bytes(),
            "é".repeat(127).into_bytes(),
        ] {
            let got = encode(&name, Form::Hashed, false);
            assert!(got.len() <= MAX_BACKING_BYTES, "{} bytes", got.len());
            assert_eq!(fatrules::check_name(&got), Ok(()));
        }
    }

    #[test]
    fn hashed_form() {
        let names: Vec<Vec<u8>> = vec![
            "\u{e9}cole".into(),
            "\u{c9}cole".into(),
            b"CON".to_vec(),
            b"a.".to_vec(),
            vec![b'x'; 255],
            vec![0xff; 255],
            "\u{F041}".repeat(85).into_bytes(),
            "\u{1F600}".repeat(63).into_bytes(),
            format!("{}.{}", "a".repeat(220), "b".repeat(30)).into_bytes(),
            format!("{} {}", "a".repeat(219), "b".repeat(30)).into_bytes(),
        ];
        let mut seen = Vec::new();
        for name in &names {
            let got = encode(name, Form::Hashed, false);
            let legal = fatrules::check_name(&got);
            assert_eq!(
                legal,
                Ok(()),
                "hashed {} = {} is not FAT-legal",
                show(name),
                show(&got)
            );
            let decoded = decode(&got, false);
            assert_eq!(
                decoded,
                Decoded::Hashed,
                "decode({}): got {decoded:?}",
                show(&got)
            );
            assert!(
                is_canonical(&got, false),
                "expected {} to be canonical",
                show(&got)
            );
            let text = String::from_utf8(got.clone()).expect("hashed names are UTF-8");
            let (prefix, hex) = text.rsplit_once(HASH_INTRO).expect("hash marker");
            assert_eq!(hex.len(), HASH_HEX_LEN, "hash digits in {text:?}");
            assert!(
                !prefix.ends_with(['.', ' ']),
                "prefix {prefix:?} ends in a dot or space"
            );
            assert!(
                !seen.contains(&fatrules::fold_key(&got)),
                "two hashed names fold together: {text:?}"
            );
            seen.push(fatrules::fold_key(&got));
        }
        // The prefix is readable and the SHA-256 is the documented one.
        let got = encode(b"hello", Form::Hashed, false);
        let expected = "hello\u{F000}~2cf24dba5fb0a30e26e83b2ac5b9e29e";
        assert_eq!(
            got,
            expected.as_bytes(),
            "expected {expected:?}, got {}",
            show(&got)
        );
        // A cut prefix keeps whole escape pairs: a dangling U+F000 would hide the hash marker.
        // 217 bytes of `a` leave room for the 38-byte suffix but not for a 6-byte escape pair.
        let name = format!("{}{}", "a".repeat(217), "\u{F041}".repeat(10));
        let got = encode(name.as_bytes(), Form::Hashed, false);
        let expected = format!("{}\u{F000}~", "a".repeat(217));
        assert!(
            got.starts_with(expected.as_bytes()),
            "expected a prefix of {expected:?}, got {}",
            show(&got)
        );
    }

    #[test]
    fn worst_case_lengths_fit() {
        let worst: Vec<Vec<u8>> = vec![
            vec![b'a'; 255],
            vec![0xff; 255],
            vec![b':'; 255],
            vec![b'.'; 255],
            "\u{F041}".repeat(85).into_bytes(),
            "\u{1F600}".repeat(63).into_bytes(),
            "\u{6587}".repeat(85).into_bytes(),
        ];
        for name in &worst {
            for form in [Form::Natural, Form::CaseEscaped, Form::Hashed] {
                let got = encode(name, form, true);
                let legal = fatrules::check_name(&got);
                assert_eq!(legal, Ok(()), "{form:?} of {} is {legal:?}", show(name));
            }
        }
    }

    #[test]
    fn decode_odd_backing_names() {
        let cases: &[(&[u8], Decoded)] = &[
            // A lone escape char and invalid UTF-8 pass through.
            ("\u{F000}".as_bytes(), Decoded::Name("\u{F000}".into())),
            ("a\u{F000}b".as_bytes(), Decoded::Name("a\u{F000}b".into())),
            (&[0xff, 0xfe], Decoded::Name(vec![0xff, 0xfe])),
            (
                &[0xef, 0x80, 0x80, 0xff, 0x7e],
                Decoded::Name(vec![0xef, 0x80, 0x80, 0xff, 0x7e]),
            ),
            // Escapes a Windows user typed are decoded, even where `encode` would not put them.
            ("a\u{F02E}b".as_bytes(), Decoded::Name(b"a.b".to_vec())),
            ("\u{F02F}".as_bytes(), Decoded::Name(b"/".to_vec())),
            ("x\u{F000}~y".as_bytes(), Decoded::Hashed),
            (
                "\u{F000}\u{F000}~".as_bytes(),
                Decoded::Name("\u{F000}~".into()),
            ),
            (b"", Decoded::Name(Vec::new())),
        ];
        for (backing, expected) in cases {
            let got = decode(backing, false);
            assert_eq!(
                &got, expected,
                "decode({backing:?}): expected {expected:?}, got {got:?}"
            );
        }
        let long_cjk = "\u{6587}".repeat(100);
        let not_canonical: &[&[u8]] = &[
            "a\u{F02E}b".as_bytes(),
            "\u{F02F}".as_bytes(),
            "\u{F02E}".as_bytes(),
            "\u{F000}".as_bytes(),
            &[0xff],
            b"CON",
            b"a.",
            "x\u{F000}~y".as_bytes(),
            "\u{F06D}akefile".as_bytes(),
            long_cjk.as_bytes(),
            b"",
        ];
        for backing in not_canonical {
            assert!(
                !is_canonical(backing, false),
                "expected {} not to be canonical, got canonical",
                show(backing)
            );
        }
    }

    #[test]
    fn posix_name_validity() {
        let cases: &[(&[u8], bool)] = &[
            (b"a", true),
            (&[0xff], true),
            (&[b'x'; 255], true),
            (&[b'x'; 256], false),
            (b"", false),
            (b".", false),
            (b"..", false),
            (b"...", true),
            (b"a/b", false),
            (b"a\0b", false),
        ];
        for (name, expected) in cases {
            let got = is_valid_posix_name(name);
            assert_eq!(
                got,
                *expected,
                "is_valid_posix_name({}): expected {expected}, got {got}",
                show(name)
            );
        }
    }

    /// Valid POSIX names biased towards the interesting parts: escapes, dots, spaces, device
    /// names, private-use chars, invalid UTF-8, and lengths near 255 bytes.
    fn posix_name() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            proptest::collection::vec(1u8..=255, 1..8),
            Just(b".".to_vec()),
            Just(b" ".to_vec()),
            Just(b"CON".to_vec()),
            Just(b"lpt".to_vec()),
            Just("\u{B9}".as_bytes().to_vec()),
            Just(b"pershome".to_vec()),
            any::<char>().prop_map(|c| c.to_string().into_bytes()),
            (0xF000u32..=0xF0FF).prop_map(|c| char::from_u32(c)
                .map(|c| c.to_string().into_bytes())
                .unwrap_or_default()),
            Just("~".as_bytes().to_vec()),
            proptest::collection::vec(b'a'..=b'z', 100..200),
        ];
        proptest::collection::vec(piece, 1..12).prop_filter_map("valid POSIX name", |pieces| {
            let mut name: Vec<u8> = pieces.concat();
            name.retain(|&b| b != b'/' && b != 0);
            name.truncate(255);
            is_valid_posix_name(&name).then_some(name)
        })
    }

    /// What `fs` does with 8.3 names, without I/O: each name in turn takes its first candidate
    /// that does not fold onto a backing name already in the directory, and the store keeps
    /// the POSIX name when the backing name does not decode to it. Returns (backing name,
    /// stored name) per name.
    fn assign_short(names: &[Vec<u8>], at_root: bool) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut folds = std::collections::HashSet::new();
        if at_root {
            // The store of an 8.3 stick is there before any name is chosen.
            folds.insert(fatrules::fold_key(
                crate::meta::layout::SHORT_STORE_DIR.as_bytes(),
            ));
        }
        let mut out = Vec::new();
        for name in names {
            let backing = (0..SHORT_ATTEMPTS)
                .filter_map(|a| short_candidate(name, a))
                .find(|c| !folds.contains(&fatrules::fold_key(c)))
                .unwrap_or_else(|| panic!("no free 8.3 name for {}", show(name)));
            folds.insert(fatrules::fold_key(&backing));
            let stored = match decode_in(NameMode::Short83, &backing, at_root) {
                Decoded::Name(n) if &n == name => None,
                _ => Some(name.clone()),
            };
            out.push((backing, stored));
        }
        out
    }

    #[test]
    fn short_names_table() {
        let names: Vec<Vec<u8>> = [
            "report.txt",
            "Makefile",
            "makefile",
            "MAKEFILE",
            "longername.txt",
            "longername of mine.txt",
            "longername of yours.txt",
            ".bashrc",
            "con",
            "com1.txt",
            "a.b.c.tar.gz",
            "été.odt",
            ".pershome",
            "...",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let expected: &[(&str, bool)] = &[
            ("REPORT.TXT", false),
            ("MAKEFILE", true),
            ("MAKEFI~1", true),
            ("MAKEFI~2", true),
            ("LONGER~1.TXT", true),
            ("LONGER~2.TXT", true),
            ("LONGER~3.TXT", true),
            ("BASHRC~1", true),
            ("CON~1", true),
            ("COM1~1.TXT", true),
            ("ABCTAR~1.GZ", true),
            ("_T_~1.ODT", true),
            ("PERSHO~1", true),
            ("_~1", true),
        ];
        let got = assign_short(&names, true);
        for ((name, (backing, stored)), (want, want_stored)) in names.iter().zip(&got).zip(expected)
        {
            assert_eq!(
                (backing.as_slice(), stored.is_some()),
                (want.as_bytes(), *want_stored),
                "8.3 name of {}: expected {want:?} (name stored: {want_stored}), got {} (stored: {})",
                show(name),
                show(backing),
                stored.is_some()
            );
        }
        // Names made elsewhere: a short name shows lower-cased, a long one as in long mode.
        let cases: &[(&[u8], Decoded)] = &[
            (b"README.TXT", Decoded::Name(b"readme.txt".to_vec())),
            (b"Notes.txt", Decoded::Name(b"Notes.txt".to_vec())),
            (b"PERSHO~1", Decoded::Name(b"persho~1".to_vec())),
            (b".pershome", Decoded::Reserved),
            (b"PERSHOME.DB", Decoded::Reserved),
            (b"pershome.db", Decoded::Reserved),
        ];
        for (backing, want) in cases {
            let got = decode_in(NameMode::Short83, backing, true);
            assert_eq!(
                &got,
                want,
                "decode_in(8.3, {}): expected {want:?}, got {got:?}",
                show(backing)
            );
        }
        // Past nine `~N` names, hashed ones.
        let got = short_candidate(b"longname.txt", 10).expect("a hashed candidate");
        let text = String::from_utf8(got).expect("ASCII");
        assert!(
            text.starts_with("LO") && text.ends_with("~1.TXT") && text.len() == 12,
            "expected LOxxxx~1.TXT, got {text:?}"
        );
        assert_eq!(NameMode::parse("8.3"), Some(NameMode::Short83));
        assert_eq!(NameMode::parse("long"), Some(NameMode::Long));
        assert_eq!(NameMode::parse("short"), None);
    }

    #[test]
    fn hostile_names_get_unique_valid_short_names() {
        let names = hostile_examples();
        for at_root in [false, true] {
            let got = assign_short(&names, at_root);
            let mut seen = std::collections::HashSet::new();
            for (name, (backing, stored)) in names.iter().zip(&got) {
                assert_eq!(
                    fatrules::check_short_name(backing),
                    Ok(()),
                    "8.3 name of {} is {}",
                    show(name),
                    show(backing)
                );
                assert!(
                    seen.insert(fatrules::fold_key(backing)),
                    "{} twice",
                    show(backing)
                );
                let back = stored.clone().or_else(|| {
                    match decode_in(NameMode::Short83, backing, at_root) {
                        Decoded::Name(n) => Some(n),
                        _ => None,
                    }
                });
                assert_eq!(
                    back.as_ref(),
                    Some(name),
                    "round trip of {} via {}",
                    show(name),
                    show(backing)
                );
            }
        }
    }

    proptest! {
        // Each case assigns up to a hundred names: fewer cases cover as much.
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn short_names_are_valid_unique_and_round_trip_through_the_store(
            names in proptest::collection::vec(posix_name(), 1..40),
            twins in proptest::collection::vec(proptest::collection::vec(b'a'..=b'z', 1..12), 0..30),
            at_root in any::<bool>(),
        ) {
            // Short names of the same basis and ASCII case twins are where 8.3 clashes live.
            let mut all: Vec<Vec<u8>> = Vec::new();
            for name in names.into_iter().chain(twins.iter().flat_map(|t| {
                let mut upper = t.to_ascii_uppercase();
                upper.extend_from_slice(b".txt");
                let mut long = t.clone();
                long.extend_from_slice(b"_long_name.txt");
                [t.clone(), upper, long]
            })) {
                if !all.contains(&name) {
                    all.push(name);
                }
            }
            let got = assign_short(&all, at_root);
            let mut seen = std::collections::HashSet::new();
            // The store as the directory's reconcile sees it: backing name -> stored name.
            for (name, (backing, stored)) in all.iter().zip(&got) {
                prop_assert_eq!(
                    fatrules::check_short_name(backing), Ok(()),
                    "8.3 name of {} is {}", show(name), show(backing)
                );
                prop_assert_eq!(fatrules::check_name(backing), Ok(()));
                prop_assert!(seen.insert(fatrules::fold_key(backing)), "{} given twice", show(backing));
                let shown = match (stored, decode_in(NameMode::Short83, backing, at_root)) {
                    (Some(n), _) => n.clone(),
                    (None, Decoded::Name(n)) => n,
                    (None, other) => return Err(TestCaseError::fail(format!("{other:?}"))),
                };
                prop_assert_eq!(&shown, name, "round trip via {}", show(backing));
            }
        }

        #[test]
        fn short_candidates_never_panic_and_are_valid(
            name in proptest::collection::vec(any::<u8>(), 0..300),
            attempt in 0u32..20_000,
        ) {
            if let Some(c) = short_candidate(&name, attempt) {
                prop_assert_eq!(fatrules::check_short_name(&c), Ok(()), "{}", show(&c));
            }
            let _ = decode_in(NameMode::Short83, &name, true);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn every_form_is_fat_legal_and_round_trips(name in posix_name(), at_root in any::<bool>()) {
            for form in [Form::Natural, Form::CaseEscaped, Form::Hashed] {
                let backing = encode(&name, form, at_root);
                prop_assert_eq!(
                    fatrules::check_name(&backing), Ok(()),
                    "{:?} of {} is {}", form, show(&name), show(&backing)
                );
                let decoded = decode(&backing, at_root);
                let expected = if form == Form::Hashed {
                    Decoded::Hashed
                } else {
                    Decoded::Name(name.clone())
                };
                prop_assert_eq!(&decoded, &expected, "decode of {:?} {}", form, show(&backing));
                prop_assert!(is_canonical(&backing, at_root), "{} not canonical", show(&backing));
            }
            let natural = encode(&name, Form::Natural, at_root);
            // The exceptions: escape-block chars (escaped so decoding is unambiguous) and the
            // store directory's name at the root.
            let has_escape_block_char = String::from_utf8_lossy(&name)
                .chars()
                .any(is_private_escape_range);
            if fatrules::check_name(&name).is_ok()
                && !has_escape_block_char
                && !(at_root && fatrules::fold_key(&name) == fatrules::fold_key(STORE_DIR.as_bytes()))
            {
                prop_assert_eq!(&natural, &name, "a FAT-legal name must stay as it is");
            }
        }

        #[test]
        fn ascii_case_twins_never_fold_together(
            name in posix_name(),
            flips in proptest::collection::vec(any::<bool>(), 255),
            at_root in any::<bool>(),
        ) {
            let twin: Vec<u8> = name
                .iter()
                .zip(&flips)
                .map(|(&b, &flip)| if flip && b.is_ascii_alphabetic() { b ^ 0x20 } else { b })
                .collect();
            let natural = encode(&name, Form::Natural, at_root);
            let escaped = encode(&twin, Form::CaseEscaped, at_root);
            if name != twin {
                prop_assert_ne!(
                    fatrules::fold_key(&natural), fatrules::fold_key(&escaped),
                    "{} and {} fold together", show(&natural), show(&escaped)
                );
            }
            // Two distinct names never share a case-escaped backing name either.
            let escaped_self = encode(&name, Form::CaseEscaped, at_root);
            if name != twin {
                prop_assert_ne!(fatrules::fold_key(&escaped_self), fatrules::fold_key(&escaped));
            }
        }

        #[test]
        fn encode_never_panics_on_any_bytes(name in proptest::collection::vec(any::<u8>(), 0..300)) {
            for form in [Form::Natural, Form::CaseEscaped, Form::Hashed] {
                let _ = encode(&name, form, true);
            }
        }

        #[test]
        fn decode_never_panics_on_any_bytes(backing in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&backing, true);
            let _ = decode(&backing, false);
            let _ = is_canonical(&backing, true);
        }

        #[test]
        fn decode_of_escape_heavy_text_never_grows(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just("\u{F000}".as_bytes().to_vec()),
                    Just(b"~".to_vec()),
                    (0xF000u32..=0xF0FF).prop_map(|c| {
                        char::from_u32(c).map(|c| c.to_string().into_bytes()).unwrap_or_default()
                    }),
                    proptest::collection::vec(any::<u8>(), 1..4),
                ],
                0..80,
            ),
            at_root in any::<bool>(),
        ) {
            let backing = pieces.concat();
            // Escapes shrink (3 bytes to 1, a 6-byte pair to 3), everything else is copied, so
            // a decoded name is never longer than its backing name: no amplification.
            if let Decoded::Name(name) = decode(&backing, at_root) {
                prop_assert!(
                    name.len() <= backing.len(),
                    "decode({}) = {} grew", show(&backing), show(&name)
                );
            }
        }
    }
}
