//! The filesystem operations, as plain functions `fn op(...) -> Result<T, Errno>` over a
//! backing directory, callable in-process without a kernel mount (most tests use them so).
//!
//! This module owns the POSIX view: the inode table, the directory trees loaded so far, the
//! choice of backing name for every new name, and what goes into the metadata store and when.
//! It never calls `reply.*` (that is `crate::fuse`), never touches the backing except through
//! `crate::backing`, and never writes the store except through `crate::meta::Journal`.
//!
//! Architecture invariants (see docs/architecture.md):
//! - One POSIX name ⇄ one backing entry. Directories, files, symlinks (a Cygwin `!<symlink>`
//!   file), fifos, sockets and device nodes (empty files) all have one; a hard-linked file's
//!   names are empty placeholder files and its content lives in `.pershome/inodes/<id>`.
//! - Reads, `stat`, `readdir` and atime never cause a store write by themselves: changes found
//!   by reconciling with the backing are recorded only when something else is committed.
//! - Metadata changes are gathered in memory (`dirty`, `pending`) and committed as one journal
//!   batch: on fsync, on the commit timer, at unmount.

pub mod acl;
mod commit;
mod inode_meta;
mod io_ops;
pub mod name_mode;
mod namespace;
pub mod parts;
#[cfg(test)]
mod race_tests;
mod reconcile;
mod repair;
mod short_name;
pub mod xattr;

pub(crate) use inode_meta::InodeMeta;
pub use repair::{LinkInode, RECOVERED_DIR};
pub(crate) use short_name::Name;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use nix::errno::Errno;

use crate::backing::Backing;
use crate::meta::journal::{Journal, OpenMode, StoreError};
use crate::meta::layout::StoreLayout;
use crate::meta::pending::PendingTree;
use crate::meta::{Meta, Timespec};
use crate::names::NameMode;

pub type Result<T> = std::result::Result<T, Errno>;
pub type Ino = u64;
pub const ROOT: Ino = 1;

/// The backing paths of the store and its directories (names from `meta::layout`), in the
/// case the backing lists them: on a `msdos` stick that is lower case, and a copy of the stick
/// on a case-sensitive file system keeps that case. Directories made later get the layout's own
/// names. The store's directories: `inodes` holds the content of hard-linked files; `staging`
/// new files with content, written there first and renamed into place
/// (`Fs::write_whole_new_file`; anything found there at mount is a crash's leftover); `parts`
/// the further parts of files stored in parts.
#[derive(Debug, Clone)]
pub(crate) struct StorePaths {
    pub store: Vec<u8>,
    pub inodes: Vec<u8>,
    pub staging: Vec<u8>,
    pub parts: Vec<u8>,
}

impl StorePaths {
    fn resolve(backing: &Backing, layout: StoreLayout) -> StorePaths {
        let store = crate::meta::layout::detect(backing.root())
            .ok()
            .and_then(|f| match layout {
                StoreLayout::Long => None,
                StoreLayout::Short83 => f.short,
            })
            .unwrap_or_else(|| layout.store_dir().as_bytes().to_vec());
        // Long names are exact: only an 8.3 store is listed for the case of its entries.
        let listed: Vec<Vec<u8>> = match layout {
            StoreLayout::Long => Vec::new(),
            StoreLayout::Short83 => backing
                .open_dir(&store)
                .and_then(|d| backing.list(d.as_fd()))
                .map(|l| l.into_iter().map(|e| e.name).collect())
                .unwrap_or_default(),
        };
        let sub = |name: &str| {
            let leaf = listed
                .iter()
                .find(|n| n.as_slice() != name.as_bytes() && layout.same_name(n, name.as_bytes()))
                .cloned()
                .unwrap_or_else(|| name.as_bytes().to_vec());
            crate::backing::join(&[&store, &leaf])
        };
        StorePaths {
            inodes: sub(layout.inodes_dir()),
            staging: sub(layout.staging_dir()),
            parts: sub(layout.parts_dir()),
            store,
        }
    }
}

/// The last component of a backing path.
pub(crate) fn leaf(path: &[u8]) -> &[u8] {
    path.rsplit(|&c| c == b'/').next().unwrap_or(path)
}

/// Options of one mount, as the command line gives them.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Who the stick's owner appears as.
    pub uid: u32,
    pub gid: u32,
    pub read_only: bool,
    /// How long metadata changes may wait in memory before they are committed.
    pub commit_interval: Duration,
    /// The `names=` option: `None` adopts the mode recorded on the stick (see `name_mode`).
    pub names: Option<NameMode>,
    /// Whether files growing past `part_size` are stored in parts (`parts=`).
    pub parts: PartsMode,
    /// The part size of files split from now on (`parts::DEFAULT_PART_SIZE` unless a test
    /// asks for tiny parts); files already parted keep the size they were split with.
    pub part_size: u64,
    /// The login hook's mounts (`private_home`, docs/security.md): no owner stored on the
    /// stick counts. Every inode shows as `uid`/`gid` (so no stored uid or gid gives another
    /// local user access, or takes it from the user), and the root is theirs, mode 0700,
    /// without an access ACL, from the moment the store is opened: before the first request.
    /// Off for plain mounts, which keep stored owners (pjdfstest: root may chown).
    pub private_home: bool,
}

