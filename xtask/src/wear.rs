//! `cargo xtask wear`: how many bytes pershomefs writes to the stick for a workload, file data
//! against metadata, next to the raw directory doing the same thing with plain `std::fs` calls.
//!
//! This module owns the four flash-wear workloads and their one hard rule: reading must never
//! write (workload (a) fails the run if it writes a single byte to the store). It never mounts
//! anything and never changes pershome to get a number: it drives `pershome::fs::Fs` in-process,
//! because under FUSE passthrough the kernel writes file data itself and the daemon's data
//! counter would miss it. Every other figure is reported, not judged.
//!
//! Two independent views of the metadata: the store's own counters (`Fs::write_stats`, bytes
//! handed to `pwrite` for `.pershome/` files) and the size of the store files on disk, summed
//! after each workload. A compaction can make the second smaller than the first (it deletes
//! the old generation); without one they agree to the byte.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{File, FileTimes, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use pershome::fs::{Ctx, Fs, FsOptions, Ino, Kind, SetAttr, SetTime, ROOT};
use pershome::meta::Timespec;

use crate::bench::Rng;
use crate::guards::TempDir;
use crate::util;

/// The stick's store directory, relative to the backing root (docs/format.md).
const STORE_DIR: &str = ".pershome";
/// Content of hard-linked files lives here: file data, not metadata, so it is not counted as
/// store size (none of the workloads makes a hard link, so it stays empty anyway).
const INODES_DIR: &str = "inodes";

/// The commit timer in workload (d): one `commit()` after every this many operations, i.e.
/// the daemon's 5 s timer at about 40 operations per second of desktop activity.
pub const COMMIT_EVERY_OPS: u64 = 200;
/// Directories of workload (d).
const CHURN_DIRS: u32 = 50;
/// Documents per directory in workload (d).
const CHURN_DOCS: u32 = 4;
/// Bytes per append in workload (c).
const APPEND_BYTES: usize = 40;

/// The caller every operation comes from: the stick's owner, as the daemon maps it.
const OWNER: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 1,
    umask: 0o022,
};

#[derive(Debug, Clone)]
pub struct Options {
    /// Files in the tree of (a) and (b).
    pub files: u32,
    /// Directories the tree's files are spread over.
    pub dirs: u32,
    /// Appends (each followed by fsync) in (c).
    pub appends: u32,
    /// Save rounds in (d).
    pub rounds: u32,
}

impl Options {
    /// The command line's choice: `--quick` shrinks the tree to 2,000 files and the churn to
    /// 400 rounds; `--files` overrides the tree size either way.
    pub fn new(files: Option<u32>, dirs: u32, quick: bool) -> Options {
        Options {
            files: files.unwrap_or(if quick { 2_000 } else { 10_000 }),
            dirs: dirs.max(1),
            appends: 1_000,
            rounds: if quick { 400 } else { 2_000 },
        }
    }
}

/// The workloads, in the order the table shows them. They run in the order b, a, c, d on one
/// backing directory: (a) needs the tree (b) made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    ReadTwice,
    CreateTree,
    Appends,
    Churn,
}

pub const WORKLOADS: [Workload; 4] = [
    Workload::ReadTwice,
    Workload::CreateTree,
    Workload::Appends,
    Workload::Churn,
];

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::ReadTwice => "(a) remount, read tree x2",
            Workload::CreateTree => "(b) create tree",
            Workload::Appends => "(c) appends+fsync",
            Workload::Churn => "(d) desktop churn",
        }
    }

    /// The ceiling on metadata bytes as a percentage of data bytes, where it sets one.
    fn target_percent(self) -> Option<f64> {
        match self {
            Workload::CreateTree | Workload::Churn => Some(5.0),
            Workload::ReadTwice | Workload::Appends => None,
        }
    }
}

/// What one workload wrote, on one filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wear {
    pub data_bytes: u64,
    pub data_writes: u64,
    pub meta_bytes: u64,
    pub meta_writes: u64,
    /// fsync calls the workload itself made (the same on both filesystems).
    pub fsyncs: u64,
    /// Bytes of file content the workload read back.
    pub read_bytes: u64,
    /// Sum of the store files' sizes after the workload (None for the raw directory).
    pub store_after: Option<u64>,
    /// How much that sum grew during the workload.
    pub store_growth: Option<i64>,
}

impl Wear {
    fn meta_percent(&self) -> Option<f64> {
        (self.data_bytes > 0).then(|| self.meta_bytes as f64 * 100.0 / self.data_bytes as f64)
    }
}

/// The results of a whole run.
#[derive(Debug, Clone)]
pub struct Report {
    pub options: Options,
    /// Indexed like [`WORKLOADS`].
    pub raw: [Wear; 4],
    pub pershome: [Wear; 4],
    /// Whether the store files (names, sizes, mtimes) were identical before and after (a).
    pub store_unchanged_by_reads: bool,
    /// Commits (d) made: by the modelled timer, and in total as counted by batches written.
    pub churn_timer_commits: u64,
    pub churn_ops: u64,
    pub elapsed: [Duration; 2],
}

