//! The replayed store: the tree of metadata records by backing path, as recovered from the
//! checkpoint and journal, before the filesystem has looked at the backing directories.
//!
//! The filesystem takes a directory's subtree out of this tree the first time it lists that
//! directory (lazy reconciliation), so records of directories never visited cost only memory.
//! This module only applies records; it never touches the stick.
//!
//! A stick chooses the shape of this tree: a chain of renames (`a` → `b/a`, `b` → `a/b`, …)
//! nests it one level deeper per record of a few bytes. So nothing here recurses over the
//! tree (dropping, snapshotting and pruning walk with a heap stack), and a replay ends with
//! `limit_depth`, which cuts what lies deeper than a record path may reach.
//!
//! A node may stand on a subtree of the base checkpoint (`base`, read lazily from the stick:
//! `journal::BaseCheckpoint`): the node's own metadata and children, when set, override the
//! base's; a child node with no metadata, no base and no children (a *whiteout*) hides the
//! base's entry of that name. Only the daemon's mount has bases; a node's base is its
//! parent's base path plus its name unless a rename moved it.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use super::codec::MAX_PATH_COMPONENTS;
use super::journal::{BaseCheckpoint, BaseChild};
use super::{Meta, Record};

/// One node of the replayed tree: the metadata of the entry at this path (if a record set it)
/// and the nodes below it, keyed by backing name, over what the base checkpoint holds at
/// `base` (if anything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingTree {
    pub meta: Option<Meta>,
    pub children: HashMap<Vec<u8>, PendingTree>,
    /// Boxed: most nodes have none, and a node of a loaded directory's parent costs this
    /// field's size (memory per entry, issue 14).
    pub base: Option<Box<BaseRef>>,
}

/// A subtree of the base checkpoint: the records at and below `path` in it.
#[derive(Debug, Clone)]
pub struct BaseRef {
    pub checkpoint: Arc<BaseCheckpoint>,
    pub path: Vec<Vec<u8>>,
}

impl PartialEq for BaseRef {
    fn eq(&self, other: &BaseRef) -> bool {
        Arc::ptr_eq(&self.checkpoint, &other.checkpoint) && self.path == other.path
    }
}

impl Eq for BaseRef {}

impl BaseRef {
    fn child(&self, name: &[u8]) -> BaseRef {
        let mut path = self.path.clone();
        path.push(name.to_vec());
        BaseRef {
            checkpoint: self.checkpoint.clone(),
            path,
        }
    }
}

/// How many tree nodes and inode-table entries a replay may create. A node costs over a
/// hundred bytes of memory but as little as two bytes of store, so without a bound a hostile
/// store of a few hundred MiB could exhaust memory. Four million is far above any home
/// (a store for 100,000 files creates about 100,000).
pub const MAX_NODES: usize = 4_000_000;

/// How deep the tree may be after a replay: the deepest path a record may hold, so that every
/// node can be written back as a record (a checkpoint) that the decoder accepts.
pub const MAX_DEPTH: usize = MAX_PATH_COMPONENTS;

/// Dropping walks the tree with a heap stack: the derived drop would recurse once per level,
/// and a hostile store can make the tree deep enough to overflow any thread's stack.
impl Drop for PendingTree {
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut stack = vec![std::mem::take(&mut self.children)];
        while let Some(mut children) = stack.pop() {
            for (_, mut child) in children.drain() {
                if !child.children.is_empty() {
                    stack.push(std::mem::take(&mut child.children));
                }
                // `child` now has no children: dropping it does not recurse.
            }
        }
    }
}

/// Everything a replay yields: the path tree and the hard-link inode table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub root: PendingTree,
    pub inodes: HashMap<u64, Meta>,
    /// Nodes this replay may still create (see `MAX_NODES`).
    pub budget: usize,
    /// Records not applied because the budget ran out; the store is then not trustworthy.
    pub refused: u64,
}

impl Default for Replayed {
    fn default() -> Replayed {
        Replayed {
            root: PendingTree::default(),
            inodes: HashMap::new(),
            budget: MAX_NODES,
            refused: 0,
        }
    }
}

