//! Lazy reconciliation: the first time a directory is needed, its backing listing is matched
//! with the store's records for it (design property 4). Entries made on another computer get
//! default metadata, files changed elsewhere get their new size and mtime, records of entries
//! that vanished are dropped. A recorded directory that vanished is first matched by its
//! contents to a new directory beside it (renamed on another computer: its records move
//! over), and a hard-link placeholder found under a name without a record is the link it names
//! (`meta::moved`). Nothing here writes to the stick: what it finds is recorded with the next
//! commit that something else causes.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd};

use super::{
    errno_of, join_path, now, Children, Dentry, DirState, Errno, Fs, Ino, Inode, InodeExtra, Kind,
    Result, State,
};
use crate::backing::{BackingEntry, BackingStat};
use crate::fatrules::fold_key;
use crate::meta::moved::{self, ListedChild};
use crate::meta::pending::PendingTree;
use crate::meta::{Meta, Record, Timespec, OWNER_ID};
use crate::names::{self, Decoded, NameMode};

/// The largest symlink body pershome reads: `!<symlink>`, a BOM, 4096 UTF-16 units and a NUL.
pub(crate) const SYMLINK_FILE_MAX: u64 = 12 + 2 * 4096 + 2;
pub(crate) const SYMLINK_MAGIC: &[u8] = b"!<symlink>";

fn ts((sec, nsec): (i64, u32)) -> Timespec {
    Timespec { sec, nsec }
}

/// Metadata for an entry that has no record: what another computer's edit looks like.
pub(crate) fn default_meta(kind: Kind, stat: &BackingStat, opts: &super::FsOptions) -> Meta {
    let perm = match kind {
        Kind::Dir => 0o755,
        Kind::Symlink => 0o777,
        _ => 0o644,
    };
    let t = ts(stat.mtime);
    Meta {
        mode: kind.type_bits() | perm,
        uid: opts.uid,
        gid: opts.gid,
        atime: t,
        mtime: t,
        ctime: t,
        btime: t,
        backing_size: stat.size,
        backing_mtime: t,
        ..Meta::default()
    }
}

/// Stored ids → ids on this machine: the stick's owner becomes whoever mounts it; in a
/// `private_home` mount every stored id does (docs/security.md: no uid on the stick grants
/// another local user access or takes it from the user).
pub(crate) fn map_ids_in(meta: &mut Meta, opts: &super::FsOptions) {
    if meta.uid == OWNER_ID || opts.private_home {
        meta.uid = opts.uid;
    }
    if meta.gid == OWNER_ID || opts.private_home {
        meta.gid = opts.gid;
    }
}

/// Parses a symlink file: Cygwin's `!<symlink>` followed by UTF-16LE with a BOM and a NUL, or
/// by raw bytes and a NUL (the form pershome writes for targets that are not UTF-8).
pub(crate) fn parse_symlink(body: &[u8]) -> Option<Vec<u8>> {
    let rest = body.strip_prefix(SYMLINK_MAGIC)?;
    if let Some(utf16) = rest.strip_prefix(&[0xff, 0xfe]) {
        let units: Vec<u16> = utf16
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
        let s = String::from_utf16(&units[..end]).ok()?;
        return (!s.is_empty()).then(|| s.into_bytes());
    }
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    (end > 0).then(|| rest[..end].to_vec())
}

/// The body pershome writes for a symlink (see `parse_symlink`).
pub(crate) fn symlink_body(target: &[u8]) -> Vec<u8> {
    let mut body = SYMLINK_MAGIC.to_vec();
    match std::str::from_utf8(target) {
        Ok(s) => {
            body.extend_from_slice(&[0xff, 0xfe]);
            for unit in s.encode_utf16() {
                body.extend_from_slice(&unit.to_le_bytes());
            }
            body.extend_from_slice(&[0, 0]);
        }
        Err(_) => {
            body.extend_from_slice(target);
            body.push(0);
        }
    }
    body
}