/// The file operations the workloads use, on the raw directory or on pershome. Paths are
/// relative, `/`-separated. Every write is counted by the implementation.
trait Target {
    fn name(&self) -> &'static str;
    fn mkdir(&mut self, path: &str) -> Result<()>;
    /// Creates a new file (it must not exist) and opens it for writing.
    fn create(&mut self, path: &str, mode: u32) -> Result<u64>;
    fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<()>;
    fn fsync(&mut self, fh: u64) -> Result<()>;
    fn close(&mut self, fh: u64) -> Result<()>;
    fn rename(&mut self, from: &str, to: &str) -> Result<()>;
    fn unlink(&mut self, path: &str) -> Result<()>;
    fn chmod(&mut self, path: &str, mode: u32) -> Result<()>;
    /// Sets atime and mtime, as `touch -d` or an rsync would.
    fn set_times(&mut self, path: &str, sec: i64) -> Result<()>;
    /// Names in a directory, without `.` and `..`, sorted.
    fn list(&mut self, path: &str) -> Result<Vec<String>>;
    fn is_dir(&mut self, path: &str) -> Result<bool>;
    /// Reads a whole file; returns how many bytes it held.
    fn read_file(&mut self, path: &str) -> Result<u64>;
    /// What the commit timer does (pershome); nothing on the raw directory.
    fn timer_commit(&mut self) -> Result<()>;
    /// Mount again after [`Target::unmount`] (pershome); nothing on the raw directory.
    fn mount(&mut self) -> Result<()>;
    /// Unmount, with the final commit and whatever the unmount writes (pershome); nothing
    /// on the raw directory.
    fn unmount(&mut self) -> Result<()>;
    /// Counters since the target was made (all mounts together).
    fn counters(&self) -> Wear;
    /// Sum of the store files' sizes, and their fingerprint.
    fn store(&self) -> Result<Option<(u64, Vec<StoreFile>)>>;
}

/// One store file as seen from the backing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFile {
    path: PathBuf,
    size: u64,
    mtime_ns: i128,
}

fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", path),
    }
}

/// The raw directory: plain `std::fs`, counting the `write` calls this code makes.
struct Raw {
    root: PathBuf,
    files: HashMap<u64, File>,
    next_fh: u64,
    wear: Wear,
}

impl Raw {
    fn new(root: PathBuf) -> Result<Raw> {
        std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Raw {
            root,
            files: HashMap::new(),
            next_fh: 1,
            wear: Wear::default(),
        })
    }

    fn path(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }

    fn file(&mut self, fh: u64) -> Result<&mut File> {
        self.files
            .get_mut(&fh)
            .with_context(|| format!("raw: no open file {fh}"))
    }
}

