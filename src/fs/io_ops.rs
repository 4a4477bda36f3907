//! Operations on file content and attributes: create/open/read/write/release, fsync,
//! fallocate, lseek, copy_file_range, setattr, statfs. Data I/O runs on the backing file
//! without holding the state lock, so several FUSE threads can read and write at once.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::namespace::{backing_open_flags, NewNode};
use super::{errno_of, now, Attr, Ctx, Errno, Fs, Handle, Ino, Kind, Result, SetAttr, SetTime};
use crate::fatrules::MAX_FILE_SIZE;

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
            },
        );
        Ok((attr, fh))
    }

    pub fn open(&self, ino: Ino, flags: i32) -> Result<u64> {
        let acc = flags & libc::O_ACCMODE;
        if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.check_writable()?;
        }
        let mut st = self.lock();
        let inode = st.inode(ino)?;
        match inode.kind {
            Kind::File | Kind::Symlink => {}
            Kind::Dir => return Err(Errno::EISDIR),
            // The kernel opens fifos, sockets and devices itself; pershome never serves them.
            _ => return Err(Errno::ENXIO),
        }
        let (dir, name) = st.content_location(ino)?;
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
            },
        );
        Ok(fh)
    }

    fn handle_file(&self, fh: u64) -> Result<(Ino, Arc<File>)> {
        let st = self.lock();
        let h = st.handles.get(&fh).ok_or(Errno::EBADF)?;
        Ok((h.ino, h.file.clone()))
    }

    /// A backing file for the kernel to read and write directly (FUSE passthrough): one per
    /// inode, opened read-write (read-only on a read-only mount) whatever the first `open`
    /// asked, because the kernel uses it for every handle of the inode.
    pub fn passthrough_file(&self, ino: Ino) -> Result<File> {
        let st = self.lock();
        if st.inode(ino)?.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        let (dir, name) = st.content_location(ino)?;
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
        let (_, file) = self.handle_file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno_of(&e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.check_writable()?;
        let (ino, file) = self.handle_file(fh)?;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE_SIZE + 1 {
            return Err(Errno::EFBIG);
        }
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
        if let Ok(inode) = st.inode_mut(ino) {
            if let Some(stat) = stat {
                inode.note_backing(&stat);
            }
            inode.opens = inode.opens.saturating_sub(1);
            if inode.opens == 0 {
                if let Some(id) = inode.link_id.filter(|_| inode.meta.nlink == 0) {
                    remove_link = Some(id);
                }
            }
        }
        if let Some(id) = remove_link {
            self.remove_link_content(id);
        }
        st.maybe_drop(ino);
        Ok(())
    }

    /// Makes a file's data and all metadata durable on the stick.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let (_, file) = self.handle_file(fh)?;
        self.backing
            .sync_file(&file, datasync)
            .map_err(|e| errno_of(&e))?;
        self.commit()
    }

    pub fn fsyncdir(&self, _ino: Ino) -> Result<()> {
        self.commit()
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        self.check_writable()?;
        let (ino, file) = self.handle_file(fh)?;
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE_SIZE + 1 && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            return Err(Errno::EFBIG);
        }
        self.backing.check_fault().map_err(|e| errno_of(&e))?;
        // SAFETY: valid fd; result checked.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
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
        let (_, file) = self.handle_file(fh)?;
        // SAFETY: valid fd; lseek on our own private descriptor; result checked.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if r < 0 {
            return Err(errno_of(&std::io::Error::last_os_error()));
        }
        Ok(r)
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
        let (_, fin) = self.handle_file(fh_in)?;
        let (ino_out, fout) = self.handle_file(fh_out)?;
        let end = off_out.checked_add(len).ok_or(Errno::EFBIG)?;
        let len = if end > MAX_FILE_SIZE + 1 {
            (MAX_FILE_SIZE + 1).saturating_sub(off_out)
        } else {
            len
        };
        if len == 0 && end > MAX_FILE_SIZE + 1 {
            return Err(Errno::EFBIG);
        }
        self.backing.check_fault().map_err(|e| errno_of(&e))?;
        let mut oi = off_in as libc::loff_t;
        let mut oo = off_out as libc::loff_t;
        // SAFETY: valid fds and offsets; result checked.
        let r = unsafe {
            libc::copy_file_range(
                fin.as_raw_fd(),
                &mut oi,
                fout.as_raw_fd(),
                &mut oo,
                len as usize,
                0,
            )
        };
        let n = if r < 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EXDEV)
                    | Some(libc::EOPNOTSUPP)
                    | Some(libc::ENOSYS)
                    | Some(libc::EINVAL)
            ) {
                return Err(errno_of(&e));
            }
            // The backing cannot copy in-kernel: copy through a buffer.
            let chunk = len.min(1 << 20) as usize;
            let mut buf = vec![0u8; chunk];
            let got = fin.read_at(&mut buf, off_in).map_err(|e| errno_of(&e))?;
            self.backing
                .write_at(&fout, &buf[..got], off_out)
                .map_err(|e| errno_of(&e))? as u64
        } else {
            self.backing
                .stats
                .bytes
                .fetch_add(r as u64, std::sync::atomic::Ordering::Relaxed);
            self.backing
                .stats
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            r as u64
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
        if let Some(size) = set.size {
            if size > MAX_FILE_SIZE {
                return Err(Errno::EFBIG);
            }
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
                    let (dir, name) = st.content_location(ino)?;
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
