//! Test hook: a model of a pulled stick (or a power cut), as opposed to a killed process.
//!
//! A killed pershomefs loses nothing the kernel has been handed: the page cache writes it out
//! later. A stick pulled out, or a machine losing power, keeps only what had been made
//! durable by `fsync`/`fdatasync` (or `syncfs`) before: everything else is gone. This module
//! keeps, beside a backing tree, the tree as it would be found after such a loss, and at the
//! crash turns the real tree into it (`PowerLoss::pull`). The rules, the strict POSIX ones
//! (which FAT without `dirsync` follows, and which ext4 does not promise to exceed):
//!
//! - a file's content (data and size) is durable as of its last `fsync`/`fdatasync`; a file
//!   never synced is empty;
//! - a directory's entries (names, and which file or directory each name is: so creations,
//!   removals and both halves of a rename) are durable as of the directory's last `fsync`;
//!   a directory never synced is empty;
//! - `syncfs` makes everything durable.
//!
//! `PowerLoss::new_vfat` adds the kernel vfat's rename quirk: a renamed file or directory is
//! found under its new name (once that directory was synced) with no content, a 0-byte file
//! or an empty directory, until it is synced itself after the rename. vfat writes the new
//! directory entry with start cluster 0 and size 0 and fills them in only when the moved
//! inode is written back (docs/testing.md, "What the kernel's vfat does").
//!
//! Files are told apart by inode number, with care for reuse: a removed name's inode is
//! forgotten (`PowerLoss::forget`), so a new file that gets the same number is a new file.
//! A renamed file or directory is the same object under its new name. The model sees what
//! `backing::Backing` and the metadata store (through `backing::io`) tell it, which is why
//! every write to the stick must go through them (docs/architecture.md).
//!
//! Production never builds one: it is reached only through `faults::Faults::with_power_loss`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

type Id = u64;

/// The durable state of one object: its content (a directory's entries) and its mtime, which
/// pershome compares with what it recorded to tell its own writes from another computer's.
#[derive(Debug, Clone)]
enum Node {
    File(Vec<u8>, Mtime),
    Dir(BTreeMap<Vec<u8>, Id>, Mtime),
}

type Mtime = (i64, i64);

fn mtime_of(md: &std::fs::Metadata) -> Mtime {
    (md.mtime(), md.mtime_nsec())
}

#[derive(Debug)]
struct Model {
    /// The device of the backing tree: a synced fd elsewhere is no business of ours.
    dev: u64,
    root: Id,
    /// Inode number → object, for the objects alive now.
    ids: HashMap<u64, Id>,
    /// Object → its durable state. Objects stay here after their inode is forgotten: a
    /// durable directory entry may still name them.
    nodes: HashMap<Id, Node>,
    next: Id,
    /// The vfat rename quirk is modelled (`PowerLoss::new_vfat`).
    vfat: bool,
    /// Objects renamed and not synced since: their entries taken as durable meanwhile
    /// (`half_entries`) come back empty.
    half_moved: HashSet<Id>,
    /// Durable entries (directory, name) made while their object was half moved.
    half_entries: HashSet<(Id, Vec<u8>)>,
}

/// The durable image of a backing tree (see the module documentation).
#[derive(Debug)]
pub struct PowerLoss {
    root: PathBuf,
    model: Mutex<Model>,
}

