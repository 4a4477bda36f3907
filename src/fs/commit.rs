//! Committing gathered metadata changes to the store, and compacting it.
//!
//! A commit is one journal batch: the structural records (remove, rename, exchange) in the
//! order they happened, then one `Put` per inode whose metadata changed, with its current path.
//! That order replays correctly because a structural record only moves or drops paths, and
//! every changed inode is written afresh at its final place.

use super::{DirState, Errno, Fs, Ino, Kind, Result, State, ROOT};
use crate::meta::{Meta, Record, OWNER_ID};

/// Compact the journal once it holds this many bytes more than the last checkpoint.
const COMPACT_AFTER_BYTES: u64 = 4 << 20;

impl Fs {
    /// Commits everything pending. A no-op (no write at all) when nothing changed: then only
    /// directories changed since the last commit, if any, are synced.
    ///
    /// The batch is built under the state lock, but written and synced without it, so a slow
    /// stick does not stall every other operation during the sync. Batches still reach the
    /// journal in the order they were built: the journal lock is taken before the state lock
    /// is let go (lock order: state, then journal).
    pub fn commit(&self) -> Result<()> {
        let mut st = self.lock();
        let Some((records, inos)) = self.build_batch(&mut st) else {
            // Nothing to record, but an fsync may still have to make directory changes
            // durable (an earlier commit failed half-way, or they came without a record).
            drop(st);
            return self.sync_tree();
        };
        let mut journal = self.journal();
        let upgrade = self.upgrade_snapshot(&st, &mut journal, &records);
        drop(st);
        let result = self.sync_tree().and_then(|()| match upgrade {
            Some(snapshot) => Self::write_checkpoint(&mut journal, &snapshot),
            None => Self::append(&mut journal, &records),
        });
        let compact = result.is_ok()
            && journal
                .as_ref()
                .is_some_and(|j| j.journal_len() > COMPACT_AFTER_BYTES);
        drop(journal);
        if let Err(e) = result {
            self.requeue(&mut self.lock(), records, inos);
            return Err(e);
        }
        if compact {
            if let Err(e) = self.compact() {
                // The journal still holds everything; compaction can wait.
                tracing::warn!("compacting the metadata store failed: {e}");
            }
        }
        Ok(())
    }

    /// Writes the whole state as a new checkpoint generation and starts a fresh journal
    /// (done automatically once the journal has grown; public for `fsck` and tests).
    pub fn compact(&self) -> Result<()> {
        self.commit()?;
        let st = self.lock();
        let snapshot = self.snapshot(&st);
        let mut journal = self.journal();
        drop(st);
        let journal = journal.as_mut().ok_or(Errno::EROFS)?;
        self.sync_tree()?;
        journal.checkpoint(&snapshot).map_err(|e| {
            tracing::warn!("writing a checkpoint failed: {e}");
            Errno::EIO
        })
    }

    /// Commits while the caller holds the state lock (an operation that must be durable
    /// before it goes on, such as the first `link()` of a file).
    pub(crate) fn commit_locked(&self, st: &mut State) -> Result<()> {
        let Some((records, inos)) = self.build_batch(st) else {
            return Ok(());
        };
        let mut journal = self.journal();
        let upgrade = self.upgrade_snapshot(st, &mut journal, &records);
        let result = self.sync_tree().and_then(|()| match upgrade {
            Some(snapshot) => Self::write_checkpoint(&mut journal, &snapshot),
            None => Self::append(&mut journal, &records),
        });
        drop(journal);
        if result.is_err() {
            self.requeue(st, records, inos);
        }
        result
    }

    /// Makes the backing tree's changes durable before the store records them: every
    /// directory whose entries changed since the last commit is synced, and every file whose
    /// length a record depends on (parts), so that after a power cut the store never names an
    /// entry (or the place a rename put it, or a parts layout) that the stick lost.
    fn sync_tree(&self) -> Result<()> {
        self.backing.sync_before_commit().map_err(|e| {
            tracing::error!("syncing the stick's directories before a commit failed: {e}");
            super::errno_of(&e)
        })
    }