/// When a file growing past the part size is split into parts (`parts=` mount option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartsMode {
    /// Split on a backing that cannot hold files of 4 GiB (FAT, and any file system pershome
    /// does not know); keep files whole on exFAT, ext4, btrfs, XFS, NTFS, tmpfs and the like.
    Auto,
    Always,
    /// Never split: the backing's own limit applies (`EFBIG` from FAT32 at 4 GiB − 1).
    Never,
}

impl FsOptions {
    /// The options of a mount by `uid`/`gid` with every other option at its default.
    pub fn new(uid: u32, gid: u32) -> FsOptions {
        FsOptions {
            uid,
            gid,
            read_only: false,
            commit_interval: Duration::from_secs(5),
            parts: PartsMode::Auto,
            part_size: parts::DEFAULT_PART_SIZE,
            names: None,
            private_home: false,
        }
    }
}

/// File types pershome represents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => return None,
        })
    }

    pub fn type_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
        }
    }
}

/// The attributes of an inode, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (no type bits).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub btime: Timespec,
}

/// Who is asking: the caller of the system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The caller's umask, for operations that create: pershome applies it itself (the kernel
    /// must not, because a default ACL on the parent replaces it).
    pub umask: u32,
}

/// A time to set, as `utimensat` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// What `setattr` changes; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Timespec>,
    pub fh: Option<u64>,
    /// Clear the set-user-ID bit, and the set-group-ID bit of a group-executable file, as
    /// the kernel would have (a chown, a truncate by an unprivileged caller, a write's
    /// `file_remove_privs`): with FUSE_HANDLE_KILLPRIV_V2 the kernel leaves that to the
    /// daemon and sends no mode (see `crate::fuse`). Directories keep their bits.
    pub kill_set_id: bool,
}

/// What `Fs::resident` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// Inodes in the table (the root included).
    pub inodes: u64,
    /// Store records held in memory: those of directories not loaded yet (read from the
    /// store when the directory is first needed), and hard-link inode records.
    pub records: u64,
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: Kind,
    pub name: Vec<u8>,
}

pub(crate) fn now() -> Timespec {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timespec {
        sec: d.as_secs() as i64,
        nsec: d.subsec_nanos(),
    }
}

pub(crate) fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

/// A name in a loaded directory: which inode, and which backing entry stands for it.
#[derive(Debug, Clone)]
pub(crate) struct Dentry {
    pub ino: Ino,
    pub backing: Vec<u8>,
}

impl DentryRef<'_> {
    pub fn to_dentry(self) -> Dentry {
        Dentry {
            ino: self.ino,
            backing: self.backing.to_vec(),
        }
    }
}

/// A name in a loaded directory, borrowed from its `Entries`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DentryRef<'a> {
    pub ino: Ino,
    pub backing: &'a [u8],
}

/// The names of a loaded directory, by POSIX name, each with its inode and backing entry.
/// Kept compact, since a home has one per entry (issue 14, Scale: memory per looked-up
/// entry): a name is a boxed slice (no spare capacity), and a backing name is kept, in a map
/// of its own, only when it differs from the POSIX name, which it does not for a FAT-legal
/// name (design property 3: most names of a home).
#[derive(Debug, Default)]
pub(crate) struct Entries {
    inos: BTreeMap<Name, Ino>,
    /// The backing names that differ from their POSIX name (the key).
    backing: HashMap<Box<[u8]>, Box<[u8]>>,
}

impl Entries {
    /// The entry `name`, borrowed.
    pub fn get_ref(&self, name: &[u8]) -> Option<DentryRef<'_>> {
        self.inos.get_key_value(name).map(|(n, &ino)| DentryRef {
            ino,
            backing: self.backing.get(name).map_or(&**n, |b| &**b),
        })
    }

    /// The entry `name`, as an owned copy.
    pub fn get(&self, name: &[u8]) -> Option<Dentry> {
        self.get_ref(name).map(DentryRef::to_dentry)
    }

    /// The inode of the entry `name`.
    pub fn ino(&self, name: &[u8]) -> Option<Ino> {
        self.inos.get(name).copied()
    }

    pub fn contains_key(&self, name: &[u8]) -> bool {
        self.inos.contains_key(name)
    }

    pub fn is_empty(&self) -> bool {
        self.inos.is_empty()
    }

    pub fn insert(&mut self, name: &[u8], dentry: Dentry) {
        if dentry.backing == name {
            self.backing.remove(name);
        } else {
            self.backing
                .insert(name.into(), dentry.backing.into_boxed_slice());
        }
        self.inos.insert(name.into(), dentry.ino);
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<Dentry> {
        let (n, ino) = self.inos.remove_entry(name)?;
        Some(Dentry {
            ino,
            backing: self
                .backing
                .remove(name)
                .map_or_else(|| n.to_vec(), <[u8]>::into_vec),
        })
    }

    /// Points the entry `name` at another inode (its backing entry stays); false when there
    /// is no such entry.
    pub fn set_ino(&mut self, name: &[u8], ino: Ino) -> bool {
        match self.inos.get_mut(name) {
            Some(slot) => {
                *slot = ino;
                true
            }
            None => false,
        }
    }

    /// Every entry, in byte order of the POSIX names.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], DentryRef<'_>)> + '_ {
        self.inos.iter().map(|(n, &ino)| {
            (
                &**n,
                DentryRef {
                    ino,
                    backing: self.backing.get(&**n).map_or(&**n, |b| &**b),
                },
            )
        })
    }
}