impl Target for Raw {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn mkdir(&mut self, path: &str) -> Result<()> {
        let p = self.path(path);
        std::fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))
    }

    fn create(&mut self, path: &str, mode: u32) -> Result<u64> {
        let p = self.path(path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .with_context(|| format!("creating {}", p.display()))?;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.files.insert(fh, file);
        Ok(fh)
    }

    fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt as _;
        let mut done = 0;
        while done < data.len() {
            let n = self
                .file(fh)?
                .write_at(&data[done..], offset + done as u64)
                .context("raw: write")?;
            if n == 0 {
                bail!("raw: write returned 0");
            }
            done += n;
            self.wear.data_writes += 1;
            self.wear.data_bytes += n as u64;
        }
        Ok(())
    }

    fn fsync(&mut self, fh: u64) -> Result<()> {
        self.file(fh)?.sync_all().context("raw: fsync")?;
        self.wear.fsyncs += 1;
        Ok(())
    }

    fn close(&mut self, fh: u64) -> Result<()> {
        self.files
            .remove(&fh)
            .map(drop)
            .with_context(|| format!("raw: closing unknown file {fh}"))
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        let (a, b) = (self.path(from), self.path(to));
        std::fs::rename(&a, &b)
            .with_context(|| format!("rename {} to {}", a.display(), b.display()))
    }

    fn unlink(&mut self, path: &str) -> Result<()> {
        let p = self.path(path);
        std::fs::remove_file(&p).with_context(|| format!("unlink {}", p.display()))
    }

    fn chmod(&mut self, path: &str, mode: u32) -> Result<()> {
        let p = self.path(path);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", p.display()))
    }

    fn set_times(&mut self, path: &str, sec: i64) -> Result<()> {
        let p = self.path(path);
        let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(sec).unwrap_or(0));
        File::open(&p)
            .and_then(|f| f.set_times(FileTimes::new().set_accessed(t).set_modified(t)))
            .with_context(|| format!("utimens {}", p.display()))
    }

    fn list(&mut self, path: &str) -> Result<Vec<String>> {
        let p = self.path(path);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&p).with_context(|| format!("listing {}", p.display()))? {
            let entry = entry.with_context(|| format!("listing {}", p.display()))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn is_dir(&mut self, path: &str) -> Result<bool> {
        let p = self.path(path);
        Ok(std::fs::symlink_metadata(&p)
            .with_context(|| format!("stat {}", p.display()))?
            .is_dir())
    }

    fn read_file(&mut self, path: &str) -> Result<u64> {
        let p = self.path(path);
        let mut file = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("reading {}", p.display()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        self.wear.read_bytes += total;
        Ok(total)
    }

    fn timer_commit(&mut self) -> Result<()> {
        Ok(())
    }

    fn mount(&mut self) -> Result<()> {
        Ok(())
    }

    fn unmount(&mut self) -> Result<()> {
        Ok(())
    }

    fn counters(&self) -> Wear {
        self.wear
    }

    fn store(&self) -> Result<Option<(u64, Vec<StoreFile>)>> {
        Ok(None)
    }
}

/// pershome, in-process over a backing directory.
struct Pershome {
    backing: PathBuf,
    fs: Option<Fs>,
    /// Counters of the mounts before the current one (each `Fs` counts from zero).
    earlier: (u64, u64, u64, u64),
    fsyncs: u64,
    read_bytes: u64,
}

fn fs_options() -> FsOptions {
    FsOptions {
        uid: OWNER.uid,
        gid: OWNER.gid,
        read_only: false,
        commit_interval: Duration::from_secs(5),
        names: None,
        ..FsOptions::new(OWNER.uid, OWNER.gid)
    }
}

impl Pershome {
    fn new(backing: PathBuf) -> Result<Pershome> {
        std::fs::create_dir(&backing).with_context(|| format!("creating {}", backing.display()))?;
        let fs = Fs::open_backing(&backing, fs_options())
            .with_context(|| format!("opening pershome over {}", backing.display()))?;
        Ok(Pershome {
            backing,
            fs: Some(fs),
            earlier: (0, 0, 0, 0),
            fsyncs: 0,
            read_bytes: 0,
        })
    }

    fn fs(&self) -> Result<&Fs> {
        self.fs.as_ref().context("pershome is not mounted")
    }

    fn resolve(&self, path: &str) -> Result<Ino> {
        let fs = self.fs()?;
        let mut ino = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = fs
                .lookup(ino, part.as_bytes())
                .with_context(|| format!("pershome: lookup {part:?} in {path:?}"))?
                .ino;
        }
        Ok(ino)
    }

    fn parent_of<'p>(&self, path: &'p str) -> Result<(Ino, &'p str)> {
        let (dir, name) = split(path);
        Ok((self.resolve(dir)?, name))
    }

    fn close_fs(&mut self) {
        if let Some(fs) = self.fs.take() {
            fs.shutdown();
            let (a, b, c, d) = fs.write_stats();
            self.earlier = (
                self.earlier.0 + a,
                self.earlier.1 + b,
                self.earlier.2 + c,
                self.earlier.3 + d,
            );
        }
    }
}

