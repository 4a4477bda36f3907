//! The thin adapter from fuser to `crate::fs`: the only module that calls `reply.*`.
//!
//! It converts types (inode numbers, times, errors), chooses the kernel caching policy, and
//! runs the commit timer. It never touches the backing directory or the store itself.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::xattr::XattrReply;
use crate::fs::{Attr, Ctx, Errno, Fs, Kind, SetAttr, SetTime};
use crate::meta::Timespec;
use crate::requests::{Counters, Op, REPORT_XATTR};

/// How long the kernel may trust names and attributes without asking. pershome is the only
/// writer of the backing while mounted, and the kernel invalidates what its own operations
/// change, so this only bounds how stale a view can be after an unusual path (none known; a
/// directory not listed yet shows the backing's link count, the same as its own listing's,
/// or 1, "unknown", where the backing does not count: `Inode::nlink`). An hour, not seconds:
/// once it ran out the kernel revalidated every name with a LOOKUP and forgot its cached
/// ACL, so an `ls -lR` 30 s after the last cost more (2.2 requests per entry) than a cold one
/// (1.6).
const TTL: Duration = Duration::from_secs(3600);

/// Flags of every opened or created file. FOPEN_NOFLUSH: `Fs::flush` has nothing to do (data
/// goes to the backing file on each write, errors are reported there, and there are no POSIX
/// locks to drop), so the kernel need not send a FLUSH at each close. Without passthrough,
/// FOPEN_KEEP_CACHE is added: pershome is the only writer while mounted, so cached pages stay
/// valid across opens.
const FOPEN_FILE: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// The commit timer: commits pending metadata every interval, until stopped.
struct Timer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// FUSE passthrough (Linux 6.9+, and only for a daemon with CAP_SYS_ADMIN): the kernel reads
/// and writes a file's backing file itself, at the speed of the backing. One backing id per
/// inode, shared by all its open handles, as the kernel requires.
#[derive(Default)]
struct Passthrough {
    enabled: AtomicBool,
    /// ino → (backing id, open handles using it).
    ids: Mutex<HashMap<u64, (BackingId, usize)>>,
    /// fh → ino, for the handles opened with passthrough.
    handles: Mutex<HashMap<u64, u64>>,
}

/// The fuser filesystem: `crate::fs::Fs` plus the commit timer.
pub struct Adapter {
    fs: Arc<Fs>,
    timer: Option<Timer>,
    destroyed: AtomicBool,
    passthrough: Passthrough,
    /// Per-opcode request counts (`-o counters`); `None`, the default, counts nothing.
    counters: Option<Arc<Counters>>,
    /// The kernel agreed to FUSE_HANDLE_KILLPRIV_V2: the daemon clears set-ID bits itself.
    killpriv: AtomicBool,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter").finish_non_exhaustive()
    }
}

fn to_system_time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        // Before 1970: subtract whole seconds, then add the nanoseconds back.
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

fn from_system_time(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec { sec, nsec }
        }
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: to_system_time(a.atime),
        mtime: to_system_time(a.mtime),
        ctime: to_system_time(a.ctime),
        crtime: to_system_time(a.btime),
        kind: file_type(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// The reply to a LOOKUP of a name that does not exist, for the kernel to remember: only the
/// node id (0) and the timeout count.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn err(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e as i32)
}

fn ctx(req: &Request, umask: u32) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        umask,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(from_system_time(t)),
    }
}

impl Adapter {
    pub fn new(fs: Fs) -> Adapter {
        Adapter {
            fs: Arc::new(fs),
            timer: None,
            destroyed: AtomicBool::new(false),
            passthrough: Passthrough::default(),
            counters: None,
            killpriv: AtomicBool::new(false),
        }
    }

    /// Counts every request per opcode from now on; the report is the root's
    /// [`REPORT_XATTR`] (see `crate::requests`).
    pub fn with_counters(mut self) -> Adapter {
        self.counters = Some(Arc::new(Counters::default()));
        self
    }