#[cfg(test)]
mod entries_tests {
    use super::{Dentry, Entries};

    #[test]
    fn a_backing_name_is_kept_only_when_it_differs_and_always_comes_back() {
        let mut e = Entries::default();
        let d = |ino, b: &[u8]| Dentry {
            ino,
            backing: b.to_vec(),
        };
        e.insert(b"same", d(2, b"same"));
        e.insert(b"a:b", d(3, b"a\xef\x80\xbab"));
        assert!(e.backing.len() == 1, "only the differing name is kept");
        assert_eq!(e.get_ref(b"a:b").unwrap().backing, b"a\xef\x80\xbab");
        assert_eq!(e.get_ref(b"same").unwrap().backing, b"same");
        // Renamed over by an entry whose backing name is its own name: the old one goes.
        e.insert(b"a:b", d(4, b"a:b"));
        assert!(e.backing.is_empty());
        e.insert(b"x", d(5, b"X~1"));
        let listed: Vec<(Vec<u8>, u64, Vec<u8>)> = e
            .iter()
            .map(|(n, r)| (n.to_vec(), r.ino, r.backing.to_vec()))
            .collect();
        assert_eq!(
            listed,
            vec![
                (b"a:b".to_vec(), 4, b"a:b".to_vec()),
                (b"same".to_vec(), 2, b"same".to_vec()),
                (b"x".to_vec(), 5, b"X~1".to_vec()),
            ]
        );
        let removed = e.remove(b"x").unwrap();
        assert_eq!((removed.ino, removed.backing), (5, b"X~1".to_vec()));
        assert!(e.backing.is_empty() && e.ino(b"x").is_none());
        assert!(e.set_ino(b"same", 9) && e.ino(b"same") == Some(9));
    }
}

/// The children of a loaded directory.
#[derive(Debug, Default)]
pub(crate) struct Children {
    /// By POSIX name.
    pub entries: Entries,
    /// Fold keys (Windows case-insensitive form) of every backing name in the directory,
    /// including entries pershome skips, so a new backing name never clashes on the stick.
    pub folds: FoldSet,
    pub subdirs: u32,
}

/// A set of fold keys, kept as 64-bit hashes: a key costs 8 bytes instead of a copy of the
/// name (memory per entry, issue 14). Two keys with one hash only make a free name look
/// taken (it then gets the next candidate); a taken name never looks free.
#[derive(Debug, Default)]
pub(crate) struct FoldSet(HashSet<u64>);

impl FoldSet {
    fn hash(key: &[u8]) -> u64 {
        use std::hash::{Hash, Hasher};
        // Fixed keys: the same hash for a key all through the mount.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        h.finish()
    }

    pub fn insert(&mut self, key: impl AsRef<[u8]>) -> bool {
        self.0.insert(FoldSet::hash(key.as_ref()))
    }

    pub fn contains(&self, key: impl AsRef<[u8]>) -> bool {
        self.0.contains(&FoldSet::hash(key.as_ref()))
    }

    pub fn remove(&mut self, key: impl AsRef<[u8]>) -> bool {
        self.0.remove(&FoldSet::hash(key.as_ref()))
    }
}

#[derive(Debug)]
pub(crate) enum DirState {
    /// Not listed yet: the store's records for the entries below, waiting for reconciliation,
    /// and the directory's link count from the backing.
    Unloaded {
        tree: PendingTree,
        nlink_hint: u32,
    },
    Loaded(Children),
}

#[derive(Debug)]
pub(crate) struct Inode {
    pub kind: Kind,
    /// Metadata with real ids (the store's `OWNER_ID` already mapped to the mount owner).
    pub meta: InodeMeta,
    pub size: u64,
    pub blocks: u64,
    /// For directories and files with one name: the directory holding the name, and the name.
    /// `parent == 0` once unlinked. Unused for hard-linked files (see `dentries`).
    pub parent: Ino,
    /// Inline when short (`Name`): no heap allocation for most names.
    pub name: Name,
    /// A hard link's id and names, a symlink's target: boxed, since few inodes have them
    /// (`None` when none is set).
    pub extra: Option<Box<InodeExtra>>,
    /// A directory's state, boxed: every inode carries this field, files included, and a
    /// `PendingTree` is 248 bytes (memory per looked-up entry, issue 14).
    pub dir: Option<Box<DirState>>,
    /// Whether the store holds (or the next commit writes) a record for this inode; entries
    /// found on the stick without a record keep default metadata and cost no store bytes.
    pub persisted: bool,
    pub lookups: u64,
    pub opens: u32,
}

/// What few inodes have (memory per entry, issue 14: boxed out of `Inode`).
#[derive(Debug, Default)]
pub(crate) struct InodeExtra {
    /// Hard-link inode id: the content is `.pershome/inodes/<id>`.
    pub link_id: Option<u64>,
    /// For hard-linked files: the names of it seen so far (directories not yet loaded may
    /// hold more; `meta.nlink` is the true count).
    pub dentries: Vec<(Ino, Vec<u8>)>,
    /// A symlink's target.
    pub symlink: Option<Vec<u8>>,
}

impl InodeExtra {
    /// The box an inode carries for these, `None` when there is nothing to keep.
    pub fn boxed(
        link_id: Option<u64>,
        dentries: Vec<(Ino, Vec<u8>)>,
        symlink: Option<Vec<u8>>,
    ) -> Option<Box<InodeExtra>> {
        (link_id.is_some() || !dentries.is_empty() || symlink.is_some()).then(|| {
            Box::new(InodeExtra {
                link_id,
                dentries,
                symlink,
            })
        })
    }
}