impl Target for Pershome {
    fn name(&self) -> &'static str {
        "pershomefs"
    }

    fn mkdir(&mut self, path: &str) -> Result<()> {
        let (parent, name) = self.parent_of(path)?;
        self.fs()?
            .mkdir(OWNER, parent, name.as_bytes(), 0o755)
            .with_context(|| format!("pershome: mkdir {path:?}"))?;
        Ok(())
    }

    fn create(&mut self, path: &str, mode: u32) -> Result<u64> {
        let (parent, name) = self.parent_of(path)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        let (_, fh) = self
            .fs()?
            .create(OWNER, parent, name.as_bytes(), mode, flags)
            .with_context(|| format!("pershome: create {path:?}"))?;
        Ok(fh)
    }

    fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<()> {
        let fs = self.fs()?;
        let mut done = 0;
        while done < data.len() {
            let n = fs
                .write(fh, offset + done as u64, &data[done..])
                .context("pershome: write")?;
            if n == 0 {
                bail!("pershome: write returned 0");
            }
            done += n as usize;
        }
        Ok(())
    }

    fn fsync(&mut self, fh: u64) -> Result<()> {
        self.fs()?.fsync(fh, false).context("pershome: fsync")?;
        self.fsyncs += 1;
        Ok(())
    }

    fn close(&mut self, fh: u64) -> Result<()> {
        self.fs()?.release(fh).context("pershome: release")
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        let (p1, n1) = self.parent_of(from)?;
        let (p2, n2) = self.parent_of(to)?;
        self.fs()?
            .rename(p1, n1.as_bytes(), p2, n2.as_bytes(), 0)
            .with_context(|| format!("pershome: rename {from:?} to {to:?}"))
    }

    fn unlink(&mut self, path: &str) -> Result<()> {
        let (parent, name) = self.parent_of(path)?;
        self.fs()?
            .unlink(parent, name.as_bytes())
            .with_context(|| format!("pershome: unlink {path:?}"))
    }

    fn chmod(&mut self, path: &str, mode: u32) -> Result<()> {
        let ino = self.resolve(path)?;
        let set = SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        self.fs()?
            .setattr(ino, set)
            .with_context(|| format!("pershome: chmod {path:?}"))?;
        Ok(())
    }

    fn set_times(&mut self, path: &str, sec: i64) -> Result<()> {
        let ino = self.resolve(path)?;
        let t = SetTime::At(Timespec { sec, nsec: 0 });
        let set = SetAttr {
            atime: Some(t),
            mtime: Some(t),
            ..SetAttr::default()
        };
        self.fs()?
            .setattr(ino, set)
            .with_context(|| format!("pershome: utimens {path:?}"))?;
        Ok(())
    }

    fn list(&mut self, path: &str) -> Result<Vec<String>> {
        let ino = self.resolve(path)?;
        let fs = self.fs()?;
        let fh = fs
            .opendir(ino)
            .with_context(|| format!("pershome: opendir {path:?}"))?;
        let entries = fs.readdir(fh, 0);
        fs.releasedir(fh);
        let mut names: Vec<String> = entries
            .with_context(|| format!("pershome: readdir {path:?}"))?
            .into_iter()
            .map(|(_, e)| String::from_utf8_lossy(&e.name).into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        Ok(names)
    }

    fn is_dir(&mut self, path: &str) -> Result<bool> {
        let ino = self.resolve(path)?;
        Ok(self.fs()?.getattr(ino).context("pershome: getattr")?.kind == Kind::Dir)
    }

    fn read_file(&mut self, path: &str) -> Result<u64> {
        let ino = self.resolve(path)?;
        let fs = self.fs()?;
        let fh = fs
            .open(ino, libc::O_RDONLY)
            .with_context(|| format!("pershome: open {path:?}"))?;
        let mut total = 0u64;
        let result = loop {
            match fs.read(fh, total, 64 << 10) {
                Ok(data) if data.is_empty() => break Ok(total),
                Ok(data) => total += data.len() as u64,
                Err(e) => break Err(e),
            }
        };
        fs.release(fh).context("pershome: release")?;
        let total = result.with_context(|| format!("pershome: read {path:?}"))?;
        self.read_bytes += total;
        Ok(total)
    }

    fn timer_commit(&mut self) -> Result<()> {
        self.fs()?.commit().context("pershome: commit")
    }

    fn mount(&mut self) -> Result<()> {
        if self.fs.is_some() {
            bail!("pershome is already mounted");
        }
        let fs = Fs::open_backing(&self.backing, fs_options())
            .with_context(|| format!("reopening pershome over {}", self.backing.display()))?;
        self.fs = Some(fs);
        Ok(())
    }

    fn unmount(&mut self) -> Result<()> {
        self.close_fs();
        Ok(())
    }

    fn counters(&self) -> Wear {
        let now = self.fs.as_ref().map_or((0, 0, 0, 0), Fs::write_stats);
        Wear {
            data_bytes: self.earlier.0 + now.0,
            data_writes: self.earlier.1 + now.1,
            meta_bytes: self.earlier.2 + now.2,
            meta_writes: self.earlier.3 + now.3,
            fsyncs: self.fsyncs,
            read_bytes: self.read_bytes,
            store_after: None,
            store_growth: None,
        }
    }

    fn store(&self) -> Result<Option<(u64, Vec<StoreFile>)>> {
        let mut files = Vec::new();
        store_files(&self.backing.join(STORE_DIR), &mut files)?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Some((files.iter().map(|f| f.size).sum(), files)))
    }
}

/// Every regular file below the store directory except the hard-link content in `inodes/`.
fn store_files(dir: &Path, out: &mut Vec<StoreFile>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let meta =
            std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        if meta.is_dir() {
            if entry.file_name() != INODES_DIR {
                store_files(&path, out)?;
            }
        } else if meta.is_file() {
            out.push(StoreFile {
                path,
                size: meta.len(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            });
        }
    }
    Ok(())
}

/// Counters and store size between two points of a run.
struct Mark {
    counters: Wear,
    store: Option<(u64, Vec<StoreFile>)>,
}

fn mark(target: &dyn Target) -> Result<Mark> {
    Ok(Mark {
        counters: target.counters(),
        store: target.store()?,
    })
}

fn since(target: &dyn Target, start: &Mark) -> Result<(Wear, Mark)> {
    let end = mark(target)?;
    let (a, b) = (start.counters, end.counters);
    let wear = Wear {
        data_bytes: b.data_bytes - a.data_bytes,
        data_writes: b.data_writes - a.data_writes,
        meta_bytes: b.meta_bytes - a.meta_bytes,
        meta_writes: b.meta_writes - a.meta_writes,
        fsyncs: b.fsyncs - a.fsyncs,
        read_bytes: b.read_bytes - a.read_bytes,
        store_after: end.store.as_ref().map(|(size, _)| *size),
        store_growth: match (&start.store, &end.store) {
            (Some((before, _)), Some((after, _))) => Some(*after as i64 - *before as i64),
            _ => None,
        },
    };
    Ok((wear, end))
}

fn tree_dir(dirs: u32, d: u32) -> String {
    format!("tree/d{:04}", d % dirs)
}