/// A POSIX name standing for a backing name that no POSIX name maps to: the backing name when
/// it fits, else its first characters and a hash of the whole, always 1..=255 bytes.
pub(crate) fn displayable_alias(backing: &[u8]) -> Vec<u8> {
    if names::is_valid_posix_name(backing) {
        return backing.to_vec();
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(backing);
    let mut cut = backing.len().min(200);
    // Cut at a character boundary so a UTF-8 name keeps a readable prefix.
    if let Ok(text) = std::str::from_utf8(backing) {
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
    }
    let mut alias: Vec<u8> = backing[..cut]
        .iter()
        .copied()
        .filter(|&b| b != b'/' && b != 0)
        .collect();
    alias.extend_from_slice(b"~");
    for b in &digest[..8] {
        alias.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    alias
}

/// What loading a directory needs to know of the store's records for it before listing it.
pub(crate) struct RecordedNames {
    /// The backing names of entries the store holds a record for.
    recorded: HashSet<Vec<u8>>,
    /// Among them, those recorded as symlinks (whose body is read at loading too).
    symlinks: HashSet<Vec<u8>>,
    /// Recorded directories with records below them, which can be found again by their
    /// contents if another computer renamed them (`meta::moved::matchable`).
    matchable_dirs: HashSet<Vec<u8>>,
}

fn recorded_names(tree: &PendingTree) -> RecordedNames {
    let mut recorded = HashSet::new();
    let mut symlinks = HashSet::new();
    let mut matchable_dirs = HashSet::new();
    for (name, t) in &tree.children {
        if let Some(meta) = &t.meta {
            recorded.insert(name.clone());
            if meta.link.is_none() && valid_meta_kind(meta) == Some(Kind::Symlink) {
                symlinks.insert(name.clone());
            }
        }
        if moved::matchable(t) {
            matchable_dirs.insert(name.clone());
        }
    }
    RecordedNames {
        recorded,
        symlinks,
        matchable_dirs,
    }
}

/// Queues a record that reconciliation found, in its place among the changes: behind the
/// structural records still pending when there are some (a rename through pershome of a
/// parent, say, must be replayed first), else with the lazy records, which a commit writes in
/// front of everything pending since (so a read alone never causes a write).
fn push_found(st: &mut State, record: Record) {
    if st.pending.is_empty() {
        st.lazy_removes.push(record);
    } else {
        st.pending.push(record);
    }
}

fn valid_meta_kind(meta: &Meta) -> Option<Kind> {
    Kind::from_mode(meta.mode)
}

/// The kind a record gives a backing *file*: a store that claims a directory there is wrong
/// (stick metadata is untrusted), and the file is shown as what it is.
fn non_dir_kind(meta: &Meta) -> Kind {
    match valid_meta_kind(meta) {
        Some(Kind::Dir) | None => Kind::File,
        Some(k) => k,
    }
}

/// What loading a directory reads from the stick: its listing (every entry stat'ed) and the
/// bodies of its small files without a record, which may be symlinks made elsewhere, and of
/// the files recorded as symlinks. Read
/// without the state lock when `Fs::preload` can (issue 11, defect 5).
pub(crate) struct DirScan {
    dirfd: std::os::fd::OwnedFd,
    entries: Vec<BackingEntry>,
    /// By backing name.
    bodies: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    /// The listings of the new directories (without a record), read only when a matchable
    /// recorded directory is missing from the listing: the candidates it may have been
    /// renamed to.
    candidates: Vec<(Vec<u8>, Vec<ListedChild>)>,
}

/// Whether `ino` is a directory not loaded yet.
fn unloaded_dir(st: &State, ino: Ino) -> bool {
    matches!(
        st.inodes.get(&ino).and_then(|i| i.dir.as_deref()),
        Some(DirState::Unloaded { .. })
    )
}

/// Whether an entry of a directory being loaded has a record: by its name, or on an 8.3
/// stick listed in lower case, by its upper-case form (see `install_dir`).
fn has_record(recorded: &HashSet<Vec<u8>>, names: NameMode, name: &[u8]) -> bool {
    recorded.contains(name)
        || (names == NameMode::Short83 && recorded.contains(&name.to_ascii_uppercase()))
}

impl Fs {
    /// The state lock, taken once the directories `dirs` are loaded: when one is not, the
    /// lock is let go while `preload` loads it (no extra locking when all are loaded).
    pub(crate) fn lock_loaded(&self, dirs: &[Ino]) -> std::sync::MutexGuard<'_, State> {
        let st = self.lock();
        if !dirs.iter().any(|&d| unloaded_dir(&st, d)) {
            return st;
        }
        drop(st);
        for &dir in dirs {
            self.preload(dir);
        }
        self.lock()
    }

    /// `lock_loaded` for an operation that also lists the entry `name` of `parent` when it
    /// is a directory (rmdir, or a rename over a directory, check that it is empty): that
    /// listing, too, is done without the lock. `st` is held over the other directories.
    pub(crate) fn relock_with_entry_loaded<'a>(
        &'a self,
        st: std::sync::MutexGuard<'a, State>,
        dirs: &[Ino],
        parent: Ino,
        name: &[u8],
    ) -> std::sync::MutexGuard<'a, State> {
        let entry = st
            .inodes
            .get(&parent)
            .and_then(|p| p.children())
            .and_then(|c| c.entries.ino(name));
        match entry {
            Some(ino) if unloaded_dir(&st, ino) => {
                drop(st);
                let mut all = dirs.to_vec();
                all.push(ino);
                self.lock_loaded(&all)
            }
            _ => st,
        }
    }

    /// Loads directory `ino` if it is not loaded yet, doing its stick I/O (listing, a stat of
    /// every entry, reading small files) without holding the state lock, so the first `ls`
    /// of a big folder does not stall every other operation. Errors are left for
    /// `ensure_loaded`, which the caller runs next under the lock, to report.
    pub(crate) fn preload(&self, ino: Ino) {
        let (dir_path, recorded) = {
            let mut st = self.lock();
            let Some(DirState::Unloaded { tree, .. }) =
                st.inodes.get_mut(&ino).and_then(|i| i.dir.as_deref_mut())
            else {
                return;
            };
            // The store's records of this directory, read from the stick if they are still
            // there (the base checkpoint): a few chunks, under the lock so that no rename
            // moves the tree meanwhile.
            if tree.materialize_level().is_err() {
                return;
            }
            let recorded = recorded_names(tree);
            let Ok(path) = st.backing_path(ino) else {
                return;
            };
            (path, recorded)
        };
        let Ok(scan) = self.scan_dir(&dir_path, &recorded) else {
            return;
        };
        let mut st = self.lock();
        // Another thread may have loaded it meanwhile. Nothing else changes the entries of a
        // directory that is not loaded (every operation on a name in it loads it first), and
        // the scan was made through the directory's own descriptor, which follows a rename.
        let unloaded = matches!(
            st.inodes.get(&ino).and_then(|i| i.dir.as_deref()),
            Some(DirState::Unloaded { .. })
        );
        if unloaded {
            if let Err(e) = self.install_dir(&mut st, ino, scan) {
                tracing::debug!("loading directory {ino} ahead: {e}");
            }
        }
    }

    /// Makes sure a directory's children are known, listing its backing directory once. The
    /// listing is done here, under the caller's state lock, only when `preload` did not do it
    /// first (a directory reached inside an operation, such as the target of a rename).
    pub(crate) fn ensure_loaded(&self, st: &mut State, ino: Ino) -> Result<()> {
        let recorded = match st.inode_mut(ino)?.dir.as_deref_mut() {
            Some(DirState::Loaded(_)) => return Ok(()),
            Some(DirState::Unloaded { tree, .. }) => {
                tree.materialize_level().map_err(|e| {
                    tracing::error!("reading the metadata store for directory {ino}: {e}");
                    Errno::EIO
                })?;
                recorded_names(tree)
            }
            None => return Err(Errno::ENOTDIR),
        };
        let dir_path = st.backing_path(ino)?;
        let scan = self.scan_dir(&dir_path, &recorded)?;
        self.install_dir(st, ino, scan)
    }

    /// The stick I/O of loading the directory at `dir_path`, given the names the store has
    /// records for and those recorded as symlinks (`recorded_names`). Touches no state.
    fn scan_dir(&self, dir_path: &[Vec<u8>], names: &RecordedNames) -> Result<DirScan> {
        let RecordedNames {
            recorded, symlinks, ..
        } = names;
        let dirfd = self
            .backing
            .open_dir(&join_path(dir_path))
            .map_err(|e| errno_of(&e))?;
        let entries = self.backing.list(dirfd.as_fd()).map_err(|e| {
            tracing::error!(
                "listing backing directory {:?}: {e}",
                String::from_utf8_lossy(&join_path(dir_path))
            );
            errno_of(&e)
        })?;
        #[cfg(test)]
        self.run_hook(|h| h.listing.clone());
        let mut bodies = std::collections::HashMap::new();
        for entry in &entries {
            let stat = &entry.stat;
            let looks_like_symlink = stat.is_file
                && stat.size > SYMLINK_MAGIC.len() as u64
                && stat.size <= SYMLINK_FILE_MAX;
            let unrecorded = !has_record(recorded, self.names, &entry.name);
            if (looks_like_symlink && unrecorded)
                || (stat.is_file && has_record(symlinks, self.names, &entry.name))
            {
                if let Ok(body) =
                    self.backing
                        .read_small(dirfd.as_fd(), &entry.name, SYMLINK_FILE_MAX)
                {
                    bodies.insert(entry.name.clone(), body);
                }
            }
        }
        let candidates = self.scan_candidates(dir_path, names, &entries);
        Ok(DirScan {
            dirfd,
            entries,
            bodies,
            candidates,
        })
    }

    /// The listings of the new directories a vanished recorded directory may have become
    /// (renamed on another computer), or nothing when no such directory vanished. A directory
    /// that cannot be listed is no candidate.
    fn scan_candidates(
        &self,
        dir_path: &[Vec<u8>],
        names: &RecordedNames,
        entries: &[BackingEntry],
    ) -> Vec<(Vec<u8>, Vec<ListedChild>)> {
        if names.matchable_dirs.is_empty() {
            return Vec::new();
        }
        let listed: HashSet<Vec<u8>> = entries.iter().map(|e| fold_key(&e.name)).collect();
        if names
            .matchable_dirs
            .iter()
            .all(|n| listed.contains(&fold_key(n)))
        {
            return Vec::new();
        }
        let mut out = Vec::new();
        for e in entries {
            if !e.stat.is_dir || has_record(&names.recorded, self.names, &e.name) {
                continue;
            }
            let mut path = dir_path.to_vec();
            path.push(e.name.clone());
            let Ok(fd) = self.backing.open_dir(&join_path(&path)) else {
                continue;
            };
            let Ok(children) = self.backing.list(fd.as_fd()) else {
                continue;
            };
            let children = children
                .into_iter()
                .filter_map(BackingEntry::into_listed_child)
                .collect();
            out.push((e.name.clone(), children));
        }
        out
    }

    /// Which vanished recorded directories of a directory being loaded were renamed to which
    /// new ones (`meta::moved::match_dirs`): new backing name → the match.
    fn renamed_dirs(
        &self,
        records: &mut std::collections::HashMap<Vec<u8>, PendingTree>,
        entries: &[BackingEntry],
        candidates: &[(Vec<u8>, Vec<ListedChild>)],
    ) -> std::collections::HashMap<Vec<u8>, moved::DirMatch> {
        if candidates.is_empty() {
            return Default::default();
        }
        // The records the listing takes, as `install_dir` finds them (8.3: by upper case).
        let mut taken = HashSet::new();
        for e in entries {
            if records.contains_key(&e.name) {
                taken.insert(e.name.clone());
            } else if self.names == NameMode::Short83 {
                taken.insert(e.name.to_ascii_uppercase());
            }
        }
        // A vanished folder's own records may still be in the base checkpoint (read lazily):
        // read them now, to compare them (a few chunks; only when a candidate exists).
        for (n, t) in records.iter_mut() {
            if !taken.contains(n) && moved::matchable(t) {
                if let Err(e) = t.materialize_level() {
                    tracing::debug!("reading the records of a vanished folder: {e}");
                }
            }
        }
        let mut vanished: Vec<(&[u8], &PendingTree)> = records
            .iter()
            .filter(|(n, t)| !taken.contains(*n) && moved::matchable(t))
            .map(|(n, t)| (n.as_slice(), t))
            .collect();
        vanished.sort_by(|a, b| a.0.cmp(b.0));
        let cands: Vec<(&[u8], &[ListedChild])> = candidates
            .iter()
            .map(|(n, l)| (n.as_slice(), l.as_slice()))
            .collect();
        moved::match_dirs(&vanished, &cands)
            .into_iter()
            .map(|m| (m.to.clone(), m))
            .collect()
    }

    /// Matches a directory's scan with the store's records for it and makes it loaded.
    fn install_dir(&self, st: &mut State, ino: Ino, scan: DirScan) -> Result<()> {
        let DirScan {
            dirfd,
            entries,
            bodies,
            candidates,
        } = scan;
        let dir_path = st.backing_path(ino)?;
        let (mut pending, nlink_hint) = match st.inode_mut(ino)?.dir.take().map(|d| *d) {
            Some(DirState::Unloaded { tree, nlink_hint }) => (tree, nlink_hint),
            _ => (PendingTree::default(), 2),
        };
        // `preload` or `ensure_loaded` made the records explicit; should that have failed
        // after all, the directory stays unloaded rather than lose them.
        if let Err(e) = pending.materialize_level() {
            tracing::error!("reading the metadata store for directory {ino}: {e}");
            st.inode_mut(ino)?.dir = Some(Box::new(DirState::Unloaded {
                tree: pending,
                nlink_hint,
            }));
            return Err(Errno::EIO);
        }
        let mut records = std::mem::take(&mut pending.children);
        let mut renamed = self.renamed_dirs(&mut records, &entries, &candidates);
        let at_root = ino == super::ROOT;
        let mut children = Children::default();
        let mut sorted = entries;
        // Deterministic order, so that when two backing names claim the same POSIX name the
        // same one keeps it at every mount.
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        for entry in sorted {
            children.folds.insert(fold_key(&entry.name));
            if !entry.stat.is_dir && !entry.stat.is_file {
                // FAT holds nothing else; on a directory backing, anything else was not made
                // by pershome and is not followed or shown.
                continue;
            }
            let mut record = records.remove(&entry.name);
            if record.is_none() && self.names == NameMode::Short83 {
                // Linux's `msdos` driver lists short names in lower case (`report.txt`) while
                // pershome made and recorded them in upper case (`REPORT.TXT`); the stick is
                // case-insensitive, so the record is the upper-case one's.
                let upper = entry.name.to_ascii_uppercase();
                if upper != entry.name && crate::fatrules::check_short_name(&upper).is_ok() {
                    record = records.remove(&upper);
                }
            }
            let mut moved_here = None;
            if record.is_none() && entry.stat.is_dir {
                if let Some(m) = renamed.remove(&entry.name) {
                    record = records.remove(&m.from);
                    // A POSIX name kept in the folder's record (hashed, or an 8.3 stick's)
                    // was the old name's: the folder is now called what the stick says.
                    if let Some(meta) = record.as_mut().and_then(|t| t.meta.as_mut()) {
                        meta.name = None;
                    }
                    moved_here = record.as_ref().map(|_| m);
                }
            }
            let (meta, subtree) = match record {
                Some(mut t) => (t.meta.take(), t),
                None => (None, PendingTree::default()),
            };
            let decoded = names::decode_in(self.names, &entry.name, at_root);
            if matches!(decoded, Decoded::Reserved) {
                continue;
            }
            let mut name = match (&meta, decoded) {
                (Some(Meta { name: Some(n), .. }), _) if names::is_valid_posix_name(n) => n.clone(),
                (_, Decoded::Name(n)) if names::is_valid_posix_name(&n) => n,
                // A hashed name whose record is gone, or a name that decodes to something a
                // POSIX name cannot be: show the backing name itself, or a shortened form of
                // it when it is longer than a POSIX name may be (255 UTF-16 units of CJK made
                // on Windows are up to 765 bytes).
                _ => displayable_alias(&entry.name),
            };
            if children.entries.contains_key(&name) {
                // Two backing names claim one POSIX name (made on another computer): keep
                // both, the later one under a marked name the user can rename.
                let base = name.clone();
                let mut n = 1;
                while children.entries.contains_key(&name) {
                    name = base.clone();
                    name.extend_from_slice(format!("~dup{n}").as_bytes());
                    n += 1;
                }
            }
            let child = self.inode_from_backing(
                st,
                ino,
                &name,
                &entry,
                meta,
                subtree,
                dirfd.as_fd(),
                bodies.get(&entry.name),
            )?;
            if let Some(m) = moved_here {
                let mut from = dir_path.clone();
                from.push(m.from.clone());
                let mut to = dir_path.clone();
                to.push(m.to.clone());
                tracing::info!(
                    "the folder {:?} was renamed to {:?} on another computer (their contents \
                     are {}% alike): its metadata and that of everything in it are kept",
                    String::from_utf8_lossy(&join_path(&from)),
                    String::from_utf8_lossy(&join_path(&to)),
                    m.percent()
                );
                push_found(st, Record::Rename { from, to });
                // The records moved along, but a name kept in the directory's own record
                // (a hashed or escaped name) was the old one: record it afresh.
                st.lazy_dirty.insert(child);
            }
            if st.inode(child)?.kind == Kind::Dir {
                children.subdirs += 1;
            }
            children.entries.insert(
                &name,
                Dentry {
                    ino: child,
                    backing: entry.name.clone(),
                },
            );
        }
        // Records whose backing entry is gone: deleted or renamed on another computer.
        // Kept until the next commit something else causes, and named by `pershome fsck`
        // until then.
        let mut gone: Vec<_> = records.into_iter().collect();
        gone.sort_by(|a, b| a.0.cmp(&b.0));
        for (backing_name, tree) in gone {
            if !tree.is_empty() {
                let mut path = dir_path.clone();
                path.push(backing_name);
                if moved::matchable(&tree) {
                    tracing::info!(
                        "the folder {:?} is gone (deleted or renamed on another computer, and \
                         no new folder beside it is clearly the same): the metadata of the \
                         entries in it is dropped",
                        String::from_utf8_lossy(&join_path(&path))
                    );
                }
                push_found(st, Record::Remove { path });
            }
        }
        st.inode_mut(ino)?.dir = Some(Box::new(DirState::Loaded(children)));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn inode_from_backing(
        &self,
        st: &mut State,
        parent: Ino,
        name: &[u8],
        entry: &BackingEntry,
        meta: Option<Meta>,
        subtree: PendingTree,
        dirfd: BorrowedFd<'_>,
        body: Option<&Vec<u8>>,
    ) -> Result<Ino> {
        let opts = &self.opts;
        let stat = &entry.stat;
        let meta = match meta {
            None if stat.is_file => self.moved_link_name(st, parent, name, entry, body),
            m => m,
        };
        let mut persisted = meta.is_some();
        let mut lazy_dirty = false;
        let mut link_id = None;
        let mut size = stat.size;
        let mut blocks = stat.blocks;
        let mut symlink = None;
        let (kind, mut meta) = if stat.is_dir {
            match meta {
                Some(m) if valid_meta_kind(&m) == Some(Kind::Dir) => (Kind::Dir, m),
                _ => {
                    persisted = false;
                    (Kind::Dir, default_meta(Kind::Dir, stat, opts))
                }
            }
        } else {
            match meta.filter(|m| matches!(valid_meta_kind(m), Some(k) if k != Kind::Dir)) {
                Some(m) if m.link.is_some() => {
                    let id = m.link.unwrap_or_default();
                    if let Some(&ino) = st.links.get(&id) {
                        let inode = st.inode_mut(ino)?;
                        inode.extra_mut().dentries.push((parent, name.to_vec()));
                        return Ok(ino);
                    }
                    let content = self.link_content_stat(id);
                    match (st.link_meta.remove(&id), content) {
                        (Some(link_meta), Some(cstat)) => {
                            link_id = Some(id);
                            (size, blocks) = self.content_size(link_meta.parts, &cstat);
                            (non_dir_kind(&link_meta), link_meta)
                        }
                        (link_meta, _) => {
                            // The link's content file is gone (a crash while a link was made
                            // or undone): this name holds the content now.
                            lazy_dirty = true;
                            persisted = false;
                            match link_meta {
                                Some(mut lm) => {
                                    lm.nlink = 0;
                                    (non_dir_kind(&lm), lm)
                                }
                                None => (Kind::File, default_meta(Kind::File, stat, opts)),
                            }
                        }
                    }
                }
                Some(mut m) => {
                    let kind = non_dir_kind(&m);
                    let changed = m.backing_size != stat.size || m.backing_mtime != ts(stat.mtime);
                    if let Some(p) = m.parts.filter(|_| kind == Kind::File) {
                        // A first part still one part long was at most edited in place; one
                        // of another length was rewritten elsewhere (Windows sees only the
                        // first part), so the later parts no longer belong to it.
                        if changed && stat.size != p.size && !self.list_parts(p.id).is_empty() {
                            let w = format!(
                                "{} was changed on another computer: it now holds only what \
                                 that computer saw ({} bytes); its later parts are kept in \
                                 {}/{} for `pershome fsck --repair` to recover",
                                String::from_utf8_lossy(name),
                                stat.size,
                                String::from_utf8_lossy(&self.paths.parts),
                                self.layout.parts_id_dir(p.id).unwrap_or_default()
                            );
                            tracing::warn!("{w}");
                            st.warnings.push(w);
                            m.parts = None;
                        } else {
                            (size, blocks) = self.content_size(m.parts, stat);
                        }
                    }
                    if kind == Kind::File && changed {
                        // Changed on another computer since pershome last wrote it.
                        m.mtime = ts(stat.mtime);
                        m.ctime = now();
                        m.backing_size = stat.size;
                        m.backing_mtime = ts(stat.mtime);
                        lazy_dirty = true;
                    }
                    (kind, m)
                }
                None => {
                    let looks_like_symlink =
                        stat.size > SYMLINK_MAGIC.len() as u64 && stat.size <= SYMLINK_FILE_MAX;
                    let target = if looks_like_symlink {
                        // Read ahead by `scan_dir` unless a record (of a kind a file cannot
                        // have) made it look recorded there.
                        match body {
                            Some(body) => parse_symlink(body),
                            None => self
                                .backing
                                .read_small(dirfd, &entry.name, SYMLINK_FILE_MAX)
                                .ok()
                                .and_then(|body| parse_symlink(&body)),
                        }
                    } else {
                        None
                    };
                    match target {
                        Some(t) => {
                            symlink = Some(t);
                            (Kind::Symlink, default_meta(Kind::Symlink, stat, opts))
                        }
                        None => (Kind::File, default_meta(Kind::File, stat, opts)),
                    }
                }
            }
        };
        map_ids_in(&mut meta, opts);
        meta.mode = kind.type_bits() | (meta.mode & 0o7777);
        meta.name = None;
        match kind {
            Kind::Symlink if symlink.is_none() => {
                // Read ahead by `scan_dir` for a symlink recorded at this name.
                let body = match (body, link_id) {
                    (Some(b), None) => Some(b.clone()),
                    _ => self.read_content_small(st, dirfd, &entry.name, link_id),
                };
                symlink = Some(body.as_deref().and_then(parse_symlink).unwrap_or_default());
            }
            Kind::Fifo | Kind::Socket | Kind::CharDevice | Kind::BlockDevice => {
                size = 0;
                blocks = 0;
            }
            _ => {}
        }
        if kind == Kind::Symlink {
            size = symlink.as_ref().map_or(0, |t| t.len() as u64);
        }
        if kind == Kind::Dir {
            size = 4096;
            blocks = 8;
        }
        let ino = st.alloc_ino();
        // The records below a directory stay where they are (in memory, or on the stick in
        // the base checkpoint) until it is loaded.
        let dir = (kind == Kind::Dir).then(|| {
            Box::new(DirState::Unloaded {
                tree: subtree,
                nlink_hint: stat.nlink as u32,
            })
        });
        let inode = Inode {
            kind,
            meta: meta.into(),
            size,
            blocks,
            parent,
            name: name.into(),
            extra: InodeExtra::boxed(
                link_id,
                if link_id.is_some() {
                    vec![(parent, name.to_vec())]
                } else {
                    Vec::new()
                },
                symlink,
            ),
            dir,
            persisted,
            lookups: 0,
            opens: 0,
        };
        st.inodes.insert(ino, Box::new(inode));
        if let Some(id) = link_id {
            st.links.insert(id, ino);
        }
        if lazy_dirty {
            st.lazy_dirty.insert(ino);
        }
        Ok(ino)
    }

    /// A name without a record whose file is a hard-link placeholder (`meta::moved`) of a link
    /// this store knows: a name moved or copied there on another computer. It becomes a name
    /// of that link, recorded with the next commit. `None` for anything else.
    fn moved_link_name(
        &self,
        st: &mut State,
        parent: Ino,
        name: &[u8],
        entry: &BackingEntry,
        body: Option<&Vec<u8>>,
    ) -> Option<Meta> {
        if entry.stat.size != moved::PLACEHOLDER_LEN {
            return None;
        }
        let id = moved::parse_placeholder(body?)?;
        if !st.links.contains_key(&id) && !st.link_meta.contains_key(&id) {
            return None;
        }
        let mut path = st.backing_path(parent).ok()?;
        path.push(entry.name.clone());
        tracing::info!(
            "{:?} is a hard link moved on another computer: it is shown with its content again",
            String::from_utf8_lossy(&join_path(&path))
        );
        let stored = self.name_to_store(&entry.name, parent == super::ROOT, name);
        let meta = super::namespace::link_name_meta(id, stored);
        push_found(
            st,
            Record::Put {
                path,
                meta: meta.clone(),
            },
        );
        Some(meta)
    }

    /// Size and blocks of a file's content: its backing file, plus its parts if parted.
    fn content_size(&self, parts: Option<crate::meta::Parts>, first: &BackingStat) -> (u64, u64) {
        let Some(p) = parts else {
            return (first.size, first.blocks);
        };
        let listed = self.list_parts(p.id);
        let size = match listed.last() {
            Some((k, stat)) => k * p.size + stat.size.min(p.size),
            None => first.size.min(p.size),
        };
        let blocks = first.blocks + listed.iter().map(|(_, s)| s.blocks).sum::<u64>();
        (size, blocks)
    }

    fn link_content_stat(&self, id: u64) -> Option<BackingStat> {
        let dir = self.backing.open_dir(&self.paths.inodes).ok()?;
        let name = self.link_file_in(dir.as_fd(), id).ok()?;
        let stat = self.backing.stat_at(dir.as_fd(), &name).ok()?;
        stat.is_file.then_some(stat)
    }

    fn read_content_small(
        &self,
        _st: &State,
        dirfd: BorrowedFd<'_>,
        backing_name: &[u8],
        link_id: Option<u64>,
    ) -> Option<Vec<u8>> {
        match link_id {
            Some(id) => {
                let dir = self.backing.open_dir(&self.paths.inodes).ok()?;
                let name = self.link_file_in(dir.as_fd(), id).ok()?;
                self.backing
                    .read_small(dir.as_fd(), &name, SYMLINK_FILE_MAX)
                    .ok()
            }
            None => self
                .backing
                .read_small(dirfd, backing_name, SYMLINK_FILE_MAX)
                .ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_too_long_for_posix_get_a_short_alias() {
        let cjk = "漢".repeat(100).into_bytes();
        let alias = displayable_alias(&cjk);
        assert!(names::is_valid_posix_name(&alias), "{} bytes", alias.len());
        assert!(std::str::from_utf8(&alias).is_ok(), "a readable prefix");
        assert_ne!(displayable_alias(&"漢".repeat(101).into_bytes()), alias);
        assert_eq!(displayable_alias(b"plain"), b"plain");
    }

    #[test]
    fn symlink_bodies_round_trip() {
        for target in [
            &b"/etc/passwd"[..],
            b"a",
            "é/ü".as_bytes(),
            &[0xff, b'x', 0x80],
        ] {
            assert_eq!(
                parse_symlink(&symlink_body(target)).as_deref(),
                Some(target)
            );
        }
        assert_eq!(parse_symlink(b"hello"), None);
    }
}
