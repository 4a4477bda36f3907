//! The bytes of a store file: file names, headers, frames, building and scanning a
//! checkpoint, replaying a journal (format: `docs/format.md`).
//!
//! Pure: it never does I/O, so every rule of the format is tested directly on byte slices. It
//! must never trust a length or count it reads: every byte comes from an untrusted stick.

#[cfg(test)]
use super::StoreLayout;
use super::{version_for, Kind, Record, Replayed, BASE_FORMAT_VERSION, FORMAT_VERSION};
use crate::meta::codec::{decode_all, encode_record};

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

/// A frame read from a file.
pub(super) enum Frame<'a> {
    /// A frame whose length fits the file and whose checksum matches.
    Good { magic: u32, payload: &'a [u8] },
    /// The file ends inside the frame.
    Torn(String),
    /// The checksum does not match.
    Bad(String),
}

pub(super) fn read_frame(bytes: &[u8], at: usize, generation: u64) -> Frame<'_> {
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
pub(super) struct CheckpointScan {
    /// The records of every intact chunk before the first problem.
    pub(super) records: Vec<Record>,
    /// True only when the trailer was found and agrees with the whole file.
    pub(super) complete: bool,
    pub(super) problem: Option<String>,
}

/// Reads a checkpoint whose header is already checked.
pub(super) fn scan_checkpoint(bytes: &[u8], generation: u64) -> CheckpointScan {
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
pub(super) fn build_checkpoint(generation: u64, records: &[Record]) -> Vec<u8> {
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
pub(super) fn replay_journal(bytes: &[u8], generation: u64, state: &mut Replayed) -> JournalScan {
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
pub(super) fn intact_frame_after(bytes: &[u8], from: usize, generation: u64) -> bool {
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
