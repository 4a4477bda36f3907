//! What `pershome fsck --repair` needs from the filesystem beyond ordinary operations: making
//! reconciliation findings durable, correcting hard-link counts, dropping inode-table entries
//! no name refers to, moving orphaned hard-link content and parts where the user can see them,
//! and giving parted files back their layout (holes for missing parts).
//!
//! These run on an `Fs` opened read-write after every directory has been loaded (so that the
//! state is the whole home). Nothing here deletes or truncates file data: content only moves,
//! from the store's `inodes` directory to a directory in the home. The names of the recovery
//! directory and of what lands in it come from `meta::layout` (8.3 names on an 8.3 stick).

use std::os::fd::AsFd;

use super::{errno_of, leaf, Errno, Fs, Result, ROOT};
use crate::fatrules::fold_key;
use crate::meta::layout::StoreLayout;
use crate::meta::{Parts, Record};

/// Where orphaned hard-link content is put on a long-name stick, at the root of the backing (a
/// FAT-legal, canonical name, so the home shows it under this name and Windows does too). An
/// 8.3 stick uses `StoreLayout::recovered_dir`.
pub const RECOVERED_DIR: &str = "pershome-recovered";

/// A hard-link inode as the loaded state knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInode {
    pub id: u64,
    /// The link count in the store.
    pub nlink: u32,
    /// The names of it found in loaded directories.
    pub names: u32,
}

impl Fs {
    /// Makes what reconciliation found (records of vanished entries, files changed elsewhere,
    /// names whose link content is gone) due at the next commit. Normally such findings wait
    /// for a commit that something else causes (reads never write); a repair wants them now.
    pub fn record_reconciliation(&self) {
        let mut st = self.lock();
        let mut removes = std::mem::take(&mut st.lazy_removes);
        removes.append(&mut st.pending);
        st.pending = removes;
        let lazy: Vec<_> = st.lazy_dirty.drain().collect();
        st.dirty.extend(lazy);
    }

    /// The hard-link inodes that have a name in a loaded directory, sorted by id.
    pub fn link_inodes(&self) -> Vec<LinkInode> {
        let st = self.lock();
        let mut out: Vec<LinkInode> = st
            .links
            .iter()
            .filter_map(|(&id, ino)| {
                let inode = st.inodes.get(ino)?;
                Some(LinkInode {
                    id,
                    nlink: inode.meta.nlink(),
                    names: u32::try_from(inode.dentries().len()).unwrap_or(u32::MAX),
                })
            })
            .collect();
        out.sort_by_key(|l| l.id);
        out
    }

    /// Sets the stored link count of a hard-link inode that has a name in a loaded directory
    /// (committed with the next commit). `nlink` must be at least 1: an inode with names
    /// keeps its content.
    pub fn set_link_count(&self, id: u64, nlink: u32) -> Result<()> {
        if nlink == 0 {
            return Err(Errno::EINVAL);
        }
        let mut st = self.lock();
        let ino = *st.links.get(&id).ok_or(Errno::ENOENT)?;
        st.inode_mut(ino)?.meta.set_nlink(nlink);
        st.dirty.insert(ino);
        Ok(())
    }

    /// Ids of inode-table entries that no name in a loaded directory refers to, sorted. After
    /// every directory has been loaded, these are entries no name refers to at all.
    pub fn unreferenced_link_inodes(&self) -> Vec<u64> {
        let st = self.lock();
        let mut ids: Vec<u64> = st.link_meta.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Drops an inode-table entry that no name refers to (see `unreferenced_link_inodes`);
    /// its content file, if any, is not touched (move it with `recover_link_content`).
    pub fn forget_link_inode(&self, id: u64) -> Result<()> {
        let mut st = self.lock();
        st.link_meta.remove(&id).ok_or(Errno::ENOENT)?;
        st.pending.push(Record::RemoveInode { id });
        Ok(())
    }

    /// Moves the content file `.pershome/inodes/<id>` to `pershome-recovered/inode-<id>` at the
    /// backing root (the directory is created when missing; a name already taken gets a
    /// `-2`, `-3`… suffix) and returns the backing path it now has. Never replaces anything.
    /// The moved file is not added to the loaded state: the next mount finds it as a new file.
    pub fn recover_link_content(&self, id: u64) -> Result<String> {
        let inodes_dir = self
            .backing
            .open_dir(&self.paths.inodes)
            .map_err(|e| errno_of(&e))?;
        let content = self.link_file_in(inodes_dir.as_fd(), id)?;
        self.move_to_recovered(
            inodes_dir.as_fd(),
            &content,
            &self.layout.recovered_inode(id),
        )
    }

    /// Every parts id that a file of the loaded state (or an inode-table entry) refers to.
    fn parts_in_use(&self) -> std::collections::BTreeMap<u64, Parts> {
        let st = self.lock();
        st.inodes
            .values()
            .filter(|i| i.parent != 0 || i.link_id().is_some())
            .filter_map(|i| i.meta.parts())
            .chain(st.link_meta.values().filter_map(|m| m.parts))
            .map(|p| (p.id, p))
            .collect()
    }

    /// Parts directories in `.pershome/parts/` that no file refers to, sorted. Only meaningful
    /// after every directory has been loaded.
    pub fn orphan_parts(&self) -> Vec<u64> {
        let live = self.parts_in_use();
        let Ok(dir) = self.backing.open_dir(&self.paths.parts) else {
            return Vec::new();
        };
        let mut out: Vec<u64> = self
            .backing
            .list(dir.as_fd())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.stat.is_dir)
            .filter_map(|e| self.layout.parse_parts_id_dir(&e.name))
            .filter(|id| !live.contains_key(id))
            .collect();
        out.sort_unstable();
        out
    }