fn proc_fd(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl Model {
    /// The object an inode is now; a new one (durably empty: it was created since the last
    /// sync that could have recorded it) when the inode is not known yet.
    fn id_of(&mut self, ino: u64, is_dir: bool, mtime: Mtime) -> Id {
        if let Some(&id) = self.ids.get(&ino) {
            return id;
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(ino, id);
        self.nodes.insert(
            id,
            if is_dir {
                Node::Dir(BTreeMap::new(), mtime)
            } else {
                Node::File(Vec::new(), mtime)
            },
        );
        id
    }

    /// Takes the current state of the directory at `path` (and, when `deep`, of everything
    /// below it) as durable.
    fn take_dir(&mut self, path: &Path, deep: bool) -> io::Result<()> {
        let mut entries = BTreeMap::new();
        let mut half = Vec::new();
        for e in std::fs::read_dir(path)? {
            let e = e?;
            let md = match e.metadata() {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Only files and directories: a FAT stick holds nothing else.
            if !md.is_dir() && !md.is_file() {
                continue;
            }
            let id = self.id_of(md.ino(), md.is_dir(), mtime_of(&md));
            let name = e.file_name().as_bytes().to_vec();
            if self.half_moved.contains(&id) {
                half.push((name.clone(), id));
            }
            entries.insert(name, id);
            if deep {
                if md.is_dir() {
                    self.take_dir(&e.path(), true)?;
                } else {
                    let content = std::fs::read(e.path())?;
                    self.nodes.insert(id, Node::File(content, mtime_of(&md)));
                }
            }
        }
        let md = std::fs::metadata(path)?;
        let id = self.id_of(md.ino(), true, mtime_of(&md));
        self.nodes.insert(id, Node::Dir(entries, mtime_of(&md)));
        self.half_entries.retain(|(dir, _)| *dir != id);
        for (name, _) in half {
            self.half_entries.insert((id, name));
        }
        Ok(())
    }
}

impl PowerLoss {
    /// Starts the model on the backing tree at `root`: all of it, as it is now, counts as
    /// durable (the test's starting point was synced).
    pub fn new(root: &Path) -> io::Result<PowerLoss> {
        PowerLoss::start(root, false)
    }

    /// As `new`, with the kernel vfat's rename quirk (see the module documentation).
    pub fn new_vfat(root: &Path) -> io::Result<PowerLoss> {
        PowerLoss::start(root, true)
    }

    fn start(root: &Path, vfat: bool) -> io::Result<PowerLoss> {
        let md = std::fs::metadata(root)?;
        let mut model = Model {
            dev: md.dev(),
            root: 0,
            ids: HashMap::new(),
            nodes: HashMap::new(),
            next: 1,
            vfat,
            half_moved: HashSet::new(),
            half_entries: HashSet::new(),
        };
        model.root = model.id_of(md.ino(), true, mtime_of(&md));
        model.take_dir(root, true)?;
        Ok(PowerLoss {
            root: root.to_path_buf(),
            model: Mutex::new(model),
        })
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After an `fsync` or `fdatasync` of `fd` returned Ok: its content is durable (a
    /// directory: its entries).
    pub(crate) fn synced(&self, fd: BorrowedFd<'_>) {
        let Ok(md) = std::fs::metadata(proc_fd(fd)) else {
            return;
        };
        let mut model = self.model();
        if md.dev() != model.dev {
            return;
        }
        // Syncing an object writes its inode, and so on vfat its directory entry too.
        if let Some(&id) = model.ids.get(&md.ino()) {
            model.half_moved.remove(&id);
        }
        if md.is_dir() {
            // A failure to list leaves the older durable state: the harsher outcome.
            let _ = model.take_dir(&proc_fd(fd), false);
        } else if md.is_file() {
            if let Ok(content) = std::fs::read(proc_fd(fd)) {
                let id = model.id_of(md.ino(), false, mtime_of(&md));
                model.nodes.insert(id, Node::File(content, mtime_of(&md)));
            }
        }
    }

    /// After `syncfs`: everything is durable.
    pub fn synced_all(&self) {
        let mut model = self.model();
        model.half_moved.clear();
        let _ = model.take_dir(&self.root, true);
    }

    /// The inode a name of `dir` is now, to be forgotten once that name is removed or
    /// replaced (`forget`).
    pub(crate) fn inode_at(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Option<u64> {
        let path = proc_fd(dir).join(OsStr::from_bytes(name));
        std::fs::symlink_metadata(path).ok().map(|md| md.ino())
    }

    /// After a rename put an object at `name` of `dir`: under the vfat quirk, its entry there
    /// holds no content until the object is synced.
    pub(crate) fn renamed(&self, dir: BorrowedFd<'_>, name: &[u8]) {
        let path = proc_fd(dir).join(OsStr::from_bytes(name));
        let mut model = self.model();
        if !model.vfat {
            return;
        }
        let Ok(md) = std::fs::symlink_metadata(path) else {
            return;
        };
        if md.dev() != model.dev || !(md.is_dir() || md.is_file()) {
            return;
        }
        let id = model.id_of(md.ino(), md.is_dir(), mtime_of(&md));
        model.half_moved.insert(id);
    }

    /// After the name that held inode `ino` was removed (unlink, rmdir, replaced by a
    /// rename): a later file with the same number is another file. The object stays, for
    /// durable entries that still name it.
    pub(crate) fn forget(&self, ino: Option<u64>) {
        if let Some(ino) = ino {
            self.model().ids.remove(&ino);
        }
    }

    /// The power cut: the backing tree becomes what was durable. Everything below the root is
    /// removed and written again from the model. A directory that durable entries name twice
    /// (moved between two directories of which only one was synced) appears once, at the
    /// first place met, so the result is a tree.
    pub fn pull(&self) -> io::Result<()> {
        let mut model = self.model();
        for e in std::fs::read_dir(&self.root)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                std::fs::remove_dir_all(e.path())?;
            } else {
                std::fs::remove_file(e.path())?;
            }
        }
        let mut seen = HashSet::from([model.root]);
        build(&model, &self.root, model.root, &mut seen)?;
        // The tree was written anew, with new inode numbers: it is the durable state now.
        model.ids.clear();
        model.nodes.clear();
        model.half_moved.clear();
        model.half_entries.clear();
        let md = std::fs::metadata(&self.root)?;
        model.root = model.id_of(md.ino(), true, mtime_of(&md));
        model.take_dir(&self.root, true)
    }
}

fn build(model: &Model, path: &Path, dir: Id, seen: &mut HashSet<Id>) -> io::Result<()> {
    let Some(Node::Dir(entries, mtime)) = model.nodes.get(&dir) else {
        return Ok(());
    };
    for (name, &id) in entries {
        let p = path.join(OsStr::from_bytes(name));
        if model.half_moved.contains(&id) && model.half_entries.contains(&(dir, name.clone())) {
            // The vfat quirk: the entry is there, with start cluster 0 and size 0.
            match model.nodes.get(&id) {
                Some(Node::File(_, mtime)) => {
                    std::fs::write(&p, b"")?;
                    set_mtime(&p, *mtime)?;
                }
                Some(Node::Dir(..)) => std::fs::create_dir(&p)?,
                None => {}
            }
            continue;
        }
        match model.nodes.get(&id) {
            Some(Node::File(content, mtime)) => {
                std::fs::write(&p, content)?;
                set_mtime(&p, *mtime)?;
            }
            Some(Node::Dir(..)) if seen.insert(id) => {
                std::fs::create_dir(&p)?;
                build(model, &p, id, seen)?;
            }
            _ => {}
        }
    }
    set_mtime(path, *mtime)
}

fn set_mtime(path: &Path, (sec, nsec): Mtime) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid path and times; result checked.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    fn tree(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                    out.insert(rel, None);
                } else {
                    out.insert(rel, Some(std::fs::read(e.path()).unwrap()));
                }
            }
        }
        out
    }

    fn sync(p: &Path) -> File {
        let f = File::open(p).unwrap();
        f.sync_all().unwrap();
        f
    }

    #[test]
    fn only_what_was_synced_survives_the_pull() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("old"), b"old").unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        let power = PowerLoss::new(root).unwrap();
        let before = tree(root);

        // Data written, not synced: lost. Synced, but the entry not: the file is lost.
        std::fs::write(root.join("old"), b"new, unsynced").unwrap();
        std::fs::write(root.join("d/synced-data"), b"data").unwrap();
        power.synced(sync(&root.join("d/synced-data")).as_fd());
        power.pull().unwrap();
        assert_eq!(tree(root), before);

        // Entry synced, data not: an empty file. Both: the file.
        std::fs::write(root.join("d/a"), b"aaa").unwrap();
        std::fs::write(root.join("d/b"), b"bbb").unwrap();
        power.synced(sync(&root.join("d/b")).as_fd());
        power.synced(sync(&root.join("d")).as_fd());
        // A rename whose directories were not synced again is not durable.
        std::fs::rename(root.join("d/b"), root.join("b")).unwrap();
        power.pull().unwrap();
        let mut want = before.clone();
        want.insert("d/a".into(), Some(Vec::new()));
        want.insert("d/b".into(), Some(b"bbb".to_vec()));
        assert_eq!(tree(root), want);
    }

    #[test]
    fn a_reused_inode_number_is_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("x"), b"durable x").unwrap();
        let power = PowerLoss::new(root).unwrap();
        let d = File::open(root).unwrap();
        let ino = power.inode_at(d.as_fd(), b"x");
        std::fs::remove_file(root.join("x")).unwrap();
        power.forget(ino);
        // A new file, perhaps with x's inode number, synced under another name: x keeps
        // its durable content, the new file is durable under its own name only.
        std::fs::write(root.join("y"), b"y").unwrap();
        power.synced(sync(&root.join("y")).as_fd());
        power.pull().unwrap();
        let want = BTreeMap::from([("x".to_string(), Some(b"durable x".to_vec()))]);
        assert_eq!(tree(root), want);
    }
}