impl PendingTree {
    /// The node at `path`, created with its parents if missing, each creation paid from
    /// `budget`; `None` when the budget does not cover the path.
    fn node_mut(&mut self, path: &[Vec<u8>], budget: &mut usize) -> Option<&mut PendingTree> {
        let mut node = self;
        for component in path {
            if !node.children.contains_key(component) {
                *budget = budget.checked_sub(1)?;
                let base = node.base.as_ref().map(|b| Box::new(b.child(component)));
                node.children
                    .insert(component.clone(), PendingTree::on_base(base));
            }
            node = node.children.get_mut(component)?;
        }
        Some(node)
    }

    /// A node with nothing of its own over `base`.
    pub fn on_base(base: Option<Box<BaseRef>>) -> PendingTree {
        PendingTree {
            meta: None,
            children: HashMap::new(),
            base,
        }
    }

    /// A node that hides whatever the base holds at its place.
    fn whiteout() -> PendingTree {
        PendingTree::default()
    }

    /// Takes the subtree at `path` out (what the base holds there included), leaving nothing
    /// in its place.
    fn take(&mut self, path: &[Vec<u8>], budget: &mut usize) -> Option<PendingTree> {
        let (last, parents) = path.split_last()?;
        // Do the parents exist? Where they do not, only a base can hold the path: the nodes
        // are then made, to hide it in.
        let mut complete = true;
        let mut walk = &*self;
        for component in parents {
            match walk.children.get(component) {
                Some(child) => walk = child,
                None => {
                    walk.base.as_ref()?;
                    complete = false;
                    break;
                }
            }
        }
        let node = if complete {
            let mut node = self;
            for component in parents {
                node = node.children.get_mut(component)?;
            }
            node
        } else {
            self.node_mut(parents, budget)?
        };
        let taken = node.children.remove(last);
        match &node.base {
            None => taken,
            Some(base) => {
                let taken =
                    taken.unwrap_or_else(|| PendingTree::on_base(Some(Box::new(base.child(last)))));
                node.children.insert(last.clone(), PendingTree::whiteout());
                Some(taken)
            }
        }
    }

    /// Whether this node stands for nothing: no record, no base, nothing below.
    pub fn is_empty(&self) -> bool {
        self.meta.is_none() && self.base.is_none() && self.children.is_empty()
    }

    /// Makes this node's children explicit, reading its base's part of the store: every
    /// child the base holds becomes a node of its own (with its record, standing on its own
    /// base), a child without a record of its own takes the base's, and whiteouts go. The
    /// node then no longer stands on a base. A no-op for a node without one.
    pub fn materialize_level(&mut self) -> io::Result<()> {
        let Some(base) = self.base.take() else {
            return Ok(());
        };
        let result = self.materialize_from(&base);
        if result.is_err() {
            // Nothing was lost: children only got records equal to the base's.
            self.base = Some(base);
        }
        result
    }

    fn materialize_from(&mut self, base: &BaseRef) -> io::Result<()> {
        let mut listed: HashMap<Vec<u8>, BaseChild> = base
            .checkpoint
            .children(&base.path)?
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        for (name, child) in self.children.iter_mut() {
            let from_listing = listed.remove(name).map(|c| c.meta);
            if child.meta.is_some() {
                continue;
            }
            let Some(own) = &child.base else {
                continue;
            };
            // A child standing on its parent's base (not moved here by a rename) has its
            // record in the listing; a moved one's is elsewhere in the store.
            let derived = Arc::ptr_eq(&own.checkpoint, &base.checkpoint)
                && own.path.len() == base.path.len() + 1
                && own.path.starts_with(&base.path)
                && own.path.last() == Some(name);
            child.meta = if derived {
                from_listing.flatten()
            } else {
                own.checkpoint.record_at(&own.path)?
            };
        }
        for (name, listed) in listed {
            // Only a child with records below it needs its base (a file has none): this
            // spares a copy of the path per file of a directory being loaded.
            let child = PendingTree {
                meta: listed.meta,
                children: HashMap::new(),
                base: listed.below.then(|| Box::new(base.child(&name))),
            };
            self.children.insert(name, child);
        }
        self.children.retain(|_, child| !child.is_empty());
        Ok(())
    }