/// The tree of `cargo xtask bench` (same generator, sizes, contents and names), written file
/// by file: one create, one write of the whole content (none for an empty file), one close.
fn create_tree(target: &mut dyn Target, options: &Options) -> Result<u64> {
    target.mkdir("tree")?;
    for d in 0..options.dirs {
        target.mkdir(&tree_dir(options.dirs, d))?;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = Vec::with_capacity(8193);
    let mut total = 0u64;
    for f in 0..options.files {
        util::check_interrupted()?;
        let size = usize::try_from(rng.next() % 8193).unwrap_or(0);
        buf.clear();
        while buf.len() < size {
            buf.extend_from_slice(&rng.next().to_le_bytes());
        }
        buf.truncate(size);
        let path = format!("{}/f{f:06}.dat", tree_dir(options.dirs, f));
        let fh = target.create(&path, 0o644)?;
        if !buf.is_empty() {
            target.write(fh, 0, &buf)?;
        }
        target.close(fh)?;
        total += size as u64;
    }
    // What the commit timer or the unmount would write.
    target.timer_commit()?;
    Ok(total)
}

/// Walks the tree and reads every file once; returns the bytes read.
fn read_tree(target: &mut dyn Target) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec!["tree".to_owned()];
    while let Some(dir) = stack.pop() {
        util::check_interrupted()?;
        for name in target.list(&dir)? {
            let path = format!("{dir}/{name}");
            if target.is_dir(&path)? {
                stack.push(path);
            } else {
                total += target.read_file(&path)?;
            }
        }
    }
    Ok(total)
}

/// (c): one file, `appends` appends of 40 bytes, each followed by fsync (a log, a shell
/// history with `histappend` and sync, a mail spool).
fn appends(target: &mut dyn Target, options: &Options) -> Result<()> {
    let fh = target.create("append.log", 0o644)?;
    let mut line = [b'x'; APPEND_BYTES];
    line[APPEND_BYTES - 1] = b'\n';
    for i in 0..u64::from(options.appends) {
        util::check_interrupted()?;
        target.write(fh, i * APPEND_BYTES as u64, &line)?;
        target.fsync(fh)?;
    }
    target.close(fh)?;
    target.timer_commit()
}

fn churn_dir(d: u32) -> String {
    format!("desk/d{d:02}")
}

/// (d), setup (not measured): 50 directories with 4 documents each, committed.
fn churn_setup(target: &mut dyn Target) -> Result<()> {
    target.mkdir("desk")?;
    for d in 0..CHURN_DIRS {
        target.mkdir(&churn_dir(d))?;
        for doc in 0..CHURN_DOCS {
            let fh = target.create(&format!("{}/doc{doc}.txt", churn_dir(d)), 0o644)?;
            target.write(fh, 0, &[b'.'; 4096])?;
            target.close(fh)?;
        }
    }
    target.timer_commit()
}

/// The commit timer of (d), driven by operations instead of seconds.
#[derive(Default)]
struct Timer {
    ops: u64,
    commits: u64,
}

impl Timer {
    /// Counts one operation; commits after every [`COMMIT_EVERY_OPS`].
    fn tick(&mut self, target: &mut dyn Target) -> Result<()> {
        self.ops += 1;
        if self.ops.is_multiple_of(COMMIT_EVERY_OPS) {
            self.commits += 1;
            target.timer_commit()?;
        }
        Ok(())
    }
}

/// (d): `rounds` saves of an editor, each:
/// 1. create the swap file `.docN.txt.swp` (0600), write 4 KiB, close (the editor opens);
/// 2. create `docN.txt~` (0644), write the new content, 4–64 KiB, fsync, close;
/// 3. rename `docN.txt~` over `docN.txt` (atomic save);
/// 4. unlink `.docN.txt.swp` (the editor closes);
/// 5. every 10th round chmod `docN.txt` (0600 and 0644 in turn), every 7th set its times.
///
/// Each of those calls is one operation; the commit timer is modelled by `commit()` after
/// every [`COMMIT_EVERY_OPS`] operations (the fsync commits too, as it does in the daemon).
/// Returns (operations, timer commits).
fn churn(target: &mut dyn Target, options: &Options) -> Result<(u64, u64)> {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut timer = Timer::default();
    let mut content = Vec::with_capacity(64 << 10);
    for round in 0..options.rounds {
        util::check_interrupted()?;
        let dir = churn_dir(u32::try_from(rng.next() % u64::from(CHURN_DIRS)).unwrap_or(0));
        let doc = rng.next() % u64::from(CHURN_DOCS);
        let size = 4096 + usize::try_from(rng.next() % (60 * 1024 + 1)).unwrap_or(0);
        content.clear();
        content.resize(size, b'a' + (round % 26) as u8);
        let real = format!("{dir}/doc{doc}.txt");
        let swap = format!("{dir}/.doc{doc}.txt.swp");
        let backup = format!("{dir}/doc{doc}.txt~");
        let fh = target.create(&swap, 0o600)?;
        timer.tick(target)?;
        target.write(fh, 0, &[b's'; 4096])?;
        timer.tick(target)?;
        target.close(fh)?;
        timer.tick(target)?;
        let fh = target.create(&backup, 0o644)?;
        timer.tick(target)?;
        target.write(fh, 0, &content)?;
        timer.tick(target)?;
        target.fsync(fh)?;
        timer.tick(target)?;
        target.close(fh)?;
        timer.tick(target)?;
        target.rename(&backup, &real)?;
        timer.tick(target)?;
        target.unlink(&swap)?;
        timer.tick(target)?;
        if round % 10 == 0 {
            target.chmod(&real, if round % 20 == 0 { 0o600 } else { 0o644 })?;
            timer.tick(target)?;
        }
        if round % 7 == 0 {
            target.set_times(&real, 1_700_000_000 + i64::from(round))?;
            timer.tick(target)?;
        }
    }
    target.timer_commit()?;
    Ok((timer.ops, timer.commits))
}

