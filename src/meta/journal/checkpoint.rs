//! Compaction: the full state written as the checkpoint of a new generation with an empty
//! journal, after which the old generation is removed.
//!
//! The old generation stays authoritative until both files of the new one are durable: it is
//! never removed or overwritten before that.

use std::os::fd::OwnedFd;

use super::base::BaseCheckpoint;
use super::file_io::StoreReader;
use super::format::{build_checkpoint_indexed, encode_header_version, HEADER_LEN};
use super::{version_for, Journal, Kind, Record, StoreError, MAX_FILE_LEN};

impl Journal {
    /// Writes generation `generation` completely: its checkpoint of `records` (unless it is
    /// the empty generation 1, which has none) and its empty journal, in the order that keeps
    /// the older generation authoritative until both are durable.
    pub(super) fn write_generation(
        &mut self,
        generation: u64,
        records: &[Record],
    ) -> Result<OwnedFd, StoreError> {
        let sd = self.layout.store_dir();
        let (checkpoint, index) = build_checkpoint_indexed(generation, records);
        self.written_index = None;
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
        if result.is_ok() {
            self.written_index = index.map(|chunks| (generation, chunks));
        }
        if result.is_err() {
            // Best effort: the older generation is still the authoritative one either way,
            // and recovery removes these if they survive.
            let _ = self.unlink(&j_name);
            let _ = self.unlink(&ck_name);
        }
        result
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

    /// The checkpoint written last (by `checkpoint`), opened as a lazily read base, when it
    /// is the live generation's and its records were in a checkpoint's order. Once: the
    /// index is handed over. `None` also when the file cannot be opened (the caller keeps
    /// its old base, whose file stays open).
    pub fn take_written_base(&mut self) -> Option<std::sync::Arc<BaseCheckpoint>> {
        let (generation, chunks) = self.written_index.take()?;
        if generation != self.generation {
            return None;
        }
        let name = self.name_of(Kind::Checkpoint, generation).ok()?;
        let file = StoreReader::open(self.dir().ok()?, self.layout.store_dir(), &name).ok()??;
        Some(std::sync::Arc::new(BaseCheckpoint::new(
            file, generation, chunks,
        )))
    }
}
