//! The metadata store: everything FAT cannot hold (modes, owners, nanosecond times, xattrs,
//! symlink and hard-link bookkeeping), kept on the stick under `.pershome/` at the root of the
//! backing directory (`PERSHOME.DB/` on an 8.3 stick: `layout` names every file of both).
//!
//! This module owns the on-stick format (see `docs/format.md`): the record types, their binary
//! encoding (`codec`), and the checkpoint + journal files with their recovery rules (`journal`).
//! It never interprets POSIX semantics and knows nothing of FUSE: the filesystem layer decides
//! what to record, this module makes it durable and reads it back, treating every byte on the
//! stick as attacker-controlled.

pub mod codec;
pub mod journal;
pub mod layout;
pub mod moved;
pub mod pending;

pub use crate::faults::Faults;
pub use journal::{Journal, OpenMode, Recovered, StoreError, WriteStats, FORMAT_VERSION};
pub use pending::PendingTree;

/// The name of the store directory at the root of the backing directory of a long-name stick
/// (`layout::StoreLayout::store_dir` gives either layout's). It is FAT-legal, and the name
/// mapping escapes a user's own file of that name at the root so the two never meet.
pub const STORE_DIR: &str = ".pershome";

/// The stored uid or gid that stands for "whoever mounts the stick" (design property 8: uid
/// numbers differ between the lab and the library). `u32::MAX` is `(uid_t)-1`, which chown(2)
/// treats as "no change", so no real file can be owned by it.
pub const OWNER_ID: u32 = u32::MAX;

/// A point in time as stored: seconds since the epoch (may be negative) and nanoseconds.
/// Packed to 12 bytes (from 16: the padding after `nsec`): every inode in memory holds five
/// (issue 14, Scale: memory per looked-up entry). Fields are read by value, never by reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(C, packed(4))]
pub struct Timespec {
    pub sec: i64,
    /// Always below 1,000,000,000; the decoder rejects anything else.
    pub nsec: u32,
}

/// The metadata of one inode, as stored. A component of a record, never a whole record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// The full `st_mode`: file type bits and permission bits, setuid/setgid/sticky included.
    pub mode: u32,
    /// Stored owner; `OWNER_ID` means the mounting user.
    pub uid: u32,
    /// Stored group; `OWNER_ID` means the mounting user's group.
    pub gid: u32,
    /// Device number of a character or block device node; 0 otherwise.
    pub rdev: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub btime: Timespec,
    /// Extended attributes, sorted by name, names unique. Names are full (`user.foo`).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For a hard-linked file: the id of its entry in the inode table. The record that carries
    /// this is a name only; the inode's own metadata is the `PutInode` record of that id.
    pub link: Option<u64>,
    /// The POSIX name when it cannot be recovered by decoding the backing name (hashed names,
    /// names disambiguated after a clash made on another computer).
    pub name: Option<Vec<u8>>,
    /// What the backing file looked like after pershome last changed it: its size and mtime.
    /// A difference at the next mount means another computer changed the file.
    pub backing_size: u64,
    pub backing_mtime: Timespec,
    /// For a hard-link inode table entry (`PutInode`): the link count. 0 elsewhere.
    pub nlink: u32,
    /// For a file stored in parts (format 2, see docs/format.md § Parts): where its further
    /// parts live and how long each part is. `None` for every other file.
    pub parts: Option<Parts>,
}

/// A file stored in parts: the backing file at its name (or `.pershome/inodes/<link>`) holds
/// the first `size` bytes, and `.pershome/parts/<id>/<k>` holds bytes `k*size ..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Parts {
    /// Names the directory `.pershome/parts/<id as 16 hex digits>`; never 0.
    pub id: u64,
    /// Bytes per part: a multiple of `PART_ALIGN`, from `MIN_PART_SIZE` to `MAX_PART_SIZE`.
    pub size: u64,
}

/// Parts are whole multiples of this (the page size, so part boundaries never split a page).
pub const PART_ALIGN: u64 = 4096;
/// The smallest part size a record may hold (tests use tiny parts to cross boundaries often).
pub const MIN_PART_SIZE: u64 = PART_ALIGN;
/// The largest part size: the largest multiple of `PART_ALIGN` a FAT32 file can hold.
pub const MAX_PART_SIZE: u64 = (crate::fatrules::MAX_FILE_SIZE / PART_ALIGN) * PART_ALIGN;

impl Record {
    /// Whether this record can only be written to a format-2 store file (it describes a file
    /// stored in parts, which a format-1 reader would misread as a short file).
    pub fn needs_format_2(&self) -> bool {
        match self {
            Record::Put { meta, .. } | Record::PutInode { meta, .. } => meta.parts.is_some(),
            _ => false,
        }
    }
}

/// One change to the store. A path is the list of backing names from the backing root down to
/// the entry (never empty, no component empty, `.`, `..` or containing `/` or NUL: the decoder
/// rejects those, so a path can never leave the backing directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Sets the metadata of the entry at `path`, creating intermediate nodes as needed.
    Put { path: Vec<Vec<u8>>, meta: Meta },
    /// Removes the entry at `path` and everything below it. Removing a missing path is a no-op.
    Remove { path: Vec<Vec<u8>> },
    /// Moves the entry at `from` (with everything below it) to `to`, replacing what was at `to`.
    /// A missing `from` leaves `to` removed.
    Rename {
        from: Vec<Vec<u8>>,
        to: Vec<Vec<u8>>,
    },
    /// Swaps the subtrees at `a` and `b` (either may be missing).
    Exchange { a: Vec<Vec<u8>>, b: Vec<Vec<u8>> },
    /// Sets the metadata of hard-link inode `id` (its content is `.pershome/inodes/<id>`).
    PutInode { id: u64, meta: Meta },
    /// Drops hard-link inode `id`.
    RemoveInode { id: u64 },
}
