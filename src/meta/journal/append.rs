//! Committing one batch: a frame appended to the live journal and synced, so that after a
//! crash the batch is either whole or absent.
//!
//! It never writes over an intact batch: a failed append's leftovers are cut off first.

use std::os::fd::{AsFd, OwnedFd};

use super::format::{push_frame, u32_at, BATCH_MAGIC, FRAME_HEADER_LEN, HEADER_LEN};
use super::{sys_err, Journal, Kind, Record, StoreError, BASE_FORMAT_VERSION, MAX_FILE_LEN};
use crate::backing::sys;
use crate::meta::codec::encode_record;

impl Journal {
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

    pub(super) fn append_frame(
        &mut self,
        fd: &OwnedFd,
        name: &str,
        frame: &[u8],
    ) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        if self.tail_dirty {
            self.stats.writes += 1;
            sys::ftruncate(self.faults(), fd.as_fd(), self.len)
                .map_err(sys_err(format!("cutting a failed batch off {sd}/{name}")))?;
            self.tail_dirty = false;
        }
        self.write_all_at(fd, name, frame, self.len)?;
        self.sync_file(fd, name, true)
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
        let fd = sys::openat(
            None,
            self.dir()?.as_fd(),
            name.as_bytes(),
            libc::O_RDONLY | libc::O_NONBLOCK,
            0,
        )
        .map_err(sys_err(context()))?;
        let mut header = [0u8; HEADER_LEN];
        let n = sys::pread_full(fd.as_fd(), &mut header, 0).map_err(sys_err(context()))?;
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
}