impl Inode {
    /// Hard-link inode id: the content is `.pershome/inodes/<id>`.
    pub fn link_id(&self) -> Option<u64> {
        self.extra.as_ref().and_then(|e| e.link_id)
    }

    /// For hard-linked files: the names of it seen so far.
    pub fn dentries(&self) -> &[(Ino, Vec<u8>)] {
        self.extra.as_ref().map_or(&[], |e| e.dentries.as_slice())
    }

    /// A symlink's target.
    pub fn symlink(&self) -> Option<&[u8]> {
        self.extra.as_ref().and_then(|e| e.symlink.as_deref())
    }

    /// The extra fields, boxed now if they were not.
    pub fn extra_mut(&mut self) -> &mut InodeExtra {
        self.extra.get_or_insert_with(Default::default)
    }

    pub fn children(&self) -> Option<&Children> {
        match self.dir.as_deref() {
            Some(DirState::Loaded(c)) => Some(c),
            _ => None,
        }
    }

    pub fn children_mut(&mut self) -> Option<&mut Children> {
        match self.dir.as_deref_mut() {
            Some(DirState::Loaded(c)) => Some(c),
            _ => None,
        }
    }

    pub fn nlink(&self) -> u32 {
        match self.kind {
            Kind::Dir => match self.dir.as_deref() {
                Some(DirState::Loaded(c)) => 2 + c.subdirs,
                // Not listed yet: the backing's count, which is the listing's own (2 and a
                // subdirectory each; no subdirectory of a home folder is hidden) on vfat, the
                // kernel's exFAT and ext4. A backing that does not count subdirectories
                // (exfat-fuse says 1) shows 1, the conventional "unknown" (btrfs shows 1 for
                // every directory): the kernel keeps attributes for an hour (`fuse::TTL`),
                // and a guessed 2 would be a wrong count all that time; 1 only says it is not
                // known, and `find` then reads the directory instead of trusting the count.
                Some(DirState::Unloaded { nlink_hint, .. }) if *nlink_hint >= 2 => *nlink_hint,
                Some(DirState::Unloaded { .. }) => 1,
                None => 2,
            },
            _ if self.link_id().is_some() => self.meta.nlink(),
            _ => u32::from(self.parent != 0),
        }
    }

    /// The inode's name `from` (directory, name) is now `to`.
    pub fn move_name(&mut self, from: (Ino, &[u8]), to: (Ino, &[u8])) {
        if let Some(extra) = self.extra.as_mut().filter(|e| e.link_id.is_some()) {
            for d in extra.dentries.iter_mut() {
                if d.0 == from.0 && d.1 == from.1 {
                    *d = (to.0, to.1.to_vec());
                }
            }
        } else {
            self.parent = to.0;
            self.name = to.1.into();
        }
    }

    /// Records the backing file's size and mtime after pershome changed it (see
    /// `Meta::backing_size`).
    pub fn note_backing(&mut self, stat: &crate::backing::BackingStat) {
        self.meta.backing_size = stat.size;
        self.meta.backing_mtime = Timespec {
            sec: stat.mtime.0,
            nsec: stat.mtime.1,
        };
    }

    pub fn attr(&self, ino: Ino) -> Attr {
        Attr {
            ino,
            kind: self.kind,
            perm: self.meta.mode & 0o7777,
            nlink: self.nlink(),
            uid: self.meta.uid,
            gid: self.meta.gid,
            rdev: self.meta.rdev(),
            size: self.size,
            blocks: self.blocks,
            atime: self.meta.atime,
            mtime: self.meta.mtime,
            ctime: self.meta.ctime,
            btime: self.meta.btime,
        }
    }
}

/// An open file: the backing file it reads and writes.
#[derive(Debug)]
pub(crate) struct Handle {
    pub ino: Ino,
    pub file: Arc<File>,
    /// The kernel reads and writes this file itself (FUSE passthrough), so its size and mtime
    /// must be read back from the backing file.
    pub passthrough: bool,
    /// Opened for writing: on a mount that splits files, such a handle is served by pershome
    /// (see `Fs::passthrough_file`).
    pub writable: bool,
}

/// A directory listing taken at opendir, so readdir offsets stay stable while it changes.
#[derive(Debug)]
pub(crate) struct DirHandle {
    pub entries: Vec<DirEntry>,
}

#[derive(Debug)]
pub(crate) struct State {
    /// Boxed inodes: the table grows by doubling, so up to half its slots are empty, and an
    /// empty slot then costs 16 bytes instead of an inode's 168 (memory per entry, issue 14).
    pub inodes: HashMap<Ino, Box<Inode>>,
    pub next_ino: Ino,
    /// Hard-link ids already materialised as inodes.
    pub links: HashMap<u64, Ino>,
    /// Hard-link inode records not yet materialised (their names are in unloaded dirs).
    pub link_meta: HashMap<u64, Meta>,
    pub next_link_id: u64,
    /// Structural records (remove, rename) in the order they happened since the last commit.
    pub pending: Vec<crate::meta::Record>,
    /// Inodes whose metadata record is due at the next commit.
    pub dirty: HashSet<Ino>,
    /// Records found to be stale by reconciliation: written with the next real commit only.
    pub lazy_removes: Vec<crate::meta::Record>,
    pub lazy_dirty: HashSet<Ino>,
    pub handles: HashMap<u64, Handle>,
    pub dir_handles: HashMap<u64, DirHandle>,
    pub next_fh: u64,
    pub warnings: Vec<String>,
}

