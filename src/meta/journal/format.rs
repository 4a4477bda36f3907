//! The bytes of a store file: file names, headers, frames, building and scanning a
//! checkpoint, replaying a journal (format: `docs/format.md`).
//!
//! Pure: it never does I/O itself. Scans read through a `Source`: a byte slice in tests, an
//! open store file (`file_io::StoreReader`) in recovery, which is read one frame at a time so
//! that memory never depends on a file's size (at most `MAX_FRAME_LEN` of it is held). It must
//! never trust a length or count it reads: every byte comes from an untrusted stick.

use super::StoreError;
#[cfg(test)]
use super::StoreLayout;
use super::{version_for, Kind, Record, Replayed, BASE_FORMAT_VERSION, FORMAT_VERSION};
use crate::meta::codec::{decode_record, encode_record, DecodeError};

/// Header of both file kinds: magic (8), version u32 LE, generation u64 LE, crc32c of the 20
/// bytes before it, u32 LE.
pub(super) const HEADER_LEN: usize = 24;
pub(super) const JOURNAL_MAGIC: [u8; 8] = *b"PSHMJRNL";
pub(super) const CHECKPOINT_MAGIC: [u8; 8] = *b"PSHMCKPT";

/// Frame: magic u32 LE, payload length u32 LE, crc u32 LE, payload.
pub(super) const FRAME_HEADER_LEN: usize = 12;
pub(super) const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"PSHB");
pub(super) const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"PSHC");
pub(super) const TRAILER_MAGIC: u32 = u32::from_le_bytes(*b"PSHT");
/// The largest frame payload a reader accepts, and so the most of a store file held in memory
/// at once while it is read. A writer never makes a larger frame: a batch that would be
/// larger is written as a new generation (checkpoint) instead, whose chunks are small. A real
/// batch is a few seconds of changes (kilobytes); 16 MiB is some 300,000 records.
pub const MAX_FRAME_LEN: usize = 16 << 20;
/// Trailer payload: record count u64 LE, crc32c of every file byte before the trailer frame.
pub(super) const TRAILER_PAYLOAD_LEN: usize = 12;
/// A checkpoint chunk frame is closed once its payload reaches this size, so that a torn or
/// corrupt checkpoint still yields most of its records when salvaged.
pub(super) const CHUNK_TARGET: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// File names
// ---------------------------------------------------------------------------------------------

/// The long layout's name of a store file (the tests' and `parse_name`'s form).
#[cfg(test)]
pub(super) fn file_name(kind: Kind, generation: u64) -> String {
    StoreLayout::Long
        .store_file(kind, generation)
        .unwrap_or_default()
}

/// The long layout's parse (the tests' form).
#[cfg(test)]
pub(super) fn parse_name(name: &[u8]) -> Option<(Kind, u64)> {
    StoreLayout::Long.parse_store_file(name)
}

// ---------------------------------------------------------------------------------------------
// Pure layout: headers, frames, file scans (no I/O, tested directly)
// ---------------------------------------------------------------------------------------------

pub(super) fn magic_of(kind: Kind) -> &'static [u8; 8] {
    match kind {
        Kind::Checkpoint => &CHECKPOINT_MAGIC,
        Kind::Journal => &JOURNAL_MAGIC,
    }
}

pub(super) fn encode_header(kind: Kind, generation: u64) -> Vec<u8> {
    encode_header_version(kind, generation, BASE_FORMAT_VERSION)
}