/// Runs all four workloads on one target. Returns the wear per workload (indexed like
/// [`WORKLOADS`]), whether the store was untouched by (a), and (d)'s operation and commit
/// counts.
///
/// Each workload is its own session, bracketed as the QEMU `wear` scenario brackets its
/// steps: mount, the workload, unmount. What an unmount writes (the final commit, the
/// compaction that leaves the next mount a short journal) is the wear of the session that
/// made the changes, so (a) can demand that a session which only reads writes nothing at
/// all, its mount and unmount included.
fn run_target(target: &mut dyn Target, options: &Options) -> Result<([Wear; 4], bool, (u64, u64))> {
    let mut wear = [Wear::default(); 4];
    let name = target.name();

    util::banner(&format!("wear: {name}: (b) create the tree"));
    let start = mark(target)?;
    let tree_bytes = create_tree(target, options)?;
    target.unmount()?;
    let (w, end) = since(target, &start)?;
    wear[1] = w;

    util::banner(&format!("wear: {name}: (a) remount, read the tree twice"));
    let start = end;
    target.mount()?;
    for pass in 1..=2 {
        let got = read_tree(target)?;
        if got != tree_bytes {
            bail!("{name}: read pass {pass} read {got} bytes, expected {tree_bytes} (the bytes (b) wrote)");
        }
    }
    // The commit timer fires during the reads too; it must find nothing to write.
    target.timer_commit()?;
    target.unmount()?;
    let (w, end) = since(target, &start)?;
    let unchanged = match (&start.store, &end.store) {
        (Some((_, before)), Some((_, after))) => before == after,
        _ => true,
    };
    wear[0] = w;

    util::banner(&format!(
        "wear: {name}: (c) {} appends with fsync",
        options.appends
    ));
    let start = end;
    target.mount()?;
    appends(target, options)?;
    target.unmount()?;
    let (w, _) = since(target, &start)?;
    wear[2] = w;

    util::banner(&format!(
        "wear: {name}: (d) desktop churn, {} rounds",
        options.rounds
    ));
    target.mount()?;
    churn_setup(target)?;
    let start = mark(target)?;
    let counts = churn(target, options)?;
    target.unmount()?;
    let (w, _) = since(target, &start)?;
    wear[3] = w;
    Ok((wear, unchanged, counts))
}

/// One workload step of `cargo xtask wear-step`, run with plain `std::fs` calls on a directory
/// that is a real mount (the VM suite's flash-wear scenario runs these inside the guest, on
/// the stick through pershomefs and on the plain vfat mount, and counts the bytes the stick
/// receives between steps with QMP). The remounts between steps are the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Step {
    /// (b) create the tree.
    Create,
    /// (a) read the tree twice (run it after a remount).
    Read,
    /// (c) appends with fsync.
    Appends,
    /// (d)'s setup: 50 directories of 4 documents (not measured).
    ChurnSetup,
    /// (d) desktop churn.
    Churn,
}

/// Run one step on `dir` (which must exist); prints what it did.
pub fn run_step(dir: &Path, step: Step, options: &Options) -> Result<()> {
    let mut raw = Raw {
        root: dir.to_path_buf(),
        files: HashMap::new(),
        next_fh: 1,
        wear: Wear::default(),
    };
    match step {
        Step::Create => {
            let bytes = create_tree(&mut raw, options)?;
            println!("created {} files, {bytes} bytes", options.files);
        }
        Step::Read => {
            let first = read_tree(&mut raw)?;
            let second = read_tree(&mut raw)?;
            if first != second {
                bail!("the two read passes read {first} and {second} bytes");
            }
            println!("read {first} bytes twice");
        }
        Step::Appends => {
            appends(&mut raw, options)?;
            println!("{} appends with fsync", options.appends);
        }
        Step::ChurnSetup => churn_setup(&mut raw)?,
        Step::Churn => {
            let (ops, _) = churn(&mut raw, options)?;
            println!("{} rounds, {ops} operations", options.rounds);
        }
    }
    for (fh, file) in raw.files.drain() {
        file.sync_all()
            .with_context(|| format!("closing left-over handle {fh}"))?;
    }
    Ok(())
}