/// The filesystem: a backing directory, the metadata store and the in-memory view of both.
#[derive(Debug)]
pub struct Fs {
    pub(crate) backing: Backing,
    pub(crate) opts: FsOptions,
    /// The naming mode in force: the option, or the stick's recorded mode.
    pub(crate) names: NameMode,
    /// The names of pershome's own files on this stick (follows `names`).
    pub(crate) layout: StoreLayout,
    pub(crate) paths: StorePaths,
    pub(crate) state: Mutex<State>,
    pub(crate) dir_cache: Mutex<HashMap<Ino, Arc<OwnedFd>>>,
    /// The store's journal (`None` on a read-only mount) and the records of batches that failed
    /// to reach it. Locked after `state` when both are.
    pub(crate) journal: Mutex<commit::StoreWriter>,
    /// Whether a whole file growing past `part_size` is split (`FsOptions::parts` resolved
    /// against the backing's file system at mount).
    pub(crate) split: bool,
    pub(crate) part_size: u64,
    /// Held across every structural change of a parted file, and across data I/O on one, so
    /// that sizes and parts change together. Taken before the state lock.
    pub(crate) parts_lock: Mutex<()>,
    /// Open part files, by (parts id, part index).
    pub(crate) part_cache: Mutex<HashMap<(u64, u64), Arc<File>>>,
    /// Compact the journal once it holds this many bytes (tests lower it to compact at
    /// nearly every commit: `set_compact_after`).
    pub(crate) compact_after: std::sync::atomic::AtomicU64,
    /// The store's checkpoint was written by an earlier pershome, not in checkpoint order, so
    /// this mount holds all of it in memory: compact at unmount, so the next mount reads it
    /// lazily (`docs/format.md` § Memory).
    pub(crate) reorder_at_unmount: bool,
    /// Unit tests' hooks, to place a racing operation at an exact point (never a timing).
    #[cfg(test)]
    pub(crate) hooks: std::sync::RwLock<Hooks>,
}

/// Code a unit test runs at a named point inside an operation, so that what races the
/// operation is placed there deterministically.
#[cfg(test)]
pub(crate) type Hook = Arc<dyn Fn(&Fs) + Send + Sync>;

#[cfg(test)]
#[derive(Default)]
pub(crate) struct Hooks {
    /// Compaction: after what was pending was taken, before the snapshot of the state.
    pub compaction: Option<Hook>,
    /// Loading a directory: after its backing listing, before the entries are installed.
    pub listing: Option<Hook>,
    /// A commit whose write failed, once it let go of the journal and before it returns.
    pub failed_write: Option<Hook>,
}

#[cfg(test)]
impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

#[cfg(test)]
impl Fs {
    /// Runs the hook `which` picks, if a test set one.
    pub(crate) fn run_hook(&self, which: fn(&Hooks) -> Option<Hook>) {
        let hook = which(&self.hooks.read().unwrap_or_else(|p| p.into_inner()));
        if let Some(hook) = hook {
            hook(self);
        }
    }
}

/// Why a backing directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the backing directory {path}: {source}")]
    Backing {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "this stick's names are in `names={}` mode (its store is {}), but \
         `names={}` was asked: mount it without the names= option to use its own mode; a \
         stick's naming mode cannot be changed in place",
        stick.as_str(),
        crate::meta::layout::StoreLayout::for_names(*stick).store_dir(),
        asked.as_str()
    )]
    NameMode { stick: NameMode, asked: NameMode },
    #[error(
        "this stick was written by a pre-release `names=8.3` mode, whose store .pershome/ \
         (with NAMES.83 in it) holds long names: copy the home off it with that release, or \
         mount the backing with names=long to read the files under their 8.3 names"
    )]
    OldShortStore,
    #[error(
        "part size {0} is not a multiple of 4096 from 4096 to {max}",
        max = crate::meta::MAX_PART_SIZE
    )]
    PartSize(u64),
}

/// Whether files on this backing must be split to pass 4 GiB: yes on FAT (`msdos`/`vfat`)
/// and on any file system not known to hold large files (a FUSE mount may be exfat-fuse or
/// fusefat: splitting is the safe guess).
fn backing_needs_parts(backing: &Backing) -> bool {
    const LARGE_FILE_FS: &[i64] = &[
        0xEF53,                 // ext2/3/4
        0x9123_683E,            // btrfs
        0x5846_5342,            // xfs
        0x0102_1994,            // tmpfs
        0x794C_7630,            // overlayfs
        0x2011_BAB0,            // exfat (kernel driver)
        0x5346_544E,            // ntfs
        0x7366_746E,            // ntfs3
        0xF2F5_2010_u32 as i64, // f2fs
        0x2FC1_2FC1,            // zfs
        0xCA45_1A4E_u32 as i64, // bcachefs
        0x6969,                 // nfs
        0xFF53_4D42_u32 as i64, // cifs
        0xFE53_4D42_u32 as i64, // smb2
    ];
    match backing.statfs_type() {
        Ok(t) => !LARGE_FILE_FS.contains(&t),
        Err(_) => true,
    }
}