pub(super) fn encode_header_version(kind: Kind, generation: u64, version: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(magic_of(kind));
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&generation.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeaderProblem {
    Short(usize),
    BadMagic,
    BadChecksum,
    Newer(u32),
    BadVersion(u32),
    WrongGeneration(u64),
}

impl HeaderProblem {
    pub(super) fn describe(&self) -> String {
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

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks a file header. The version is trusted only once the header checksum matches, so a
/// flipped bit reads as corruption (recovered from) rather than as a newer format (refused).
/// Every later format keeps this 24-byte header, checksum included.
pub(super) fn check_header(bytes: &[u8], kind: Kind, generation: u64) -> Result<(), HeaderProblem> {
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
pub(super) fn frame_crc(generation: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&generation.to_le_bytes()), payload)
}

pub(super) fn push_frame(out: &mut Vec<u8>, magic: u32, generation: u64, payload: &[u8]) {
    // Payloads are bounded by MAX_FILE_LEN (< 4 GiB) before they get here.
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame_crc(generation, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Where a scan reads a store file from: a byte slice (tests) or an open file (recovery).
pub(super) trait Source {
    /// The file's length when it was opened.
    fn len(&self) -> usize;
    /// Fills `buf` from offset `at`; the caller never reads past `len()`.
    fn read_at(&self, at: usize, buf: &mut [u8]) -> Result<(), StoreError>;
}

impl Source for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn read_at(&self, at: usize, buf: &mut [u8]) -> Result<(), StoreError> {
        buf.copy_from_slice(&self[at..at + buf.len()]);
        Ok(())
    }
}

impl Source for Vec<u8> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn read_at(&self, at: usize, buf: &mut [u8]) -> Result<(), StoreError> {
        self.as_slice().read_at(at, buf)
    }
}

/// A frame read from a file.
pub(super) enum Frame {
    /// A frame whose length fits the file and whose checksum matches; `header` is its 12
    /// header bytes (for the checkpoint's whole-file checksum).
    Good {
        magic: u32,
        header: [u8; FRAME_HEADER_LEN],
        payload: Vec<u8>,
    },
    /// The file ends inside the frame.
    Torn(String),
    /// The checksum does not match, or the frame claims more than a frame may hold.
    Bad(String),
}

pub(super) fn read_frame<S: Source + ?Sized>(
    src: &S,
    at: usize,
    generation: u64,
) -> Result<Frame, StoreError> {
    let left = src.len().saturating_sub(at);
    if left < FRAME_HEADER_LEN {
        return Ok(Frame::Torn(format!(
            "the file ends {left} bytes into a frame header"
        )));
    }
    let mut header = [0u8; FRAME_HEADER_LEN];
    src.read_at(at, &mut header)?;
    let magic = u32_at(&header, 0);
    let len = u32_at(&header, 4) as usize;
    let crc = u32_at(&header, 8);
    let start = at + FRAME_HEADER_LEN;
    if len > src.len() - start {
        return Ok(Frame::Torn(format!(
            "a frame claims {len} bytes but the file ends {} bytes later",
            src.len() - start
        )));
    }
    if len > MAX_FRAME_LEN {
        return Ok(Frame::Bad(format!(
            "a frame claims {len} bytes, more than the {MAX_FRAME_LEN} a frame may hold"
        )));
    }
    let mut payload = vec![0u8; len];
    src.read_at(start, &mut payload)?;
    if frame_crc(generation, &payload) != crc {
        return Ok(Frame::Bad("a frame's checksum does not match".into()));
    }
    Ok(Frame::Good {
        magic,
        header,
        payload,
    })
}

/// Applies the records of one frame payload to `state`, all or none: the payload is decoded
/// once to check it (keeping nothing), then again to apply it, record by record, so that a
/// frame's records are never all in memory at once. Returns how many were applied.
pub(super) fn apply_payload(payload: &[u8], state: &mut Replayed) -> Result<usize, DecodeError> {
    let mut at = 0;
    let mut count = 0;
    while at < payload.len() {
        let (_, used) = decode_record(&payload[at..]).map_err(|e| DecodeError {
            offset: at + e.offset,
            reason: e.reason,
        })?;
        at += used;
        count += 1;
    }
    at = 0;
    while at < payload.len() {
        let (record, used) = decode_record(&payload[at..])?;
        state.apply(record);
        at += used;
    }
    Ok(count)
}

/// What a checkpoint file yielded.
#[derive(Debug)]
pub(super) struct CheckpointScan {
    /// How many records of intact chunks before the first problem were applied.
    pub(super) records: usize,
    /// True only when the trailer was found and agrees with the whole file.
    pub(super) complete: bool,
    pub(super) problem: Option<String>,
}

/// Reads a checkpoint whose header is already checked, applying the records of every intact
/// chunk before the first problem to `state`.
pub(super) fn scan_checkpoint<S: Source + ?Sized>(
    src: &S,
    generation: u64,
    state: &mut Replayed,
) -> Result<CheckpointScan, StoreError> {
    let mut records = 0;
    let mut at = HEADER_LEN;
    let fail = |records, why: String| {
        Ok(CheckpointScan {
            records,
            complete: false,
            problem: Some(why),
        })
    };
    // The whole-file checksum of the trailer, computed as the frames go by.
    let mut file_crc = {
        let mut header = [0u8; HEADER_LEN];
        src.read_at(0, &mut header)?;
        crc32c::crc32c(&header)
    };
    loop {
        let (magic, header, payload) = match read_frame(src, at, generation)? {
            Frame::Good {
                magic,
                header,
                payload,
            } => (magic, header, payload),
            Frame::Torn(why) | Frame::Bad(why) => {
                return fail(records, format!("at byte {at}: {why}"));
            }
        };
        match magic {
            CHUNK_MAGIC => match apply_payload(&payload, state) {
                Ok(n) => records += n,
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
                let count = u64_at(&payload, 0);
                let stored_crc = u32_at(&payload, 8);
                if count != records as u64 {
                    return fail(
                        records,
                        format!("the trailer counts {count} records, the frames hold {records}"),
                    );
                }
                if file_crc != stored_crc {
                    return fail(
                        records,
                        "the trailer's whole-file checksum does not match".into(),
                    );
                }
                let end = at + FRAME_HEADER_LEN + payload.len();
                let problem = (end != src.len()).then(|| {
                    format!(
                        "{} stray bytes follow the trailer (ignored)",
                        src.len() - end
                    )
                });
                return Ok(CheckpointScan {
                    records,
                    complete: true,
                    problem,
                });
            }
            other => {
                return fail(
                    records,
                    format!("unknown frame type {other:#010x} at byte {at}"),
                );
            }
        }
        file_crc = crc32c::crc32c_append(file_crc, &header);
        file_crc = crc32c::crc32c_append(file_crc, &payload);
        at += FRAME_HEADER_LEN + payload.len();
    }
}

/// Builds a whole checkpoint file.
#[cfg(test)]
pub(super) fn build_checkpoint(generation: u64, records: &[Record]) -> Vec<u8> {
    build_checkpoint_indexed(generation, records).0
}

/// `build_checkpoint`, with the chunk index a lazily read base needs (`base`) when the
/// records are in a checkpoint's order (`pending::sort_for_checkpoint`), else `None`.
pub(super) fn build_checkpoint_indexed(
    generation: u64,
    records: &[Record],
) -> (Vec<u8>, Option<Vec<super::base::Chunk>>) {
    let mut file = encode_header_version(Kind::Checkpoint, generation, version_for(records));
    let mut chunk = Vec::new();
    let mut one = Vec::new();
    let mut index = Some(Vec::new());
    let mut in_order = true;
    let mut chunk_first: Option<Vec<Vec<u8>>> = None;
    let mut last: Option<&[Vec<u8>]> = None;
    let close = |file: &mut Vec<u8>,
                 chunk: &mut Vec<u8>,
                 first: &mut Option<Vec<Vec<u8>>>,
                 index: &mut Option<Vec<super::base::Chunk>>| {
        let at = file.len() as u64;
        push_frame(file, CHUNK_MAGIC, generation, chunk);
        chunk.clear();
        if let (Some(index), Some(first)) = (index.as_mut(), first.take()) {
            index.push(super::base::Chunk { at, first });
        }
    };
    for r in records {
        one.clear();
        encode_record(r, &mut one);
        // A chunk holds at most CHUNK_TARGET bytes or a single record, so every chunk stays
        // far below MAX_FRAME_LEN (a record is at most a few MiB: codec limits).
        if !chunk.is_empty() && chunk.len() + one.len() > CHUNK_TARGET {
            close(&mut file, &mut chunk, &mut chunk_first, &mut index);
        }
        chunk.extend_from_slice(&one);
        match r {
            Record::Put { path, .. } => {
                if last.is_some_and(|l| l >= path.as_slice()) {
                    // Not in order: readable only by a full replay.
                    in_order = false;
                }
                last = Some(path);
                if chunk_first.is_none() {
                    chunk_first = Some(path.clone());
                }
            }
            Record::PutInode { .. } => {}
            _ => in_order = false,
        }
    }
    if !chunk.is_empty() {
        close(&mut file, &mut chunk, &mut chunk_first, &mut index);
    }
    let index = index.filter(|_| in_order);
    let mut trailer = Vec::with_capacity(TRAILER_PAYLOAD_LEN);
    trailer.extend_from_slice(&(records.len() as u64).to_le_bytes());
    trailer.extend_from_slice(&crc32c::crc32c(&file).to_le_bytes());
    push_frame(&mut file, TRAILER_MAGIC, generation, &trailer);
    (file, index)
}

/// What a journal file yielded.
#[derive(Debug)]
pub(super) struct JournalScan {
    pub(super) batches: usize,
    /// End of the last intact batch: where the next batch goes.
    pub(super) good_end: usize,
    pub(super) problem: Option<String>,
    /// An intact batch frame exists after the first bad one: the damage is not a torn tail
    /// from a crash but corruption, and the file is kept for fsck instead of being cut.
    pub(super) intact_after_problem: bool,
}

/// Replays a journal whose header is already checked into `state`, batch by batch, stopping
/// at the first batch that is torn, fails its checksum or does not decode.
pub(super) fn replay_journal<S: Source + ?Sized>(
    src: &S,
    generation: u64,
    state: &mut Replayed,
) -> Result<JournalScan, StoreError> {
    let mut at = HEADER_LEN;
    let mut batches = 0;
    while at < src.len() {
        let why = match read_frame(src, at, generation)? {
            Frame::Good { magic, payload, .. } if magic == BATCH_MAGIC => {
                match apply_payload(&payload, state) {
                    Ok(_) => {
                        batches += 1;
                        at += FRAME_HEADER_LEN + payload.len();
                        continue;
                    }
                    Err(e) => format!("the batch at byte {at} does not decode: {e}"),
                }
            }
            Frame::Good { magic, .. } => {
                format!("unknown frame type {magic:#010x} at byte {at}")
            }
            Frame::Torn(why) | Frame::Bad(why) => format!("at byte {at}: {why}"),
        };
        return Ok(JournalScan {
            batches,
            good_end: at,
            problem: Some(why),
            intact_after_problem: intact_frame_after(src, at + 1, generation)?,
        });
    }
    Ok(JournalScan {
        batches,
        good_end: at,
        problem: None,
        intact_after_problem: false,
    })
}

/// How much of a file `intact_frame_after` looks at in one read.
const SCAN_WINDOW: usize = 1 << 20;

/// Whether an intact batch frame starts anywhere at or after `from`. A stick could plant a
/// frame magic at every offset, each claiming a long payload, to make this search quadratic:
/// the bytes checksummed are capped at twice the file, and running out counts as "yes" (the
/// cautious answer: the file is kept as evidence rather than cut). The file is read in
/// windows of `SCAN_WINDOW` bytes, and a candidate frame is read only when its claimed length
/// is one a frame may have.
pub(super) fn intact_frame_after<S: Source + ?Sized>(
    src: &S,
    from: usize,
    generation: u64,
) -> Result<bool, StoreError> {
    let len = src.len();
    let mut budget = len.saturating_mul(2);
    let mut window = Vec::new();
    let mut start = from;
    while start + FRAME_HEADER_LEN <= len {
        // A window overlaps the next by a frame header, so no header is split between them.
        let end = (start + SCAN_WINDOW).min(len);
        window.resize(end - start, 0);
        src.read_at(start, &mut window)?;
        let last_candidate = window.len().saturating_sub(FRAME_HEADER_LEN);
        let first = BATCH_MAGIC.to_le_bytes()[0];
        for i in 0..=last_candidate {
            // The first byte alone rules out almost every offset, cheaply.
            if window[i] != first || u32_at(&window, i) != BATCH_MAGIC {
                continue;
            }
            let later = start + i;
            let claimed = u32_at(&window, i + 4) as usize;
            if claimed > len - later - FRAME_HEADER_LEN || claimed > MAX_FRAME_LEN {
                continue;
            }
            if claimed > budget {
                return Ok(true);
            }
            budget -= claimed;
            if matches!(read_frame(src, later, generation)?, Frame::Good { .. }) {
                return Ok(true);
            }
        }
        if end == len {
            break;
        }
        start = start + last_candidate + 1;
    }
    Ok(false)
}

/// A checkpoint's chunk index, and a note about stray bytes after its trailer.
pub(super) type Indexed = (Vec<super::base::Chunk>, Option<String>);

/// Reads a checkpoint whose header is already checked as a lazily read base (see `base`):
/// every frame is checked as `scan_checkpoint` checks it, `PutInode` records are applied to
/// `state`, and of `Put` records only the first path of each chunk is kept. `None` when the
/// checkpoint cannot be read so (not complete, `Put`s not in path order, a record of another
/// kind, or more chunks than the node budget): the caller then scans it the ordinary way.
pub(super) fn index_checkpoint<S: Source + ?Sized>(
    src: &S,
    generation: u64,
    state: &mut Replayed,
) -> Result<Option<Indexed>, StoreError> {
    let mut chunks = Vec::new();
    let mut records: u64 = 0;
    let mut last: Option<Vec<Vec<u8>>> = None;
    let mut at = HEADER_LEN;
    let mut file_crc = {
        let mut header = [0u8; HEADER_LEN];
        src.read_at(0, &mut header)?;
        crc32c::crc32c(&header)
    };
    loop {
        let Frame::Good {
            magic,
            header,
            payload,
        } = read_frame(src, at, generation)?
        else {
            return Ok(None);
        };
        match magic {
            CHUNK_MAGIC => {
                let mut off = 0;
                let mut first = None;
                while off < payload.len() {
                    let Ok((record, used)) = decode_record(&payload[off..]) else {
                        return Ok(None);
                    };
                    off += used;
                    records += 1;
                    match record {
                        Record::Put { path, .. } => {
                            if last.as_ref().is_some_and(|l| *l >= path) {
                                return Ok(None);
                            }
                            if first.is_none() {
                                first = Some(path.clone());
                            }
                            last = Some(path);
                        }
                        r @ Record::PutInode { .. } => state.apply(r),
                        _ => return Ok(None),
                    }
                }
                if let Some(first) = first {
                    let Some(left) = state.budget.checked_sub(1) else {
                        return Ok(None);
                    };
                    state.budget = left;
                    chunks.push(super::base::Chunk {
                        at: at as u64,
                        first,
                    });
                }
            }
            TRAILER_MAGIC => {
                if payload.len() != TRAILER_PAYLOAD_LEN
                    || u64_at(&payload, 0) != records
                    || u32_at(&payload, 8) != file_crc
                {
                    return Ok(None);
                }
                let end = at + FRAME_HEADER_LEN + payload.len();
                let problem = (end != src.len()).then(|| {
                    format!(
                        "{} stray bytes follow the trailer (ignored)",
                        src.len() - end
                    )
                });
                return Ok(Some((chunks, problem)));
            }
            _ => return Ok(None),
        }
        file_crc = crc32c::crc32c_append(file_crc, &header);
        file_crc = crc32c::crc32c_append(file_crc, &payload);
        at += FRAME_HEADER_LEN + payload.len();
    }
}