    /// Gives every live parted file its layout back: a missing or short part before the last
    /// becomes a hole of a whole part (what reads showed anyway). Returns what was done.
    pub fn mend_parts(&self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let _parts = self.parts_guard();
        for (id, p) in self.parts_in_use() {
            let listed = self.list_parts(id);
            let Some(&(last, _)) = listed.last() else {
                continue;
            };
            let present: std::collections::BTreeMap<u64, u64> =
                listed.iter().map(|(k, s)| (*k, s.size)).collect();
            let lengths: Vec<(u64, u64)> = present.iter().map(|(k, n)| (*k, *n)).collect();
            let (missing, _) = super::parts::missing_or_short(&lengths, last, p.size, 0);
            if missing > super::parts::MAX_MENDABLE_PARTS {
                // Not pershome's layout at all (fsck reports it as unrepairable): billions of
                // hole files would be no repair.
                continue;
            }
            let dir_path = self.parts_dir_path(id)?;
            let dir = self.backing.open_dir(&dir_path).map_err(|e| errno_of(&e))?;
            for k in 1..last {
                if present.get(&k).is_some_and(|&n| n >= p.size) {
                    continue;
                }
                let f = self
                    .backing
                    .open_at(
                        dir.as_fd(),
                        &self.part_name_in(dir.as_fd(), k),
                        libc::O_WRONLY | libc::O_CREAT,
                        0o600,
                    )
                    .map_err(|e| errno_of(&e))?;
                self.backing.set_len(&f, p.size).map_err(|e| errno_of(&e))?;
                done.push(format!(
                    "made part {k} of {} a hole of {} bytes",
                    String::from_utf8_lossy(&dir_path),
                    p.size
                ));
            }
        }
        Ok(done)
    }

    /// Moves an orphaned parts directory to `pershome-recovered/parts-<id>` (its part files
    /// keep their names: the bytes of part k belong at offset k × part size of the lost file).
    pub fn recover_parts(&self, id: u64) -> Result<String> {
        let parent = self
            .backing
            .open_dir(&self.paths.parts)
            .map_err(|e| errno_of(&e))?;
        let path = self.parts_dir_path(id)?;
        self.move_to_recovered(
            parent.as_fd(),
            leaf(&path),
            &self.layout.recovered_parts(id),
        )
    }

    /// Moves `source` in `from` to `pershome-recovered/<base>` at the backing root (the
    /// directory is created when missing; a name already taken gets a `-2`, `-3`… suffix) and
    /// returns the backing path it now has. Never replaces anything. The moved entry is not
    /// added to the loaded state: the next mount finds it as new.
    fn move_to_recovered(
        &self,
        from: std::os::fd::BorrowedFd<'_>,
        source: &[u8],
        base: &str,
    ) -> Result<String> {
        let mut st = self.lock();
        let root = self.backing.root();
        // The recovery directory: the first candidate that is a directory, or that can be
        // created without clashing (in Windows case) with a name already in the root.
        let mut dir_name = None;
        for n in 1..100 {
            let candidate = self.layout.recovered_dir(n);
            match self.backing.stat_at(root, candidate.as_bytes()) {
                Ok(s) if s.is_dir => {
                    dir_name = Some(candidate);
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let key = fold_key(candidate.as_bytes());
                    let clash = st
                        .inodes
                        .get(&ROOT)
                        .and_then(|r| r.children())
                        .is_some_and(|c| c.folds.contains(&key));
                    if clash {
                        continue;
                    }
                    self.backing
                        .mkdir_at(root, candidate.as_bytes())
                        .map_err(|e| errno_of(&e))?;
                    self.backing.fsync_dir(root).map_err(|e| errno_of(&e))?;
                    if let Some(c) = st.inode_mut(ROOT)?.children_mut() {
                        c.folds.insert(key);
                    }
                    dir_name = Some(candidate);
                    break;
                }
                Err(e) => return Err(errno_of(&e)),
            }
        }
        let dir_name = dir_name.ok_or(Errno::EEXIST)?;
        let target_dir = self
            .backing
            .open_dir(dir_name.as_bytes())
            .map_err(|e| errno_of(&e))?;
        // 8.3 names have room for two digits of suffix.
        let last = match self.layout {
            StoreLayout::Long => 10_000,
            StoreLayout::Short83 => 100,
        };
        for n in 1..last {
            let name = if n == 1 {
                base.to_string()
            } else {
                self.layout.recovered_suffixed(base, n)
            };
            match self.backing.stat_at(target_dir.as_fd(), name.as_bytes()) {
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(errno_of(&e)),
            }
            // RENAME_NOREPLACE where the backing supports it; otherwise the stat above (under
            // the store lock, so no other pershome is creating names) has to do.
            let moved = match self.backing.rename_at(
                from,
                source,
                target_dir.as_fd(),
                name.as_bytes(),
                libc::RENAME_NOREPLACE,
            ) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.backing
                        .rename_at(from, source, target_dir.as_fd(), name.as_bytes(), 0)
                }
                other => other,
            };
            match moved {
                Ok(()) => {
                    self.backing
                        .fsync_dir(target_dir.as_fd())
                        .map_err(|e| errno_of(&e))?;
                    self.backing.fsync_dir(from).map_err(|e| errno_of(&e))?;
                    return Ok(format!("{dir_name}/{name}"));
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(errno_of(&e)),
            }
        }
        Err(Errno::EEXIST)
    }
}