impl Fs {
    /// Opens a backing directory: recovers the metadata store to its last commit.
    pub fn open_backing(
        backing_path: &Path,
        opts: FsOptions,
    ) -> std::result::Result<Fs, OpenError> {
        let backing = Backing::open(backing_path).map_err(|source| OpenError::Backing {
            path: backing_path.display().to_string(),
            source,
        })?;
        let mode = if opts.read_only {
            OpenMode::ReadOnly
        } else {
            OpenMode::ReadWrite
        };
        let layout = name_mode::resolve(
            &backing,
            &backing_path.display().to_string(),
            opts.names,
            opts.read_only,
        )?;
        let names = layout.names();
        let (journal, recovered) = Journal::open_lazy_in(backing.root(), mode, layout)?;
        let paths = StorePaths::resolve(&backing, layout);
        let journal = (!opts.read_only).then_some(journal);
        for w in &recovered.warnings {
            tracing::warn!("metadata store: {w}");
        }
        let root_stat =
            backing
                .stat_at(backing.root(), b".")
                .map_err(|source| OpenError::Backing {
                    path: backing_path.display().to_string(),
                    source,
                })?;
        let unordered_base = recovered.unordered_base;
        let read_only = opts.read_only;
        let mut replayed = recovered.replayed;
        let mut warnings = recovered.warnings;
        if replayed.refused > 0 {
            let w = format!(
                "the metadata store holds more entries than pershome accepts ({} records \
                 ignored); the stick may have been tampered with: run `pershome fsck`",
                replayed.refused
            );
            tracing::warn!("{w}");
            warnings.push(w);
        }
        let mut root_record = replayed.root.meta.take();
        if let (None, Some(base)) = (&root_record, &replayed.root.base) {
            root_record = base
                .checkpoint
                .record_at(&[])
                .map_err(|source| OpenError::Backing {
                    path: backing_path.display().to_string(),
                    source,
                })?;
        }
        let tree = std::mem::take(&mut replayed.root);
        let persisted = root_record.is_some();
        let mut root_meta = match root_record {
            Some(m) if m.mode & libc::S_IFMT == libc::S_IFDIR => m,
            _ => reconcile::default_meta(Kind::Dir, &root_stat, &opts),
        };
        reconcile::map_ids_in(&mut root_meta, &opts);
        if opts.private_home {
            // The home's top directory is the user's and closed to everybody else whatever
            // the stick says: an access ACL there could name another user.
            root_meta.mode = libc::S_IFDIR | 0o700;
            root_meta
                .xattrs
                .retain(|(n, _)| n.as_slice() != acl::ACCESS);
        }
        let root = Inode {
            kind: Kind::Dir,
            meta: root_meta.into(),
            size: 4096,
            blocks: 8,
            parent: 0,
            name: Name::default(),
            extra: None,
            dir: Some(Box::new(DirState::Unloaded {
                tree,
                nlink_hint: root_stat.nlink as u32,
            })),
            persisted,
            lookups: 1,
            opens: 0,
        };
        let next_link_id = replayed.inodes.keys().max().map_or(1, |m| m + 1);
        let mut inodes = HashMap::new();
        inodes.insert(ROOT, Box::new(root));
        let state = State {
            inodes,
            next_ino: ROOT + 1,
            links: HashMap::new(),
            link_meta: replayed.inodes,
            next_link_id,
            pending: Vec::new(),
            dirty: HashSet::new(),
            lazy_removes: Vec::new(),
            lazy_dirty: HashSet::new(),
            handles: HashMap::new(),
            dir_handles: HashMap::new(),
            next_fh: 1,
            warnings,
        };
        let split = match opts.parts {
            PartsMode::Always => true,
            PartsMode::Never => false,
            PartsMode::Auto => backing_needs_parts(&backing),
        };
        let part_size = opts.part_size;
        if !(crate::meta::MIN_PART_SIZE..=crate::meta::MAX_PART_SIZE).contains(&part_size)
            || part_size % crate::meta::PART_ALIGN != 0
        {
            return Err(OpenError::PartSize(part_size));
        }
        let fs = Fs {
            backing,
            opts,
            names,
            layout,
            paths,
            state: Mutex::new(state),
            dir_cache: Mutex::new(HashMap::new()),
            journal: Mutex::new(commit::StoreWriter::new(journal)),
            split,
            part_size,
            parts_lock: Mutex::new(()),
            part_cache: Mutex::new(HashMap::new()),
            compact_after: std::sync::atomic::AtomicU64::new(commit::COMPACT_AFTER_BYTES),
            reorder_at_unmount: unordered_base && !read_only,
            #[cfg(test)]
            hooks: Default::default(),
        };
        if !fs.opts.read_only {
            fs.clear_staging();
        }
        Ok(fs)
    }

    pub fn options(&self) -> &FsOptions {
        &self.opts
    }

