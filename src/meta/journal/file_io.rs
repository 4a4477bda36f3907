//! Every system call on the store directory: opening, reading and listing store files,
//! writing, syncing, creating durably and removing them.
//!
//! Each write-like call passes the injected-fault gate and is counted in `WriteStats`. It
//! never follows a symlink and never reads more than `MAX_FILE_LEN` bytes of a file.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use nix::sys::uio::{pread, pwrite};
use nix::unistd::{fdatasync, fsync, unlinkat, UnlinkatFlags};

use super::format::HEADER_LEN;
use super::{io_err, Journal, Kind, OpenMode, StoreError, StoreLayout, MAX_FILE_LEN};
use crate::faults::{torn_len, Gate};

pub(super) fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

pub(super) fn open_at(
    dir: &OwnedFd,
    name: &str,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let fd = openat(Some(raw(dir)), name, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: openat just returned this descriptor, so it is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
pub(super) fn read_file(
    dir: &OwnedFd,
    sd: &str,
    name: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
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

/// The error an injected fault gives: what a pulled stick gives.
pub(super) fn injected(context: String) -> StoreError {
    StoreError::Io {
        context: format!("{context} (injected fault)"),
        source: Errno::EIO.into(),
    }
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

    /// Consults the injected faults, if any, before a write-like system call.
    pub(super) fn gate(&self) -> Gate {
        match &self.faults {
            None => Gate::Go,
            Some(f) => f.gate(),
        }
    }

    /// `gate` for an operation that cannot be torn: Err if it must fail.
    pub(super) fn gate_op(&self, context: impl FnOnce() -> String) -> Result<(), StoreError> {
        match self.gate() {
            Gate::Go => Ok(()),
            Gate::Fail { .. } => Err(injected(context())),
        }
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

    pub(super) fn sync_file(
        &mut self,
        fd: &OwnedFd,
        name: &str,
        data_only: bool,
    ) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        self.gate_op(|| format!("syncing {sd}/{name}"))?;
        self.stats.syncs += 1;
        let res = if data_only {
            fdatasync(raw(fd))
        } else {
            fsync(raw(fd))
        };
        res.map_err(io_err(format!("syncing {sd}/{name}")))
    }

    pub(super) fn sync_dir(&mut self) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        let dir = self.dir()?.as_raw_fd();
        self.gate_op(|| format!("syncing the directory {sd}"))?;
        self.stats.syncs += 1;
        fsync(dir).map_err(io_err(format!("syncing the directory {sd}")))
    }

    pub(super) fn unlink(&mut self, name: &str) -> Result<(), StoreError> {
        let sd = self.layout.store_dir();
        let dir = self.dir()?.as_raw_fd();
        self.gate_op(|| format!("removing {sd}/{name}"))?;
        let res = unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir);
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
    pub(super) fn create_durable(
        &mut self,
        name: &str,
        contents: &[u8],
    ) -> Result<OwnedFd, StoreError> {
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
}
