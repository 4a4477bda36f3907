//! Every access to the backing directory (the stick's `pershome/`) goes through here.
//!
//! Paths are resolved only with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the
//! backing root, and leaf operations use `*at()` calls on a directory fd with `O_NOFOLLOW` /
//! `AT_SYMLINK_NOFOLLOW`, so a symlink planted in the backing (possible on a plain-directory or
//! sshfs backing; FAT itself has none) can never lead pershome outside the backing directory.
//! This module knows nothing of POSIX names or metadata: it deals in backing names only.
//! It counts the bytes pershome writes to the stick as file data, for the flash-wear figures.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::faults::Faults;

pub mod power_loss;
pub mod sys;

/// `stat` of a backing entry, reduced to what pershome uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackingStat {
    pub is_dir: bool,
    pub is_file: bool,
    pub size: u64,
    pub blocks: u64,
    pub nlink: u64,
    pub mtime: (i64, u32),
}

impl BackingStat {
    fn from_raw(st: &libc::stat) -> BackingStat {
        let fmt = st.st_mode & libc::S_IFMT;
        BackingStat {
            is_dir: fmt == libc::S_IFDIR,
            is_file: fmt == libc::S_IFREG,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            nlink: st.st_nlink,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        }
    }
}

/// An entry of a backing directory listing.
#[derive(Debug, Clone)]
pub struct BackingEntry {
    pub name: Vec<u8>,
    pub stat: BackingStat,
}

impl BackingEntry {
    /// What the match of a folder renamed elsewhere compares of this entry
    /// (`meta::moved`): files and folders only. The mount and fsck both match.
    pub fn into_listed_child(self) -> Option<crate::meta::moved::ListedChild> {
        let keep = self.stat.is_dir || self.stat.is_file;
        keep.then_some(crate::meta::moved::ListedChild {
            backing_name: self.name,
            is_dir: self.stat.is_dir,
            size: self.stat.size,
        })
    }
}

/// Counters of what pershome wrote to the backing as file data (metadata is counted by the
/// journal). Bytes and write calls, for the flash-wear benchmark.
#[derive(Debug, Default)]
pub struct DataStats {
    pub bytes: AtomicU64,
    pub writes: AtomicU64,
    /// Directory listings made: reconciliation is lazy, so this stays small at mount.
    pub listings: AtomicU64,
}

/// The backing directory, held open by fd for the lifetime of the mount.
#[derive(Debug)]
pub struct Backing {
    root: OwnedFd,
    pub stats: DataStats,
    /// Test hook (tests/crash.rs): injected failures of every write-like call below. Unset in
    /// production, where each call costs one load of an empty `OnceLock`.
    faults: OnceLock<Arc<Faults>>,
    /// What the next commit must make durable before the store records anything
    /// (`sync_before_commit`), by (device, inode), with an fd to sync it by: directories
    /// whose entries pershome changed (created, removed or renamed a name in), since on a
    /// pulled stick a directory entry is only there if its directory was synced; and files
    /// whose data the store's records depend on (`keep_in_order`: the parts of a parted file,
    /// whose lengths are its layout); and files and directories renamed, whose new entry
    /// on vfat is only complete once their own inode is written (`rename_at`).
    unsynced: Mutex<Unsynced>,
    /// How many may wait in `unsynced` (`unsynced_cap`).
    unsynced_cap: std::sync::atomic::AtomicUsize,
    /// The backing answered `EINVAL` to `RENAME_NOREPLACE` (a libfuse 2 backing such as
    /// exfat-fuse): `rename_noreplace` claims the name by creating it instead.
    no_rename_flags: std::sync::atomic::AtomicBool,
}

/// How many directories and files may wait for the next commit's sync, at least: past the
/// cap the one that has waited longest is synced at once, so a big unpacking does not hold
/// thousands of fds. An early sync runs on the request path (under the state lock), where
/// the commit's run in the commit thread beside the requests, so the cap grows with the fds
/// the process may open (`unsynced_cap`).
const MAX_UNSYNCED: usize = 256;
/// The most that may wait, whatever the fd limit (a few hundred KiB of kernel memory).
const MAX_UNSYNCED_CEILING: usize = 4096;