    fn put_subtree(
        &mut self,
        path: &[Vec<u8>],
        subtree: Option<PendingTree>,
        budget: &mut usize,
    ) -> bool {
        let Some((last, parents)) = path.split_last() else {
            return true;
        };
        let Some(parent) = self.node_mut(parents, budget) else {
            return false;
        };
        match subtree {
            Some(subtree) => {
                parent.children.insert(last.clone(), subtree);
            }
            None if parent.base.is_some() => {
                parent
                    .children
                    .insert(last.clone(), PendingTree::whiteout());
            }
            None => {
                parent.children.remove(last);
            }
        }
        true
    }

    /// Appends a record for every node that carries metadata (its own or its base's), with
    /// `prefix` as the path of this node, in no particular order (a checkpoint sorts them).
    /// Walks with a heap stack (see the module comment). Fails only when the base cannot
    /// be read: a snapshot without it would lose its records.
    pub fn snapshot_into(&self, prefix: &[Vec<u8>], out: &mut Vec<Record>) -> io::Result<()> {
        self.snapshot_walk(prefix, true, out)
    }

    /// `snapshot_into` without this node's own record (a directory's record comes from its
    /// inode; this tree holds what lies below it).
    pub fn snapshot_children_into(
        &self,
        prefix: &[Vec<u8>],
        out: &mut Vec<Record>,
    ) -> io::Result<()> {
        self.snapshot_walk(prefix, false, out)
    }

    fn snapshot_walk(
        &self,
        prefix: &[Vec<u8>],
        with_self: bool,
        out: &mut Vec<Record>,
    ) -> io::Result<()> {
        // The records of a base subtree, moved to `at`.
        fn whole_base(
            base: &BaseRef,
            at: &[Vec<u8>],
            with_self: bool,
            out: &mut Vec<Record>,
        ) -> io::Result<()> {
            let cut = base.path.len();
            base.checkpoint.subtree(&base.path, |path, meta| {
                if path.len() == cut && !with_self {
                    return;
                }
                let mut full = at.to_vec();
                full.extend_from_slice(&path[cut..]);
                if !full.is_empty() {
                    out.push(Record::Put { path: full, meta });
                }
            })
        }
        // (node, its path, its base's record when the parent's listing gave it, own record?)
        type Work<'a> = (&'a PendingTree, Vec<Vec<u8>>, Option<Option<Meta>>, bool);
        let mut stack: Vec<Work<'_>> = vec![(self, prefix.to_vec(), None, with_self)];
        while let Some((node, path, known, emit_self)) = stack.pop() {
            if node.meta.is_none() && node.children.is_empty() {
                // Nothing of its own: exactly its base subtree (nothing for a whiteout).
                if let Some(base) = &node.base {
                    whole_base(base, &path, emit_self, out)?;
                }
                continue;
            }
            if emit_self && !path.is_empty() {
                let meta = match (&node.meta, known, &node.base) {
                    (Some(m), _, _) => Some(m.clone()),
                    (None, Some(known), _) => known,
                    (None, None, Some(base)) => base.checkpoint.record_at(&base.path)?,
                    (None, None, None) => None,
                };
                if let Some(meta) = meta {
                    out.push(Record::Put {
                        path: path.clone(),
                        meta,
                    });
                }
            }
            // The base subtree in one pass (a pass per child would read a chunk per child):
            // what lies under a child the tree overrides is that child's to give (its own
            // base, when it was not moved here, covers it), the rest goes out as it is.
            let mut listed: HashMap<Vec<u8>, Meta> = HashMap::new();
            if let Some(base) = &node.base {
                let cut = base.path.len();
                base.checkpoint.subtree(&base.path, |found, meta| {
                    let Some(child) = found.get(cut) else {
                        // The node's own record: given above.
                        return;
                    };
                    if node.children.contains_key(child) {
                        if found.len() == cut + 1 {
                            listed.insert(child.clone(), meta);
                        }
                        return;
                    }
                    let mut at = path.clone();
                    at.extend_from_slice(&found[cut..]);
                    out.push(Record::Put { path: at, meta });
                })?;
            }
            for (name, child) in &node.children {
                let mut at = path.clone();
                at.push(name.clone());
                // The listing's record is the child's own only if it was not moved here.
                let derived = match (&node.base, &child.base) {
                    (Some(base), Some(own)) => {
                        Arc::ptr_eq(&own.checkpoint, &base.checkpoint)
                            && own.path.len() == base.path.len() + 1
                            && own.path.starts_with(&base.path)
                            && own.path.last() == Some(name)
                    }
                    _ => false,
                };
                let known = if derived {
                    Some(listed.remove(name))
                } else {
                    None
                };
                stack.push((child, at, known, true));
            }
        }
        Ok(())
    }

    /// How many nodes of this tree (itself included) carry metadata. Iterative.
    pub fn count_records(&self) -> u64 {
        let mut count = 0;
        let mut stack = vec![self];
        while let Some(node) = stack.pop() {
            count += u64::from(node.meta.is_some());
            stack.extend(node.children.values());
        }
        count
    }
}

