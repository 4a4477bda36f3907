//! Committing gathered metadata changes to the store, and compacting it.
//!
//! A commit is one journal batch: the structural records (remove, rename, exchange) in the
//! order they happened, then one `Put` per inode whose metadata changed, with its current path.
//! That order replays correctly because a structural record only moves or drops paths, and
//! every changed inode is written afresh at its final place.

use super::{DirState, Errno, Fs, Ino, Kind, Result, State, ROOT};
use crate::meta::{Meta, Record, OWNER_ID};

/// Compact the journal once it holds this many bytes more than the last checkpoint.
pub(crate) const COMPACT_AFTER_BYTES: u64 = 4 << 20;

/// At unmount, compact a journal longer than this: a mount reads the checkpoint lazily but
/// replays the journal into memory (some 300 bytes per record of about 50), so a short
/// journal keeps an idle mount small (issue 14: 5 MiB with a 500,000-record store). About
/// 1,300 changes; a session that made fewer leaves the journal as it is.
pub(crate) const UNMOUNT_COMPACT_AFTER_BYTES: u64 = 64 << 10;

/// The store's journal and what could not be written to it yet, under one lock (`Fs::journal`,
/// taken after the state lock when both are held).
#[derive(Debug)]
pub(crate) struct StoreWriter {
    /// `None` on a read-only mount.
    pub journal: Option<crate::meta::Journal>,
    /// Records of batches whose write failed, oldest first. Every later write puts them in
    /// front of its own records, so a failed batch is never overtaken by a later one; a
    /// checkpoint, which holds the whole state, replaces them.
    pub unsaved: Vec<Record>,
}

impl StoreWriter {
    pub(crate) fn new(journal: Option<crate::meta::Journal>) -> StoreWriter {
        StoreWriter {
            journal,
            unsaved: Vec::new(),
        }
    }

    /// Appends the unsaved records and then `records` as one batch; on failure all of them
    /// stay unsaved, in order.
    fn append(&mut self, records: Vec<Record>) -> Result<()> {
        let mut batch = std::mem::take(&mut self.unsaved);
        batch.extend(records);
        let result = match self.journal.as_mut() {
            None => Err(Errno::EROFS),
            Some(j) => j.append(&batch).map_err(|e| {
                tracing::error!("committing metadata to the stick failed: {e}");
                store_errno(&e)
            }),
        };
        if result.is_err() {
            self.unsaved = batch;
        }
        result
    }

    /// Writes `snapshot`, the whole state including `records` and everything unsaved, as a
    /// new generation; on failure `records` join the unsaved ones.
    fn checkpoint(&mut self, snapshot: &[Record], records: Vec<Record>) -> Result<()> {
        let result = match self.journal.as_mut() {
            None => Err(Errno::EROFS),
            Some(j) => {
                let before = j.generation();
                match j.checkpoint(snapshot) {
                    Ok(()) => Ok(()),
                    // The new generation is durable and in use; only removing the old one
                    // failed (the next open removes it). The checkpoint holds `records`: they
                    // must not stay unsaved, or they would be appended after it again.
                    Err(e) if j.generation() != before => {
                        tracing::warn!("removing the old metadata generation failed: {e}");
                        Ok(())
                    }
                    Err(e) => {
                        tracing::error!("writing a checkpoint of the metadata store failed: {e}");
                        Err(store_errno(&e))
                    }
                }
            }
        };
        match result {
            Ok(()) => self.unsaved.clear(),
            Err(_) => self.unsaved.extend(records),
        }
        result
    }

    fn compaction_due(&self, after: u64) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| j.journal_len() > after)
    }
}

/// The error an application sees for a failed store write: `ENOSPC` when the stick is full
/// (the user can act on that), `EIO` otherwise.
fn store_errno(e: &crate::meta::StoreError) -> Errno {
    use crate::meta::StoreError;
    match e {
        StoreError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
        {
            Errno::ENOSPC
        }
        StoreError::ReadOnly => Errno::EROFS,
        _ => Errno::EIO,
    }
}