    /// The naming mode in force on this mount.
    pub fn name_mode(&self) -> NameMode {
        self.names
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still the best we have, and
        // refusing every later operation would lose the user's unsaved metadata.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Warnings from recovering the store (a torn journal tail, a corrupt checkpoint…).
    pub fn recovery_warnings(&self) -> Vec<String> {
        self.lock().warnings.clone()
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let mut st = self.lock();
        st.refresh_passthrough(ino);
        st.inodes
            .get(&ino)
            .map(|i| i.attr(ino))
            .ok_or(Errno::ENOENT)
    }

    /// The backing file of an open file handle (the FUSE adapter hands it to the kernel for
    /// passthrough).
    pub fn open_file(&self, fh: u64) -> Option<Arc<File>> {
        self.lock().handles.get(&fh).map(|h| h.file.clone())
    }

    /// Records that the kernel now reads and writes this handle's file directly.
    pub fn set_passthrough(&self, fh: u64) {
        if let Some(h) = self.lock().handles.get_mut(&fh) {
            h.passthrough = true;
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.opts.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// Drops `nlookup` kernel references to an inode; forgets it once nothing refers to it.
    pub fn forget(&self, ino: Ino, nlookup: u64) {
        let mut st = self.lock();
        if let Some(inode) = st.inodes.get_mut(&ino) {
            inode.lookups = inode.lookups.saturating_sub(nlookup);
        }
        st.maybe_drop(ino);
    }

    /// What the daemon holds in memory for the tree (issue 14, Scale): inodes, and records
    /// of the store kept for directories not loaded yet. Counts, for tests and the bench;
    /// never used to decide anything.
    pub fn resident(&self) -> Resident {
        let st = self.lock();
        let records = st
            .inodes
            .values()
            .filter_map(|i| match i.dir.as_deref() {
                Some(DirState::Unloaded { tree, .. }) => Some(tree.count_records()),
                _ => None,
            })
            .sum::<u64>()
            + st.link_meta.len() as u64;
        Resident {
            inodes: st.inodes.len() as u64,
            records,
        }
    }

    /// How many backing directories have been listed since the mount.
    pub fn directories_listed(&self) -> u64 {
        self.backing
            .stats
            .listings
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Backing statistics for the flash-wear figures: (data bytes, data writes, metadata
    /// bytes, metadata writes).
    pub fn write_stats(&self) -> (u64, u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let (mb, mw) = self.journal().journal.as_ref().map_or((0, 0), |j| {
            let s = j.stats();
            (s.bytes, s.writes)
        });
        (
            self.backing.stats.bytes.load(Relaxed),
            self.backing.stats.writes.load(Relaxed),
            mb,
            mw,
        )
    }
}

impl State {
    pub fn inode(&self, ino: Ino) -> Result<&Inode> {
        self.inodes.get(&ino).map(|i| &**i).ok_or(Errno::ENOENT)
    }

    pub fn inode_mut(&mut self, ino: Ino) -> Result<&mut Inode> {
        self.inodes
            .get_mut(&ino)
            .map(|i| &mut **i)
            .ok_or(Errno::ENOENT)
    }

    pub fn alloc_ino(&mut self) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    /// Removes an inode that no name, kernel reference or open file refers to any more.
    pub fn maybe_drop(&mut self, ino: Ino) {
        if ino == ROOT {
            return;
        }
        let Some(inode) = self.inodes.get(&ino) else {
            return;
        };
        let linked = match inode.link_id() {
            Some(_) => inode.meta.nlink() > 0,
            None => inode.parent != 0,
        };
        if !linked && inode.lookups == 0 && inode.opens == 0 {
            if let Some(id) = inode.link_id() {
                self.links.remove(&id);
            }
            self.inodes.remove(&ino);
            self.dirty.remove(&ino);
            self.lazy_dirty.remove(&ino);
        }
    }

    /// The backing path (backing names from the root) of a directory or single-name inode.
    pub fn backing_path(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let inode = self.inode(cur)?;
            if inode.parent == 0 {
                return Err(Errno::ENOENT);
            }
            let parent = self.inode(inode.parent)?;
            let dentry = parent
                .children()
                .and_then(|c| c.entries.get_ref(&inode.name))
                .ok_or(Errno::EIO)?;
            parts.push(dentry.backing.to_vec());
            cur = inode.parent;
            if parts.len() > 4096 {
                return Err(Errno::ELOOP);
            }
        }
        parts.reverse();
        Ok(parts)
    }

    /// Where an inode's content lives on the backing: (directory path, backing name).
    /// `fs` names the store's files (a hard-linked file's content is there).
    pub fn content_location(&self, fs: &Fs, ino: Ino) -> Result<(Vec<u8>, Vec<u8>)> {
        let inode = self.inode(ino)?;
        if let Some(id) = inode.link_id() {
            let dir = fs.paths.inodes.clone();
            let name = match fs.backing.open_dir(&dir) {
                Ok(fd) => fs.link_file_in(fd.as_fd(), id)?,
                Err(_) => fs.link_file_name(id)?,
            };
            return Ok((dir, name));
        }
        let mut path = self.backing_path(ino)?;
        let name = path.pop().ok_or(Errno::EISDIR)?;
        Ok((join_path(&path), name))
    }

    /// For a file the kernel writes directly (passthrough), takes its size from the backing
    /// file, and when the backing file changed since pershome last looked, its mtime too.
    pub fn refresh_passthrough(&mut self, ino: Ino) {
        // getattr calls this for every inode: look through the open handles only for an
        // inode that has some.
        if self.inodes.get(&ino).is_none_or(|i| i.opens == 0) {
            return;
        }
        let Some(file) = self
            .handles
            .values()
            .find(|h| h.ino == ino && h.passthrough)
            .map(|h| h.file.clone())
        else {
            return;
        };
        let Ok(stat) = Backing::fstat(&file) else {
            return;
        };
        let Some(inode) = self.inodes.get_mut(&ino) else {
            return;
        };
        let backing_mtime = Timespec {
            sec: stat.mtime.0,
            nsec: stat.mtime.1,
        };
        if inode.meta.backing_size != stat.size || inode.meta.backing_mtime != backing_mtime {
            let t = now();
            inode.size = stat.size;
            inode.blocks = stat.size.div_ceil(512);
            inode.meta.mtime = t;
            inode.meta.ctime = t;
            inode.note_backing(&stat);
            self.dirty.insert(ino);
        }
    }

    pub fn alloc_fh(&mut self) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        fh
    }

    /// Puts a name into a loaded directory and makes the change the directory's own: its
    /// mtime and ctime, its link count for a subdirectory, its record.
    pub fn add_entry(
        &mut self,
        dir: Ino,
        name: &[u8],
        dentry: Dentry,
        is_dir: bool,
        t: Timespec,
    ) -> Result<()> {
        let inode = self.inode_mut(dir)?;
        inode.meta.mtime = t;
        inode.meta.ctime = t;
        let children = inode.children_mut().ok_or(Errno::EIO)?;
        children
            .folds
            .insert(crate::fatrules::fold_key(&dentry.backing));
        children.entries.insert(name, dentry);
        if is_dir {
            children.subdirs += 1;
        }
        self.mark_dirty(dir);
        Ok(())
    }

    /// Takes a name out of a loaded directory; the counterpart of `add_entry`.
    pub fn remove_entry(
        &mut self,
        dir: Ino,
        name: &[u8],
        backing: &[u8],
        is_dir: bool,
        t: Timespec,
    ) -> Result<()> {
        let inode = self.inode_mut(dir)?;
        inode.meta.mtime = t;
        inode.meta.ctime = t;
        let children = inode.children_mut().ok_or(Errno::EIO)?;
        children.entries.remove(name);
        children.folds.remove(crate::fatrules::fold_key(backing));
        if is_dir {
            children.subdirs = children.subdirs.saturating_sub(1);
        }
        self.mark_dirty(dir);
        Ok(())
    }

    pub fn mark_dirty(&mut self, ino: Ino) {
        self.dirty.insert(ino);
    }
}

impl Fs {
    /// The content file name of hard-link inode `id` as this layout writes it. `ENOSPC`, with
    /// the reason logged, for an id past what the 8.3 layout's names hold.
    pub(crate) fn link_file_name(&self, id: u64) -> Result<Vec<u8>> {
        self.layout
            .inode_file(id)
            .map(String::into_bytes)
            .map_err(|e| {
                tracing::error!("{e}");
                Errno::ENOSPC
            })
    }

    /// `link_file_name` as the backing lists it in `dir` (the inodes directory).
    pub(crate) fn link_file_in(&self, dir: BorrowedFd<'_>, id: u64) -> Result<Vec<u8>> {
        let name = self.link_file_name(id)?;
        Ok(self.store_entry(dir, name))
    }

    /// A store entry `name` (as this layout writes it) of the directory `dir`, as the backing
    /// lists it: on an 8.3 stick whose listing shows another case (a copy of a `msdos` stick
    /// on a case-sensitive file system), that case. The name itself when it is there or
    /// missing altogether, and always in the long layout.
    pub(crate) fn store_entry(&self, dir: BorrowedFd<'_>, name: Vec<u8>) -> Vec<u8> {
        if self.layout == StoreLayout::Long {
            return name;
        }
        match self.backing.stat_at(dir, &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            _ => return name,
        }
        self.backing
            .list(dir)
            .ok()
            .and_then(|l| {
                l.into_iter()
                    .map(|e| e.name)
                    .find(|n| self.layout.same_name(n, &name))
            })
            .unwrap_or(name)
    }
}

pub(crate) fn join_path(parts: &[Vec<u8>]) -> Vec<u8> {
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    crate::backing::join(&refs)
}

/// How many backing directory fds to keep open. A directory fd stays valid when the directory
/// is renamed, so the cache is keyed by inode and only forgets a directory when it is removed.
const DIR_CACHE_MAX: usize = 512;

impl Fs {
    /// An open fd of a directory inode's backing directory, from the cache when possible:
    /// resolving a path with `openat2` for every create or unlink costs more than the rest of
    /// the operation.
    pub(crate) fn open_dir_of(&self, st: &State, ino: Ino) -> Result<Arc<OwnedFd>> {
        let mut cache = self.dir_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = cache.get(&ino) {
            return Ok(fd.clone());
        }
        let path = st.backing_path(ino)?;
        let fd = Arc::new(
            self.backing
                .open_dir(&join_path(&path))
                .map_err(|e| errno_of(&e))?,
        );
        if cache.len() >= DIR_CACHE_MAX {
            cache.clear();
        }
        cache.insert(ino, fd.clone());
        Ok(fd)
    }

    pub(crate) fn forget_dir_fd(&self, ino: Ino) {
        self.dir_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
    }
}

#[cfg(test)]
mod size_tests {
    /// Every entry of every loaded directory has an inode: its size is paid once per entry
    /// of a home (issue 14, Scale; `tests/entry_memory.rs` counts the whole cost). malloc
    /// holds 168 bytes in a 176-byte chunk; the inode was 424 bytes before the rare fields
    /// were boxed.
    #[test]
    fn an_inode_stays_within_168_bytes() {
        let size = std::mem::size_of::<super::Inode>();
        assert!(size <= 168, "Inode is {size} bytes");
    }
}
