//! Every access to the store directory: opening, reading and listing store files, writing,
//! syncing, creating durably and removing them.
//!
//! The system calls themselves are `backing::sys`'s, the one layer every write to the stick
//! goes through, so the injected faults and the power-loss model of the tests see the store's
//! writes in the order they happen among the tree's. Each write-like call is counted here in
//! `WriteStats`. It never follows a symlink, never opens a file larger than `MAX_FILE_LEN`
//! bytes, and never reads a store file whole: `StoreReader` serves the scans one frame at a
//! time.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{fstat, Mode, SFlag};

use super::format::{Source, HEADER_LEN};
use super::{io_err, sys_err, Journal, Kind, OpenMode, StoreError, StoreLayout, MAX_FILE_LEN};
use crate::backing::sys;

pub(super) fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

/// Opens a store file below `dir` (`O_NOFOLLOW | O_CLOEXEC` always), through `backing::sys`.
pub(super) fn open_at(
    dir: &OwnedFd,
    name: &str,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    sys::openat(
        None,
        dir.as_fd(),
        name.as_bytes(),
        flags.bits(),
        mode.bits(),
    )
    .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

pub(super) fn is_regular(fd: &OwnedFd) -> Result<bool, Errno> {
    let st = fstat(raw(fd))?;
    Ok(SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG)
}

/// Opens a store file for reading: no symlink is followed, and O_NONBLOCK keeps a fifo that a
/// stick planted under a store name from hanging the open. None if it is not a regular file.
pub(super) fn open_for_read(
    dir: &OwnedFd,
    sd: &str,
    name: &str,
) -> Result<Option<OwnedFd>, StoreError> {
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

pub(super) fn read_at_most(
    fd: &OwnedFd,
    sd: &str,
    name: &str,
    want: usize,
) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; want];
    let got = sys::pread_full(fd.as_fd(), &mut buf, 0)
        .map_err(sys_err(format!("reading {sd}/{name}")))?;
    buf.truncate(got);
    Ok(buf)
}

/// A store file open for reading, read in pieces by the scans of `format` (never whole: a
/// stick decides how large its store files are).
#[derive(Debug)]
pub(super) struct StoreReader {
    fd: OwnedFd,
    len: usize,
    what: String,
}

impl StoreReader {
    /// Opens a store file for reading; None if it is not a regular file.
    pub(super) fn open(
        dir: &OwnedFd,
        sd: &str,
        name: &str,
    ) -> Result<Option<StoreReader>, StoreError> {
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
        Ok(Some(StoreReader {
            fd,
            // Cannot truncate: size <= MAX_FILE_LEN.
            len: size as usize,
            what: format!("{sd}/{name}"),
        }))
    }
}

impl Source for StoreReader {
    fn len(&self) -> usize {
        self.len
    }

    fn read_at(&self, at: usize, buf: &mut [u8]) -> Result<(), StoreError> {
        let got = sys::pread_full(self.fd.as_fd(), buf, at as u64)
            .map_err(sys_err(format!("reading {}", self.what)))?;
        if got < buf.len() {
            // The file shrank since it was opened (a live journal only grows): what was read
            // no longer describes one file.
            return Err(StoreError::Io {
                context: format!("reading {}: it shrank while being read", self.what),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(())
    }
}

pub(super) fn read_header(
    dir: &OwnedFd,
    sd: &str,
    name: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(fd) = open_for_read(dir, sd, name)? else {
        return Ok(None);
    };
    read_at_most(&fd, sd, name, HEADER_LEN).map(Some)
}

/// The recognised files of the store, by generation.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct GenFiles {
    pub(super) checkpoint: bool,
    pub(super) journal: bool,
}

#[allow(clippy::type_complexity)]
pub(super) fn list_store(
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

impl Journal {
    /// The name of a store file of this layout, as listed when the listing showed it in
    /// another case. Refused (not a panic) past the 8.3 layout's 32-bit generations.
    pub(super) fn name_of(&self, kind: Kind, generation: u64) -> Result<String, StoreError> {
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

    /// The injected faults of the tests, if any: `backing::sys` consults them.
    pub(super) fn faults(&self) -> Option<&crate::faults::Faults> {
        self.faults.as_deref()
    }

    pub(super) fn dir(&self) -> Result<&OwnedFd, StoreError> {
        match (self.mode, &self.dir) {
            (OpenMode::ReadWrite, Some(dir)) => Ok(dir),
            _ => Err(StoreError::ReadOnly),
        }
    }

    pub(super) fn write_all_at(
        &mut self,
        fd: &OwnedFd,
        name: &str,
        buf: &[u8],
        offset: u64,
    ) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        let faults = self.faults.as_deref();
        let stats = &mut self.stats;
        sys::pwrite_all(faults, fd.as_fd(), buf, offset, |n| {
            stats.writes += 1;
            stats.bytes += n as u64;
        })
        .map_err(sys_err(format!("writing {sd}/{name}")))
    }

    pub(super) fn sync_file(
        &mut self,
        fd: &OwnedFd,
        name: &str,
        data_only: bool,
    ) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        self.stats.syncs += 1;
        sys::sync(self.faults(), fd.as_fd(), data_only)
            .map_err(sys_err(format!("syncing {sd}/{name}")))
    }

    pub(super) fn sync_dir(&mut self) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        self.stats.syncs += 1;
        sys::sync(self.faults(), self.dir()?.as_fd(), false)
            .map_err(sys_err(format!("syncing the directory {sd}")))
    }

    pub(super) fn unlink(&mut self, name: &str) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        let res = sys::unlinkat(self.faults(), self.dir()?.as_fd(), name.as_bytes(), false);
        match res {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(sys_err(format!("removing {sd}/{name}"))(e)),
        }
        self.listed.retain(|_, listed| listed != name);
        Ok(())
    }

    /// Creates a file that must not exist yet (a leftover of a failed attempt is removed
    /// first: no file of a generation not yet in use holds anything committed), writes
    /// `contents`, and makes it and its directory entry durable. Returns the open file.
    pub(super) fn create_durable(
        &mut self,
        name: &str,
        contents: &[u8],
    ) -> Result<OwnedFd, StoreError> {
        let sd = self.layout.store_dir();
        self.unlink(name)?;
        let fd = sys::openat(
            self.faults(),
            self.dir()?.as_fd(),
            name.as_bytes(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .map_err(sys_err(format!("creating {sd}/{name}")))?;
        self.write_all_at(&fd, name, contents, 0)?;
        // A full fsync: the file's size is metadata the data cannot be found without.
        self.sync_file(&fd, name, false)?;
        self.sync_dir()?;
        Ok(fd)
    }
}
