//! The names of everything pershome itself keeps on a stick: the store directory and the files
//! and directories in it, the login hook's owner mark, and what `pershome fsck --repair` moves
//! out of the store. One place, chosen by the naming mode, so that a `names=8.3` stick holds
//! only upper-case MS-DOS `NAME.EXT` names, pershome's own included (see `docs/format.md`
//! § Naming modes).
//!
//! This module owns those names and their parsing; it does no I/O but `detect`, which only
//! looks (never creates, never follows a symlink). It never changes the long layout: every long
//! name is the one format 1 and 2 sticks already hold.
//!
//! In the 8.3 layout every name is recognised in any letter case, because Linux's `msdos`
//! driver lists short names in lower case (`PERSHOME.DB` shows as `pershome.db`) while looking
//! them up in any case. Names are always *written* upper-case.

use std::os::fd::BorrowedFd;

use crate::names::NameMode;

/// The store directory of a long-name stick.
pub const LONG_STORE_DIR: &str = ".pershome";
/// The store directory of an 8.3 stick. Its presence (in any case) at the backing root, with
/// no long store beside it, is what makes a stick an 8.3 stick.
pub const SHORT_STORE_DIR: &str = "PERSHOME.DB";

/// The marker the pre-release 8.3 mode kept in a long-named store. Only recognised, to refuse
/// such a stick with a clear message: its store cannot be read by a `msdos` mount anyway.
pub const OLD_SHORT_NAMES_MARKER: &str = "NAMES.83";

/// Which of the two layouts a stick uses. `Long` is the default and the only layout of a
/// long-name stick; `Short83` is that of a `names=8.3` stick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum StoreLayout {
    #[default]
    Long,
    Short83,
}

/// The two kinds of file that hold the store's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StoreFile {
    Checkpoint,
    Journal,
}

/// A number too large for the 8.3 layout's eight hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {value:#x} does not fit the 8 hex digits of an 8.3 stick's names (at most \
     {:#x}); copy the home to a stick mounted with names=long",
    u32::MAX
)]
pub struct TooLarge {
    pub what: &'static str,
    pub value: u64,
}

fn hex8(value: u64, what: &'static str) -> Result<String, TooLarge> {
    u32::try_from(value)
        .map(|v| format!("{v:08X}"))
        .map_err(|_| TooLarge { what, value })
}