impl Replayed {
    /// Applies one record. Records are applied in the order they were committed; every record
    /// is total (a missing path is not an error), so a journal that lost some history by a
    /// repair still replays.
    pub fn apply(&mut self, record: Record) {
        match record {
            // An empty path is the backing root itself (the home directory's own mode).
            Record::Put { path, meta } => match self.root.node_mut(&path, &mut self.budget) {
                Some(node) => node.meta = Some(meta),
                None => self.refused += 1,
            },
            Record::Remove { path } => {
                self.root.take(&path, &mut self.budget);
            }
            Record::Rename { from, to } => {
                if from == to {
                    return;
                }
                // Moving a directory into itself cannot be committed by the filesystem; a
                // journal that says so is corrupt, and the safe reading is "nothing moved".
                if to.starts_with(&from) {
                    return;
                }
                let moved = self.root.take(&from, &mut self.budget);
                if !self.root.put_subtree(&to, moved, &mut self.budget) {
                    self.refused += 1;
                }
            }
            Record::Exchange { a, b } => {
                if a == b || a.starts_with(&b) || b.starts_with(&a) {
                    return;
                }
                let at_a = self.root.take(&a, &mut self.budget);
                let at_b = self.root.take(&b, &mut self.budget);
                let ok_a = self.root.put_subtree(&a, at_b, &mut self.budget);
                let ok_b = self.root.put_subtree(&b, at_a, &mut self.budget);
                if !(ok_a && ok_b) {
                    self.refused += 1;
                }
            }
            Record::PutInode { id, meta } => {
                if !self.inodes.contains_key(&id) {
                    match self.budget.checked_sub(1) {
                        Some(left) => self.budget = left,
                        None => {
                            self.refused += 1;
                            return;
                        }
                    }
                }
                self.inodes.insert(id, meta);
            }
            Record::RemoveInode { id } => {
                self.inodes.remove(&id);
            }
        }
    }

    /// Cuts every node deeper than `MAX_DEPTH` (counted in `refused`): renames can nest the
    /// tree deeper than any record path, and a node that cannot be written back as a record
    /// would make the next checkpoint unreadable. Recovery calls this after replaying.
    pub fn limit_depth(&mut self) {
        let mut cut = Vec::new();
        let mut stack = vec![(&mut self.root, 0usize)];
        while let Some((node, depth)) = stack.pop() {
            if depth == MAX_DEPTH {
                cut.extend(node.children.drain().map(|(_, child)| child));
                continue;
            }
            for child in node.children.values_mut() {
                stack.push((child, depth + 1));
            }
        }
        self.refused += cut.iter().map(PendingTree::count_records).sum::<u64>();
    }

    /// `try_snapshot` of a state replayed into memory (no base: it cannot fail). A state
    /// standing on a base must use `try_snapshot`.
    pub fn snapshot(&self) -> Vec<Record> {
        self.try_snapshot().unwrap_or_else(|e| {
            tracing::error!("snapshot of a lazily read store state failed: {e}");
            Vec::new()
        })
    }

