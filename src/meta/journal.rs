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

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, Mode, SFlag};
use nix::sys::uio::{pread, pwrite};
use nix::unistd::{fdatasync, fsync, ftruncate, unlinkat, UnlinkatFlags};

use super::codec::{decode_all, encode_record};
use super::pending::Replayed;
use super::Record;
use crate::faults::{torn_len, Faults, Gate};

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

/// No store file is read if it is larger than this: whole files are read into memory, and a
/// stick must not be able to make the daemon allocate without bound.
pub const MAX_FILE_LEN: u64 = 1 << 30;

/// Header of both file kinds: magic (8), version u32 LE, generation u64 LE, crc32c of the 20
/// bytes before it, u32 LE.
const HEADER_LEN: usize = 24;
const JOURNAL_MAGIC: [u8; 8] = *b"PSHMJRNL";
const CHECKPOINT_MAGIC: [u8; 8] = *b"PSHMCKPT";

/// Frame: magic u32 LE, payload length u32 LE, crc u32 LE, payload.
const FRAME_HEADER_LEN: usize = 12;
const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"PSHB");
const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"PSHC");
const TRAILER_MAGIC: u32 = u32::from_le_bytes(*b"PSHT");
/// Trailer payload: record count u64 LE, crc32c of every file byte before the trailer frame.
const TRAILER_PAYLOAD_LEN: usize = 12;
/// A checkpoint chunk frame is closed once its payload reaches this size, so that a torn or
/// corrupt checkpoint still yields most of its records when salvaged.
const CHUNK_TARGET: usize = 64 * 1024;

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
}

// ---------------------------------------------------------------------------------------------
// File names
// ---------------------------------------------------------------------------------------------

use super::layout::{StoreFile as Kind, StoreLayout};

/// The long layout's name of a store file (the tests' and `parse_name`'s form).
#[cfg(test)]
fn file_name(kind: Kind, generation: u64) -> String {
    StoreLayout::Long
        .store_file(kind, generation)
        .unwrap_or_default()
}

/// The long layout's parse (the tests' form).
#[cfg(test)]
fn parse_name(name: &[u8]) -> Option<(Kind, u64)> {
    StoreLayout::Long.parse_store_file(name)
}

// ---------------------------------------------------------------------------------------------
// Pure layout: headers, frames, file scans (no I/O, tested directly)
// ---------------------------------------------------------------------------------------------

fn magic_of(kind: Kind) -> &'static [u8; 8] {
    match kind {
        Kind::Checkpoint => &CHECKPOINT_MAGIC,
        Kind::Journal => &JOURNAL_MAGIC,
    }
}

fn encode_header(kind: Kind, generation: u64) -> Vec<u8> {
    encode_header_version(kind, generation, BASE_FORMAT_VERSION)
}