/// The cap on waiting fds: a quarter of the soft `RLIMIT_NOFILE` (the rest is for the
/// directory cache, open files and the store), between `MAX_UNSYNCED` and
/// `MAX_UNSYNCED_CEILING`. With the usual soft limit of 1,024 that is 256.
fn unsynced_cap() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit the call writes; the result is checked.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    } else {
        0
    };
    (soft / 4).clamp(MAX_UNSYNCED, MAX_UNSYNCED_CEILING)
}

/// What waits for the next commit's sync, by (device, inode), in the order it was noted.
///
/// When it is full, the entry noted first is synced and let go to make room (`note`), not the
/// newcomer: `tar x`, `rm -rf` and `cp -r` change one directory after another, several times
/// each, so a newcomer synced at once (as before) was synced again at every later change in
/// it: with 500 directories changed between two commits, one `fsync` per create or unlink
/// past the 256th directory (984 for `tar x` of 2,000 files in 500 directories, where 501
/// suffice), each a journal commit on ext4 and a rewritten directory sector on a stick.
#[derive(Debug, Default)]
struct Unsynced {
    fds: HashMap<(u64, u64), OwnedFd>,
    /// The keys of `fds`, oldest first.
    order: std::collections::VecDeque<(u64, u64)>,
}

impl Unsynced {
    fn insert(&mut self, key: (u64, u64), fd: OwnedFd) {
        if self.fds.insert(key, fd).is_none() {
            self.order.push_back(key);
        }
    }

    fn remove(&mut self, key: (u64, u64)) {
        if self.fds.remove(&key).is_some() {
            self.order.retain(|k| *k != key);
        }
    }

    fn take_oldest(&mut self) -> Option<((u64, u64), OwnedFd)> {
        let key = self.order.pop_front()?;
        self.fds.remove(&key).map(|fd| (key, fd))
    }

    fn drain(&mut self) -> impl Iterator<Item = ((u64, u64), OwnedFd)> + '_ {
        self.order.clear();
        self.fds.drain()
    }
}

/// `fstatat` of `name` in `dir`, not following a symlink (for `stat_at` and `key_at`).
fn fstatat_nofollow(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is written by fstatat on success, which check() verifies.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so st is initialised.
    Ok(unsafe { st.assume_init() })
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A backing path relative to the root: backing names joined with `/`. Empty means the root.
pub fn join(components: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c);
    }
    out
}