    pub(crate) fn journal(&self) -> std::sync::MutexGuard<'_, Option<crate::meta::Journal>> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first record of a file stored in parts cannot go into a format-1 journal (an
    /// older pershome would read it as damage and cut it off): the whole state, which already
    /// holds the batch's changes, is written as a new format-2 generation instead.
    fn upgrade_snapshot(
        &self,
        st: &State,
        journal: &mut Option<crate::meta::Journal>,
        records: &[Record],
    ) -> Option<Vec<Record>> {
        if !records.iter().any(Record::needs_format_2) {
            return None;
        }
        let version = journal.as_mut()?.live_version().ok()?;
        (version < 2).then(|| self.snapshot(st))
    }

    fn write_checkpoint(
        journal: &mut Option<crate::meta::Journal>,
        snapshot: &[Record],
    ) -> Result<()> {
        let journal = journal.as_mut().ok_or(Errno::EROFS)?;
        journal.checkpoint(snapshot).map_err(|e| {
            tracing::error!("writing the metadata store as format 2 failed: {e}");
            Errno::EIO
        })
    }

    fn append(journal: &mut Option<crate::meta::Journal>, records: &[Record]) -> Result<()> {
        let journal = journal.as_mut().ok_or(Errno::EROFS)?;
        journal.append(records).map_err(|e| {
            tracing::error!("committing metadata to the stick failed: {e}");
            Errno::EIO
        })
    }

    /// Takes what is pending out of the state as one batch of records.
    fn build_batch(&self, st: &mut State) -> Option<(Vec<Record>, Vec<Ino>)> {
        if st.pending.is_empty() && st.dirty.is_empty() {
            return None;
        }
        let mut records = std::mem::take(&mut st.lazy_removes);
        records.append(&mut std::mem::take(&mut st.pending));
        let mut inos: Vec<Ino> = st.dirty.drain().chain(st.lazy_dirty.drain()).collect();
        inos.sort_unstable();
        inos.dedup();
        // A file still open has not had its backing snapshot taken at release yet: take it
        // now (an fstat, no write), so that after a crash this commit's record matches the
        // file and the next mount does not mistake our own writes for another computer's.
        let open_files: std::collections::HashMap<Ino, (std::sync::Arc<std::fs::File>, bool)> = st
            .handles
            .values()
            .map(|h| (h.ino, (h.file.clone(), h.passthrough)))
            .collect();
        for &ino in &inos {
            match open_files.get(&ino) {
                // The kernel writes passthrough files itself: take size and mtime along.
                Some((_, true)) => st.refresh_passthrough(ino),
                Some((file, false)) => {
                    if let (Ok(stat), Some(inode)) = (
                        crate::backing::Backing::fstat(file),
                        st.inodes.get_mut(&ino),
                    ) {
                        inode.note_backing(&stat);
                    }
                }
                None => {}
            }
        }
        // What a refresh just found goes into this batch; it is not due again.
        for ino in &inos {
            st.dirty.remove(ino);
        }
        for &ino in &inos {
            if let Some(r) = self.record_for(st, ino) {
                records.push(r);
            }
            if let Some(i) = st.inodes.get_mut(&ino) {
                i.persisted = true;
            }
        }
        Some((records, inos))
    }

    /// A batch that could not be written goes back in front of what came since, so a later
    /// commit (after space is freed, or the stick is back) still writes it. A batch built by
    /// another thread meanwhile may have landed first; the stick was failing then anyway.
    fn requeue(&self, st: &mut State, mut records: Vec<Record>, inos: Vec<Ino>) {
        records.append(&mut st.pending);
        st.pending = records;
        st.dirty.extend(inos);
    }

    /// Metadata as stored: the mounting user's ids become `OWNER_ID` (design property 8).
    pub(crate) fn stored_meta(&self, meta: &Meta) -> Meta {
        let mut m = meta.clone();
        if m.uid == self.opts.uid {
            m.uid = OWNER_ID;
        }
        if m.gid == self.opts.gid {
            m.gid = OWNER_ID;
        }
        m
    }