fn encode_header_version(kind: Kind, generation: u64, version: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(magic_of(kind));
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&generation.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

#[derive(Debug, PartialEq, Eq)]
enum HeaderProblem {
    Short(usize),
    BadMagic,
    BadChecksum,
    Newer(u32),
    BadVersion(u32),
    WrongGeneration(u64),
}

impl HeaderProblem {
    fn describe(&self) -> String {
        match self {
            HeaderProblem::Short(n) => format!("only {n} of its {HEADER_LEN} header bytes exist"),
            HeaderProblem::BadMagic => "its header does not start with the pershome magic".into(),
            HeaderProblem::BadChecksum => "its header checksum does not match".into(),
            HeaderProblem::Newer(v) => format!("it is in the newer format {v}"),
            HeaderProblem::BadVersion(v) => format!("its header claims format {v}"),
            HeaderProblem::WrongGeneration(g) => {
                format!("its header names generation {g}, not the one in its file name")
            }
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks a file header. The version is trusted only once the header checksum matches, so a
/// flipped bit reads as corruption (recovered from) rather than as a newer format (refused).
/// Every later format keeps this 24-byte header, checksum included.
fn check_header(bytes: &[u8], kind: Kind, generation: u64) -> Result<(), HeaderProblem> {
    if bytes.len() < HEADER_LEN {
        return Err(HeaderProblem::Short(bytes.len()));
    }
    if bytes[..8] != magic_of(kind)[..] {
        return Err(HeaderProblem::BadMagic);
    }
    if crc32c::crc32c(&bytes[..20]) != u32_at(bytes, 20) {
        return Err(HeaderProblem::BadChecksum);
    }
    let version = u32_at(bytes, 8);
    if version > FORMAT_VERSION {
        return Err(HeaderProblem::Newer(version));
    }
    if version == 0 {
        return Err(HeaderProblem::BadVersion(version));
    }
    let found = u64_at(bytes, 12);
    if found != generation {
        return Err(HeaderProblem::WrongGeneration(found));
    }
    Ok(())
}

/// The frame checksum is crc32c of the payload, seeded with the generation: a frame left in a
/// reused FAT cluster by an older generation's file (which a crash can expose past the end of
/// what was really written) can then never pass for a frame of this one.
fn frame_crc(generation: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&generation.to_le_bytes()), payload)
}

fn push_frame(out: &mut Vec<u8>, magic: u32, generation: u64, payload: &[u8]) {
    // Payloads are bounded by MAX_FILE_LEN (< 4 GiB) before they get here.
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame_crc(generation, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// A frame read from a file.
enum Frame<'a> {
    /// A frame whose length fits the file and whose checksum matches.
    Good { magic: u32, payload: &'a [u8] },
    /// The file ends inside the frame.
    Torn(String),
    /// The checksum does not match.
    Bad(String),
}

fn read_frame(bytes: &[u8], at: usize, generation: u64) -> Frame<'_> {
    let left = bytes.len().saturating_sub(at);
    if left < FRAME_HEADER_LEN {
        return Frame::Torn(format!("the file ends {left} bytes into a frame header"));
    }
    let magic = u32_at(bytes, at);
    let len = u32_at(bytes, at + 4) as usize;
    let crc = u32_at(bytes, at + 8);
    let start = at + FRAME_HEADER_LEN;
    if len > bytes.len() - start {
        return Frame::Torn(format!(
            "a frame claims {len} bytes but the file ends {} bytes later",
            bytes.len() - start
        ));
    }
    let payload = &bytes[start..start + len];
    if frame_crc(generation, payload) != crc {
        return Frame::Bad("a frame's checksum does not match".into());
    }
    Frame::Good { magic, payload }
}

/// What a checkpoint file yielded.
#[derive(Debug)]
struct CheckpointScan {
    /// The records of every intact chunk before the first problem.
    records: Vec<Record>,
    /// True only when the trailer was found and agrees with the whole file.
    complete: bool,
    problem: Option<String>,
}

/// Reads a checkpoint whose header is already checked.
fn scan_checkpoint(bytes: &[u8], generation: u64) -> CheckpointScan {
    let mut records = Vec::new();
    let mut at = HEADER_LEN;
    let fail = |records, why: String| CheckpointScan {
        records,
        complete: false,
        problem: Some(why),
    };
    loop {
        let (magic, payload) = match read_frame(bytes, at, generation) {
            Frame::Good { magic, payload } => (magic, payload),
            Frame::Torn(why) | Frame::Bad(why) => {
                return fail(records, format!("at byte {at}: {why}"));
            }
        };
        match magic {
            CHUNK_MAGIC => match decode_all(payload) {
                Ok(mut r) => records.append(&mut r),
                Err(e) => {
                    return fail(records, format!("in the frame at byte {at}: {e}"));
                }
            },
            TRAILER_MAGIC => {
                if payload.len() != TRAILER_PAYLOAD_LEN {
                    return fail(
                        records,
                        format!("the trailer at byte {at} has a bad length"),
                    );
                }
                let count = u64_at(payload, 0);
                let file_crc = u32_at(payload, 8);
                let held = records.len();
                if count != held as u64 {
                    return fail(
                        records,
                        format!("the trailer counts {count} records, the frames hold {held}"),
                    );
                }
                if crc32c::crc32c(&bytes[..at]) != file_crc {
                    return fail(
                        records,
                        "the trailer's whole-file checksum does not match".into(),
                    );
                }
                let end = at + FRAME_HEADER_LEN + payload.len();
                let problem = (end != bytes.len()).then(|| {
                    format!(
                        "{} stray bytes follow the trailer (ignored)",
                        bytes.len() - end
                    )
                });
                return CheckpointScan {
                    records,
                    complete: true,
                    problem,
                };
            }
            other => {
                return fail(
                    records,
                    format!("unknown frame type {other:#010x} at byte {at}"),
                );
            }
        }
        at += FRAME_HEADER_LEN + payload.len();
    }
}

/// Builds a whole checkpoint file.
fn build_checkpoint(generation: u64, records: &[Record]) -> Vec<u8> {
    let mut file = encode_header_version(Kind::Checkpoint, generation, version_for(records));
    let mut chunk = Vec::new();
    for r in records {
        encode_record(r, &mut chunk);
        if chunk.len() >= CHUNK_TARGET {
            push_frame(&mut file, CHUNK_MAGIC, generation, &chunk);
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        push_frame(&mut file, CHUNK_MAGIC, generation, &chunk);
    }
    let mut trailer = Vec::with_capacity(TRAILER_PAYLOAD_LEN);
    trailer.extend_from_slice(&(records.len() as u64).to_le_bytes());
    trailer.extend_from_slice(&crc32c::crc32c(&file).to_le_bytes());
    push_frame(&mut file, TRAILER_MAGIC, generation, &trailer);
    file
}

/// What a journal file yielded.
#[derive(Debug)]
struct JournalScan {
    batches: usize,
    /// End of the last intact batch: where the next batch goes.
    good_end: usize,
    problem: Option<String>,
    /// An intact batch frame exists after the first bad one: the damage is not a torn tail
    /// from a crash but corruption, and the file is kept for fsck instead of being cut.
    intact_after_problem: bool,
}

/// Replays a journal whose header is already checked into `state`, batch by batch, stopping
/// at the first batch that is torn, fails its checksum or does not decode.
fn replay_journal(bytes: &[u8], generation: u64, state: &mut Replayed) -> JournalScan {
    let mut at = HEADER_LEN;
    let mut batches = 0;
    while at < bytes.len() {
        let why = match read_frame(bytes, at, generation) {
            Frame::Good { magic, payload } if magic == BATCH_MAGIC => match decode_all(payload) {
                Ok(records) => {
                    for r in records {
                        state.apply(r);
                    }
                    batches += 1;
                    at += FRAME_HEADER_LEN + payload.len();
                    continue;
                }
                Err(e) => format!("the batch at byte {at} does not decode: {e}"),
            },
            Frame::Good { magic, .. } => {
                format!("unknown frame type {magic:#010x} at byte {at}")
            }
            Frame::Torn(why) | Frame::Bad(why) => format!("at byte {at}: {why}"),
        };
        return JournalScan {
            batches,
            good_end: at,
            problem: Some(why),
            intact_after_problem: intact_frame_after(bytes, at + 1, generation),
        };
    }
    JournalScan {
        batches,
        good_end: at,
        problem: None,
        intact_after_problem: false,
    }
}

/// Whether an intact batch frame starts anywhere at or after `from`. A stick could plant a
/// frame magic at every offset, each claiming a long payload, to make this search quadratic:
/// the bytes checksummed are capped at twice the file, and running out counts as "yes" (the
/// cautious answer: the file is kept as evidence rather than cut).
fn intact_frame_after(bytes: &[u8], from: usize, generation: u64) -> bool {
    let mut budget = bytes.len().saturating_mul(2);
    for later in from..bytes.len() {
        if bytes.len() - later < FRAME_HEADER_LEN || u32_at(bytes, later) != BATCH_MAGIC {
            continue;
        }
        let len = u32_at(bytes, later + 4) as usize;
        if len > bytes.len() - later - FRAME_HEADER_LEN {
            continue;
        }
        if len > budget {
            return true;
        }
        budget -= len;
        if matches!(read_frame(bytes, later, generation), Frame::Good { .. }) {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Store directory I/O
// ---------------------------------------------------------------------------------------------

fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

fn open_at(dir: &OwnedFd, name: &str, flags: OFlag, mode: Mode) -> Result<OwnedFd, Errno> {
    let fd = openat(Some(raw(dir)), name, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: openat just returned this descriptor, so it is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_regular(fd: &OwnedFd) -> Result<bool, Errno> {
    let st = fstat(raw(fd))?;
    Ok(SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG)
}

/// Opens a store file for reading: no symlink is followed, and O_NONBLOCK keeps a fifo that a
/// stick planted under a store name from hanging the open. None if it is not a regular file.
fn open_for_read(dir: &OwnedFd, sd: &str, name: &str) -> Result<Option<OwnedFd>, StoreError> {
    let fd = open_at(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
        Mode::empty(),
    );
    let fd = match fd {
        Ok(fd) => fd,
        // A symlink under a store name: not ours, and never followed.
        Err(Errno::ELOOP) => return Ok(None),
        Err(e) => return Err(io_err(format!("opening {sd}/{name}"))(e)),
    };
    if !is_regular(&fd).map_err(io_err(format!("examining {sd}/{name}")))? {
        return Ok(None);
    }
    Ok(Some(fd))
}

fn read_at_most(fd: &OwnedFd, sd: &str, name: &str, want: usize) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; want];
    let mut got = 0;
    while got < want {
        match pread(fd.as_fd(), &mut buf[got..], got as i64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io_err(format!("reading {sd}/{name}"))(e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Reads a whole store file; None if it is not a regular file.
fn read_file(dir: &OwnedFd, sd: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(fd) = open_for_read(dir, sd, name)? else {
        return Ok(None);
    };
    let st = fstat(raw(&fd)).map_err(io_err(format!("examining {sd}/{name}")))?;
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size > MAX_FILE_LEN {
        return Err(StoreError::TooLarge {
            name: format!("{sd}/{name}"),
            size,
        });
    }
    // Cannot truncate: size <= MAX_FILE_LEN.
    read_at_most(&fd, sd, name, size as usize).map(Some)
}

fn read_header(dir: &OwnedFd, sd: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(fd) = open_for_read(dir, sd, name)? else {
        return Ok(None);
    };
    read_at_most(&fd, sd, name, HEADER_LEN).map(Some)
}

/// The recognised files of the store, by generation.
#[derive(Debug, Default, Clone, Copy)]
struct GenFiles {
    checkpoint: bool,
    journal: bool,
}

#[allow(clippy::type_complexity)]
fn list_store(
    dir: &OwnedFd,
    layout: StoreLayout,
) -> Result<(BTreeMap<u64, GenFiles>, BTreeMap<(Kind, u64), String>), StoreError> {
    let sd = layout.store_dir();
    let mut d = Dir::openat(
        Some(raw(dir)),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err(format!("listing {sd}")))?;
    let mut gens: BTreeMap<u64, GenFiles> = BTreeMap::new();
    let mut listed = BTreeMap::new();
    for entry in d.iter() {
        let entry = entry.map_err(io_err(format!("listing {sd}")))?;
        let name = entry.file_name().to_bytes();
        if let Some((kind, generation)) = layout.parse_store_file(name) {
            if layout
                .store_file(kind, generation)
                .ok()
                .as_deref()
                .map(str::as_bytes)
                != Some(name)
            {
                listed.insert(
                    (kind, generation),
                    String::from_utf8_lossy(name).into_owned(),
                );
            }
            let files = gens.entry(generation).or_default();
            match kind {
                Kind::Checkpoint => files.checkpoint = true,
                Kind::Journal => files.journal = true,
            }
        }
    }
    Ok((gens, listed))
}

/// The error an injected fault gives: what a pulled stick gives.
fn injected(context: String) -> StoreError {
    StoreError::Io {
        context: format!("{context} (injected fault)"),
        source: Errno::EIO.into(),
    }
}

impl Journal {
    /// The name of a store file of this layout, as listed when the listing showed it in
    /// another case. Refused (not a panic) past the 8.3 layout's 32-bit generations.
    fn name_of(&self, kind: Kind, generation: u64) -> Result<String, StoreError> {
        if let Some(listed) = self.listed.get(&(kind, generation)) {
            return Ok(listed.clone());
        }
        self.layout
            .store_file(kind, generation)
            .map_err(|e| StoreError::Io {
                context: "naming the next store file".into(),
                source: std::io::Error::other(e.to_string()),
            })
    }

    /// Test hook: fail the store's later writes as `faults` says (see `Faults`).
    pub fn set_faults(&mut self, faults: Arc<Faults>) {
        self.faults = Some(faults);
    }

    /// Consults the injected faults, if any, before a write-like system call.
    fn gate(&self) -> Gate {
        match &self.faults {
            None => Gate::Go,
            Some(f) => f.gate(),
        }
    }

    /// `gate` for an operation that cannot be torn: Err if it must fail.
    fn gate_op(&self, context: impl FnOnce() -> String) -> Result<(), StoreError> {
        match self.gate() {
            Gate::Go => Ok(()),
            Gate::Fail { .. } => Err(injected(context())),
        }
    }

    fn dir(&self) -> Result<&OwnedFd, StoreError> {
        match (self.mode, &self.dir) {
            (OpenMode::ReadWrite, Some(dir)) => Ok(dir),
            _ => Err(StoreError::ReadOnly),
        }
    }

    fn write_all_at(
        &mut self,
        fd: &OwnedFd,
        name: &str,
        buf: &[u8],
        offset: u64,
    ) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            if let Gate::Fail { torn } = self.gate() {
                if torn {
                    let part = &buf[done..done + torn_len(buf.len() - done)];
                    if !part.is_empty() {
                        self.stats.writes += 1;
                        self.stats.bytes += part.len() as u64;
                        // The error of a torn write is the injected one, whatever this gives.
                        let _ = pwrite(fd.as_fd(), part, at as i64);
                    }
                }
                return Err(injected(format!("writing {sd}/{name}")));
            }
            let res = pwrite(fd.as_fd(), &buf[done..], at as i64);
            self.stats.writes += 1;
            match res {
                Ok(0) => {
                    return Err(StoreError::Io {
                        context: format!("writing {sd}/{name}"),
                        source: std::io::Error::from(std::io::ErrorKind::WriteZero),
                    })
                }
                Ok(n) => {
                    done += n;
                    self.stats.bytes += n as u64;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io_err(format!("writing {sd}/{name}"))(e)),
            }
        }
        Ok(())
    }

    fn sync_file(&mut self, fd: &OwnedFd, name: &str, data_only: bool) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        self.gate_op(|| format!("syncing {sd}/{name}"))?;
        self.stats.syncs += 1;
        let res = if data_only {
            fdatasync(raw(fd))
        } else {
            fsync(raw(fd))
        };
        res.map_err(io_err(format!("syncing {sd}/{name}")))?;
        if let Some(p) = self.faults.as_deref().and_then(Faults::power) {
            p.synced(fd.as_fd());
        }
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        let dir = self.dir()?.as_raw_fd();
        self.gate_op(|| format!("syncing the directory {sd}"))?;
        self.stats.syncs += 1;
        fsync(dir).map_err(io_err(format!("syncing the directory {sd}")))?;
        if let (Some(p), Ok(dir)) = (self.faults.as_deref().and_then(Faults::power), self.dir()) {
            p.synced(dir.as_fd());
        }
        Ok(())
    }

    fn unlink(&mut self, name: &str) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        let dir = self.dir()?.as_raw_fd();
        self.gate_op(|| format!("removing {sd}/{name}"))?;
        let power = self.faults.as_deref().and_then(Faults::power);
        let victim = power.and_then(|p| p.inode_at(self.dir().ok()?.as_fd(), name.as_bytes()));
        let res = unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir);
        if let (Some(p), Ok(())) = (power, &res) {
            p.forget(victim);
        }
        if matches!(res, Ok(()) | Err(Errno::ENOENT)) {
            self.listed.retain(|_, listed| listed != name);
        }
        match res {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(io_err(format!("removing {sd}/{name}"))(e)),
        }
    }

    /// Creates a file that must not exist yet (a leftover of a failed attempt is removed
    /// first: no file of a generation not yet in use holds anything committed), writes
    /// `contents`, and makes it and its directory entry durable. Returns the open file.
    fn create_durable(&mut self, name: &str, contents: &[u8]) -> Result<OwnedFd, StoreError> {
        let sd = self.layout.store_dir();
        self.unlink(name)?;
        self.gate_op(|| format!("creating {sd}/{name}"))?;
        let fd = open_at(
            self.dir()?,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(io_err(format!("creating {sd}/{name}")))?;
        self.write_all_at(&fd, name, contents, 0)?;
        // A full fsync: the file's size is metadata the data cannot be found without.
        self.sync_file(&fd, name, false)?;
        self.sync_dir()?;
        Ok(fd)
    }

    /// Writes generation `generation` completely: its checkpoint of `records` (unless it is
    /// the empty generation 1, which has none) and its empty journal, in the order that keeps
    /// the older generation authoritative until both are durable.
    fn write_generation(
        &mut self,
        generation: u64,
        records: &[Record],
    ) -> Result<OwnedFd, StoreError> {
        let sd = self.layout.store_dir();
        let checkpoint = build_checkpoint(generation, records);
        if checkpoint.len() as u64 > MAX_FILE_LEN {
            return Err(StoreError::TooLarge {
                name: format!("{sd}/{}", self.name_of(Kind::Checkpoint, generation)?),
                size: checkpoint.len() as u64,
            });
        }
        let ck_name = self.name_of(Kind::Checkpoint, generation)?;
        let j_name = self.name_of(Kind::Journal, generation)?;
        let result = self.create_durable(&ck_name, &checkpoint).and_then(|_| {
            self.create_durable(
                &j_name,
                &encode_header_version(Kind::Journal, generation, version_for(records)),
            )
        });
        if result.is_err() {
            // Best effort: the older generation is still the authoritative one either way,
            // and recovery removes these if they survive.
            let _ = self.unlink(&j_name);
            let _ = self.unlink(&ck_name);
        }
        result
    }

    /// Commits one batch: it is entirely on the stick (or, after a crash, entirely absent at
    /// recovery) when this returns Ok. An empty batch writes nothing.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.dir()?;
        if records.is_empty() {
            return Ok(());
        }
        if records.iter().any(Record::needs_format_2) {
            let current = self.live_version()?;
            if current < 2 {
                return Err(StoreError::NeedsNewerFormat { current });
            }
        }
        let mut payload = Vec::new();
        for r in records {
            encode_record(r, &mut payload);
        }
        let frame_len = (FRAME_HEADER_LEN + payload.len()) as u64;
        if self.len + frame_len > MAX_FILE_LEN {
            return Err(StoreError::BatchTooLarge { bytes: frame_len });
        }
        let mut frame = Vec::with_capacity(frame_len as usize);
        push_frame(&mut frame, BATCH_MAGIC, self.generation, &payload);
        let name = self.name_of(Kind::Journal, self.generation)?;
        let fd = self.file.take().ok_or(StoreError::ReadOnly)?;
        let result = self.append_frame(&fd, &name, &frame);
        self.file = Some(fd);
        match result {
            Ok(()) => {
                self.len += frame_len;
                Ok(())
            }
            Err(e) => {
                self.tail_dirty = true;
                Err(e)
            }
        }
    }

    fn append_frame(&mut self, fd: &OwnedFd, name: &str, frame: &[u8]) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        if self.tail_dirty {
            self.gate_op(|| format!("cutting a failed batch off {sd}/{name}"))?;
            self.stats.writes += 1;
            ftruncate(fd.as_fd(), self.len as i64)
                .map_err(io_err(format!("cutting a failed batch off {sd}/{name}")))?;
            self.tail_dirty = false;
        }
        self.write_all_at(fd, name, frame, self.len)?;
        self.sync_file(fd, name, true)
    }

    /// Compaction: makes `records` (the full current state) the new generation's checkpoint
    /// and starts its empty journal, then removes the old generation.
    pub fn checkpoint(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.dir()?;
        let old = self.generation;
        let new = old.checked_add(1).ok_or(StoreError::GenerationOverflow)?;
        let fd = self.write_generation(new, records)?;
        self.file = Some(fd);
        self.live_version = Some(version_for(records));
        self.generation = new;
        self.len = HEADER_LEN as u64;
        self.tail_dirty = false;
        // The new generation is durable: the old one is now garbage. A crash before these
        // removals leaves it for the next open to remove.
        self.unlink(&self.name_of(Kind::Journal, old)?)?;
        self.unlink(&self.name_of(Kind::Checkpoint, old)?)?;
        Ok(())
    }

    /// The format version the current journal declares: a batch of format-2 records may only
    /// be appended to a format-2 journal (a format-1 reader would drop it as damage).
    pub fn live_version(&mut self) -> Result<u32, StoreError> {
        let sd = self.layout.store_dir();
        if let Some(v) = self.live_version {
            return Ok(v);
        }
        self.file.as_ref().ok_or(StoreError::ReadOnly)?;
        let name = self.name_of(Kind::Journal, self.generation)?;
        let context = || format!("reading the header of {sd}/{name}");
        // The live journal is held write-only: read its header through a second descriptor.
        let fd = openat(
            Some(self.dir()?.as_raw_fd()),
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(context()))?;
        // SAFETY: openat returned a fresh fd that nothing else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_LEN];
        let n = pread(fd.as_fd(), &mut header, 0).map_err(io_err(context()))?;
        // The header was checked at open (or written by us); should it be short now, the
        // safe answer is the base format: parted records then go to a new generation.
        let v = if n == HEADER_LEN {
            u32_at(&header, 8)
        } else {
            BASE_FORMAT_VERSION
        };
        self.live_version = Some(v);
        Ok(v)
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

    /// Opens (ReadWrite: creating if missing, and repairing) the store of `backing_root` and
    /// recovers its state. See `docs/format.md` § Recovery for the rules.
    pub fn open(
        backing_root: BorrowedFd<'_>,
        mode: OpenMode,
    ) -> Result<(Journal, Recovered), StoreError> {
        Journal::open_in(backing_root, mode, StoreLayout::Long)
    }

    /// `open` for a store of `layout`. The 8.3 store directory is found in any letter case.
    pub fn open_in(
        backing_root: BorrowedFd<'_>,
        mode: OpenMode,
        layout: StoreLayout,
    ) -> Result<(Journal, Recovered), StoreError> {
        let sd = layout.store_dir();
        let store_name: String = match layout {
            StoreLayout::Long => layout.store_dir().to_owned(),
            StoreLayout::Short83 => super::layout::detect(backing_root)
                .map_err(|source| StoreError::Io {
                    context: "listing the backing directory".into(),
                    source,
                })?
                .short
                .map_or_else(
                    || layout.store_dir().to_owned(),
                    |n| String::from_utf8_lossy(&n).into_owned(),
                ),
        };
        let store_name = store_name.as_str();
        let mut journal = Journal {
            layout,
            listed: BTreeMap::new(),
            mode,
            dir: None,
            file: None,
            generation: 0,
            len: 0,
            tail_dirty: false,
            stats: WriteStats::default(),
            faults: None,
            live_version: None,
        };
        let root = backing_root.as_raw_fd();
        let mut created_dir = false;
        match fstatat(Some(root), store_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
                if kind != SFlag::S_IFDIR {
                    return Err(StoreError::NotADirectory(format!(
                        "{sd} in the backing directory is not a directory{}",
                        if kind == SFlag::S_IFLNK {
                            " but a symlink"
                        } else {
                            ""
                        }
                    )));
                }
            }
            Err(Errno::ENOENT) if mode != OpenMode::ReadWrite => {
                let recovered = Recovered {
                    replayed: Replayed::default(),
                    generation: 0,
                    warnings: Vec::new(),
                    created: false,
                };
                return Ok((journal, recovered));
            }
            Err(Errno::ENOENT) => {
                mkdirat(Some(root), store_name, Mode::from_bits_truncate(0o700))
                    .map_err(io_err(format!("creating {sd}")))?;
                created_dir = true;
            }
            Err(e) => return Err(io_err(format!("examining {sd}"))(e)),
        }
        let dir = match openat(
            Some(root),
            store_name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            // SAFETY: openat just returned this descriptor; nobody else owns it.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                return Err(StoreError::NotADirectory(format!(
                    "{sd} in the backing directory is not a directory"
                )))
            }
            Err(e) => return Err(io_err(format!("opening {sd}"))(e)),
        };
        // One writer per stick: a second pershomefs (or an fsck) on the same store would
        // interleave batches. A shared lock lets read-only users coexist with each other only.
        let lock = match mode {
            OpenMode::ReadWrite => libc::LOCK_EX,
            OpenMode::ReadOnly => libc::LOCK_SH,
            // fsck --force on a live store: no lock, so the mount is not disturbed.
            OpenMode::ReadOnlyUnlocked => 0,
        };
        // A pershomefs that was just unmounted may still be writing its last commit: wait a
        // little for it rather than fail a quick `umount; mount`.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        if lock != 0 {
            loop {
                // SAFETY: flock on a descriptor we own; the result is checked.
                if unsafe { libc::flock(dir.as_raw_fd(), lock | libc::LOCK_NB) } == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(StoreError::Io {
                        context: format!("locking {sd}"),
                        source: e,
                    });
                }
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::Busy);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        journal.dir = Some(dir);
        if created_dir {
            // The new directory entry must survive a crash as well as the files in it. The
            // root is reopened because the caller's fd may be an O_PATH one, which cannot sync.
            let root_dir = openat(
                Some(root),
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err("opening the backing directory"))?;
            // SAFETY: openat just returned this descriptor; nobody else owns it.
            let root_dir = unsafe { OwnedFd::from_raw_fd(root_dir) };
            journal.stats.syncs += 1;
            fsync(root_dir.as_raw_fd()).map_err(io_err("syncing the backing directory"))?;
        }
        let recovered = journal.recover()?;
        Ok((journal, recovered))
    }

    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let sd = self.layout.store_dir();
        let store = self.dir.as_ref().ok_or(StoreError::ReadOnly)?;
        let (gens, listed) = list_store(store, self.layout)?;
        self.listed = listed;

        // Refuse a newer format before anything else is read or written.
        for (&generation, files) in &gens {
            for (kind, present) in [
                (Kind::Checkpoint, files.checkpoint),
                (Kind::Journal, files.journal),
            ] {
                if !present {
                    continue;
                }
                if let Some(header) = read_header(
                    store,
                    self.layout.store_dir(),
                    &self.name_of(kind, generation)?,
                )? {
                    if let Err(HeaderProblem::Newer(found)) =
                        check_header(&header, kind, generation)
                    {
                        return Err(StoreError::NewerFormat {
                            found,
                            supported: FORMAT_VERSION,
                        });
                    }
                }
            }
        }

        let mut warnings = Vec::new();
        if gens.is_empty() {
            let created = self.mode == OpenMode::ReadWrite;
            if created {
                let fd = self.write_first_journal()?;
                self.file = Some(fd);
                self.generation = 1;
                self.len = HEADER_LEN as u64;
            }
            return Ok(Recovered {
                replayed: Replayed::default(),
                generation: self.generation,
                warnings,
                created,
            });
        }
        let max_gen = gens.keys().next_back().copied().unwrap_or(1);

        // Files that hold damaged data are renamed to *.corrupt by a repair, for fsck.
        let mut corrupt: BTreeSet<String> = BTreeSet::new();
        let mut needs_repair = false;

        // The base: the newest generation with a complete checkpoint (or gen 1's implicit
        // empty one). Newer checkpoints that are not complete are crashed compactions.
        let mut base: Option<(u64, Vec<Record>)> = None;
        let mut salvage: Option<(u64, Vec<Record>)> = None;
        for (&generation, files) in gens.iter().rev() {
            if !files.checkpoint {
                if generation == 1 && files.journal {
                    base = Some((1, Vec::new()));
                    break;
                }
                if files.journal {
                    warnings.push(format!(
                        "generation {generation} has a journal but no checkpoint"
                    ));
                }
                continue;
            }
            let name = self.name_of(Kind::Checkpoint, generation)?;
            let Some(bytes) = read_file(store, self.layout.store_dir(), &name)? else {
                warnings.push(format!("{sd}/{name} is not a regular file; ignored"));
                corrupt.insert(name);
                continue;
            };
            if let Err(p) = check_header(&bytes, Kind::Checkpoint, generation) {
                warnings.push(format!("{sd}/{name} is unusable: {}", p.describe()));
                if bytes.len() >= HEADER_LEN {
                    corrupt.insert(name);
                }
                continue;
            }
            let scan = scan_checkpoint(&bytes, generation);
            if scan.complete {
                if let Some(why) = scan.problem {
                    warnings.push(format!("{sd}/{name}: {why}"));
                }
                base = Some((generation, scan.records));
                break;
            }
            warnings.push(format!(
                "{sd}/{name} is incomplete or damaged ({}); {} records readable",
                scan.problem.unwrap_or_default(),
                scan.records.len()
            ));
            // An incomplete checkpoint with no journal of its own is a compaction that
            // crashed before finishing: the older generation holds the whole state. With a
            // journal, it was complete once and is now damaged.
            if files.journal {
                corrupt.insert(name);
            }
            if salvage.is_none() {
                salvage = Some((generation, scan.records));
            }
        }

        let (base_gen, base_records) = match base {
            Some(b) => b,
            None => {
                needs_repair = true;
                match salvage {
                    Some((generation, records)) => {
                        corrupt.insert(self.name_of(Kind::Checkpoint, generation)?);
                        warnings.push(format!(
                            "NO INTACT CHECKPOINT: recovered {} records from the damaged checkpoint \
                             of generation {generation}; metadata of some files may be lost \
                             (run `pershome fsck`)",
                            records.len()
                        ));
                        (generation, records)
                    }
                    None => {
                        let first = gens.keys().next().copied().unwrap_or(1);
                        warnings.push(format!(
                            "NO CHECKPOINT: replaying journals from generation {first} onto an \
                             empty state; metadata of some files may be lost (run `pershome fsck`)"
                        ));
                        (first, Vec::new())
                    }
                }
            }
        };

        let mut state = Replayed::default();
        for r in base_records {
            state.apply(r);
        }

        // Journals from the base generation up. A journal newer than the base means its own
        // checkpoint was damaged after it was complete: its batches still apply on top.
        let mut live_len: Option<usize> = None;
        let mut live_needs_header = false;
        let mut live_cut: Option<usize> = None;
        for (&generation, files) in gens.range(base_gen..) {
            let is_live = generation == base_gen;
            let name = self.name_of(Kind::Journal, generation)?;
            if !files.journal {
                if is_live {
                    live_needs_header = true;
                }
                continue;
            }
            if !is_live {
                needs_repair = true;
                warnings.push(format!(
                    "replaying {sd}/{name}, whose checkpoint is damaged, on top of \
                     generation {base_gen}"
                ));
            }
            let Some(bytes) = read_file(store, self.layout.store_dir(), &name)? else {
                warnings.push(format!("{sd}/{name} is not a regular file; ignored"));
                corrupt.insert(name);
                needs_repair = true;
                continue;
            };
            if let Err(p) = check_header(&bytes, Kind::Journal, generation) {
                if bytes.len() < HEADER_LEN {
                    // Torn while being created: it never held a batch.
                    if is_live {
                        live_needs_header = true;
                    }
                    warnings.push(format!(
                        "{sd}/{name} was being created when the stick was last \
                         removed; it held no changes"
                    ));
                } else {
                    warnings.push(format!(
                        "{sd}/{name} is unusable ({}); its changes are lost",
                        p.describe()
                    ));
                    corrupt.insert(name);
                    needs_repair = true;
                }
                continue;
            }
            let scan = replay_journal(&bytes, generation, &mut state);
            if let Some(why) = &scan.problem {
                if scan.intact_after_problem {
                    warnings.push(format!(
                        "{sd}/{name} is damaged ({why}); kept {} batches, dropped the \
                         rest including later intact ones (run `pershome fsck`)",
                        scan.batches
                    ));
                    corrupt.insert(name.clone());
                    needs_repair = true;
                } else {
                    warnings.push(format!(
                        "{sd}/{name} ends in a torn batch ({why}); kept {} batches \
                         (the last one was not committed)",
                        scan.batches
                    ));
                    if is_live {
                        live_cut = Some(scan.good_end);
                    }
                }
            }
            if is_live {
                live_len = Some(scan.good_end);
            }
        }
        for (&generation, _) in gens.range(..base_gen) {
            warnings.push(format!(
                "found leftover files of superseded generation {generation} (an earlier \
                 compaction was interrupted); they go at the next read-write open"
            ));
        }
        if gens.range(base_gen + 1..).next().is_some() && !needs_repair {
            warnings.push(format!(
                "ignoring an incomplete checkpoint newer than generation {base_gen} (a \
                 compaction was interrupted)"
            ));
        }

        if self.mode != OpenMode::ReadWrite {
            self.generation = base_gen;
            self.len = live_len.unwrap_or(0) as u64;
            return Ok(Recovered {
                replayed: state,
                generation: base_gen,
                warnings,
                created: false,
            });
        }

        if needs_repair {
            let new = max_gen
                .checked_add(1)
                .ok_or(StoreError::GenerationOverflow)?;
            let fd = self.write_generation(new, &state.snapshot())?;
            self.file = Some(fd);
            self.generation = new;
            self.len = HEADER_LEN as u64;
            warnings.push(format!(
                "wrote a fresh checkpoint of the recovered state as generation {new}"
            ));
        } else {
            self.generation = base_gen;
            let name = self.name_of(Kind::Journal, base_gen)?;
            if live_needs_header {
                let fd = self.create_durable(&name, &encode_header(Kind::Journal, base_gen))?;
                self.file = Some(fd);
                self.len = HEADER_LEN as u64;
            } else {
                let fd = open_at(
                    self.dir()?,
                    &name,
                    OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
                    Mode::empty(),
                )
                .map_err(io_err(format!("opening {sd}/{name}")))?;
                let len = live_len.unwrap_or(HEADER_LEN);
                if let Some(cut) = live_cut {
                    self.gate_op(|| format!("cutting the torn batch off {sd}/{name}"))?;
                    self.stats.writes += 1;
                    ftruncate(fd.as_fd(), cut as i64)
                        .map_err(io_err(format!("cutting the torn batch off {sd}/{name}")))?;
                    self.sync_file(&fd, &name, false)?;
                }
                self.file = Some(fd);
                self.len = len as u64;
            }
        }

        // Everything but the live generation is now garbage, or evidence for fsck.
        let live = self.generation;
        for (&generation, files) in &gens {
            if generation == live {
                continue;
            }
            for (kind, present) in [
                (Kind::Checkpoint, files.checkpoint),
                (Kind::Journal, files.journal),
            ] {
                if !present {
                    continue;
                }
                let name = self.name_of(kind, generation)?;
                if corrupt.contains(&name) {
                    if let Some(w) = self.keep_as_corrupt(&name)? {
                        warnings.push(w);
                    }
                } else {
                    self.unlink(&name)?;
                }
            }
        }
        Ok(Recovered {
            replayed: state,
            generation: self.generation,
            warnings,
            created: false,
        })
    }

    fn write_first_journal(&mut self) -> Result<OwnedFd, StoreError> {
        self.create_durable(
            &self.name_of(Kind::Journal, 1)?,
            &encode_header(Kind::Journal, 1),
        )
    }

    /// Renames a damaged file to `<name>.corrupt` (a new name: never a rename-over), so that
    /// fsck can look at it and it is no longer a store file. Returns a warning if it had to
    /// stay.
    fn keep_as_corrupt(&mut self, name: &str) -> Result<Option<String>, StoreError> {
        let sd = self.layout.store_dir();
        let dir = self.dir()?.as_raw_fd();
        for n in 0..100u32 {
            let target = self.layout.corrupt_name(name, n);
            match fstatat(Some(dir), target.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(_) => continue,
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(io_err(format!("examining {sd}/{target}"))(e)),
            }
            self.gate_op(|| format!("renaming {sd}/{name} to {target}"))?;
            renameat(Some(dir), name, Some(dir), target.as_str())
                .map_err(io_err(format!("renaming {sd}/{name} to {target}")))?;
            return Ok(Some(format!("kept the damaged {sd}/{name} as {target}")));
        }
        Ok(Some(format!(
            "could not find a free *.corrupt name for {sd}/{name}; left in place"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Meta;
    use crate::meta::STORE_DIR;
    use std::fs;
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
        let first_chunk = decode_all(
            &ck[HEADER_LEN + FRAME_HEADER_LEN..HEADER_LEN + FRAME_HEADER_LEN + first_len],
        )
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
        nix::unistd::mkfifo(&store(&root).join(c(2)), Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
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
            let scan = replay_journal(&j, 1, &mut s);
            proptest::prop_assert!(scan.good_end <= j.len());
            let mut ck = encode_header(Kind::Checkpoint, 1);
            ck.extend_from_slice(&body);
            let _ = scan_checkpoint(&ck, 1);
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
        let scan = replay_journal(&j2, 2, &mut s);
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
}