/// Runs every workload on the raw directory and on pershome, below `scratch`.
pub fn measure_in(scratch: &Path, options: &Options) -> Result<Report> {
    let started = Instant::now();
    let mut raw = Raw::new(scratch.join("raw"))?;
    let (raw_wear, _, raw_counts) = run_target(&mut raw, options)?;
    let raw_time = started.elapsed();

    let started = Instant::now();
    let mut pershome = Pershome::new(scratch.join("b"))?;
    let (pershome_wear, unchanged, counts) = run_target(&mut pershome, options)?;
    let pershome_time = started.elapsed();
    if raw_counts.0 != counts.0 {
        bail!(
            "(d) made {} operations on raw but {} on pershome: the workloads differ",
            raw_counts.0,
            counts.0
        );
    }
    Ok(Report {
        options: options.clone(),
        raw: raw_wear,
        pershome: pershome_wear,
        store_unchanged_by_reads: unchanged,
        churn_ops: counts.0,
        churn_timer_commits: counts.1,
        elapsed: [raw_time, pershome_time],
    })
}

/// Runs the benchmark in a temporary directory under /var/tmp (removed afterwards).
pub fn measure(options: &Options) -> Result<Report> {
    let scratch = TempDir::new("wear")?;
    measure_in(scratch.path(), options)
}

impl Report {
    /// Design property: reading never writes to the stick. Any byte (data or metadata) or
    /// any change to the store files during (a) is a failure.
    pub fn check_reads(&self) -> Result<()> {
        let w = &self.pershome[0];
        if w.meta_bytes != 0 || w.meta_writes != 0 || w.data_bytes != 0 || w.data_writes != 0 {
            bail!(
                "reads wrote to the stick: (a) expected 0 bytes in 0 writes, got {} data bytes in {} writes and {} metadata bytes in {} writes",
                w.data_bytes,
                w.data_writes,
                w.meta_bytes,
                w.meta_writes
            );
        }
        if !self.store_unchanged_by_reads {
            bail!("reads wrote to the stick: the store files under {STORE_DIR}/ changed (name, size or mtime) during (a), although the counters saw nothing");
        }
        Ok(())
    }

    /// One line per target of the issue: met or missed, with the figure.
    fn verdicts(&self) -> Vec<String> {
        let mut out = Vec::new();
        let a = &self.pershome[0];
        out.push(format!(
            "target (a) 0 metadata bytes on reads: {} ({} bytes, store files {})",
            if a.meta_bytes == 0 && self.store_unchanged_by_reads {
                "met"
            } else {
                "MISSED"
            },
            a.meta_bytes,
            if self.store_unchanged_by_reads {
                "unchanged"
            } else {
                "changed"
            }
        ));
        for (i, workload) in WORKLOADS.iter().enumerate() {
            let (Some(limit), Some(pct)) =
                (workload.target_percent(), self.pershome[i].meta_percent())
            else {
                continue;
            };
            out.push(format!(
                "target {} metadata under {limit:.0} % of data: {} ({pct:.2} %)",
                &workload.label()[..3],
                if pct < limit { "met" } else { "MISSED" }
            ));
        }
        out
    }

    pub fn table(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "wear: in-process, no kernel mount; each workload is one session (open, workload, unmount with its final \
             commit and compaction). (b) {} files of 0-8 KiB in {} dirs (the bench tree), one commit at the end; \
             (a) read it all twice; (c) {} appends of {APPEND_BYTES} B, fsync after each; \
             (d) {} editor saves in {CHURN_DIRS} dirs, commit() every {COMMIT_EVERY_OPS} ops plus every fsync",
            o.files, o.dirs, o.appends, o.rounds
        );
        let _ = writeln!(
            out,
            "{:<27} {:<10} {:>12} {:>8} {:>11} {:>8} {:>9} {:>6} {:>11} {:>10}",
            "workload",
            "fs",
            "data bytes",
            "data wr",
            "meta bytes",
            "meta wr",
            "meta/data",
            "fsync",
            "store size",
            "growth"
        );
        let _ = writeln!(out, "{}", "-".repeat(122));
        for (i, workload) in WORKLOADS.iter().enumerate() {
            for (fs, w) in [("raw", &self.raw[i]), ("pershomefs", &self.pershome[i])] {
                let pct = w
                    .meta_percent()
                    .map_or("n/a".to_owned(), |p| format!("{p:.2} %"));
                let label = if fs == "raw" { workload.label() } else { "" };
                let _ = writeln!(
                    out,
                    "{:<27} {:<10} {:>12} {:>8} {:>11} {:>8} {:>9} {:>6} {:>11} {:>10}",
                    label,
                    fs,
                    group(w.data_bytes),
                    group(w.data_writes),
                    group(w.meta_bytes),
                    group(w.meta_writes),
                    pct,
                    group(w.fsyncs),
                    w.store_after.map_or("-".to_owned(), group),
                    w.store_growth.map_or("-".to_owned(), |g| {
                        let s = group(g.unsigned_abs());
                        if g < 0 {
                            format!("-{s}")
                        } else {
                            format!("+{s}")
                        }
                    }),
                );
            }
        }
        let b = &self.pershome[1];
        if o.files > 0 {
            let _ = writeln!(
                out,
                "(b) per file: {:.1} metadata bytes against {:.0} data bytes on average",
                b.meta_bytes as f64 / f64::from(o.files),
                b.data_bytes as f64 / f64::from(o.files)
            );
        }
        let c = &self.pershome[2];
        if o.appends > 0 {
            let _ = writeln!(
                out,
                "(c) per fsync: {:.1} metadata bytes in {:.2} writes for {APPEND_BYTES} data bytes",
                c.meta_bytes as f64 / f64::from(o.appends),
                c.meta_writes as f64 / f64::from(o.appends)
            );
        }
        let d = &self.pershome[3];
        if o.rounds > 0 {
            let _ = writeln!(
                out,
                "(d) {} ops, {} timer commits + {} fsync commits; per save: {:.1} metadata bytes against {:.0} data bytes",
                self.churn_ops,
                self.churn_timer_commits,
                d.fsyncs,
                d.meta_bytes as f64 / f64::from(o.rounds),
                d.data_bytes as f64 / f64::from(o.rounds)
            );
        }
        let same_data = (1..4).all(|i| self.raw[i].data_bytes == self.pershome[i].data_bytes);
        let _ = writeln!(
            out,
            "cross-checks: pershome data bytes {} raw's in (b)-(d); store growth {} the metadata counter where no compaction ran",
            if same_data { "equal" } else { "DIFFER FROM" },
            if (1..4).all(|i| self.pershome[i].store_growth == Some(self.pershome[i].meta_bytes as i64)) {
                "equals"
            } else {
                "differs from"
            }
        );
        for line in self.verdicts() {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "run time (informational, not a benchmark): raw {:.1} s, pershomefs {:.1} s",
            self.elapsed[0].as_secs_f64(),
            self.elapsed[1].as_secs_f64()
        );
        out
    }
}