    /// The records that rebuild this state from nothing: what a checkpoint holds, in the
    /// order a checkpoint is written (`sort_for_checkpoint`). Fails only when a base cannot
    /// be read.
    pub fn try_snapshot(&self) -> io::Result<Vec<Record>> {
        let mut out = Vec::new();
        let mut ids: Vec<&u64> = self.inodes.keys().collect();
        ids.sort();
        for id in ids {
            out.push(Record::PutInode {
                id: *id,
                meta: self.inodes[id].clone(),
            });
        }
        self.root.snapshot_into(&[], &mut out)?;
        sort_for_checkpoint(&mut out);
        Ok(out)
    }
}

/// Puts a checkpoint's records in the order a lazily read base needs (`journal::base`):
/// `PutInode` records first (by id), then `Put` records by path, one per path (the last one
/// given wins), and drops `Put`s deeper than a record path may be (renames can nest the tree
/// deeper; a record the decoder refuses would make the checkpoint unreadable).
pub fn sort_for_checkpoint(records: &mut Vec<Record>) {
    fn key(r: &Record) -> (u8, u64, &[Vec<u8>]) {
        match r {
            Record::PutInode { id, .. } => (0, *id, &[]),
            Record::Put { path, .. } => (1, 0, path.as_slice()),
            _ => (2, 0, &[]),
        }
    }
    records.retain(|r| !matches!(r, Record::Put { path, .. } if path.len() > MAX_DEPTH));
    // Stable: of two records for one path, the later stays later, and is kept below.
    records.sort_by(|a, b| key(a).cmp(&key(b)));
    let mut i = records.len();
    let mut keep = vec![true; records.len()];
    while i > 1 {
        i -= 1;
        if let (Record::Put { path: a, .. }, Record::Put { path: b, .. }) =
            (&records[i - 1], &records[i])
        {
            if a == b {
                keep[i - 1] = false;
            }
        }
    }
    let mut flags = keep.into_iter();
    records.retain(|_| flags.next().unwrap_or(true));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(parts: &[&str]) -> Vec<Vec<u8>> {
        parts.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            ..Meta::default()
        }
    }

    #[test]
    fn rename_moves_subtree_and_snapshot_replays_to_same_state() {
        let mut r = Replayed::default();
        r.apply(Record::Put {
            path: p(&["a"]),
            meta: meta(0o40755),
        });
        r.apply(Record::Put {
            path: p(&["a", "f"]),
            meta: meta(0o100644),
        });
        r.apply(Record::Put {
            path: p(&["b"]),
            meta: meta(0o100600),
        });
        r.apply(Record::Rename {
            from: p(&["a"]),
            to: p(&["c"]),
        });
        r.apply(Record::Exchange {
            a: p(&["b"]),
            b: p(&["c"]),
        });
        assert_eq!(
            r.root.children[&b"b".to_vec()].children[&b"f".to_vec()].meta,
            Some(meta(0o100644))
        );
        assert_eq!(r.root.children[&b"c".to_vec()].meta, Some(meta(0o100600)));
        let mut again = Replayed::default();
        for record in r.snapshot() {
            again.apply(record);
        }
        assert_eq!(again, r);
    }

    #[test]
    fn a_replay_stops_creating_nodes_at_its_budget() {
        let mut r = Replayed {
            budget: 3,
            ..Replayed::default()
        };
        r.apply(Record::Put {
            path: p(&["a", "b"]),
            meta: meta(0o100644),
        });
        r.apply(Record::Put {
            path: p(&["a", "c"]),
            meta: meta(0o100644),
        });
        r.apply(Record::Put {
            path: p(&["d", "e"]),
            meta: meta(0o100644),
        });
        r.apply(Record::PutInode {
            id: 1,
            meta: meta(0o100644),
        });
        assert_eq!((r.budget, r.refused), (0, 2));
        assert!(r.root.children[&b"a".to_vec()]
            .children
            .contains_key(b"c".as_slice()));
        assert!(!r.root.children.contains_key(b"d".as_slice()));
    }

    #[test]
    fn rename_into_itself_is_ignored() {
        let mut r = Replayed::default();
        r.apply(Record::Put {
            path: p(&["a"]),
            meta: meta(0o40755),
        });
        r.apply(Record::Rename {
            from: p(&["a"]),
            to: p(&["a", "b"]),
        });
        assert!(r.root.children.contains_key(b"a".as_slice()));
    }
}
