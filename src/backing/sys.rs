//! The system calls that change the stick, on file descriptors: the one layer below
//! `Backing` (which resolves paths safely and calls these) and the metadata store (which keeps
//! its own descriptors below the directory it was given, and calls these too).
//!
//! Each call here consults the test hooks before it acts (`crate::faults::Faults`: count,
//! fail, tear) and tells the power-loss model (`power_loss::PowerLoss`) what it needs after
//! it succeeded: syncs, and names removed. In production `faults` is `None` and each call is
//! the bare system call. This module never resolves a path with more than one component and
//! never decides what to write.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::faults::{torn_len, Faults, Gate};

/// The error an injected fault gives: EIO, what a pulled stick gives.
pub fn injected() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstr(bytes: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The injected error when the hooks say this call must fail (it cannot be torn).
pub fn gate(faults: Option<&Faults>) -> io::Result<()> {
    match faults.map_or(Gate::Go, Faults::gate) {
        Gate::Go => Ok(()),
        Gate::Fail { .. } => Err(injected()),
    }
}

/// `openat(2)` below `dir`, `O_NOFOLLOW | O_CLOEXEC` always. Creating or truncating counts as
/// a write.
pub fn openat(
    faults: Option<&Faults>,
    dir: BorrowedFd<'_>,
    name: &[u8],
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    if flags & (libc::O_CREAT | libc::O_TRUNC) != 0 {
        gate(faults)?;
    }
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid arguments; result checked.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode) })?;
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes all of `data` at `offset` (a torn injected fault writes the first half of what is
/// left first). Calls `counted(n)` for every successful `pwrite` of `n` bytes.
pub fn pwrite_all(
    faults: Option<&Faults>,
    fd: BorrowedFd<'_>,
    data: &[u8],
    offset: u64,
    mut counted: impl FnMut(usize),
) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let at = offset + done as u64;
        if let Gate::Fail { torn } = faults.map_or(Gate::Go, Faults::gate) {
            let part = &data[done..done + torn_len(data.len() - done)];
            if torn && !part.is_empty() {
                // The error of a torn write is the injected one, whatever this gives.
                let _ = pwrite(fd, part, at);
            }
            return Err(injected());
        }
        match pwrite(fd, &data[done..], at) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            Ok(n) => {
                done += n;
                counted(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    // SAFETY: buf is valid for its length; result checked.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `pread(2)` until `buf` is full or the file ends; the bytes read. Reads change nothing and
/// are not gated.
pub fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: rest is valid for its length; result checked.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                rest.as_mut_ptr().cast(),
                rest.len(),
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(done)
}

/// `fsync(2)` (or `fdatasync(2)` when `data_only`) of a file or directory. Once it returned
/// Ok, the power-loss model takes the file's content (a directory's entries) as durable.
pub fn sync(faults: Option<&Faults>, fd: BorrowedFd<'_>, data_only: bool) -> io::Result<()> {
    gate(faults)?;
    // SAFETY: valid fd; result checked.
    check(unsafe {
        if data_only {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })?;
    if let Some(power) = faults.and_then(Faults::power) {
        power.synced(fd);
    }
    Ok(())
}

/// `ftruncate(2)`.
pub fn ftruncate(faults: Option<&Faults>, fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    gate(faults)?;
    // SAFETY: valid fd; result checked.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

/// `mkdirat(2)` with mode 0700: the mode on the stick means nothing (FAT has none).
pub fn mkdirat(faults: Option<&Faults>, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    gate(faults)?;
    // SAFETY: valid arguments; result checked.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o700) }).map(drop)
}

/// `unlinkat(2)` of a file, or with `is_dir` of an empty directory.
pub fn unlinkat(
    faults: Option<&Faults>,
    dir: BorrowedFd<'_>,
    name: &[u8],
    is_dir: bool,
) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    gate(faults)?;
    let power = faults.and_then(Faults::power);
    let victim = power.and_then(|p| p.inode_at(dir, name));
    // SAFETY: valid arguments; result checked.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) })?;
    if let Some(p) = power {
        p.forget(victim);
    }
    Ok(())
}

/// `renameat2(2)`; `flags` may hold `RENAME_NOREPLACE` or `RENAME_EXCHANGE`.
pub fn renameat(
    faults: Option<&Faults>,
    from_dir: BorrowedFd<'_>,
    from: &[u8],
    to_dir: BorrowedFd<'_>,
    to: &[u8],
    flags: libc::c_uint,
) -> io::Result<()> {
    let f = cstr(from)?;
    let t = cstr(to)?;
    gate(faults)?;
    // A rename over an existing name removes that name's file (not when exchanging, and not
    // when both names are the same file, which rename leaves alone).
    let power = faults.and_then(Faults::power);
    let victim = power
        .filter(|_| flags & libc::RENAME_EXCHANGE == 0)
        .and_then(|p| p.inode_at(to_dir, to))
        .filter(|&v| power.and_then(|p| p.inode_at(from_dir, from)) != Some(v));
    // SAFETY: valid arguments; result checked.
    check(unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
            flags,
        )
    })?;
    if let Some(p) = power {
        p.forget(victim);
        p.renamed(to_dir, to);
        if flags & libc::RENAME_EXCHANGE != 0 {
            p.renamed(from_dir, from);
        }
    }
    Ok(())
}