/// 1234567 -> "1,234,567".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `cargo xtask wear`: measure, print and save the table, then fail if reads wrote.
pub fn run(options: &Options) -> Result<()> {
    let report = measure(options)?;
    print_and_save(&report)?;
    report.check_reads()
}

pub fn print_and_save(report: &Report) -> Result<()> {
    let table = report.table();
    println!("\n{table}");
    let out = util::target_dir().join("wear.txt");
    std::fs::write(&out, &table).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("table saved to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Options {
        Options {
            files: 60,
            dirs: 7,
            appends: 25,
            rounds: 45,
        }
    }

    #[test]
    fn grouping_of_digits() {
        for (n, want) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (1234567, "1,234,567"),
        ] {
            assert_eq!(
                group(n),
                want,
                "group({n}): expected {want}, got {}",
                group(n)
            );
        }
    }

    #[test]
    fn quick_shrinks_the_tree_unless_files_is_given() {
        let quick = Options::new(None, 500, true);
        let full = Options::new(None, 500, false);
        let given = Options::new(Some(123), 500, true);
        assert_eq!(
            (quick.files, full.files, given.files),
            (2_000, 10_000, 123),
            "expected files 2000/10000/123, got {}/{}/{}",
            quick.files,
            full.files,
            given.files
        );
    }

    /// A small run of the real workloads: reads write nothing, both filesystems see the same
    /// data bytes, and the store's growth matches the metadata counter.
    #[test]
    fn small_run_counts_consistently() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let report = measure_in(dir.path(), &small()).expect("the wear run");
        report.check_reads().expect("reads must not write");
        for (i, workload) in WORKLOADS.iter().enumerate().skip(1) {
            let (raw, ph) = (&report.raw[i], &report.pershome[i]);
            assert_eq!(
                raw.data_bytes,
                ph.data_bytes,
                "{}: data bytes raw vs pershome: expected equal, got {} and {}",
                workload.label(),
                raw.data_bytes,
                ph.data_bytes
            );
            assert!(
                ph.meta_bytes > 0,
                "{}: expected metadata bytes > 0, got 0",
                workload.label()
            );
            assert_eq!(
                ph.store_growth,
                Some(ph.meta_bytes as i64),
                "{}: expected the store to grow by the counted metadata bytes",
                workload.label()
            );
            assert_eq!(raw.meta_bytes, 0, "raw never counts metadata bytes");
        }
        assert_eq!(
            report.pershome[2].fsyncs, 25,
            "(c): expected 25 fsyncs, got {}",
            report.pershome[2].fsyncs
        );
        let table = report.table();
        for want in [
            "(a) remount",
            "(d) desktop churn",
            "target (b)",
            "target (d)",
        ] {
            assert!(
                table.contains(want),
                "expected {want:?} in the table:\n{table}"
            );
        }
    }

    /// The (a) check can fail: a report with one metadata byte on reads is refused.
    #[test]
    fn check_reads_refuses_a_written_byte() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut report = measure_in(dir.path(), &small()).expect("the wear run");
        report.pershome[0].meta_bytes = 1;
        let err = report
            .check_reads()
            .expect_err("a metadata byte on reads must fail");
        assert!(
            err.to_string().contains("1 metadata bytes"),
            "expected the error to name the byte, got: {err}"
        );
        report.pershome[0].meta_bytes = 0;
        report.store_unchanged_by_reads = false;
        assert!(
            report.check_reads().is_err(),
            "expected a changed store to fail the check"
        );
    }
}