    /// The record that states an inode's metadata now, if it has a place in the store.
    fn record_for(&self, st: &State, ino: Ino) -> Option<Record> {
        let inode = st.inodes.get(&ino)?;
        let mut meta = self.stored_meta(&inode.meta);
        if let Some(id) = inode.link_id {
            if inode.meta.nlink == 0 {
                return None;
            }
            meta.name = None;
            return Some(Record::PutInode { id, meta });
        }
        if ino != ROOT && inode.parent == 0 {
            return None;
        }
        let path = st.backing_path(ino).ok()?;
        if let Some(backing_name) = path.last() {
            // Keep the POSIX name in the record when decoding the backing name would not give
            // it back (hashed names, names renamed after a clash).
            let at_root = inode.parent == ROOT;
            meta.name = self.name_to_store(backing_name, at_root, &inode.name);
        }
        Some(Record::Put { path, meta })
    }

    /// The whole state as records: what a checkpoint holds.
    pub(crate) fn snapshot(&self, st: &State) -> Vec<Record> {
        let mut out = Vec::new();
        let mut ids: Vec<(&u64, &Meta)> = st.link_meta.iter().collect();
        ids.sort_by_key(|(id, _)| **id);
        for (id, meta) in ids {
            out.push(Record::PutInode {
                id: *id,
                meta: meta.clone(),
            });
        }
        let mut linked: Vec<(&u64, &Ino)> = st.links.iter().collect();
        linked.sort();
        for (_, ino) in linked {
            if let Some(r) = self.record_for(st, *ino) {
                out.push(r);
            }
        }
        if st.inodes.get(&ROOT).is_some_and(|r| r.persisted) {
            if let Some(r) = self.record_for(st, ROOT) {
                out.push(r);
            }
        }
        self.snapshot_dir(st, ROOT, &mut Vec::new(), &mut out);
        out
    }

    fn snapshot_dir(&self, st: &State, dir: Ino, path: &mut Vec<Vec<u8>>, out: &mut Vec<Record>) {
        let Some(inode) = st.inodes.get(&dir) else {
            return;
        };
        match &inode.dir {
            Some(DirState::Unloaded(tree)) => {
                let mut prefix = path.clone();
                for (name, child) in &tree.children {
                    prefix.push(name.clone());
                    child.snapshot_into(&mut prefix, out);
                    prefix.pop();
                }
            }
            Some(DirState::Loaded(children)) => {
                for (name, dentry) in &children.entries {
                    path.push(dentry.backing.clone());
                    if let Some(child) = st.inodes.get(&dentry.ino) {
                        if let Some(id) = child.link_id {
                            let meta = Meta {
                                mode: libc::S_IFREG,
                                link: Some(id),
                                name: self.name_to_store(&dentry.backing, dir == ROOT, name),
                                ..Meta::default()
                            };
                            out.push(Record::Put {
                                path: path.clone(),
                                meta,
                            });
                        } else if child.persisted {
                            if let Some(r) = self.record_for(st, dentry.ino) {
                                out.push(r);
                            }
                        }
                        if child.kind == Kind::Dir {
                            self.snapshot_dir(st, dentry.ino, path, out);
                        }
                    }
                    path.pop();
                }
            }
            None => {}
        }
    }

    /// Test hook: injected failures of every write to the stick from now on, file data and
    /// directory operations as well as the store, counted in the order they happen (see
    /// `crate::faults`). A read-only mount has no store to fail.
    pub fn set_faults(&self, faults: std::sync::Arc<crate::faults::Faults>) {
        if let Some(journal) = self.journal().as_mut() {
            journal.set_faults(faults.clone());
        }
        self.backing.set_faults(faults);
    }

    /// Called at unmount: commit what is pending; the daemon exits after this.
    pub fn shutdown(&self) {
        if self.opts.read_only {
            return;
        }
        if let Err(e) = self.commit() {
            tracing::error!("final metadata commit failed: {e}");
        }
    }
}
