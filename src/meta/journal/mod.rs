//! The store files under `<backing root>/.pershome/`: checkpoints, journals, and recovery
//! (format 1, see `docs/format.md`).
//!
//! This module owns every byte written to or read from the store directory and the order of
//! those writes (the crash-safety protocol). It must never:
//! - rewrite committed bytes (flash wear: a journal only grows, a checkpoint is written once),
//! - rely on rename-over (not atomic on FAT), or overwrite or delete the last good checkpoint
//!   before its successor is durable,
//! - touch anything in ReadOnly mode, or touch names in the store directory it does not
//!   recognise,
//! - follow a symlink, panic, or allocate without bound on what it reads: every file is
//!   attacker-controlled.
//!
//! Corruption never fails an open (a mountable home matters more): it is recovered from as far
//! as possible and reported in `Recovered::warnings`. Only I/O errors, a newer format, a store
//! that is not a directory, or a file too large to read fail it.

//!
//! Code map (each part can be read on its own):
//! - `format`: the bytes of a store file: names, headers, frames, building and scanning a
//!   checkpoint, replaying a journal. Pure: no I/O.
//! - `file_io`: every system call on the store directory, with the injected-fault gate and
//!   the write counters.
//! - `append`: committing one batch to the live journal.
//! - `checkpoint`: writing a new generation and retiring the old one (compaction).
//! - `recovery`: opening the store and choosing what to trust after a crash or damage.

mod append;
mod base;
mod checkpoint;
mod file_io;
mod format;
mod recovery;
#[cfg(test)]
mod tests;

pub use append::fits_in_one_batch;
pub use base::{BaseCheckpoint, BaseChild};
pub use format::MAX_FRAME_LEN;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::errno::Errno;

use super::layout::{StoreFile as Kind, StoreLayout};
use super::pending::Replayed;
use super::Record;
use crate::faults::Faults;

/// The newest on-stick format this code reads and writes. Format 2 adds files stored in parts
/// (record tags 7 and 8); a generation is written as format 2 only when it holds such a record,
/// so a stick without parted files stays readable by a format-1 pershome.
pub const FORMAT_VERSION: u32 = 2;

/// The format of a generation without parted files.
pub const BASE_FORMAT_VERSION: u32 = 1;

/// The format a generation holding `records` must declare.
pub fn version_for(records: &[Record]) -> u32 {
    if records.iter().any(Record::needs_format_2) {
        2
    } else {
        BASE_FORMAT_VERSION
    }
}

/// No store file is read if it is larger than this. Files are read one frame at a time (at
/// most `MAX_FRAME_LEN` bytes in memory), so this bounds the time a hostile file costs, not
/// the memory.
pub const MAX_FILE_LEN: u64 = 1 << 30;

/// How the store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Recover, repair, and accept appends and checkpoints.
    ReadWrite,
    /// Recover in memory only; nothing on the stick is created, changed or removed.
    ReadOnly,
    /// As `ReadOnly`, without taking or waiting for the lock: for `pershome fsck --force`,
    /// which looks at the store of a mounted stick. What it reads may be a batch being
    /// written (seen as a torn tail); it must never be used to write.
    ReadOnlyUnlocked,
}

/// Counters of metadata I/O, to measure flash wear against data bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes handed to `pwrite` for store files.
    pub bytes: u64,
    /// `pwrite` and `ftruncate` calls on store files.
    pub writes: u64,
    /// `fsync`/`fdatasync` calls on store files and the store directory.
    pub syncs: u64,
}

/// What `Journal::open` recovered.
#[derive(Debug)]
pub struct Recovered {
    /// The state: checkpoint records, then every intact journal batch, in commit order.
    pub replayed: Replayed,
    /// The generation now in use (0 only for a ReadOnly open of a store that does not exist).
    pub generation: u64,
    /// What was found wrong and what was done about it, in plain words. Empty after a clean
    /// shutdown.
    pub warnings: Vec<String>,
    /// True when this open created the store (ReadWrite, no store files before).
    pub created: bool,
    /// A lazy open (`open_lazy_in`) had to replay the base checkpoint into memory because
    /// its records are not in checkpoint order (an earlier pershome wrote it): the next
    /// compaction writes it in order, and the daemon makes one at unmount.
    pub unordered_base: bool,
}

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the metadata on this stick is in format {found}, newer than this pershome \
         (format {supported}); update pershome to use this stick"
    )]
    NewerFormat { found: u32, supported: u32 },
    #[error("{0}")]
    NotADirectory(String),
    #[error("the metadata store was opened read-only")]
    ReadOnly,
    #[error("store file {name} is {size} bytes, more than the {MAX_FILE_LEN} bytes allowed")]
    TooLarge { name: String, size: u64 },
    #[error("a batch of {bytes} bytes would grow the journal past {MAX_FILE_LEN} bytes; checkpoint first")]
    BatchTooLarge { bytes: u64 },
    #[error("the store's generation number is exhausted")]
    GenerationOverflow,
    #[error(
        "the batch describes a file stored in parts, which the current journal (format \
         {current}) may not hold; write a new generation (checkpoint) instead"
    )]
    NeedsNewerFormat { current: u32 },
    #[error(
        "the metadata store is in use: this stick is already mounted by pershomefs (or being \
         checked); unmount it first"
    )]
    Busy,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(Errno) -> StoreError {
    let context = context.into();
    move |e| StoreError::Io {
        context,
        source: e.into(),
    }
}

/// `io_err` for the errors of `backing::sys`.
fn sys_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// How long `open` waits for another user of the store to let go of it.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The metadata store of one backing directory, open.
#[derive(Debug)]
pub struct Journal {
    mode: OpenMode,
    /// The store directory; None only for a ReadOnly open of a missing store.
    dir: Option<OwnedFd>,
    /// The current journal file, open for writing (ReadWrite only).
    file: Option<OwnedFd>,
    generation: u64,
    /// Bytes of the current journal that hold its header and intact batches.
    len: u64,
    /// A failed append may have left bytes past `len`; they are cut off before the next one
    /// so a shorter batch cannot be followed by the remains of a longer one.
    tail_dirty: bool,
    stats: WriteStats,
    /// Injected failures (tests only); None costs one branch per write.
    faults: Option<Arc<Faults>>,
    /// The format version in the current journal's header, once known (read lazily).
    live_version: Option<u32>,
    /// Which names the store's files have (see `meta::layout`).
    layout: StoreLayout,
    /// The store's files as listed at recovery, where a listing shows a name in another case
    /// than the one this module writes (a `msdos` mount lists 8.3 names in lower case): the
    /// listed name is the one opened, renamed and removed.
    listed: BTreeMap<(Kind, u64), String>,
    /// Recover with the base checkpoint read lazily (`base`), when it can be: the daemon's
    /// open. Tools that walk the whole store (fsck) replay it into memory.
    lazy: bool,
    /// The chunk index of the checkpoint this writer wrote last, when its records were in
    /// path order: `take_written_base` opens it as the new lazily read base.
    written_index: Option<(u64, Vec<base::Chunk>)>,
}

impl Journal {
    /// Test hook: fail the store's later writes as `faults` says (see `Faults`).
    pub fn set_faults(&mut self, faults: Arc<Faults>) {
        self.faults = Some(faults);
    }

    /// Bytes in the current journal (header included).
    pub fn journal_len(&self) -> u64 {
        self.len
    }

    pub fn stats(&self) -> WriteStats {
        self.stats
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}