impl Fs {
    /// Commits everything pending, and what an earlier failed commit left unsaved. A no-op
    /// (no write at all) when nothing changed, but for directories changed since the last
    /// commit, which are synced. When another thread is writing a batch, this
    /// waits for it: what that batch took from the state may include this caller's changes,
    /// which are durable only once it is done.
    ///
    /// The batch is built under the state lock, but written and synced without it, so a slow
    /// stick does not stall every other operation during the sync. Batches still reach the
    /// journal in the order they were built: the journal lock is taken before the state lock
    /// is let go (lock order: state, then journal).
    pub fn commit(&self) -> Result<()> {
        let mut st = self.lock();
        let records = match self.build_batch(&mut st, false) {
            Some(records) => records,
            None => {
                // Nothing new: wait for a writer in progress without holding the state.
                drop(st);
                if self.journal().unsaved.is_empty() {
                    // Nothing to record, but an fsync may still have to make directory
                    // changes durable (they came without a record, or a sync failed).
                    return self.sync_tree();
                }
                st = self.lock();
                Vec::new()
            }
        };
        let mut store = self.journal();
        let upgrade = match self.upgrade_snapshot(&st, &mut store, &records) {
            Ok(upgrade) => upgrade,
            Err(e) => {
                store.unsaved.extend(records);
                return Err(e);
            }
        };
        drop(st);
        let result = self.write_after_sync(&mut store, records, |store, records| match upgrade {
            Some(snapshot) => store.checkpoint(&snapshot, records),
            None => store.append(records),
        });
        let compact = result.is_ok() && store.compaction_due(self.compact_after());
        drop(store);
        #[cfg(test)]
        if result.is_err() {
            self.run_hook(|h| h.failed_write.clone());
        }
        result?;
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
    ///
    /// What is pending is taken out of the state and the snapshot is made under the same
    /// state lock, and the journal lock is taken before it is let go: the checkpoint holds
    /// exactly the changes it replaces, none is appended again after it (a replayed rename
    /// would find nothing at its source and clear its target). It never calls `commit`.
    pub fn compact(&self) -> Result<()> {
        #[cfg(test)]
        self.run_hook(|h| h.compaction.clone());
        let mut st = self.lock();
        let records = self.build_batch(&mut st, true).unwrap_or_default();
        let mut unloaded = Vec::new();
        let snapshot = self.snapshot_with(&st, &mut unloaded);
        let mut store = self.journal();
        drop(st);
        let snapshot = match snapshot {
            Ok(mut snapshot) => {
                // Half a million records take a moment to sort: not under the state lock.
                crate::meta::pending::sort_for_checkpoint(&mut snapshot);
                snapshot
            }
            Err(e) => {
                // The batch was taken out of the state: it goes in front of the next one.
                store.unsaved.extend(records);
                return Err(e);
            }
        };
        self.write_after_sync(&mut store, records, |store, records| {
            store.checkpoint(&snapshot, records)
        })?;
        let base = store.journal.as_mut().and_then(|j| j.take_written_base());
        drop(store);
        if let Some(base) = base {
            self.rebase(base, unloaded);
        }
        Ok(())
    }

    /// After a compaction: the directories that were not loaded when its snapshot was taken
    /// now stand on the new checkpoint, at the paths they had then (what they held went into
    /// it, and nothing changes a directory's records until it is loaded), so the records
    /// the old generation and the journal held for them are let go. A directory loaded
    /// meanwhile is left alone.
    fn rebase(
        &self,
        base: std::sync::Arc<crate::meta::journal::BaseCheckpoint>,
        unloaded: Vec<(Ino, Vec<Vec<u8>>)>,
    ) {
        let mut st = self.lock();
        for (ino, path) in unloaded {
            if let Some(inode) = st.inodes.get_mut(&ino) {
                if let Some(DirState::Unloaded { tree, .. }) = inode.dir.as_deref_mut() {
                    *tree = crate::meta::PendingTree::on_base(Some(Box::new(
                        crate::meta::pending::BaseRef {
                            checkpoint: base.clone(),
                            path,
                        },
                    )));
                }
            }
        }
    }

    /// Commits while the caller holds the state lock (an operation that must be durable
    /// before it goes on, such as the first `link()` of a file).
    pub(crate) fn commit_locked(&self, st: &mut State) -> Result<()> {
        let records = self.build_batch(st, false).unwrap_or_default();
        let mut store = self.journal();
        if records.is_empty() && store.unsaved.is_empty() {
            return Ok(());
        }
        let upgrade = match self.upgrade_snapshot(st, &mut store, &records) {
            Ok(upgrade) => upgrade,
            Err(e) => {
                store.unsaved.extend(records);
                return Err(e);
            }
        };
        self.write_after_sync(&mut store, records, |store, records| match upgrade {
            Some(snapshot) => store.checkpoint(&snapshot, records),
            None => store.append(records),
        })
    }

    /// Makes the backing tree's changes durable before the store records them: every
    /// directory whose entries changed since the last commit is synced, and every file whose
    /// length a record depends on (parts), so that after a power cut the store never names
    /// an entry (or the place a rename put it, or a parts layout) that the stick lost.
    fn sync_tree(&self) -> Result<()> {
        self.backing.sync_before_commit().map_err(|e| {
            tracing::error!("syncing the stick's directories before a commit failed: {e}");
            super::errno_of(&e)
        })
    }

    /// `sync_tree`, then `write` of `records`; when the sync fails, the records join the
    /// unsaved ones (written in front of the next batch), as when the write itself fails.
    fn write_after_sync(
        &self,
        store: &mut StoreWriter,
        records: Vec<Record>,
        write: impl FnOnce(&mut StoreWriter, Vec<Record>) -> Result<()>,
    ) -> Result<()> {
        if let Err(e) = self.sync_tree() {
            store.unsaved.extend(records);
            return Err(e);
        }
        write(store, records)
    }

    /// Test hook: compact once the journal holds more than `bytes` (4 MiB by default), so a
    /// test can make compaction race every other operation.
    pub fn set_compact_after(&self, bytes: u64) {
        self.compact_after
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn compact_after(&self) -> u64 {
        self.compact_after
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn journal(&self) -> std::sync::MutexGuard<'_, StoreWriter> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the last commit landed: nothing is waiting in memory or unsaved.
    pub fn all_saved(&self) -> bool {
        let st = self.lock();
        let nothing_pending = st.pending.is_empty() && st.dirty.is_empty();
        drop(st);
        nothing_pending && self.journal().unsaved.is_empty()
    }

    /// The whole state, when the batch (with what is unsaved) cannot go into the journal: the
    /// first record of a file stored in parts cannot go into a format-1 journal (an older
    /// pershome would read it as damage and cut it off), and no batch may be larger than a
    /// reader accepts. The state already holds the batch's changes and the unsaved ones and
    /// is written as a new generation instead.
    fn upgrade_snapshot(
        &self,
        st: &State,
        store: &mut StoreWriter,
        records: &[Record],
    ) -> Result<Option<Vec<Record>>> {
        // A batch larger than a reader accepts in one frame (`MAX_FRAME_LEN`, the bound on
        // what recovery holds in memory) goes as a new generation too, in small chunks.
        if !crate::meta::journal::fits_in_one_batch(store.unsaved.iter().chain(records)) {
            return self.snapshot(st).map(Some);
        }
        if !records
            .iter()
            .chain(store.unsaved.iter())
            .any(Record::needs_format_2)
        {
            return Ok(None);
        }
        let Some(version) = store.journal.as_mut().and_then(|j| j.live_version().ok()) else {
            return Ok(None);
        };
        if version < 2 {
            self.snapshot(st).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Takes what is pending out of the state as one batch of records. `None` when nothing
    /// is pending; with `with_lazy` (compaction), also when only reconciliation's lazy
    /// records are, which compaction must take too (its snapshot already reflects them).
    fn build_batch(&self, st: &mut State, with_lazy: bool) -> Option<Vec<Record>> {
        let lazy = with_lazy && !(st.lazy_removes.is_empty() && st.lazy_dirty.is_empty());
        if st.pending.is_empty() && st.dirty.is_empty() && !lazy {
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
        Some(records)
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
        let mut meta = self.stored_meta(&inode.meta.to_meta());
        if let Some(id) = inode.link_id() {
            if inode.meta.nlink() == 0 {
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

    /// The whole state as records: what a checkpoint holds, in a checkpoint's order
    /// (`sort_for_checkpoint`: the next mount reads it lazily). `EIO` when records of a
    /// directory not loaded yet cannot be read from the stick.
    pub(crate) fn snapshot(&self, st: &State) -> Result<Vec<Record>> {
        let mut out = self.snapshot_with(st, &mut Vec::new())?;
        crate::meta::pending::sort_for_checkpoint(&mut out);
        Ok(out)
    }

    /// `snapshot` not yet sorted (the caller sorts without the state lock), also telling
    /// which directories were not loaded, with their paths.
    fn snapshot_with(
        &self,
        st: &State,
        unloaded: &mut Vec<(Ino, Vec<Vec<u8>>)>,
    ) -> Result<Vec<Record>> {
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
        self.snapshot_dir(st, ROOT, &mut Vec::new(), &mut out, unloaded)?;
        Ok(out)
    }

    fn snapshot_dir(
        &self,
        st: &State,
        dir: Ino,
        path: &mut Vec<Vec<u8>>,
        out: &mut Vec<Record>,
        unloaded: &mut Vec<(Ino, Vec<Vec<u8>>)>,
    ) -> Result<()> {
        let Some(inode) = st.inodes.get(&dir) else {
            return Ok(());
        };
        match inode.dir.as_deref() {
            Some(DirState::Unloaded { tree, .. }) => {
                tree.snapshot_children_into(path, out).map_err(|e| {
                    tracing::error!("reading the metadata store for a checkpoint: {e}");
                    Errno::EIO
                })?;
                unloaded.push((dir, path.clone()));
            }
            Some(DirState::Loaded(children)) => {
                for (name, dentry) in children.entries.iter() {
                    path.push(dentry.backing.to_vec());
                    if let Some(child) = st.inodes.get(&dentry.ino) {
                        if let Some(id) = child.link_id() {
                            let meta = Meta {
                                mode: libc::S_IFREG,
                                link: Some(id),
                                name: self.name_to_store(dentry.backing, dir == ROOT, name),
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
                            self.snapshot_dir(st, dentry.ino, path, out, unloaded)?;
                        }
                    }
                    path.pop();
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Test hook: injected failures of every write to the stick from now on, file data and
    /// directory operations as well as the store, counted in the order they happen (see
    /// `crate::faults`). A read-only mount has no store to fail.
    pub fn set_faults(&self, faults: std::sync::Arc<crate::faults::Faults>) {
        if let Some(journal) = self.journal().journal.as_mut() {
            journal.set_faults(faults.clone());
        }
        self.backing.set_faults(faults);
    }

    /// Called at unmount: commit what is pending; the daemon exits after this. A failure is
    /// logged; `final_commit` says whether it landed.
    pub fn shutdown(&self) {
        let _ = self.final_commit();
    }

    /// The last commit before unmount: Ok only when everything changed on this mount is on
    /// the stick (the daemon's exit status, which the login hook turns into its message).
    pub fn final_commit(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let result = self.commit().and_then(|()| {
            // The next mount holds the journal's records in memory (the checkpoint's stay on
            // the stick until needed): leave it a short journal.
            if self.reorder_at_unmount || self.journal().compaction_due(UNMOUNT_COMPACT_AFTER_BYTES)
            {
                if let Err(e) = self.compact() {
                    // The journal still holds everything.
                    tracing::warn!("compacting the metadata store at unmount failed: {e}");
                }
            }
            if self.all_saved() {
                Ok(())
            } else {
                Err(Errno::EIO)
            }
        });
        if let Err(e) = result {
            tracing::error!(
                "final metadata commit failed: {e}; changes since the last commit are lost"
            );
        }
        result
    }
}