/// `digits` as a number when it is exactly `len` hex digits: lower-case only when `any_case` is
/// false (the long layout's exact form), either case otherwise.
fn parse_hex(digits: &[u8], len: usize, any_case: bool) -> Option<u64> {
    let ok = digits.len() == len
        && digits.iter().all(|c| {
            c.is_ascii_digit()
                || (b'a'..=b'f').contains(c)
                || (any_case && (b'A'..=b'F').contains(c))
        });
    if !ok {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// `name` split at its only dot into an 8-hex-digit base and an extension equal (ignoring case)
/// to `ext`; the base's value.
fn parse_short(name: &[u8], ext: &str) -> Option<u64> {
    let (base, e) = name.split_at(name.iter().position(|&c| c == b'.')?);
    if !e[1..].eq_ignore_ascii_case(ext.as_bytes()) {
        return None;
    }
    parse_hex(base, 8, true)
}

impl StoreLayout {
    pub fn for_names(mode: NameMode) -> StoreLayout {
        match mode {
            NameMode::Long => StoreLayout::Long,
            NameMode::Short83 => StoreLayout::Short83,
        }
    }

    pub fn names(self) -> NameMode {
        match self {
            StoreLayout::Long => NameMode::Long,
            StoreLayout::Short83 => NameMode::Short83,
        }
    }

    /// The store directory, at the backing root.
    pub fn store_dir(self) -> &'static str {
        match self {
            StoreLayout::Long => LONG_STORE_DIR,
            StoreLayout::Short83 => SHORT_STORE_DIR,
        }
    }

    /// Whether a backing-root entry named `name` is this layout's store directory, as a
    /// directory listing shows it (any case in the 8.3 layout).
    pub fn is_store_dir(self, name: &[u8]) -> bool {
        match self {
            StoreLayout::Long => name == LONG_STORE_DIR.as_bytes(),
            StoreLayout::Short83 => name.eq_ignore_ascii_case(SHORT_STORE_DIR.as_bytes()),
        }
    }

    /// Whether `a` and `b` name the same store entry in this layout (exact in the long layout;
    /// ignoring ASCII case in the 8.3 layout, as a `msdos` mount looks names up).
    pub fn same_name(self, a: &[u8], b: &[u8]) -> bool {
        match self {
            StoreLayout::Long => a == b,
            StoreLayout::Short83 => a.eq_ignore_ascii_case(b),
        }
    }

    /// The hard-link content directory, in the store.
    pub fn inodes_dir(self) -> &'static str {
        match self {
            StoreLayout::Long => "inodes",
            StoreLayout::Short83 => "INODES",
        }
    }

    /// The directory new files are written in before being renamed into place, in the store.
    pub fn staging_dir(self) -> &'static str {
        match self {
            StoreLayout::Long => "staging",
            StoreLayout::Short83 => "STAGING",
        }
    }

    /// The directory of the further parts of files stored in parts, in the store.
    pub fn parts_dir(self) -> &'static str {
        match self {
            StoreLayout::Long => "parts",
            StoreLayout::Short83 => "PARTS",
        }
    }

    /// The login hook's owner mark, in the store.
    pub fn owner_mark(self) -> &'static str {
        match self {
            StoreLayout::Long => "owner-name",
            StoreLayout::Short83 => "OWNER.TXT",
        }
    }

    /// The name an entry has in the store for the instant of a `RENAME_EXCHANGE` on a backing
    /// without one (never there after the exchange returns, nor after a crash's recovery).
    pub fn exchange_tmp(self) -> &'static str {
        match self {
            StoreLayout::Long => "exchange.tmp",
            StoreLayout::Short83 => "EXCHANGE.TMP",
        }
    }

    /// The name of a checkpoint or journal file of `generation`.
    pub fn store_file(self, kind: StoreFile, generation: u64) -> Result<String, TooLarge> {
        match (self, kind) {
            (StoreLayout::Long, StoreFile::Checkpoint) => {
                Ok(format!("checkpoint.{generation:016x}"))
            }
            (StoreLayout::Long, StoreFile::Journal) => Ok(format!("journal.{generation:016x}")),
            (StoreLayout::Short83, StoreFile::Checkpoint) => {
                Ok(format!("{}.CKP", hex8(generation, "the store generation")?))
            }
            (StoreLayout::Short83, StoreFile::Journal) => {
                Ok(format!("{}.JNL", hex8(generation, "the store generation")?))
            }
        }
    }

    /// Recognises exactly the store file names this layout writes (in any case in the 8.3
    /// layout): the kind and generation. Generation 0 is never written and never recognised.
    pub fn parse_store_file(self, name: &[u8]) -> Option<(StoreFile, u64)> {
        let (kind, generation) = match self {
            StoreLayout::Long => {
                if let Some(d) = name.strip_prefix(b"checkpoint.") {
                    (StoreFile::Checkpoint, parse_hex(d, 16, false)?)
                } else if let Some(d) = name.strip_prefix(b"journal.") {
                    (StoreFile::Journal, parse_hex(d, 16, false)?)
                } else {
                    return None;
                }
            }
            StoreLayout::Short83 => {
                if let Some(g) = parse_short(name, "CKP") {
                    (StoreFile::Checkpoint, g)
                } else {
                    (StoreFile::Journal, parse_short(name, "JNL")?)
                }
            }
        };
        (generation != 0).then_some((kind, generation))
    }

    /// Candidate `n` (0..100) of the name a damaged store file `name` is kept under. Never a
    /// name `parse_store_file` accepts.
    pub fn corrupt_name(self, name: &str, n: u32) -> String {
        match self {
            StoreLayout::Long if n == 0 => format!("{name}.corrupt"),
            StoreLayout::Long => format!("{name}.corrupt.{n}"),
            // `0000000A.JNL` → `0000000A.J00`, `0000000A.J01`…: still 8.3, and the extension
            // says which kind of file it was.
            StoreLayout::Short83 => {
                let (base, ext) = name.split_once('.').unwrap_or((name, "X"));
                let letter = ext.chars().next().unwrap_or('X').to_ascii_uppercase();
                format!("{}.{letter}{:02}", base.to_ascii_uppercase(), n % 100)
            }
        }
    }

    /// The content file of hard-link inode `id`, in the inodes directory.
    pub fn inode_file(self, id: u64) -> Result<String, TooLarge> {
        match self {
            StoreLayout::Long => Ok(format!("{id:016x}")),
            StoreLayout::Short83 => Ok(format!("{}.LNK", hex8(id, "the hard-link inode id")?)),
        }
    }

    /// An inode content file name back to its id (any case in the 8.3 layout).
    pub fn parse_inode_file(self, name: &[u8]) -> Option<u64> {
        match self {
            StoreLayout::Long => parse_hex(name, 16, false),
            StoreLayout::Short83 => parse_short(name, "LNK"),
        }
        .filter(|&id| id != 0)
    }

    /// The directory of the parts of parts-id `id`, in the parts directory.
    pub fn parts_id_dir(self, id: u64) -> Result<String, TooLarge> {
        match self {
            StoreLayout::Long => Ok(format!("{id:016x}")),
            StoreLayout::Short83 => hex8(id, "the parts id"),
        }
    }

    /// A parts directory name back to its id; never 0.
    pub fn parse_parts_id_dir(self, name: &[u8]) -> Option<u64> {
        match self {
            StoreLayout::Long => parse_hex(name, 16, false),
            StoreLayout::Short83 => parse_hex(name, 8, true),
        }
        .filter(|&id| id != 0)
    }

    /// The file of part `k` (from 1: part 0 is the file itself) in its parts directory.
    pub fn part_file(self, k: u64) -> String {
        match self {
            StoreLayout::Long => format!("{k:08x}"),
            // MAX_PARTS keeps k far below 2^32, so eight digits always hold it.
            StoreLayout::Short83 => format!("{k:08X}"),
        }
    }

    /// A part file name back to its index; `None` for anything else or for 0.
    pub fn parse_part_file(self, name: &[u8]) -> Option<u64> {
        parse_hex(name, 8, self == StoreLayout::Short83).filter(|&k| k != 0)
    }

    /// The `n`th staged file of process `pid`. In the 8.3 layout the pid is left out: only the
    /// one process that holds the store's lock ever stages into it.
    pub fn staged_file(self, pid: u32, n: u64) -> String {
        match self {
            StoreLayout::Long => format!("{pid:x}-{n:x}"),
            StoreLayout::Short83 => format!("{:08X}.TMP", n & u64::from(u32::MAX)),
        }
    }

    /// Candidate `n` (1..100) of the directory `pershome fsck --repair` moves orphans to, at
    /// the backing root.
    pub fn recovered_dir(self, n: u32) -> String {
        match (self, n) {
            (StoreLayout::Long, 1) => "pershome-recovered".into(),
            (StoreLayout::Long, n) => format!("pershome-recovered-{n}"),
            (StoreLayout::Short83, 1) => "PHRECOV".into(),
            (StoreLayout::Short83, n) => format!("PHRECOV.{n}"),
        }
    }

    /// The name an orphaned hard-link content file of `id` gets in the recovery directory.
    pub fn recovered_inode(self, id: u64) -> String {
        match self {
            StoreLayout::Long => format!("inode-{id:016x}"),
            // Orphans come from the store, whose 8.3 ids fit 32 bits; a larger one (a forged
            // name cannot parse as one) is cut, and the collision suffix keeps it unique.
            StoreLayout::Short83 => format!("{:08X}.LNK", id & u64::from(u32::MAX)),
        }
    }

    /// The name an orphaned parts directory of `id` gets in the recovery directory.
    pub fn recovered_parts(self, id: u64) -> String {
        match self {
            StoreLayout::Long => format!("parts-{id:016x}"),
            StoreLayout::Short83 => format!("{:08X}.PRT", id & u64::from(u32::MAX)),
        }
    }

    /// Candidate `n` (2..100) for `base` in the recovery directory when `base` is taken.
    pub fn recovered_suffixed(self, base: &str, n: u32) -> String {
        match self {
            StoreLayout::Long => format!("{base}-{n}"),
            // `0000002A.LNK` → `0000002A.L02`: the extension's first letter keeps the kind.
            StoreLayout::Short83 => self.corrupt_name(base, n),
        }
    }
}

