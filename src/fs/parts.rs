//! Files larger than the backing can hold (FAT32: 4 GiB − 1), stored in parts.
//!
//! A parted file keeps its first `Parts::size` bytes in its ordinary backing file (at its
//! name, or `.pershome/inodes/<link>` when hard-linked), so Windows still sees a file holding
//! the first bytes; part `k ≥ 1` is `.pershome/parts/<id>/<k as 8 hex digits>` and holds bytes
//! `k·size .. (k+1)·size`. Invariant on the stick: every part before the last one present is
//! exactly `size` bytes long, so a file's length is `k_last·size + len(part k_last)`: it is
//! read from the parts themselves at load, never trusted from the store. A missing part reads
//! as a hole (zeros). The store records only `Parts { id, size }` in the file's record
//! (format 2, `docs/format.md` § Parts).
//!
//! This module owns the mapping of file offsets to parts and every structural change to the
//! parts (creating, extending, removing). It never decides *whether* a file is parted (that is
//! `FsOptions::parts` and `io_ops`), and never touches the store except through `commit`.
//!
//! Lock order: `parts_lock` (held for the whole of a structural change), then the state
//! lock, the journal, the directory-fd and part-file caches.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::{errno_of, leaf, Errno, Fs, Ino, Result};
use crate::meta::layout::StoreLayout;
use crate::meta::Parts;

/// The part size of new parted files unless the mount says otherwise: the largest multiple of
/// 4 KiB a FAT32 file can hold, so a file is split only when it must be.
pub const DEFAULT_PART_SIZE: u64 = crate::meta::MAX_PART_SIZE;

/// Part indexes are 8 hex digits.
const MAX_PARTS: u64 = 1 << 32;

/// The most missing or short parts `pershome fsck --repair` makes into holes for one file
/// (`Fs::mend_parts`). A FAT directory holds at most 65,536 entries, so a file missing more
/// parts than that was never written by pershome: its parts directory names a part far past
/// its data (planted, or a corrupt name), and making billions of hole files is no repair.
pub const MAX_MENDABLE_PARTS: u64 = 65_536;

/// The parts before `last` that are missing or shorter than `size`, from a sorted listing of
/// (index, length) only (never by walking every index up to `last`): how many in all, and the
/// first `show` of them, for a message.
pub fn missing_or_short(
    parts: &[(u64, u64)],
    last: u64,
    size: u64,
    show: usize,
) -> (u64, Vec<u64>) {
    let mut count = 0u64;
    let mut first = Vec::new();
    let mut expected = 1u64;
    let note = |from: u64, to: u64, count: &mut u64, first: &mut Vec<u64>| {
        *count += to - from;
        let room = show.saturating_sub(first.len()) as u64;
        first.extend(from..to.min(from.saturating_add(room)));
    };
    for &(k, len) in parts.iter().filter(|(k, _)| (1..last).contains(k)) {
        note(expected, k, &mut count, &mut first);
        if len < size {
            note(k, k + 1, &mut count, &mut first);
        }
        expected = k + 1;
    }
    note(expected.min(last), last, &mut count, &mut first);
    (count, first)
}

/// How many part files to keep open.
const PART_CACHE_MAX: usize = 64;

/// The largest size a file of these parts may reach (`EFBIG` past it).
pub(crate) fn max_size(p: Parts) -> u64 {
    p.size.saturating_mul(MAX_PARTS).min(i64::MAX as u64)
}

/// The length part `k` has in a file of `size` bytes (0 if the file ends before it).
fn part_len(p: Parts, size: u64, k: u64) -> u64 {
    size.saturating_sub(k * p.size).min(p.size)
}

/// The index of the part holding byte `offset`.
fn index_of(p: Parts, offset: u64) -> u64 {
    offset / p.size
}

/// A fresh random parts id (never 0), from the kernel's generator.
fn random_id(layout: StoreLayout) -> Result<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: buf is valid for 8 bytes; the result is checked.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != 8 {
        return Err(Errno::EIO);
    }
    let id = u64::from_le_bytes(buf);
    // The 8.3 layout names a parts directory with 8 hex digits.
    let id = match layout {
        StoreLayout::Long => id,
        StoreLayout::Short83 => id & u64::from(u32::MAX),
    };
    Ok(id.max(1))
}

