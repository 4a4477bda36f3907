//! Operations on file content and attributes: create/open/read/write/release, fsync,
//! fallocate, lseek, copy_file_range, setattr, statfs. Data I/O runs on the backing file
//! without holding the state lock, so several FUSE threads can read and write at once.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::namespace::{backing_open_flags, NewNode};
use super::parts::Layout;
use super::{errno_of, now, Attr, Ctx, Errno, Fs, Handle, Ino, Kind, Result, SetAttr, SetTime};
use crate::meta::Parts;

/// What a data operation on an open file works on: the handle's backing file (the whole file,
/// or its first part) and, for a parted file, its parts and length.
struct Io {
    ino: Ino,
    file: Arc<File>,
    parts: Option<Parts>,
    size: u64,
}

impl Io {
    fn layout(&self) -> Option<Layout<'_>> {
        self.parts.map(|parts| Layout {
            first: &self.file,
            parts,
            size: self.size,
        })
    }
}

/// What `statfs` reports.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl Fs {
    pub fn create(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, u64)> {
        let node = NewNode {
            kind: Kind::File,
            perm: mode,
            rdev: 0,
            symlink: None,
        };
        let (attr, file) = self.create_node(ctx, parent, name, node, Some(flags))?;
        let file = file.ok_or(Errno::EIO)?;
        let mut st = self.lock();
        let fh = st.alloc_fh();
        st.inode_mut(attr.ino)?.opens += 1;
        st.handles.insert(
            fh,
            Handle {
                ino: attr.ino,
                file: Arc::new(file),
                passthrough: false,
                writable: flags & libc::O_ACCMODE != libc::O_RDONLY,
            },
        );
        Ok((attr, fh))
    }

    pub fn open(&self, ino: Ino, flags: i32) -> Result<u64> {
        let acc = flags & libc::O_ACCMODE;
        if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.check_writable()?;
        }
        // O_TRUNC of a parted file removes its parts: a structural change.
        let _parts = (flags & libc::O_TRUNC != 0).then(|| self.parts_guard());
        let mut st = self.lock();
        let inode = st.inode(ino)?;
        match inode.kind {
            Kind::File | Kind::Symlink => {}
            Kind::Dir => return Err(Errno::EISDIR),
            // The kernel opens fifos, sockets and devices itself; pershome never serves them.
            _ => return Err(Errno::ENXIO),
        }
        let (dir, name) = st.content_location(self, ino)?;
        let dirfd = self.backing.open_dir(&dir).map_err(|e| errno_of(&e))?;
        let bflags = if self.opts.read_only {
            libc::O_RDONLY
        } else {
            backing_open_flags(flags)
        };
        let file = self
            .backing
            .open_at(dirfd.as_fd(), &name, bflags, 0)
            .map_err(|e| errno_of(&e))?;
        let fh = st.alloc_fh();
        let inode = st.inode_mut(ino)?;
        inode.opens += 1;
        if bflags & libc::O_TRUNC != 0 && inode.size != 0 {
            if let Some(p) = inode.meta.parts() {
                self.remove_parts_from(p, 1)?;
            }
            let inode = st.inode_mut(ino)?;
            let t = now();
            inode.size = 0;
            inode.blocks = 0;
            inode.meta.mtime = t;
            inode.meta.ctime = t;
            st.mark_dirty(ino);
        }
        st.handles.insert(
            fh,
            Handle {
                ino,
                file: Arc::new(file),
                passthrough: false,
                writable: acc != libc::O_RDONLY,
            },
        );
        Ok(fh)
    }

    fn handle_file(&self, fh: u64) -> Result<(Ino, Arc<File>)> {
        let st = self.lock();
        let h = st.handles.get(&fh).ok_or(Errno::EBADF)?;
        Ok((h.ino, h.file.clone()))
    }

    fn handle_io(&self, fh: u64) -> Result<Io> {
        let st = self.lock();
        let h = st.handles.get(&fh).ok_or(Errno::EBADF)?;
        let inode = st.inode(h.ino)?;
        Ok(Io {
            ino: h.ino,
            file: h.file.clone(),
            parts: inode.meta.parts(),
            size: inode.size,
        })
    }

    pub(crate) fn parts_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.parts_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an operation reaching `end` must work on parts: the file is parted already, or
    /// it is about to grow past the part size on a mount that splits.
    fn needs_parts(&self, io: &Io, end: u64) -> bool {
        io.parts.is_some() || (self.may_split(io.ino) && end > self.part_size && end > io.size)
    }

    /// Whether a whole file may be split now: on a mount that splits, unless the kernel has
    /// it open through passthrough (it would go on writing the first part alone); such a file
    /// grows whole up to the backing's limit and is split at a later write through pershome.
    fn may_split(&self, ino: Ino) -> bool {
        self.split
            && !self
                .lock()
                .handles
                .values()
                .any(|h| h.ino == ino && h.passthrough)
    }

    /// With `parts_lock` held: the handle's state again (another thread may have split the
    /// file meanwhile), split first when `grow_to` passes the part size of a whole file.
    fn parted_io(&self, fh: u64, grow_to: u64) -> Result<Io> {
        let mut io = self.handle_io(fh)?;
        if io.parts.is_none() && grow_to > self.part_size && self.may_split(io.ino) {
            io.parts = Some(self.make_parted(io.ino)?);
        }
        Ok(io)
    }

    /// After a size change of a parted file: its new size, blocks and times.
    fn note_growth(&self, ino: Ino, size: u64, set: bool) {
        let mut st = self.lock();
        if let Ok(inode) = st.inode_mut(ino) {
            let t = now();
            inode.size = if set { size } else { inode.size.max(size) };
            inode.blocks = inode.size.div_ceil(512);
            inode.meta.mtime = t;
            inode.meta.ctime = t;
            st.mark_dirty(ino);
        }
    }

    /// A backing file for the kernel to read and write directly (FUSE passthrough): one per
    /// inode, opened read-write (read-only on a read-only mount) whatever the first `open`
    /// asked, because the kernel uses it for every handle of the inode. Asked when handle `fh`
    /// is the first to want passthrough for `ino`.
    ///
    /// The kernel insists that all open handles of an inode agree (all passthrough or none),
    /// and it would read and write only the first part of a parted file and could never let
    /// pershome split one. So this refuses (`EOPNOTSUPP`, and the handle is served by the
    /// daemon) when another handle of the inode is open already, for a parted file, and, on
    /// a mount that splits files, for a writer (it might write past the part size: `cp` of a
    /// 5 GiB file) or a file of half a part or more (docs/architecture.md).
    pub fn passthrough_file(&self, ino: Ino, fh: u64) -> Result<File> {
        let st = self.lock();
        let inode = st.inode(ino)?;
        if inode.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        let writable = st.handles.get(&fh).is_some_and(|h| h.writable);
        let others = st.handles.iter().any(|(&f, h)| h.ino == ino && f != fh);
        if others
            || inode.meta.parts().is_some()
            || (self.split && (writable || inode.size >= self.part_size / 2))
        {
            return Err(Errno::EOPNOTSUPP);
        }
        let (dir, name) = st.content_location(self, ino)?;
        let dirfd = self.backing.open_dir(&dir).map_err(|e| errno_of(&e))?;
        let flags = if self.opts.read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        self.backing
            .open_at(dirfd.as_fd(), &name, flags, 0)
            .map_err(|e| errno_of(&e))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let io = self.handle_io(fh)?;
        if io.parts.is_some() {
            let _parts = self.parts_guard();
            let io = self.handle_io(fh)?;
            if let Some(l) = io.layout() {
                return self.parted_read(&l, offset, size as usize);
            }
        }
        let (file, known_size) = (io.file, io.size);
        let mut buf = vec![0u8; size as usize];
        let done = self
            .backing
            .read_at(&file, &mut buf, offset)
            .map_err(|e| errno_of(&e))?;
        buf.truncate(done);
        // Only a read that stops short of the size the file had when it began can have met a
        // split; an ordinary read to the end of the file takes no lock here.
        if done < size as usize && self.split && offset + (done as u64) < known_size {
            // A short read of a whole file may be a split that cut this file to its first
            // part while we read: the rest is in parts now. Read it again from the parts,
            // else a reader would take the cut for the end of the file.
            let _parts = self.parts_guard();
            let io = self.handle_io(fh)?;
            if let Some(l) = io.layout() {
                return self.parted_read(&l, offset, size as usize);
            }
        }
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.check_writable()?;
        let io = self.handle_io(fh)?;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if self.needs_parts(&io, end) {
            let _parts = self.parts_guard();
            let io = self.parted_io(fh, end)?;
            if let Some(l) = io.layout() {
                let n = self.parted_write(&l, offset, data)?;
                self.note_growth(io.ino, offset + n as u64, false);
                return Ok(n as u32);
            }
        }
        let (ino, file) = (io.ino, io.file);
        let n = self
            .backing
            .write_at(&file, data, offset)
            .map_err(|e| errno_of(&e))?;
        let mut st = self.lock();
        if let Ok(inode) = st.inode_mut(ino) {
            let t = now();
            inode.size = inode.size.max(offset + n as u64);
            inode.blocks = inode.size.div_ceil(512);
            inode.meta.mtime = t;
            inode.meta.ctime = t;
            st.mark_dirty(ino);
        }
        Ok(n as u32)
    }

    /// Nothing to do: data reaches the backing file at each write. The adapter opens files
    /// `FOPEN_NOFLUSH`, so the kernel does not even send FLUSH; work that must happen at
    /// close belongs in `release`.
    pub fn flush(&self, _fh: u64) -> Result<()> {
        Ok(())
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let mut st = self.lock();
        let Some((ino, passthrough)) = st.handles.get(&fh).map(|h| (h.ino, h.passthrough)) else {
            return Ok(());
        };
        if passthrough {
            // The kernel wrote this file without us: take its size and mtime first.
            st.refresh_passthrough(ino);
        }
        let Some(handle) = st.handles.remove(&fh) else {
            return Ok(());
        };
        // Remember what the backing file looks like after our writes, so the next mount can
        // tell our changes from another computer's.
        let stat = crate::backing::Backing::fstat(&handle.file).ok();
        drop(handle);
        let mut remove_link = None;
        let mut remove_parts = None;
        if let Ok(inode) = st.inode_mut(ino) {
            if let Some(stat) = stat {
                inode.note_backing(&stat);
            }
            inode.opens = inode.opens.saturating_sub(1);
            if inode.opens == 0 {
                if let Some(id) = inode.link_id().filter(|_| inode.meta.nlink() == 0) {
                    remove_link = Some(id);
                }
                let gone = match inode.link_id() {
                    Some(_) => inode.meta.nlink() == 0,
                    None => inode.parent == 0,
                };
                if gone {
                    remove_parts = inode.meta.parts();
                }
            }
        }
        if let Some(id) = remove_link {
            self.remove_link_content(id);
        }
        if let Some(p) = remove_parts {
            // The last name went while the file was open: its parts go with its last close.
            self.remove_all_parts(p);
        }
        st.maybe_drop(ino);
        Ok(())
    }

    /// Makes a file's data and all metadata durable on the stick.
    /// Makes a file's data and all metadata durable on the stick. A file in parts has its
    /// later parts synced too: the bytes the caller wrote may be in any of them.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let io = self.handle_io(fh)?;
        self.backing
            .sync_file(&io.file, datasync)
            .map_err(|e| errno_of(&e))?;
        if let Some(p) = io.parts {
            let _parts = self.parts_guard();
            // The size may have changed since `handle_io`; the parts lock keeps it still now.
            let size = self.lock().inode(io.ino).map_or(io.size, |i| i.size);
            self.sync_parts(p, size, datasync)?;
        }
        self.commit()
    }

    pub fn fsyncdir(&self, _ino: Ino) -> Result<()> {
        self.commit()
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        self.check_writable()?;
        let io = self.handle_io(fh)?;
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        let grows = mode & libc::FALLOC_FL_KEEP_SIZE == 0;
        if io.parts.is_some() || (grows && self.needs_parts(&io, end)) {
            let _parts = self.parts_guard();
            let mut io = self.parted_io(fh, if grows { end } else { 0 })?;
            if io.parts.is_some() {
                if grows && end > io.size {
                    if let Some(l) = io.layout() {
                        self.parted_set_len(&l, end)?;
                    }
                    io.size = end;
                }
                if let Some(l) = io.layout() {
                    self.parted_fallocate(&l, offset, length, mode)?;
                }
                if grows {
                    self.note_growth(io.ino, end, false);
                }
                return Ok(());
            }
        }
        let (ino, file) = (io.ino, io.file);
        if let Err(e) = self.backing.fallocate(&file, mode, offset, length) {
            // FAT cannot punch holes or allocate without zeroing; plain allocation can always be
            // done by writing zeros, which is what FAT stores for unwritten space anyway.
            if mode == 0 && e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                let size = crate::backing::Backing::fstat(&file)
                    .map_err(|e| errno_of(&e))?
                    .size;
                if end > size {
                    self.backing.set_len(&file, end).map_err(|e| errno_of(&e))?;
                }
            } else {
                return Err(errno_of(&e));
            }
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            let mut st = self.lock();
            if let Ok(inode) = st.inode_mut(ino) {
                if end > inode.size {
                    inode.size = end;
                    inode.blocks = end.div_ceil(512);
                }
                let t = now();
                inode.meta.mtime = t;
                inode.meta.ctime = t;
                st.mark_dirty(ino);
            }
        }
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let io = self.handle_io(fh)?;
        if io.parts.is_some() {
            let _parts = self.parts_guard();
            let io = self.handle_io(fh)?;
            if let Some(l) = io.layout() {
                let off = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
                return match whence {
                    libc::SEEK_DATA | libc::SEEK_HOLE => {
                        Ok(self.parted_seek(&l, off, whence)? as i64)
                    }
                    libc::SEEK_SET => Ok(offset),
                    libc::SEEK_END => Ok((l.size as i64).saturating_add(offset)),
                    _ => Err(Errno::EINVAL),
                };
            }
        }
        let file = io.file;
        // The offset is our own private descriptor's: no other handle is moved.
        self.backing
            .lseek(&file, offset, whence)
            .map_err(|e| errno_of(&e))
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64> {
        self.check_writable()?;
        let io_in = self.handle_io(fh_in)?;
        let io_out = self.handle_io(fh_out)?;
        let end = off_out.checked_add(len).ok_or(Errno::EFBIG)?;
        if io_in.parts.is_some() || self.needs_parts(&io_out, end) {
            // Parts are not one file the kernel could copy between: copy through a buffer,
            // with the same splitting as any write.
            let chunk = len.min(1 << 20) as u32;
            let data = self.read(fh_in, off_in, chunk)?;
            if data.is_empty() {
                return Ok(0);
            }
            return Ok(u64::from(self.write(fh_out, off_out, &data)?));
        }
        let (fin, ino_out, fout) = (io_in.file, io_out.ino, io_out.file);
        let n = match self
            .backing
            .copy_file_range(&fin, off_in, &fout, off_out, len)
        {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV)
                        | Some(libc::EOPNOTSUPP)
                        | Some(libc::ENOSYS)
                        | Some(libc::EINVAL)
                ) =>
            {
                // The backing cannot copy in-kernel: copy through a buffer.
                let mut buf = vec![0u8; len.min(1 << 20) as usize];
                let got = self
                    .backing
                    .read_at(&fin, &mut buf, off_in)
                    .map_err(|e| errno_of(&e))?;
                self.backing
                    .write_at(&fout, &buf[..got], off_out)
                    .map_err(|e| errno_of(&e))? as u64
            }
            Err(e) => return Err(errno_of(&e)),
        };
        if n > 0 {
            let mut st = self.lock();
            if let Ok(inode) = st.inode_mut(ino_out) {
                let t = now();
                inode.size = inode.size.max(off_out + n);
                inode.blocks = inode.size.div_ceil(512);
                inode.meta.mtime = t;
                inode.meta.ctime = t;
                st.mark_dirty(ino_out);
            }
        }
        Ok(n)
    }

    pub fn setattr(&self, ino: Ino, set: SetAttr) -> Result<Attr> {
        self.check_writable()?;
        let _parts;
        let mut parted_done = false;
        if let Some(size) = set.size {
            let (kind, parts, cur) = {
                let st = self.lock();
                let i = st.inode(ino)?;
                (i.kind, i.meta.parts(), i.size)
            };
            if kind == Kind::File
                && (parts.is_some() || (size > self.part_size && size > cur && self.may_split(ino)))
            {
                _parts = self.parts_guard();
                // Not `match self.lock()…`: the guard would live through `make_parted`, which
                // takes the state lock itself.
                let known = self.lock().inode(ino)?.meta.parts();
                let parts = match known {
                    Some(p) => p,
                    None => self.make_parted(ino)?,
                };
                let first = self.open_first(ino)?;
                let cur = self.lock().inode(ino)?.size;
                let l = Layout {
                    first: &first,
                    parts,
                    size: cur,
                };
                self.parted_set_len(&l, size)?;
                let stat = crate::backing::Backing::fstat(&first).ok();
                if let (Some(stat), Ok(inode)) = (stat, self.lock().inode_mut(ino)) {
                    inode.note_backing(&stat);
                }
                parted_done = true;
            }
        }
        if let Some(size) = set.size.filter(|_| !parted_done) {
            let handle_file = set
                .fh
                .and_then(|fh| self.handle_file(fh).ok())
                .map(|(_, f)| f);
            let file = match handle_file {
                Some(f) => f,
                None => {
                    let st = self.lock();
                    let inode = st.inode(ino)?;
                    match inode.kind {
                        Kind::File => {}
                        Kind::Dir => return Err(Errno::EISDIR),
                        _ => return Err(Errno::EINVAL),
                    }
                    let (dir, name) = st.content_location(self, ino)?;
                    let dirfd = self.backing.open_dir(&dir).map_err(|e| errno_of(&e))?;
                    Arc::new(
                        self.backing
                            .open_at(dirfd.as_fd(), &name, libc::O_WRONLY, 0)
                            .map_err(|e| errno_of(&e))?,
                    )
                }
            };
            self.backing
                .set_len(&file, size)
                .map_err(|e| errno_of(&e))?;
            let stat = crate::backing::Backing::fstat(&file).ok();
            if let (Some(stat), Ok(inode)) = (stat, self.lock().inode_mut(ino)) {
                inode.note_backing(&stat);
            }
        }
        let mut st = self.lock();
        let t = now();
        let inode = st.inode_mut(ino)?;
        if let Some(mode) = set.mode {
            inode.meta.mode = inode.kind.type_bits() | (mode & 0o7777);
        }
        if let Some(uid) = set.uid {
            inode.meta.uid = uid;
        }
        if let Some(gid) = set.gid {
            inode.meta.gid = gid;
        }
        if set.kill_set_id {
            inode.meta.mode = without_set_id(inode.kind, inode.meta.mode);
        }
        if let Some(size) = set.size {
            inode.size = size;
            inode.blocks = size.div_ceil(512);
            inode.meta.mtime = t;
        }
        let resolve = |s: SetTime| match s {
            SetTime::Now => t,
            SetTime::At(ts) => ts,
        };
        if let Some(a) = set.atime {
            inode.meta.atime = resolve(a);
        }
        if let Some(m) = set.mtime {
            inode.meta.mtime = resolve(m);
        }
        inode.meta.ctime = set.ctime.unwrap_or(t);
        let attr = inode.attr(ino);
        st.mark_dirty(ino);
        Ok(attr)
    }

    /// Clears the set-ID bits a write by an unprivileged caller removes (the kernel asks for
    /// it with FUSE_WRITE_KILL_SUIDGID once the daemon handles that, see `crate::fuse`).
    pub fn kill_set_id(&self, ino: Ino) -> Result<Attr> {
        let mut st = self.lock();
        let inode = st.inode_mut(ino)?;
        let mode = without_set_id(inode.kind, inode.meta.mode);
        if mode != inode.meta.mode {
            inode.meta.mode = mode;
            inode.meta.ctime = now();
            let attr = inode.attr(ino);
            st.mark_dirty(ino);
            return Ok(attr);
        }
        Ok(inode.attr(ino))
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let s = self.backing.statvfs().map_err(|e| errno_of(&e))?;
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: 255,
            frsize: s.f_frsize as u32,
        })
    }
}

/// `mode` as a chown, a truncate or a write by an unprivileged caller leaves it on Linux: no
/// set-user-ID bit, and no set-group-ID bit where the group may execute (a set-group-ID bit
/// without group execute marks mandatory locking, and stays). Directories keep both: their
/// set-group-ID bit is inheritance, not privilege.
pub(crate) fn without_set_id(kind: Kind, mode: u32) -> u32 {
    if kind == Kind::Dir {
        return mode;
    }
    let mut mode = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        mode &= !libc::S_ISGID;
    }
    mode
}