/// What the backing root says about the layout, looking only: the entries that are store
/// directories of either layout, as listed (any case for the 8.3 one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// `.pershome` is there (as any kind of entry: a non-directory is refused later).
    pub long: bool,
    /// The 8.3 store directory's name as listed (`PERSHOME.DB`, or `pershome.db` on a `msdos`
    /// mount), if there is one.
    pub short: Option<Vec<u8>>,
}

impl Found {
    /// The layout these entries say the stick has: `None` when there is no store yet. A long
    /// store wins: on a long-name stick `PERSHOME.DB` is only a user's directory.
    pub fn layout(&self) -> Option<StoreLayout> {
        if self.long {
            Some(StoreLayout::Long)
        } else if self.short.is_some() {
            Some(StoreLayout::Short83)
        } else {
            None
        }
    }
}

/// Looks in `root` (a directory fd of the backing root) for store directories. The exact names
/// are tried first, so a stick with a store is never listed (a mount lists only what is used);
/// only without either is the root listed, for an 8.3 store in another case.
pub fn detect(root: BorrowedFd<'_>) -> std::io::Result<Found> {
    use std::os::fd::AsRawFd;
    // Any failure counts as "not there": the `msdos` driver refuses a name with a leading dot
    // (EINVAL) rather than saying ENOENT, and a real I/O error shows in the listing below.
    let exists = |name: &str| {
        nix::sys::stat::fstatat(
            Some(root.as_raw_fd()),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok()
    };
    if exists(LONG_STORE_DIR) {
        return Ok(Found {
            long: true,
            short: None,
        });
    }
    if exists(SHORT_STORE_DIR) {
        return Ok(Found {
            long: false,
            short: Some(SHORT_STORE_DIR.as_bytes().to_vec()),
        });
    }
    let mut dir = nix::dir::Dir::openat(
        Some(root.as_raw_fd()),
        ".",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let mut found = Found::default();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if StoreLayout::Long.is_store_dir(name) {
            found.long = true;
        } else if StoreLayout::Short83.is_store_dir(name) {
            // An exact upper-case entry is preferred should a case-sensitive backing hold two.
            if found.short.is_none() || name == SHORT_STORE_DIR.as_bytes() {
                found.short = Some(name.to_vec());
            }
        }
    }
    Ok(found)
}

/// `detect` on a path (for the tools, which work on paths rather than descriptors).
pub fn detect_path(root: &std::path::Path) -> std::io::Result<Found> {
    let dir = std::fs::File::open(root)?;
    use std::os::fd::AsFd;
    detect(dir.as_fd())
}

/// The store directory in `root` (a backing directory), of whichever layout, as listed: its
/// path and layout; `None` when there is none (or `root` cannot be listed). Looks only.
pub fn find_store(root: &std::path::Path) -> Option<(std::path::PathBuf, StoreLayout)> {
    use std::os::unix::ffi::OsStrExt;
    let found = detect_path(root).ok()?;
    let layout = found.layout()?;
    let name = match (layout, &found.short) {
        (StoreLayout::Short83, Some(listed)) => std::ffi::OsStr::from_bytes(listed).to_owned(),
        _ => layout.store_dir().into(),
    };
    Some((root.join(name), layout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_8_3_name_is_an_upper_case_8_3_name_and_parses_back_in_any_case() {
        let l = StoreLayout::Short83;
        let mut names = vec![
            l.store_dir().to_string(),
            l.inodes_dir().into(),
            l.staging_dir().into(),
            l.parts_dir().into(),
            l.owner_mark().into(),
            l.recovered_dir(1),
            l.recovered_dir(99),
            l.part_file(1),
            l.staged_file(4242, 7),
            l.recovered_inode(u64::MAX),
            l.recovered_parts(3),
            l.recovered_suffixed("0000002A.LNK", 2),
        ];
        for g in [1u64, 0xff, u64::from(u32::MAX)] {
            for kind in [StoreFile::Checkpoint, StoreFile::Journal] {
                let name = l.store_file(kind, g).expect("fits");
                assert_eq!(
                    l.parse_store_file(name.as_bytes()),
                    Some((kind, g)),
                    "{name}"
                );
                let lower = name.to_ascii_lowercase();
                assert_eq!(
                    l.parse_store_file(lower.as_bytes()),
                    Some((kind, g)),
                    "{lower}"
                );
                for n in [0, 1, 99] {
                    let bad = l.corrupt_name(&name, n);
                    assert_eq!(l.parse_store_file(bad.as_bytes()), None, "{bad}");
                    names.push(bad);
                }
                names.push(name);
            }
            let inode = l.inode_file(g).expect("fits");
            assert_eq!(
                l.parse_inode_file(inode.to_ascii_lowercase().as_bytes()),
                Some(g)
            );
            let parts = l.parts_id_dir(g).expect("fits");
            assert_eq!(
                l.parse_parts_id_dir(parts.to_ascii_lowercase().as_bytes()),
                Some(g)
            );
            names.extend([inode, parts]);
        }
        for name in &names {
            assert!(
                crate::fatrules::check_short_name(name.as_bytes()).is_ok(),
                "expected an upper-case 8.3 name, got {name:?}: {:?}",
                crate::fatrules::check_short_name(name.as_bytes())
            );
        }
    }

    #[test]
    fn ids_past_32_bits_are_refused_in_8_3_with_a_clear_error() {
        let l = StoreLayout::Short83;
        let big = u64::from(u32::MAX) + 1;
        let err = l.inode_file(big).expect_err("too large");
        assert!(err.to_string().contains("names=long"), "got {err}");
        assert!(l.store_file(StoreFile::Journal, big).is_err());
        assert!(l.parts_id_dir(big).is_err());
        assert_eq!(
            StoreLayout::Long.inode_file(big).unwrap(),
            "0000000100000000"
        );
    }

    #[test]
    fn the_long_layout_is_the_format_1_layout() {
        let l = StoreLayout::Long;
        assert_eq!(l.store_dir(), ".pershome");
        assert_eq!(
            l.store_file(StoreFile::Journal, 1).unwrap(),
            "journal.0000000000000001"
        );
        assert_eq!(
            l.store_file(StoreFile::Checkpoint, 255).unwrap(),
            "checkpoint.00000000000000ff"
        );
        assert_eq!(
            l.corrupt_name("journal.0000000000000001", 0),
            "journal.0000000000000001.corrupt"
        );
        assert_eq!(
            l.corrupt_name("journal.0000000000000001", 2),
            "journal.0000000000000001.corrupt.2"
        );
        assert_eq!(l.inode_file(1).unwrap(), "0000000000000001");
        assert_eq!(l.parts_id_dir(0xab).unwrap(), "00000000000000ab");
        assert_eq!(l.part_file(2), "00000002");
        assert_eq!(l.staged_file(0x10, 3), "10-3");
        assert_eq!(l.recovered_dir(1), "pershome-recovered");
        assert_eq!(l.recovered_inode(0xaa), "inode-00000000000000aa");
        assert_eq!(l.recovered_parts(0xab), "parts-00000000000000ab");
        assert_eq!(l.owner_mark(), "owner-name");
        // Upper-case hex is not a long name.
        assert_eq!(l.parse_store_file(b"journal.000000000000000F"), None);
        assert_eq!(l.parse_inode_file(b"000000000000000A"), None);
    }
}
