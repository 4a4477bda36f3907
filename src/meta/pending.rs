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

use std::collections::HashMap;

use super::codec::MAX_PATH_COMPONENTS;
use super::{Meta, Record};

/// One node of the replayed tree: the metadata of the entry at this path (if a record set it)
/// and the nodes below it, keyed by backing name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingTree {
    pub meta: Option<Meta>,
    pub children: HashMap<Vec<u8>, PendingTree>,
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
            }
            node = node.children.entry(component.clone()).or_default();
        }
        Some(node)
    }

    fn take(&mut self, path: &[Vec<u8>]) -> Option<PendingTree> {
        let (last, parents) = path.split_last()?;
        let mut node = self;
        for component in parents {
            node = node.children.get_mut(component)?;
        }
        node.children.remove(last)
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
            None => {
                parent.children.remove(last);
            }
        }
        true
    }

    /// Appends a record for every node that carries metadata, parents before children, with
    /// `prefix` as the path of this node. Walks with a heap stack (see the module comment).
    pub fn snapshot_into(&self, prefix: &mut Vec<Vec<u8>>, out: &mut Vec<Record>) {
        fn emit(node: &PendingTree, prefix: &[Vec<u8>], out: &mut Vec<Record>) {
            if let Some(meta) = &node.meta {
                if !prefix.is_empty() {
                    out.push(Record::Put {
                        path: prefix.to_vec(),
                        meta: meta.clone(),
                    });
                }
            }
        }
        // Sorted so that a checkpoint of the same state is the same bytes.
        fn sorted(node: &PendingTree) -> std::vec::IntoIter<(&Vec<u8>, &PendingTree)> {
            let mut children: Vec<_> = node.children.iter().collect();
            children.sort_by(|a, b| a.0.cmp(b.0));
            children.into_iter()
        }
        emit(self, prefix, out);
        let mut stack = vec![sorted(self)];
        while let Some(level) = stack.last_mut() {
            match level.next() {
                Some((name, child)) => {
                    prefix.push(name.clone());
                    emit(child, prefix, out);
                    stack.push(sorted(child));
                }
                None => {
                    stack.pop();
                    // The level just finished was a child's: its name leaves the path.
                    if !stack.is_empty() {
                        prefix.pop();
                    }
                }
            }
        }
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
                self.root.take(&path);
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
                let moved = self.root.take(&from);
                if !self.root.put_subtree(&to, moved, &mut self.budget) {
                    self.refused += 1;
                }
            }
            Record::Exchange { a, b } => {
                if a == b || a.starts_with(&b) || b.starts_with(&a) {
                    return;
                }
                let at_a = self.root.take(&a);
                let at_b = self.root.take(&b);
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

    /// The records that rebuild this state from nothing: what a checkpoint holds.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out = Vec::new();
        let mut ids: Vec<&u64> = self.inodes.keys().collect();
        ids.sort();
        for id in ids {
            out.push(Record::PutInode {
                id: *id,
                meta: self.inodes[id].clone(),
            });
        }
        self.root.snapshot_into(&mut Vec::new(), &mut out);
        out
    }
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