impl Fs {
    /// The backing path of the directory of parts-id `id` (in the case the backing lists it).
    pub(crate) fn parts_dir_path(&self, id: u64) -> Result<Vec<u8>> {
        let name = self.layout.parts_id_dir(id).map_err(|e| {
            tracing::error!("{e}");
            Errno::EIO
        })?;
        let name = match self.backing.open_dir(&self.paths.parts) {
            Ok(dir) => self.store_entry(dir.as_fd(), name.into_bytes()),
            Err(_) => name.into_bytes(),
        };
        Ok(crate::backing::join(&[&self.paths.parts, &name]))
    }

    /// The name of part `k` in its directory `dir` (in the case the backing lists it).
    pub(crate) fn part_name_in(&self, dir: std::os::fd::BorrowedFd<'_>, k: u64) -> Vec<u8> {
        self.store_entry(dir, self.layout.part_file(k).into_bytes())
    }
}

/// What a parted file is made of right now: its first part (an open file) and its layout.
pub(crate) struct Layout<'a> {
    pub first: &'a File,
    pub parts: Parts,
    pub size: u64,
}

impl Fs {
    /// An open part `k ≥ 1`; `None` when it does not exist and `create` is false.
    fn part_file(&self, p: Parts, k: u64, create: bool) -> Result<Option<Arc<File>>> {
        let mut cache = self.part_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(&(p.id, k)) {
            return Ok(Some(f.clone()));
        }
        let dir = match self.backing.open_dir(&self.parts_dir_path(p.id)?) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !create => return Ok(None),
            Err(e) => return Err(errno_of(&e)),
        };
        let flags = match (self.opts.read_only, create) {
            (true, _) => libc::O_RDONLY,
            (false, false) => libc::O_RDWR,
            (false, true) => libc::O_RDWR | libc::O_CREAT,
        };
        let file = match self.backing.open_at(
            dir.as_fd(),
            &self.part_name_in(dir.as_fd(), k),
            flags,
            0o600,
        ) {
            Ok(f) => Arc::new(f),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !create => return Ok(None),
            Err(e) => return Err(errno_of(&e)),
        };
        if cache.len() >= PART_CACHE_MAX {
            cache.clear();
        }
        cache.insert((p.id, k), file.clone());
        Ok(Some(file))
    }

    fn forget_part_files(&self, id: u64) {
        self.part_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _), _| *i != id);
    }

    /// The indexes of the parts present on the backing (sorted), `[]` without a directory.
    pub(crate) fn list_parts(&self, id: u64) -> Vec<(u64, crate::backing::BackingStat)> {
        let Ok(path) = self.parts_dir_path(id) else {
            return Vec::new();
        };
        let Ok(dir) = self.backing.open_dir(&path) else {
            return Vec::new();
        };
        let mut out: Vec<_> = self
            .backing
            .list(dir.as_fd())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.stat.is_file)
            .filter_map(|e| self.layout.parse_part_file(&e.name).map(|k| (k, e.stat)))
            .collect();
        out.sort_by_key(|(k, _)| *k);
        out
    }

    fn file_for(&self, l: &Layout<'_>, k: u64, create: bool) -> Result<Option<Arc<File>>> {
        if k == 0 {
            // The first part is the handle's own file; a borrowed one is wrapped per call.
            return Ok(None);
        }
        self.part_file(l.parts, k, create)
    }

    /// Makes every part before `k` exactly a part long (creating missing ones as holes), so
    /// that part `k` may be written: the layout invariant.
    fn fill_before(&self, l: &Layout<'_>, k: u64) -> Result<()> {
        let from = if l.size == 0 {
            0
        } else {
            index_of(l.parts, l.size - 1)
        };
        for j in from..k {
            if part_len(l.parts, l.size, j) == l.parts.size {
                continue;
            }
            if j == 0 {
                self.set_part_len(l.first, l.parts.size)?;
            } else if let Some(f) = self.file_for(l, j, true)? {
                self.set_part_len(&f, l.parts.size)?;
            }
        }
        Ok(())
    }

    /// The indexes of the parts of `l` present on the backing from `from` to `to` (both
    /// included), part 0 (the file itself) always among them: every loop that visits a
    /// file's existing parts goes through this, so its length is what the listing shows,
    /// never what a size read from the stick implies (a planted part `ffffffff` in a record
    /// of 4 KiB parts makes a file of 16 TiB; walking its indexes one by one under
    /// `parts_lock` would hang the mount). The loops that create parts (`fill_before`,
    /// `copy_tail_into_parts`) run only as far as the caller's own write or the backing
    /// file's real length, with the mount's part size.
    fn present_parts(&self, l: &Layout<'_>, from: u64, to: u64) -> Vec<u64> {
        let mut present: Vec<u64> = self
            .list_parts(l.parts.id)
            .into_iter()
            .map(|(k, _)| k)
            .filter(|&k| (from..=to).contains(&k))
            .collect();
        if from == 0 {
            present.insert(0, 0);
        }
        present
    }

    /// Reads up to `len` bytes at `offset` of a parted file; holes and missing parts read as
    /// zeros.
    /// `fsync`/`fdatasync` of parts 1.. of a file of `size` bytes in parts `p` (part 0 is the
    /// handle's own file, synced by the caller). A part that does not exist is a hole: there
    /// is nothing of it to sync.
    pub(crate) fn sync_parts(&self, p: Parts, size: u64, datasync: bool) -> Result<()> {
        if size <= p.size {
            return Ok(());
        }
        // Only the parts the listing shows: a missing one is a hole, with nothing to sync.
        for (k, _) in self.list_parts(p.id) {
            if k > index_of(p, size - 1) {
                break;
            }
            if let Some(f) = self.part_file(p, k, false)? {
                self.backing
                    .sync_file(&f, datasync)
                    .map_err(|e| errno_of(&e))?;
            }
        }
        // New part files are entries of the parts directory: make them durable too.
        if let Ok(dir) = self.backing.open_dir(&self.parts_dir_path(p.id)?) {
            self.backing
                .fsync_dir(dir.as_fd())
                .map_err(|e| errno_of(&e))?;
        }
        Ok(())
    }

    pub(crate) fn parted_read(&self, l: &Layout<'_>, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = offset.saturating_add(len as u64).min(l.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let k = index_of(l.parts, pos);
            let seg_end = ((k + 1) * l.parts.size).min(end);
            let out = &mut buf[(pos - offset) as usize..(seg_end - offset) as usize];
            let in_part = pos - k * l.parts.size;
            let owned = self.file_for(l, k, false)?;
            let file: Option<&File> = if k == 0 {
                Some(l.first)
            } else {
                owned.as_deref()
            };
            if let Some(file) = file {
                self.read_full(file, out, in_part)?;
            }
            pos = seg_end;
        }
        Ok(buf)
    }

    /// Writes `data` at `offset` of a parted file, creating parts as needed. The caller holds
    /// `parts_lock` and updates the inode's size.
    pub(crate) fn parted_write(&self, l: &Layout<'_>, offset: u64, data: &[u8]) -> Result<usize> {
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > max_size(l.parts) {
            return Err(Errno::EFBIG);
        }
        if data.is_empty() {
            return Ok(0);
        }
        self.fill_before(l, index_of(l.parts, offset))?;
        let mut pos = offset;
        while pos < end {
            let k = index_of(l.parts, pos);
            let seg_end = ((k + 1) * l.parts.size).min(end);
            let chunk = &data[(pos - offset) as usize..(seg_end - offset) as usize];
            let in_part = pos - k * l.parts.size;
            let owned = self.file_for(l, k, true)?;
            let file: &File = match (k, owned.as_deref()) {
                (0, _) => l.first,
                (_, Some(f)) => f,
                (_, None) => return Err(Errno::EIO),
            };
            self.backing
                .write_at(file, chunk, in_part)
                .and_then(|_| self.backing.keep_in_order(file))
                .map_err(|e| errno_of(&e))?;
            pos = seg_end;
        }
        Ok(data.len())
    }

    /// Changes a parted file's length: growing makes holes (creating parts), shrinking
    /// removes the parts past the new end. The caller holds `parts_lock`.
    pub(crate) fn parted_set_len(&self, l: &Layout<'_>, new: u64) -> Result<()> {
        if new > max_size(l.parts) {
            return Err(Errno::EFBIG);
        }
        let last = if new == 0 {
            0
        } else {
            index_of(l.parts, new - 1)
        };
        if new > l.size {
            self.fill_before(l, last)?;
        } else {
            self.remove_parts_from(l.parts, last + 1)?;
        }
        let len = part_len(l.parts, new, last);
        if last == 0 {
            self.set_part_len(l.first, len)?;
        } else if let Some(f) = self.file_for(l, last, true)? {
            self.set_part_len(&f, len)?;
        }
        Ok(())
    }

    /// Sets a part's length. The lengths of the parts are the file's layout (the store does
    /// not hold it), so the next commit syncs the part before it records anything: after a
    /// power cut, the layout is never one the store's records do not match.
    fn set_part_len(&self, file: &File, len: u64) -> Result<()> {
        self.backing
            .set_len(file, len)
            .and_then(|()| self.backing.keep_in_order(file))
            .map_err(|e| errno_of(&e))
    }

    /// Removes parts `k ≥ from` (and `from ≥ 1`), whatever the store says: the listing is
    /// the truth.
    pub(crate) fn remove_parts_from(&self, p: Parts, from: u64) -> Result<()> {
        let from = from.max(1);
        self.forget_part_files(p.id);
        let Ok(dir) = self.backing.open_dir(&self.parts_dir_path(p.id)?) else {
            return Ok(());
        };
        for (k, _) in self.list_parts(p.id) {
            if k >= from {
                self.backing
                    .unlink_at(dir.as_fd(), &self.part_name_in(dir.as_fd(), k), false)
                    .map_err(|e| errno_of(&e))?;
            }
        }
        Ok(())
    }

    /// Removes every part of a file and its parts directory (the file is gone: its last name
    /// was removed and nothing has it open). Failures only leave orphans for fsck.
    pub(crate) fn remove_all_parts(&self, p: Parts) {
        if let Err(e) = self.remove_parts_from(p, 1) {
            tracing::warn!("removing the parts of a deleted file ({:016x}): {e}", p.id);
            return;
        }
        let Ok(path) = self.parts_dir_path(p.id) else {
            return;
        };
        if let Ok(dir) = self.backing.open_dir(&self.paths.parts) {
            let name = leaf(&path).to_vec();
            if let Err(e) = self.backing.unlink_at(dir.as_fd(), &name, true) {
                tracing::warn!("removing the parts directory of a deleted file: {e}");
            }
        }
    }

    /// `SEEK_DATA` / `SEEK_HOLE` across parts; a missing part is a hole. Visits only the parts
    /// the listing shows (`present_parts`), jumping over the missing ones.
    pub(crate) fn parted_seek(&self, l: &Layout<'_>, offset: u64, whence: i32) -> Result<u64> {
        if offset >= l.size {
            return Err(Errno::ENXIO);
        }
        let present =
            self.present_parts(l, index_of(l.parts, offset), index_of(l.parts, l.size - 1));
        let mut pos = offset;
        while pos < l.size {
            let k = index_of(l.parts, pos);
            if present.binary_search(&k).is_err() {
                // A missing part: a hole from `pos` on; data only in the next present part.
                if whence == libc::SEEK_HOLE {
                    return Ok(pos);
                }
                match present.iter().find(|&&j| j > k) {
                    Some(&next) => {
                        pos = next * l.parts.size;
                        continue;
                    }
                    None => break,
                }
            }
            let in_part = pos - k * l.parts.size;
            let plen = part_len(l.parts, l.size, k);
            let owned = self.file_for(l, k, false)?;
            let file: Option<&File> = if k == 0 {
                Some(l.first)
            } else {
                owned.as_deref()
            };
            let found = match file {
                None if whence == libc::SEEK_HOLE => Some(in_part),
                None => None,
                Some(f) => {
                    // The offset is per open file description; pershome's part fds are its own.
                    match self.backing.lseek(f, in_part as i64, whence) {
                        Ok(r) => Some(r as u64),
                        // SEEK_DATA: no data after in_part; SEEK_HOLE: in_part past EOF,
                        // which the invariant rules out, so treat it as the end.
                        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                            (whence == libc::SEEK_HOLE).then_some(plen)
                        }
                        Err(e) => return Err(errno_of(&e)),
                    }
                }
            };
            match found {
                // A hole at a part's end is only a hole of the file if it is the file's end;
                // otherwise the next part decides.
                Some(r) if whence == libc::SEEK_HOLE && r >= plen => {}
                Some(r) => return Ok((k * l.parts.size + r).min(l.size)),
                None => {}
            }
            pos = (k + 1) * l.parts.size;
        }
        if whence == libc::SEEK_HOLE {
            Ok(l.size)
        } else {
            Err(Errno::ENXIO)
        }
    }

    /// `fallocate` on a parted file: modes that act per byte range (allocate, punch a hole,
    /// zero a range) are applied part by part; modes that shift data are refused. The caller
    /// grows the file first when the mode changes its size.
    pub(crate) fn parted_fallocate(
        &self,
        l: &Layout<'_>,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<()> {
        if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        // Space past the end is only a reservation: not kept for parted files, whose later
        // parts must not exist before the data does.
        let end = offset.saturating_add(length).min(l.size);
        if offset >= end {
            return Ok(());
        }
        // A missing part is a hole already: nothing to allocate, punch or zero there.
        for k in self.present_parts(l, index_of(l.parts, offset), index_of(l.parts, end - 1)) {
            let pos = offset.max(k * l.parts.size);
            let seg_end = ((k + 1) * l.parts.size).min(end);
            let in_part = pos - k * l.parts.size;
            let owned = self.file_for(l, k, false)?;
            let file: Option<&File> = if k == 0 {
                Some(l.first)
            } else {
                owned.as_deref()
            };
            if let Some(f) = file {
                let r = self.backing.fallocate(
                    f,
                    mode | libc::FALLOC_FL_KEEP_SIZE,
                    in_part,
                    seg_end - pos,
                );
                if let Err(e) = r {
                    // FAT allocates nothing in advance: plain allocation is a no-op there.
                    if !(mode == 0 && e.raw_os_error() == Some(libc::EOPNOTSUPP)) {
                        return Err(errno_of(&e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens an inode's first part read-write for a structural change.
    pub(crate) fn open_first(&self, ino: Ino) -> Result<File> {
        let (dir, name) = self.lock().content_location(self, ino)?;
        let dirfd = self.backing.open_dir(&dir).map_err(|e| errno_of(&e))?;
        self.backing
            .open_at(dirfd.as_fd(), &name, libc::O_RDWR, 0)
            .map_err(|e| errno_of(&e))
    }

    /// Turns a whole file into a parted one (it is about to grow past `part_size`). Order,
    /// for crash safety: the parts directory is made and any bytes past the part size copied
    /// into parts first; then the record naming the parts is committed; only then is the
    /// first part cut to the part size. A crash before the commit leaves the whole file as it
    /// was (and an orphan parts directory for fsck); after it, the parts are authoritative.
    /// The caller holds `parts_lock`.
    pub(crate) fn make_parted(&self, ino: Ino) -> Result<Parts> {
        {
            let st = self.lock();
            if let Some(p) = st.inode(ino)?.meta.parts() {
                return Ok(p);
            }
            // The kernel reads and writes a passthrough file by itself and would go on seeing
            // only the first part: such a file cannot be split while it is open, and grows no
            // further than the backing allows, as on FAT itself (docs/architecture.md).
            if st.handles.values().any(|h| h.ino == ino && h.passthrough) {
                return Err(Errno::EFBIG);
            }
        }
        let parent = self
            .store_subdir(&self.paths.parts)
            .map_err(|e| errno_of(&e))?;
        let mut id = random_id(self.layout)?;
        let mut tries = 0;
        loop {
            let name = self.layout.parts_id_dir(id).map_err(|_| Errno::EIO)?;
            match self.backing.mkdir_at(parent.as_fd(), name.as_bytes()) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && tries < 8 => {
                    tries += 1;
                    id = random_id(self.layout)?;
                }
                Err(e) => return Err(errno_of(&e)),
            }
        }
        let parts = Parts {
            id,
            size: self.part_size,
        };
        let first = self.open_first(ino)?;
        let whole = crate::backing::Backing::fstat(&first)
            .map_err(|e| errno_of(&e))?
            .size;
        let result = self
            .copy_tail_into_parts(&first, parts, whole)
            .and_then(|()| {
                let mut st = self.lock();
                let inode = st.inode_mut(ino)?;
                inode.meta.set_parts(Some(parts));
                st.mark_dirty(ino);
                let r = self.commit_locked(&mut st);
                if r.is_err() {
                    if let Ok(inode) = st.inode_mut(ino) {
                        inode.meta.set_parts(None);
                    }
                }
                r
            });
        if let Err(e) = result {
            self.remove_all_parts(parts);
            return Err(e);
        }
        if whole > parts.size {
            // The commit synced the parts first (`set_part_len`, `keep_in_order`): only now
            // may the tail leave the first part. Synced at once, so the layout on the stick is
            // the committed one before anything else is written into the parts.
            self.backing
                .set_len(&first, parts.size)
                .and_then(|()| self.backing.sync_file(&first, false))
                .map_err(|e| errno_of(&e))?;
        }
        Ok(parts)
    }

    /// Copies the bytes of a whole file past the part size into parts (holes stay holes).
    fn copy_tail_into_parts(&self, first: &File, p: Parts, whole: u64) -> Result<()> {
        if whole <= p.size {
            return Ok(());
        }
        let mut buf = vec![0u8; (1 << 20).min(p.size) as usize];
        let mut pos = p.size;
        while pos < whole {
            // Skip holes: a sparse 5 GiB file must not become 5 GiB of zeros.
            let Ok(data) = self.backing.lseek(first, pos as i64, libc::SEEK_DATA) else {
                break;
            };
            pos = data as u64;
            if pos >= whole {
                break;
            }
            let n = (whole - pos).min(buf.len() as u64) as usize;
            self.read_full(first, &mut buf[..n], pos)?;
            let k = index_of(p, pos);
            let seg = n.min(((k + 1) * p.size - pos) as usize);
            let file = self.part_file(p, k, true)?.ok_or(Errno::EIO)?;
            self.backing
                .write_at(&file, &buf[..seg], pos - k * p.size)
                .and_then(|_| self.backing.keep_in_order(&file))
                .map_err(|e| errno_of(&e))?;
            pos += seg as u64;
        }
        // After skipping holes: every part before the last full-length, the last one ending
        // at `whole` (the layout invariant).
        for k in 1..=index_of(p, whole - 1) {
            let f = self.part_file(p, k, true)?.ok_or(Errno::EIO)?;
            self.set_part_len(&f, part_len(p, whole, k))?;
        }
        Ok(())
    }
}

impl Fs {
    /// Fills `out` from a part at `offset`; a short part reads as a hole.
    fn read_full(&self, file: &File, out: &mut [u8], offset: u64) -> Result<()> {
        let done = self
            .backing
            .read_at(file, out, offset)
            .map_err(|e| errno_of(&e))?;
        out[done..].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_short_counts_from_the_listing_alone() {
        // Parts 1 and 3 whole, 4 short, 2 and 5..9 missing; part 10 the last.
        let listed = [(1, 4096), (3, 4096), (4, 10), (10, 7)];
        assert_eq!(
            missing_or_short(&listed, 10, 4096, 3),
            (7, vec![2, 4, 5]),
            "2, 4 and 5..=9 are missing or short"
        );
        assert_eq!(
            missing_or_short(&[(1, 4096), (2, 1)], 2, 4096, 9),
            (0, vec![])
        );
        // A planted last part: counted, not walked.
        let (count, first) =
            missing_or_short(&[(1, 4096), (u32::MAX.into(), 1)], u32::MAX.into(), 4096, 2);
        assert_eq!((count, first), (u64::from(u32::MAX) - 2, vec![2, 3]));
    }
}