impl Backing {
    /// Opens the backing directory given on the command line. The administrator's path may go
    /// through symlinks (e.g. `/media/stick`); everything below it may not.
    pub fn open(path: &Path) -> io::Result<Backing> {
        let c = cstr(path.as_os_str().as_bytes())?;
        // SAFETY: c is a valid NUL-terminated string; the returned fd is checked.
        let fd = check(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Backing {
            root,
            stats: DataStats::default(),
            faults: OnceLock::new(),
            unsynced: Mutex::new(Unsynced::default()),
            unsynced_cap: std::sync::atomic::AtomicUsize::new(unsynced_cap()),
            no_rename_flags: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Test hook: fail this backing's write-like calls from now on as `faults` says (see
    /// `crate::faults`). Set once; a second call is ignored.
    pub fn set_faults(&self, faults: Arc<Faults>) {
        let _ = self.faults.set(faults);
    }

    /// The injected faults, if any (`sys` consults them before every write-like call).
    fn faults(&self) -> Option<&Faults> {
        self.faults.get().map(|f| &**f)
    }

    /// `gate` for a call that cannot be torn: the injected error if it must fail. Public to
    /// the crate for the few calls the fs makes on a backing file itself (fallocate,
    /// copy_file_range).
    pub(crate) fn check_fault(&self) -> io::Result<()> {
        sys::gate(self.faults())
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Opens a directory below the root by relative backing path (empty = the root itself),
    /// refusing symlinks anywhere on the way and any escape from the root.
    pub fn open_dir(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        let path = if rel.is_empty() {
            cstr(b".")?
        } else {
            cstr(rel)?
        };
        // SAFETY: open_how is plain data; all-zero is its documented default.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags =
            (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: arguments are valid for the duration of the call; the result is checked.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat2 returned a fresh fd.
        Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) })
    }

    pub fn stat_at(&self, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<BackingStat> {
        Ok(BackingStat::from_raw(&fstatat_nofollow(dir, name)?))
    }

    fn fstat_fd(fd: BorrowedFd<'_>) -> io::Result<BackingStat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: as in stat_at.
        check(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstat succeeded.
        Ok(BackingStat::from_raw(unsafe { &st.assume_init() }))
    }

    pub fn fstat(file: &File) -> io::Result<BackingStat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: as in stat_at.
        check(unsafe { libc::fstat(file.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstat succeeded.
        Ok(BackingStat::from_raw(unsafe { &st.assume_init() }))
    }

    /// Lists a directory: every entry but `.` and `..`, with its `stat` (no symlink followed).
    pub fn list(&self, dir: BorrowedFd<'_>) -> io::Result<Vec<BackingEntry>> {
        self.stats.listings.fetch_add(1, Ordering::Relaxed);
        // fdopendir takes ownership of the fd it is given, so hand it a duplicate.
        let dup = dir.try_clone_to_owned()?;
        let raw = dup.as_raw_fd();
        // SAFETY: raw is a valid directory fd that fdopendir now owns (we forget `dup`).
        let dirp = unsafe { libc::fdopendir(raw) };
        if dirp.is_null() {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(dup);
        // SAFETY: rewinding a freshly opened stream is always valid; a dup shares the offset
        // with the caller's fd, which may have been read before.
        unsafe { libc::rewinddir(dirp) };
        let mut names = Vec::new();
        let result = loop {
            // SAFETY: errno is thread-local; readdir's NULL is ambiguous without clearing it.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: dirp is valid until closedir below.
            let ent = unsafe { libc::readdir64(dirp) };
            if ent.is_null() {
                let err = io::Error::last_os_error();
                break if err.raw_os_error() == Some(0) {
                    Ok(())
                } else {
                    Err(err)
                };
            }
            // SAFETY: d_name is a NUL-terminated array inside the entry readdir returned.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        };
        // SAFETY: dirp came from fdopendir and is closed exactly once.
        unsafe { libc::closedir(dirp) };
        result?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match self.stat_at(dir, &name) {
                Ok(stat) => out.push(BackingEntry { name, stat }),
                // Removed between readdir and stat (another process on a shared backing).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Opens a regular file below `dir`, never following a symlink; `O_CLOEXEC` always.
    ///
    /// Anything but a regular file is refused with `EIO`, and opening it can never block: on
    /// a directory or sshfs "stick" the far side can swap a file for a fifo after pershome
    /// listed it, and a plain `open` of a fifo waits for the other end forever (a daemon
    /// thread hung, holding whatever lock it held). So the open is `O_NONBLOCK` (a fifo then
    /// opens at once for reading, or fails with `ENXIO` for writing), the type is checked on
    /// the descriptor (no race), and only then is `O_NONBLOCK` cleared for ordinary I/O. A
    /// device node cannot be opened at all on a stick mounted `nodev`.
    pub fn open_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<File> {
        // O_NONBLOCK: a fifo planted on the stick under this name must not hang the open;
        // it is then refused, and the flag cleared on the regular file.
        let file = sys::openat(self.faults(), dir, name, flags | libc::O_NONBLOCK, mode)
            .map(File::from)?;
        if flags & libc::O_CREAT != 0 {
            self.changed(dir)?;
        }
        if !Backing::fstat(&file)?.is_file {
            tracing::warn!(
                "backing entry {:?} is not a regular file (a fifo or device planted on the \
                 stick?): refused",
                String::from_utf8_lossy(name)
            );
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if flags & libc::O_NONBLOCK == 0 {
            // SAFETY: valid fd; results checked.
            let status = check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) })?;
            // SAFETY: as above.
            check(unsafe {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, status & !libc::O_NONBLOCK)
            })?;
        }
        Ok(file)
    }

    pub fn mkdir_at(&self, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
        sys::mkdirat(self.faults(), dir, name)?;
        self.changed(dir)
    }

    pub fn unlink_at(&self, dir: BorrowedFd<'_>, name: &[u8], is_dir: bool) -> io::Result<()> {
        // A removed directory need not be synced before the next commit: once its parent's
        // sync has made the removal durable, nothing in it is left to keep, and until then the
        // store records none of the removals in it either. So `rm -rf` syncs only the
        // directories that remain, not every one it emptied. (The key is read before the
        // removal; one that cannot be read leaves the directory to be synced, as before.)
        let removed_key = if is_dir {
            self.key_at(dir, name).ok()
        } else {
            None
        };
        sys::unlinkat(self.faults(), dir, name, is_dir)?;
        if let Some(key) = removed_key {
            self.unsynced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
        }
        self.changed(dir)
    }

    /// The (device, inode) of `name` in `dir`, not following a symlink.
    fn key_at(&self, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<(u64, u64)> {
        let st = fstatat_nofollow(dir, name)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Notes that `dir`'s entries changed: the next commit syncs it first.
    fn changed(&self, dir: BorrowedFd<'_>) -> io::Result<()> {
        self.sync_before_next_commit(dir)
    }

    /// Notes that the next commit records something that depends on `file`'s data (its
    /// length, as for the parts of a parted file): the commit syncs it first.
    pub fn keep_in_order(&self, file: &File) -> io::Result<()> {
        self.sync_before_next_commit(file.as_fd())
    }

    /// Adds `fd` (a directory or a file) to what the next commit syncs first; syncs it at
    /// once when too many wait already, or when it cannot be kept.
    fn sync_before_next_commit(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: as in stat_at.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
            return sys::sync(self.faults(), fd, false);
        }
        // SAFETY: fstat succeeded.
        let st = unsafe { st.assume_init() };
        let key = (st.st_dev, st.st_ino);
        let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        if unsynced.fds.contains_key(&key) {
            return Ok(());
        }
        let Ok(dup) = fd.try_clone_to_owned() else {
            drop(unsynced);
            return sys::sync(self.faults(), fd, false);
        };
        if unsynced.fds.len() >= self.unsynced_cap.load(Ordering::Relaxed) {
            // Synced under the lock: a commit that is about to record what depends on the
            // oldest entry waits here (in `sync_before_commit`) until it is durable, rather
            // than finding it gone from the list and writing its batch too early.
            if let Some((old_key, old_fd)) = unsynced.take_oldest() {
                if let Err(e) = self.sync_noted(old_fd.as_fd()) {
                    // Still due: the next commit tries it again. The newcomer is synced now,
                    // as when nothing can be let go, and that result is the caller's.
                    unsynced.fds.insert(old_key, old_fd);
                    unsynced.order.push_front(old_key);
                    drop(unsynced);
                    tracing::warn!("syncing a stick directory early failed: {e}");
                    return sys::sync(self.faults(), fd, false);
                }
            }
        }
        unsynced.insert(key, dup);
        Ok(())
    }

    /// Syncs every directory and file noted since the last commit (`changed`,
    /// `keep_in_order`), so that what a commit is about to record is on the stick, whatever
    /// happens to the power next. Files go first, then directories. Those not synced when one
    /// fails are kept for the next commit.
    pub fn sync_before_commit(&self) -> io::Result<()> {
        let mut waiting: Vec<((u64, u64), OwnedFd, bool)> = {
            let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
            unsynced
                .drain()
                .map(|(key, fd)| {
                    let is_dir = Backing::fstat_fd(fd.as_fd()).is_ok_and(|s| s.is_dir);
                    (key, fd, is_dir)
                })
                .collect()
        };
        waiting.sort_by_key(|(key, _, is_dir)| (*is_dir, *key));
        let mut result = Ok(());
        let mut left = Vec::new();
        for (key, fd, _) in waiting {
            if result.is_ok() {
                if let Err(e) = self.sync_noted(fd.as_fd()) {
                    result = Err(e);
                    left.push((key, fd));
                }
            } else {
                left.push((key, fd));
            }
        }
        if !left.is_empty() {
            let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
            for (key, fd) in left {
                if !unsynced.fds.contains_key(&key) {
                    unsynced.insert(key, fd);
                }
            }
        }
        result
    }

    /// Test hook: how many directories and files may wait for the next commit's sync.
    #[cfg(test)]
    fn set_unsynced_cap(&self, cap: usize) {
        self.unsynced_cap.store(cap, Ordering::Relaxed);
    }

    /// Syncs a noted directory or file. exfat-fuse (and other FUSE backings) answer ENOENT,
    /// or ESTALE, for a descriptor whose file or directory has since been removed, where a
    /// kernel filesystem syncs it. Nothing of a removed entry is left to keep: its removal
    /// is an entry change of its parent, which is noted and synced too.
    fn sync_noted(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        match sys::sync(self.faults(), fd, false) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)) => Ok(()),
            other => other,
        }
    }

    /// `renameat2`; `flags` may hold `RENAME_NOREPLACE` or `RENAME_EXCHANGE`.
    ///
    /// The next commit syncs both directories and the moved entry itself (both, when
    /// exchanging). FAT quirk: the kernel's vfat writes a renamed file's new directory entry
    /// with start cluster 0 and size 0, and fills them in only when the file's inode is written
    /// back (about 30 s later), so an fsync of the directory alone makes a 0-byte file durable
    /// under the new name (and frees nothing: the old entry is gone). Syncing the moved file
    /// or directory writes its inode, that is its entry.
    pub fn rename_at(
        &self,
        from_dir: BorrowedFd<'_>,
        from: &[u8],
        to_dir: BorrowedFd<'_>,
        to: &[u8],
        flags: libc::c_uint,
    ) -> io::Result<()> {
        sys::renameat(self.faults(), from_dir, from, to_dir, to, flags)?;
        self.moved(to_dir, to);
        if flags & libc::RENAME_EXCHANGE != 0 {
            self.moved(from_dir, from);
        }
        self.changed(from_dir)?;
        self.changed(to_dir)
    }

    /// Renames `from` to a name pershome believes free, and never over anything: `EEXIST`
    /// when `to` answers, which on vfat includes a long-named file whose 8.3 alias `to` is
    /// (`QUARTE~1.ODT` for "Quarterly Report.odt"), a name no listing shows. The caller then
    /// takes its next candidate name.
    ///
    /// `RENAME_NOREPLACE` where the backing has it (kernel vfat and exfat, ext4, tmpfs: the
    /// VFS answers `EEXIST` for any name the filesystem's lookup finds, aliases included).
    /// FUSE backings built on libfuse 2, such as exfat-fuse, answer `EINVAL` to any rename
    /// flag: there the name is first claimed race-free by creating it (`O_EXCL`, or `mkdir`
    /// for a directory, which fail with `EEXIST` just as well), and the rename then replaces
    /// only that placeholder of pershome's own.
    pub fn rename_noreplace(
        &self,
        from_dir: BorrowedFd<'_>,
        from: &[u8],
        to_dir: BorrowedFd<'_>,
        to: &[u8],
    ) -> io::Result<()> {
        if !self.no_rename_flags.load(Ordering::Relaxed) {
            match self.rename_at(from_dir, from, to_dir, to, libc::RENAME_NOREPLACE) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                    tracing::info!(
                        "the backing refuses RENAME_NOREPLACE ({e}): renames to a free name \
                         claim the name by creating it first"
                    );
                    self.no_rename_flags.store(true, Ordering::Relaxed);
                }
                done => return done,
            }
        }
        let is_dir = self.stat_at(from_dir, from)?.is_dir;
        if is_dir {
            self.mkdir_at(to_dir, to)?;
        } else {
            self.open_at(
                to_dir,
                to,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o600,
            )?;
        }
        let renamed = self.rename_at(from_dir, from, to_dir, to, 0);
        if renamed.is_err() {
            // Best effort: the placeholder is pershome's own, made just now.
            let _ = self.unlink_at(to_dir, to, is_dir);
        }
        renamed
    }

    /// Notes that the entry `name` of `dir` was just renamed there: the next commit syncs it
    /// (see `rename_at`). Not found (a FUSE backing racing a removal) means nothing to keep.
    fn moved(&self, dir: BorrowedFd<'_>, name: &[u8]) {
        let opened = sys::openat(None, dir, name, libc::O_RDONLY | libc::O_NONBLOCK, 0);
        match opened {
            Ok(fd) => {
                if let Err(e) = self.sync_before_next_commit(fd.as_fd()) {
                    tracing::warn!(
                        "syncing the renamed {:?}: {e}",
                        crate::backing::display(name)
                    );
                }
            }
            Err(e) => tracing::debug!(
                "opening the renamed {:?} to sync it: {e}",
                crate::backing::display(name)
            ),
        }
    }

    /// Creates (or truncates) a file and fills it with `content`; used for symlinks and
    /// placeholders, which are small.
    pub fn write_new_file(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        content: &[u8],
    ) -> io::Result<()> {
        self.create_filled(dir, name, content).map(drop)
    }

    /// `write_new_file`, and the file's data made durable before this returns: a file about
    /// to be renamed into place (the rename may reach the stick before unsynced data would).
    pub fn write_new_file_synced(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        content: &[u8],
    ) -> io::Result<()> {
        let file = self.create_filled(dir, name, content)?;
        self.sync_file(&file, false)
    }

    /// A new file (`O_EXCL`) holding `content`, still open.
    fn create_filled(&self, dir: BorrowedFd<'_>, name: &[u8], content: &[u8]) -> io::Result<File> {
        let file = self.open_at(
            dir,
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )?;
        if !content.is_empty() {
            self.write_at(&file, content, 0)?;
        }
        Ok(file)
    }

    /// Writes file data, counting it for the wear figures.
    pub fn write_at(&self, file: &File, data: &[u8], offset: u64) -> io::Result<usize> {
        sys::pwrite_all(self.faults(), file.as_fd(), data, offset, |n| {
            self.stats.writes.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        })?;
        Ok(data.len())
    }

    /// Reads a whole small file (symlink bodies), refusing anything over `limit` bytes.
    pub fn read_small(&self, dir: BorrowedFd<'_>, name: &[u8], limit: u64) -> io::Result<Vec<u8>> {
        let file = self.open_at(dir, name, libc::O_RDONLY, 0)?;
        let st = Backing::fstat(&file)?;
        if st.size > limit {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let mut buf = vec![0u8; st.size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn statvfs(&self) -> io::Result<libc::statvfs> {
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: as in stat_at.
        check(unsafe { libc::fstatvfs(self.root.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstatvfs succeeded.
        Ok(unsafe { st.assume_init() })
    }

    /// The backing's file system type (`statfs(2)` `f_type`), to tell FAT from the rest.
    pub fn statfs_type(&self) -> io::Result<i64> {
        let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: as in stat_at.
        check(unsafe { libc::fstatfs(self.root.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstatfs succeeded.
        let st = unsafe { st.assume_init() };
        // f_type is __fsword_t, whose width and sign differ between architectures.
        #[allow(clippy::unnecessary_cast)]
        Ok(st.f_type as i64)
    }

    pub fn fsync_dir(&self, dir: BorrowedFd<'_>) -> io::Result<()> {
        sys::sync(self.faults(), dir, false)
    }
}

impl Backing {
    /// Reads from a backing file at `offset` into `buf`, until it is full or the file ends;
    /// the bytes read. Reads write nothing, so no fault is injected here.
    pub fn read_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// `lseek(2)` on a backing file pershome opened itself (its offset is pershome's own):
    /// `SEEK_DATA` / `SEEK_HOLE` and the plain kinds.
    pub fn lseek(&self, file: &File, offset: i64, whence: libc::c_int) -> io::Result<i64> {
        // SAFETY: valid fd; result checked.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// `fallocate(2)` on a backing file; the caller handles `EOPNOTSUPP` (FAT allocates
    /// nothing in advance and punches no holes).
    pub fn fallocate(
        &self,
        file: &File,
        mode: libc::c_int,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.check_fault()?;
        // SAFETY: valid fd; result checked.
        check(unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        })
        .map(drop)
    }

    /// `copy_file_range(2)` between two backing files, counted as data written. The caller
    /// falls back to `read_at` + `write_at` where the backing cannot copy in the kernel.
    pub fn copy_file_range(
        &self,
        from: &File,
        from_offset: u64,
        to: &File,
        to_offset: u64,
        len: u64,
    ) -> io::Result<u64> {
        self.check_fault()?;
        let mut oi = from_offset as libc::loff_t;
        let mut oo = to_offset as libc::loff_t;
        // SAFETY: valid fds and offsets; result checked.
        let r = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut oi,
                to.as_raw_fd(),
                &mut oo,
                len as usize,
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.stats.bytes.fetch_add(r as u64, Ordering::Relaxed);
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        Ok(r as u64)
    }

    /// Sets a backing file's length (truncate or sparse extension).
    pub fn set_len(&self, file: &File, size: u64) -> io::Result<()> {
        sys::ftruncate(self.faults(), file.as_fd(), size)
    }

    /// Makes a backing file's data (and with `!datasync` its attributes) durable.
    pub fn sync_file(&self, file: &File, datasync: bool) -> io::Result<()> {
        sys::sync(self.faults(), file.as_fd(), datasync)
    }
}

/// A backing name as an `OsStr`, for messages.
pub fn display(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backing directory of `dirs` folders `d000`… holding the files `files` (content "x"),
    /// with `MAX_UNSYNCED` of them allowed to wait for the commit's sync.
    fn folders(dirs: usize, files: &[&str]) -> (tempfile::TempDir, Backing) {
        let tmp = tempfile::tempdir().unwrap();
        for d in 0..dirs {
            let dir = tmp.path().join(format!("d{d:03}"));
            std::fs::create_dir(&dir).unwrap();
            for f in files {
                std::fs::write(dir.join(f), b"x").unwrap();
            }
        }
        let backing = Backing::open(tmp.path()).unwrap();
        backing.set_unsynced_cap(MAX_UNSYNCED);
        (tmp, backing)
    }

    /// `rm -rf` of a tree of 300 directories of 4 files between two commits: each directory
    /// is synced once, whether it waited for the commit or was let go early to keep the fds
    /// held under `MAX_UNSYNCED` (before, every unlink in a directory past the 256th was an
    /// fsync of its own: 1,376 operations here instead of 1,244).
    #[test]
    fn each_changed_directory_is_synced_once_however_many_wait() {
        const DIRS: usize = 300;
        const FILES: usize = 4;
        let (_tmp, backing) = folders(DIRS, &["f0", "f1", "f2", "f3"]);
        let faults = Arc::new(Faults::counting());
        backing.set_faults(faults.clone());
        for d in 0..DIRS {
            let dir = backing.open_dir(format!("d{d:03}").as_bytes()).unwrap();
            for f in 0..FILES {
                backing
                    .unlink_at(dir.as_fd(), format!("f{f}").as_bytes(), false)
                    .unwrap();
            }
        }
        let unlinks = (DIRS * FILES) as u64;
        let early = (DIRS - MAX_UNSYNCED) as u64;
        assert_eq!(
            faults.operations(),
            unlinks + early,
            "{unlinks} unlinks and one early sync per directory past the {MAX_UNSYNCED} that wait"
        );
        backing.sync_before_commit().unwrap();
        assert_eq!(
            faults.operations(),
            unlinks + DIRS as u64,
            "the commit syncs the {MAX_UNSYNCED} directories that waited: one sync per directory"
        );
    }

    /// `rm -rf` of the same tree, directories included: a removed directory's own sync is
    /// dropped (its parent's sync makes the removal durable), so nothing is synced early and
    /// the commit syncs only the top (before, the 256 directories that waited were synced,
    /// though removed, and 44 more early).
    #[test]
    fn a_removed_directory_is_not_synced() {
        const DIRS: usize = 300;
        const FILES: usize = 4;
        let (_tmp, backing) = folders(DIRS, &["f0", "f1", "f2", "f3"]);
        let faults = Arc::new(Faults::counting());
        backing.set_faults(faults.clone());
        let top = backing.open_dir(b"").unwrap();
        for d in 0..DIRS {
            let name = format!("d{d:03}");
            let dir = backing.open_dir(name.as_bytes()).unwrap();
            for f in 0..FILES {
                backing
                    .unlink_at(dir.as_fd(), format!("f{f}").as_bytes(), false)
                    .unwrap();
            }
            backing
                .unlink_at(top.as_fd(), name.as_bytes(), true)
                .unwrap();
        }
        let removals = (DIRS * (FILES + 1)) as u64;
        assert_eq!(faults.operations(), removals, "no sync before the commit");
        backing.sync_before_commit().unwrap();
        assert_eq!(
            faults.operations(),
            removals + 1,
            "the commit syncs the top directory only"
        );
    }

    /// The durability side of the cap (power-loss model): a file unlinked in each of 300
    /// folders, with 256 allowed to wait, is gone after the commit's sync and a pulled stick,
    /// in the folders synced early as in those the commit synced.
    #[test]
    fn every_changed_directory_is_durable_after_the_commit_however_many_waited() {
        const DIRS: usize = 300;
        let (tmp, backing) = folders(DIRS, &["gone", "kept"]);
        let power = Arc::new(crate::backing::power_loss::PowerLoss::new(tmp.path()).unwrap());
        backing.set_faults(Arc::new(Faults::with_power_loss(u64::MAX, power.clone())));
        for d in 0..DIRS {
            let dir = backing.open_dir(format!("d{d:03}").as_bytes()).unwrap();
            backing.unlink_at(dir.as_fd(), b"gone", false).unwrap();
        }
        backing.sync_before_commit().unwrap();
        power.pull().unwrap();
        let back: Vec<usize> = (0..DIRS)
            .filter(|d| tmp.path().join(format!("d{d:03}/gone")).exists())
            .collect();
        assert!(
            back.is_empty(),
            "unlinked files back after the pull in folders {back:?}"
        );
        for d in 0..DIRS {
            assert!(tmp.path().join(format!("d{d:03}/kept")).exists());
        }
    }

    /// The durability side of dropping a removed folder's sync (power-loss model): after
    /// `rm -rf` of 300 folders, the commit's sync and a pulled stick, none of them is back.
    #[test]
    fn removed_directories_stay_removed_after_the_commit() {
        const DIRS: usize = 300;
        let (tmp, backing) = folders(DIRS, &["f"]);
        let power = Arc::new(crate::backing::power_loss::PowerLoss::new(tmp.path()).unwrap());
        backing.set_faults(Arc::new(Faults::with_power_loss(u64::MAX, power.clone())));
        let top = backing.open_dir(b"").unwrap();
        for d in 0..DIRS {
            let name = format!("d{d:03}");
            let dir = backing.open_dir(name.as_bytes()).unwrap();
            backing.unlink_at(dir.as_fd(), b"f", false).unwrap();
            backing
                .unlink_at(top.as_fd(), name.as_bytes(), true)
                .unwrap();
        }
        backing.sync_before_commit().unwrap();
        power.pull().unwrap();
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "back after the pull: {left:?}");
    }
}