    fn count(&self, op: Op) {
        if let Some(counters) = &self.counters {
            counters.add(op);
        }
    }

    /// Opens a backing directory for mounting (see `Fs::open_backing`).
    pub fn open(
        backing: &Path,
        opts: crate::fs::FsOptions,
    ) -> Result<Adapter, crate::fs::OpenError> {
        Fs::open_backing(backing, opts).map(Adapter::new)
    }

    pub fn fs(&self) -> &Arc<Fs> {
        &self.fs
    }

    fn entry(&self, reply: ReplyEntry, r: crate::fs::Result<Attr>) {
        match r {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn empty(reply: ReplyEmpty, r: crate::fs::Result<()>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn xattr(reply: ReplyXattr, r: crate::fs::Result<XattrReply>) {
        match r {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    /// The passthrough backing id for an inode's new handle `fh`, registering the inode's
    /// backing file with the kernel on its first open; `None` when passthrough is off or
    /// refused (then the handle is served through the daemon as usual).
    fn backing_id(
        &self,
        ino: u64,
        fh: u64,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<BackingIdRef<'_>> {
        if !self.passthrough.enabled.load(Ordering::SeqCst) {
            return None;
        }
        let mut ids = self
            .passthrough
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Vacant(slot) = ids.entry(ino) {
            let file = self.fs.passthrough_file(ino, fh).ok()?;
            match register(&file) {
                Ok(id) => {
                    slot.insert((id, 0));
                }
                Err(e) => {
                    tracing::info!(
                        "FUSE passthrough refused ({e}); serving file data through pershomefs"
                    );
                    self.passthrough.enabled.store(false, Ordering::SeqCst);
                    return None;
                }
            }
        }
        let entry = ids.get_mut(&ino)?;
        entry.1 += 1;
        self.fs.set_passthrough(fh);
        self.passthrough
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, ino);
        Some(BackingIdRef { ids, ino })
    }

    fn release_backing_id(&self, fh: u64) {
        let Some(ino) = self
            .passthrough
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh)
        else {
            return;
        };
        let mut ids = self
            .passthrough
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = ids.get_mut(&ino) {
            entry.1 -= 1;
            if entry.1 == 0 {
                // Dropping the id unregisters the backing file from the kernel.
                ids.remove(&ino);
            }
        }
    }

    fn stop_timer(&mut self) {
        if let Some(mut timer) = self.timer.take() {
            let (lock, cvar) = &*timer.stop;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cvar.notify_all();
            if let Some(t) = timer.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A borrowed backing id, valid while the map lock is held (through the reply).
struct BackingIdRef<'a> {
    ids: std::sync::MutexGuard<'a, HashMap<u64, (BackingId, usize)>>,
    ino: u64,
}

impl std::ops::Deref for BackingIdRef<'_> {
    type Target = BackingId;
    fn deref(&self) -> &BackingId {
        // The entry was inserted or found under this same guard.
        &self.ids[&self.ino].0
    }
}

/// Set when the final commit of this process's filesystem failed (one filesystem per
/// daemon): the exit status says so (`last_commit_landed`).
static LAST_COMMIT_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether the final commit at unmount wrote everything (true before any unmount).
pub fn last_commit_landed() -> bool {
    !LAST_COMMIT_FAILED.load(Ordering::SeqCst)
}

impl Adapter {
    fn final_commit(&self) {
        if self.fs.final_commit().is_err() {
            LAST_COMMIT_FAILED.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        self.stop_timer();
        if !self.destroyed.swap(true, Ordering::SeqCst) {
            self.final_commit();
        }
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each capability is wanted only where the kernel offers it; refusals are harmless.
        // No FUSE_WRITEBACK_CACHE: measured here it made untarring 10% slower and a 1 GiB
        // sequential write 2.5 times slower (extra SETATTR/GETATTR per file, page-sized
        // writeback), and it would let the kernel own mtime and size.
        // READDIRPLUS for every batch of a listing, not FUSE_READDIRPLUS_AUTO: with AUTO the
        // kernel asks for attributes only in the first batch of an uncached listing (or after
        // a LOOKUP in that directory, `fuse_use_readdirplus`), and `du`, `tar c`, `cp -a`,
        // `rsync` and `rm -rf` read a whole directory before they look at its entries, so
        // every entry past the first batch cost a LOOKUP. Measured on a tmpfs backing with
        // 100 directories of 1,000 files, cold: `du -s` 3.1 s → 0.9 s (80,701 LOOKUPs → 1),
        // `tar cf /dev/null` 3.2 → 1.0 s, `rm -rf` 8.9 → 6.0 s. A bare `find`, which needs
        // no attributes, pays for the inodes the kernel now makes (0.56 → 0.81 s there; on the
        // bench's tree of small folders it got faster, 0.52 → 0.40 requests per entry). The
        // daemon already holds every entry of a loaded directory, so it costs it nothing.
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_MAX_PAGES,
            // pershome applies the umask itself, because a default ACL replaces it.
            InitFlags::FUSE_DONT_MASK,
        ] {
            let _ = config.add_capabilities(flag);
        }
        // FUSE_HANDLE_KILLPRIV_V2: the daemon clears the set-ID bits on chown, truncate and
        // write, so the kernel stops fetching the attributes before every chown (one GETATTR
        // per file `tar x` untars as root, fs/fuse/dir.c `fuse_setattr`), and marks the
        // superblock SB_NOSEC, so a file that was found free of set-ID bits and
        // security.capability is not asked again at each write (`file_remove_privs`).
        // fuser 0.18 passes FUSE_WRITE_KILL_SUIDGID to `write` but not FATTR_KILL_SUIDGID to
        // `setattr`; `setattr` below infers it from the request the way the kernel sets it.
        if config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_ok()
        {
            self.killpriv.store(true, Ordering::SeqCst);
        }
        // Passthrough needs a stacking depth of 1 and CAP_SYS_ADMIN (checked by the kernel at
        // the first open; a refusal there switches it off again).
        if config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            && nix::unistd::geteuid().is_root()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.enabled.store(true, Ordering::SeqCst);
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        let interval = self.fs.options().commit_interval;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let fs = self.fs.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || {
                let (lock, cvar) = &*stop2;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let (guard, _) = cvar
                        .wait_timeout(stopped, interval)
                        .unwrap_or_else(|p| p.into_inner());
                    stopped = guard;
                    if *stopped {
                        return;
                    }
                    if let Err(e) = fs.commit() {
                        tracing::warn!("timed metadata commit failed: {e}");
                    }
                }
            })?;
        self.timer = Some(Timer {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    fn destroy(&mut self) {
        self.stop_timer();
        if !self.destroyed.swap(true, Ordering::SeqCst) {
            self.final_commit();
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.count(Op::Lookup);
        match self.fs.lookup(parent.0, name.as_bytes()) {
            // A name that is not there is remembered too: node id 0 with a timeout is a
            // negative entry the kernel keeps (fs/fuse/dir.c `fuse_lookup_name`), where a bare
            // ENOENT is asked again at every access. Programs probe many names that do not
            // exist (a desktop's config and theme files, a shell's PATH, `make`); only an
            // operation through this mount can create a name while it is mounted, and the
            // kernel turns the entry positive when one does. A directory is loaded before its
            // first answer, so no later discovery on the stick can contradict it.
            Err(Errno::ENOENT) => reply.entry(&TTL, &negative_entry(), Generation(0)),
            r => self.entry(reply, r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.count(Op::Forget);
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.count(Op::Getattr);
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.count(Op::Setattr);
        // With FUSE_HANDLE_KILLPRIV_V2 the kernel drops ATTR_KILL_SUID/SGID and the mode it
        // derived from them (fuse_setattr), and flags FATTR_KILL_SUIDGID, which fuser 0.18
        // does not pass on, for: a chown of a non-directory (always), a size change by a
        // caller without CAP_FSETID (the daemon sees only the uid: root is taken to have it),
        // and a SETATTR that carries nothing else, which is `file_remove_privs` before a
        // passthrough write or a chown(-1, -1) (utimensat with both times omitted returns
        // before reaching the filesystem). `Fs::setattr` leaves directories alone.
        let nothing_else = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && atime.is_none()
            && mtime.is_none();
        let kill_set_id = self.killpriv.load(Ordering::Relaxed)
            && (uid.is_some()
                || gid.is_some()
                || (size.is_some() && req.uid() != 0)
                || nothing_else);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(from_system_time),
            fh: fh.map(|f| f.0),
            kill_set_id,
        };
        match self.fs.setattr(ino.0, set) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.count(Op::Readlink);
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.count(Op::Mknod);
        self.entry(
            reply,
            self.fs.mknod(
                ctx(req, umask),
                parent.0,
                name.as_bytes(),
                mode,
                rdev as u64,
            ),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.count(Op::Mkdir);
        self.entry(
            reply,
            self.fs
                .mkdir(ctx(req, umask), parent.0, name.as_bytes(), mode),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.count(Op::Unlink);
        Self::empty(reply, self.fs.unlink(parent.0, name.as_bytes()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.count(Op::Rmdir);
        Self::empty(reply, self.fs.rmdir(parent.0, name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.count(Op::Symlink);
        let r = self.fs.symlink(
            ctx(req, 0),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Rename);
        let r = self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        Self::empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.count(Op::Link);
        self.entry(reply, self.fs.link(ino.0, newparent.0, newname.as_bytes()));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.count(Op::Open);
        match self.fs.open(ino.0, flags.0) {
            Ok(fh) => match self.backing_id(ino.0, fh, |f| reply.open_backing(f)) {
                Some(id) => reply.opened_passthrough(FileHandle(fh), FOPEN_FILE, &id),
                None => reply.opened(FileHandle(fh), FOPEN_FILE | FopenFlags::FOPEN_KEEP_CACHE),
            },
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.count(Op::Read);
        match self.fs.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.count(Op::Write);
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => {
                // Set by the kernel only under FUSE_HANDLE_KILLPRIV_V2, for a caller without
                // CAP_FSETID: the write must clear the set-ID bits, as it would on ext4.
                if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                    if let Err(e) = self.fs.kill_set_id(ino.0) {
                        return reply.error(err(e));
                    }
                }
                reply.written(n)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Flush);
        Self::empty(reply, self.fs.flush(fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Release);
        let r = self.fs.release(fh.0);
        self.release_backing_id(fh.0);
        Self::empty(reply, r);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Fsync);
        Self::empty(reply, self.fs.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.count(Op::Opendir);
        // ENOSYS once: the kernel then opens every directory of this mount by itself
        // (fc->no_opendir, fs/fuse/file.c `fuse_file_open`), with FOPEN_CACHE_DIR |
        // FOPEN_KEEP_CACHE, and sends neither OPENDIR nor RELEASEDIR again: two round trips
        // less per directory a walk enters. Listings are read by inode and offset
        // (`Fs::list_dir`). The kernel keeps each listing in the directory's page cache and
        // drops it whenever a create, unlink, rename or link through this mount changes the
        // directory (its iversion moves); the daemon is the only writer while mounted, so no
        // listing can go stale. A cached listing also spares the kernel the READDIRPLUS
        // that would forget every entry's cached ACL. The kernel still checks the
        // permission to open the directory (default_permissions).
        reply.error(fuser::Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.count(Op::Readdir);
        // The kernel's buffer holds a few dozen entries; ask for a bounded batch.
        match self.fs.list_dir(ino.0, offset, 256) {
            Ok(entries) => {
                for (off, e) in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        off,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.count(Op::Readdirplus);
        // The kernel's buffer holds a few dozen entries; ask for a bounded batch.
        match self.fs.list_dir_plus(ino.0, offset, 256) {
            Ok(entries) => {
                let mut taken = Vec::new();
                for (off, e, a) in entries {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(
                        INodeNo(e.ino),
                        off,
                        name,
                        &TTL,
                        &file_attr(&a),
                        Generation(0),
                    ) {
                        break;
                    }
                    if e.name != b"." && e.name != b".." {
                        taken.push(e.ino);
                    }
                }
                // Only entries the kernel received count as lookups.
                self.fs.count_lookups(&taken);
                reply.ok();
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // Not sent once OPENDIR was declined (see `opendir`); counted, so one would show.
        self.count(Op::Releasedir);
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Fsyncdir);
        Self::empty(reply, self.fs.fsyncdir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.count(Op::Statfs);
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Setxattr);
        Self::empty(
            reply,
            self.fs.setxattr(ino.0, name.as_bytes(), value, flags),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if let Some(counters) = &self.counters {
            // The report itself is answered here, uncounted, so snapshots taken around an
            // operation differ by exactly that operation's requests. The kernel lets only
            // root read `trusted.*`.
            if ino == INodeNo::ROOT && name.as_bytes() == REPORT_XATTR.as_bytes() {
                let report = counters.report().into_bytes();
                return Self::xattr(reply, crate::fs::xattr::sized(report, size));
            }
        }
        self.count(Op::Getxattr);
        Self::xattr(reply, self.fs.getxattr(ino.0, name.as_bytes(), size));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.count(Op::Listxattr);
        Self::xattr(reply, self.fs.listxattr(ino.0, size));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.count(Op::Removexattr);
        Self::empty(reply, self.fs.removexattr(ino.0, name.as_bytes()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.count(Op::Create);
        match self
            .fs
            .create(ctx(req, umask), parent.0, name.as_bytes(), mode, flags)
        {
            Ok((a, fh)) => match self.backing_id(a.ino, fh, |f| reply.open_backing(f)) {
                Some(id) => reply.created_passthrough(
                    &TTL,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(fh),
                    FOPEN_FILE,
                    &id,
                ),
                None => reply.created(
                    &TTL,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(fh),
                    FOPEN_FILE | FopenFlags::FOPEN_KEEP_CACHE,
                ),
            },
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Fallocate);
        Self::empty(reply, self.fs.fallocate(fh.0, offset, length, mode));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.count(Op::Lseek);
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.count(Op::CopyFileRange);
        match self
            .fs
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n.min(u32::MAX as u64) as u32),
            Err(e) => reply.error(err(e)),
        }
    }

    // Never sent with `default_permissions` and without FUSE_POSIX_LOCKS (the kernel checks
    // permissions and keeps locks itself), nor bmap on a non-block mount; answered as fuser
    // would, but counted, so an unexpected one shows in the report.
    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.count(Op::Access);
        reply.error(fuser::Errno::ENOSYS);
    }

    fn bmap(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _blocksize: u32,
        _idx: u64,
        reply: fuser::ReplyBmap,
    ) {
        self.count(Op::Bmap);
        reply.error(fuser::Errno::ENOSYS);
    }

    // The operations below have no meaning on a FAT-backed home. They are answered here,
    // quietly, because fuser's defaults log a warning for every call, which would fill the
    // journal of a desktop whose tools probe ioctls (lsattr, file managers) and poll.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.count(Op::Ioctl);
        reply.error(fuser::Errno::from_i32(libc::ENOTTY));
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        self.count(Op::Poll);
        // ENOSYS tells the kernel to treat files here as always ready, as regular files are.
        reply.error(fuser::Errno::ENOSYS);
    }
}
