//! The base checkpoint of a mount, read lazily (issue 14, Scale): instead of replaying every
//! record of a checkpoint into memory at mount, recovery checks the checkpoint whole (frames,
//! trailer, whole-file checksum, as before) and keeps only an index of its chunks, each with
//! the path of its first `Put`. A directory's records are read from the stick when the
//! directory is first needed (`children`), a single record when a renamed node needs its own
//! (`record_at`), a whole subtree when a compaction writes it back (`subtree`).
//!
//! This works because a checkpoint's `Put` records are in path order (component by component,
//! bytewise; a parent before its children: `docs/format.md` § Checkpoint), so the records of
//! one directory's subtree are one run of the file, and its direct children lie inside it. A
//! checkpoint that is not in that order (one written by an older pershome, whose checkpoint
//! order followed its in-memory maps), or holds anything but `Put` and `PutInode` records, is
//! not indexed: recovery then replays it into memory as before (`index_checkpoint` says
//! `None`), and the next compaction writes it in order.
//!
//! It owns the open checkpoint file and the index, and never writes. Every byte is re-checked
//! when read again (frame checksums): the file may have changed under the mount only through
//! damage, which yields an error, never a wrong record.

use std::cmp::Ordering;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use super::file_io::StoreReader;
use super::format::{read_frame, Frame, CHUNK_MAGIC};
use crate::meta::codec::decode_record;
use crate::meta::{Meta, Record};

/// A path of backing names from the backing root.
pub type Path = Vec<Vec<u8>>;

/// One chunk frame of the checkpoint that holds `Put` records.
#[derive(Debug)]
pub(super) struct Chunk {
    /// Offset of the frame in the file.
    pub(super) at: u64,
    /// The path of the chunk's first `Put`.
    pub(super) first: Path,
}

/// The base checkpoint of the current mount, open and indexed.
#[derive(Debug)]
pub struct BaseCheckpoint {
    file: StoreReader,
    generation: u64,
    chunks: Vec<Chunk>,
    /// The chunk decoded last: sibling directories often share one, and a compaction
    /// visits them one after the other.
    last: Mutex<Option<(usize, Arc<Records>)>>,
    /// Entries `children` may still hand out: each becomes a node in memory when its
    /// directory is loaded, so a hostile store with millions of records in one directory is
    /// held to the same bound as a replay (`pending::MAX_NODES`).
    budget: AtomicUsize,
}

/// The `Put` records of one chunk, in order.
type Records = Vec<(Path, Meta)>;

/// A direct child of a directory in the checkpoint.
#[derive(Debug)]
pub struct BaseChild {
    pub name: Vec<u8>,
    /// Its own record, if the checkpoint holds one.
    pub meta: Option<Meta>,
    /// Whether the checkpoint holds records below it.
    pub below: bool,
}

/// Component-wise path order: the order of a checkpoint's `Put` records.
pub fn path_cmp(a: &[Vec<u8>], b: &[Vec<u8>]) -> Ordering {
    a.cmp(b)
}

fn damaged(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the metadata store's checkpoint changed or was damaged while mounted: {what}"),
    )
}

impl BaseCheckpoint {
    pub(super) fn new(file: StoreReader, generation: u64, chunks: Vec<Chunk>) -> BaseCheckpoint {
        BaseCheckpoint {
            file,
            generation,
            chunks,
            last: Mutex::new(None),
            budget: AtomicUsize::new(crate::meta::pending::MAX_NODES),
        }
    }

    /// Test hook: how many entries `children` may still hand out.
    #[cfg(test)]
    pub(crate) fn set_budget(&self, entries: usize) {
        self.budget.store(entries, AtomicOrdering::Relaxed);
    }

    /// Takes one entry from the budget; false once it is spent.
    fn spend(&self) -> bool {
        self.budget
            .fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |b| {
                b.checked_sub(1)
            })
            .is_ok()
    }

    /// How many chunks the index holds (tests, memory figures).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The `Put` records of chunk `i`, in order.
    fn chunk_records(&self, i: usize) -> io::Result<Arc<Records>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, records)) = last.as_ref() {
            if *n == i {
                return Ok(records.clone());
            }
        }
        let records = Arc::new(self.decode_chunk(i)?);
        *last = Some((i, records.clone()));
        Ok(records)
    }

    fn decode_chunk(&self, i: usize) -> io::Result<Records> {
        let at = self.chunks[i].at as usize;
        let payload = match read_frame(&self.file, at, self.generation) {
            Ok(Frame::Good { magic, payload, .. }) if magic == CHUNK_MAGIC => payload,
            Ok(Frame::Good { .. }) => return Err(damaged("a chunk changed its type")),
            Ok(Frame::Torn(why)) | Ok(Frame::Bad(why)) => return Err(damaged(&why)),
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        let mut out = Vec::new();
        let mut off = 0;
        while off < payload.len() {
            let (record, used) =
                decode_record(&payload[off..]).map_err(|e| damaged(&e.to_string()))?;
            off += used;
            if let Record::Put { path, meta } = record {
                out.push((path, meta));
            }
        }
        Ok(out)
    }

    /// The first chunk that may hold `path` or anything after it.
    fn first_chunk_for(&self, path: &[Vec<u8>]) -> usize {
        self.chunks
            .partition_point(|c| path_cmp(&c.first, path) != Ordering::Greater)
            .saturating_sub(1)
    }

    /// Calls `f` with every `Put` whose path starts with `prefix`, in order.
    fn scan_prefix(&self, prefix: &[Vec<u8>], mut f: impl FnMut(Path, Meta)) -> io::Result<()> {
        let mut i = self.first_chunk_for(prefix);
        while i < self.chunks.len() {
            let first = &self.chunks[i].first;
            if !first.starts_with(prefix) && path_cmp(first, prefix) == Ordering::Greater {
                break;
            }
            for (path, meta) in self.chunk_records(i)?.iter() {
                if path.starts_with(prefix) {
                    f(path.clone(), meta.clone());
                } else if path_cmp(path, prefix) == Ordering::Greater {
                    return Ok(());
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// The record at exactly `path`, if the checkpoint holds one.
    pub fn record_at(&self, path: &[Vec<u8>]) -> io::Result<Option<Meta>> {
        let mut found = None;
        let mut i = self.first_chunk_for(path);
        while i < self.chunks.len() && found.is_none() {
            if path_cmp(&self.chunks[i].first, path) == Ordering::Greater {
                break;
            }
            for (p, meta) in self.chunk_records(i)?.iter() {
                match path_cmp(p, path) {
                    Ordering::Equal => {
                        found = Some(meta.clone());
                        break;
                    }
                    Ordering::Greater => return Ok(None),
                    Ordering::Less => {}
                }
            }
            i += 1;
        }
        Ok(found)
    }

    /// The direct children of `dir` in the checkpoint, in name order: each with its record
    /// (if any) and whether records lie below it. Chunks that lie wholly
    /// inside one child's subtree are not read.
    pub fn children(&self, dir: &[Vec<u8>]) -> io::Result<Vec<BaseChild>> {
        let depth = dir.len();
        let mut out: Vec<BaseChild> = Vec::new();
        let mut refused = 0u64;
        // `meta` is the child's own record; `None` means a record below it.
        let mut note = |out: &mut Vec<BaseChild>, name: &[u8], meta: Option<Meta>| {
            let below = meta.is_none();
            match out.last_mut() {
                Some(last) if last.name.as_slice() == name => {
                    if meta.is_some() {
                        last.meta = meta;
                    }
                    last.below |= below;
                }
                _ if self.spend() => out.push(BaseChild {
                    name: name.to_vec(),
                    meta,
                    below,
                }),
                _ => refused += 1,
            }
        };
        let mut i = self.first_chunk_for(dir);
        while i < self.chunks.len() {
            let first = &self.chunks[i].first;
            if !first.starts_with(dir) && path_cmp(first, dir) == Ordering::Greater {
                break;
            }
            // A chunk whose first path lies strictly below a child `c`, and whose successor's
            // first path lies below `c` too, holds only `c`'s descendants (every path between
            // two paths that share a prefix shares it): it is not read.
            let next = self.chunks.get(i + 1).map(|c| c.first.as_slice());
            let inside_one_child = first.starts_with(dir)
                && first.len() > depth + 1
                && next.is_some_and(|n| n.starts_with(&first[..=depth]));
            if inside_one_child {
                note(&mut out, &first[depth], None);
                i += 1;
                continue;
            }
            for (path, meta) in self.chunk_records(i)?.iter() {
                if path.starts_with(dir) {
                    if path.len() == depth + 1 {
                        note(&mut out, &path[depth], Some(meta.clone()));
                    } else if path.len() > depth + 1 {
                        note(&mut out, &path[depth], None);
                    }
                } else if path_cmp(path, dir) == Ordering::Greater {
                    i = self.chunks.len();
                    break;
                }
            }
            i += 1;
        }
        if refused > 0 {
            tracing::warn!(
                "the metadata store holds more entries than pershome accepts ({refused} \
                 entries of a directory ignored); the stick may have been tampered with: run \
                 `pershome fsck`"
            );
        }
        Ok(out)
    }

    /// Every record at or below `dir`, in order, with its path.
    pub fn subtree(&self, dir: &[Vec<u8>], f: impl FnMut(Path, Meta)) -> io::Result<()> {
        self.scan_prefix(dir, f)
    }
}
