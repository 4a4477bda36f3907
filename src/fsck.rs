//! `pershome fsck`: checks a stick's metadata store against its backing tree, and with
//! `--repair` brings the two back in line (see `docs/fsck.md`).
//!
//! This module owns the check (a read-only look at the store and the tree, findings in plain
//! words) and the order of a repair. It never deletes or truncates user data: a repair only
//! rewrites the store (through `fs::Fs`, the same code a mount uses, so a repaired store means
//! exactly what a mount would make of it) and moves orphaned hard-link content into
//! `pershome-recovered/`. It never writes to a store another process holds (a mount): that is
//! checked read-only with `--force`, or refused.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::audit;
use crate::backing::Backing;
use crate::fs::{Fs, FsOptions, Kind, OpenError, ROOT};
use crate::meta::journal::{Journal, OpenMode, StoreError};
use crate::meta::layout::{self, StoreLayout};
use crate::meta::moved::{self, ListedChild};
use crate::meta::pending::PendingTree;
use crate::meta::{Meta, Parts, OWNER_ID};
use crate::names::{self, Decoded};

/// Exit codes, as e2fsck's.
pub mod exit_code {
    /// No problems found.
    pub const CLEAN: u8 = 0;
    /// Problems were found and all of them repaired.
    pub const REPAIRED: u8 = 1;
    /// Problems remain: found without `--repair`, or not repairable automatically.
    pub const UNREPAIRED: u8 = 4;
    /// The check could not run: no such directory, no store, store busy, I/O error, newer
    /// format.
    pub const OPERATIONAL: u8 = 8;
    /// The command line is wrong.
    pub const USAGE: u8 = 16;
}

/// What the command line asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsckOptions {
    /// Repair what can be repaired.
    pub repair: bool,
    /// Check a store that a mount holds (read-only, without its lock).
    pub force: bool,
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Wrong, and `--repair` fixes it.
    Repairable,
    /// Wrong, and only the user can fix it.
    Unrepairable,
    /// Legal but worth knowing (what the user will see); does not change the exit code.
    Note,
}

/// One thing found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub class: Class,
    /// The POSIX path in the home where known, else the backing path (relative to BACKING).
    pub path: String,
    pub what: String,
}

/// The outcome of a check (and repair).
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// What the check found (before any repair).
    pub findings: Vec<Finding>,
    /// Records of entries that no longer exist.
    pub stale_records: u64,
    pub directories: u64,
    pub entries: u64,
    /// What `--repair` did; empty when it did not run.
    pub repairs: Vec<String>,
    /// What a check after the repair still found.
    pub remaining: Vec<Finding>,
    /// The store was in use by a mount and was read without its lock (`--force`).
    pub live: bool,
    /// Hard links whose every name is gone (deleted or renamed on another computer, no moved
    /// placeholder found): link id → the old paths of its names, for the repair to say why
    /// it moved the content where it did.
    pub lost_links: BTreeMap<u64, Vec<String>>,
}

impl Report {
    /// The problems left: those of the check after the repair when one ran.
    pub fn problems_left(&self) -> impl Iterator<Item = &Finding> {
        let list = if self.repairs.is_empty() {
            &self.findings
        } else {
            &self.remaining
        };
        list.iter().filter(|f| f.class != Class::Note)
    }

    pub fn exit_code(&self) -> u8 {
        if self.problems_left().next().is_some() {
            exit_code::UNREPAIRED
        } else if !self.repairs.is_empty() {
            exit_code::REPAIRED
        } else {
            exit_code::CLEAN
        }
    }
}

/// Why the check could not run (exit code 8).
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error(
        "{0} holds no pershome metadata store (.pershome/); it is not a pershome backing \
         directory yet: mount it once with pershomefs to create one"
    )]
    NoStore(String),
    #[error(
        "{0} is in use by a mounted pershomefs; unmount it, or use --force to check a live \
         store read-only"
    )]
    Busy(String),
    #[error("the metadata store in {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> FsckError {
    let context = context.into();
    move |source| FsckError::Io { context, source }
}

/// Checks BACKING, and repairs it when asked and possible. See `docs/fsck.md`.
pub fn fsck(backing: &Path, opts: &FsckOptions) -> Result<Report, FsckError> {
    let shown = backing.display().to_string();
    let meta = std::fs::metadata(backing).map_err(io_err(format!("examining {shown}")))?;
    if !meta.is_dir() {
        return Err(FsckError::NotADirectory(shown));
    }
    let found = layout::detect_path(backing).map_err(io_err(format!("listing {shown}")))?;
    let Some(store_layout) = found.layout() else {
        return Err(FsckError::NoStore(shown));
    };
    let names = StoreNames::resolve(backing, store_layout, &found);
    let mut report = match examine(backing, &names, OpenMode::ReadOnly) {
        Err(FsckError::Store {
            source: StoreError::Busy,
            ..
        }) if opts.force => {
            let mut r = examine(backing, &names, OpenMode::ReadOnlyUnlocked)?;
            r.live = true;
            r
        }
        Err(FsckError::Store {
            source: StoreError::Busy,
            ..
        }) => return Err(FsckError::Busy(shown)),
        other => other?,
    };
    let repairable = report.findings.iter().any(|f| f.class == Class::Repairable);
    if !opts.repair || !repairable {
        return Ok(report);
    }
    if report.live {
        report.findings.push(Finding {
            class: Class::Note,
            path: shown,
            what: "not repaired: the store is in use by a mounted pershomefs; unmount it and \
                   run fsck --repair again"
                .into(),
        });
        return Ok(report);
    }
    report.repairs = repair(backing, &names, report.stale_records, &report.lost_links)?;
    report.remaining = examine(backing, &names, OpenMode::ReadOnly)?.findings;
    Ok(report)
}

/// Runs `fsck` and prints its findings to `out` (errors to `err`); returns the exit code.
pub fn run(backing: &Path, opts: &FsckOptions, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match fsck(backing, opts) {
        Ok(report) => {
            // Output is best effort: a closed stdout must not turn a repair into a failure.
            let _ = print_report(backing, opts, &report, out);
            report.exit_code()
        }
        Err(e) => {
            let _ = writeln!(err, "pershome fsck: {e}");
            exit_code::OPERATIONAL
        }
    }
}

fn print_report(
    backing: &Path,
    opts: &FsckOptions,
    report: &Report,
    out: &mut dyn Write,
) -> io::Result<()> {
    let label = |f: &Finding| match f.class {
        Class::Repairable if opts.repair && !report.live => "repaired",
        Class::Repairable => "problem (--repair fixes it)",
        Class::Unrepairable => "problem (fix it by hand)",
        Class::Note => "note",
    };
    if report.live {
        writeln!(
            out,
            "warning: {} is mounted; checked read-only without the store lock, so a commit in \
             progress may show as a torn journal tail",
            backing.display()
        )?;
    }
    for f in &report.findings {
        writeln!(out, "{}: {}: {}", label(f), f.path, f.what)?;
    }
    for r in &report.repairs {
        writeln!(out, "repair: {r}")?;
    }
    if !report.repairs.is_empty() {
        for f in report.remaining.iter().filter(|f| f.class != Class::Note) {
            writeln!(out, "still wrong after the repair: {}: {}", f.path, f.what)?;
        }
    }
    let count = |c: Class| report.findings.iter().filter(|f| f.class == c).count();
    writeln!(
        out,
        "{}: {} directories, {} entries; {} repairable problem(s), {} to fix by hand, {} \
         note(s); {}",
        backing.display(),
        report.directories,
        report.entries,
        count(Class::Repairable),
        count(Class::Unrepairable),
        count(Class::Note),
        match report.exit_code() {
            exit_code::CLEAN => "clean",
            exit_code::REPAIRED => "repaired",
            _ => "problems remain",
        }
    )
}

/// A POSIX path for display: components joined with `/`, lossily as UTF-8.
fn shown(parts: &[Vec<u8>]) -> String {
    if parts.is_empty() {
        return ".".into();
    }
    parts
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether `name` is a backing name pershome itself would write in `mode` (in 8.3 mode: a
/// short name, in the case the stick lists it; `msdos` lists them in lower case).
fn is_canonical(mode: names::NameMode, name: &[u8], at_root: bool) -> bool {
    match mode {
        names::NameMode::Long => names::is_canonical(name, at_root),
        names::NameMode::Short83 => {
            crate::fatrules::check_short_name(&name.to_ascii_uppercase()).is_ok()
        }
    }
}

/// The names of the store's files on the stick being checked: the layout (`meta::layout`)
/// and the store's directories as the backing lists them (lower case on a `msdos` mount),
/// which is how findings show them.
struct StoreNames {
    layout: StoreLayout,
    store: String,
    inodes: String,
    parts: String,
}

impl StoreNames {
    fn resolve(backing: &Path, layout: StoreLayout, found: &layout::Found) -> StoreNames {
        let store = match (layout, &found.short) {
            (StoreLayout::Short83, Some(listed)) => String::from_utf8_lossy(listed).into_owned(),
            _ => layout.store_dir().to_owned(),
        };
        let listed: Vec<Vec<u8>> = std::fs::read_dir(backing.join(&store))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().as_bytes().to_vec())
                    .collect()
            })
            .unwrap_or_default();
        let sub = |name: &str| {
            let leaf = listed
                .iter()
                .find(|n| n.as_slice() != name.as_bytes() && layout.same_name(n, name.as_bytes()))
                .map_or_else(
                    || name.to_owned(),
                    |n| String::from_utf8_lossy(n).into_owned(),
                );
            format!("{store}/{leaf}")
        };
        StoreNames {
            inodes: sub(layout.inodes_dir()),
            parts: sub(layout.parts_dir()),
            layout,
            store,
        }
    }

    /// The content file of hard-link inode `id`, as a backing path for display.
    fn inode_path(&self, id: u64) -> String {
        let file = self
            .layout
            .inode_file(id)
            .unwrap_or_else(|_| format!("{id:x}"));
        format!("{}/{file}", self.inodes)
    }

    fn recovered(&self) -> String {
        self.layout.recovered_dir(1)
    }

    fn recovered_inode(&self, id: u64) -> String {
        format!("{}/{}", self.recovered(), self.layout.recovered_inode(id))
    }

    fn recovered_parts(&self, id: u64) -> String {
        format!("{}/{}", self.recovered(), self.layout.recovered_parts(id))
    }
}

/// A file in `.pershome/inodes/`.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ContentFile {
    name: Vec<u8>,
    /// The hard-link id, when the name is one pershome makes.
    id: Option<u64>,
    size: u64,
    is_file: bool,
}

/// The files in the store's `inodes` directory, sorted; none when it does not exist.
fn content_files(b: &Backing, s: &StoreNames) -> Result<Vec<ContentFile>, FsckError> {
    let rel = s.inodes.clone();
    let dir = match b.open_dir(rel.as_bytes()) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("opening {rel}"))(e)),
    };
    let mut out: Vec<_> = b
        .list(dir.as_fd())
        .map_err(io_err(format!("listing {rel}")))?
        .into_iter()
        .map(|e| (s.layout.parse_inode_file(&e.name), e))
        .map(|(id, e)| ContentFile {
            name: e.name,
            id,
            size: e.stat.size,
            is_file: e.stat.is_file,
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Records (nodes with metadata) in a replayed subtree.
fn count_records(tree: &PendingTree) -> u64 {
    tree.count_records()
}

/// The link id a record gives a backing file, as reconciliation reads it: only a record of a
/// non-directory kind names a hard link.
fn link_of(meta: &Meta) -> Option<u64> {
    match Kind::from_mode(meta.mode) {
        Some(Kind::Dir) | None => None,
        Some(_) => meta.link,
    }
}

/// A vanished entry's records that fsck cannot place: the old POSIX path of the top one and
/// the tree below it.
struct Unplaced {
    old: Vec<Vec<u8>>,
    tree: PendingTree,
}

/// The POSIX name of a record's backing name, as a mount would show it.
fn posix_of(
    mode: names::NameMode,
    backing_name: &[u8],
    meta: Option<&Meta>,
    at_root: bool,
) -> Vec<u8> {
    if let Some(n) = meta
        .and_then(|m| m.name.clone())
        .filter(|n| names::is_valid_posix_name(n))
    {
        return n;
    }
    match names::decode_in(mode, backing_name, at_root) {
        Decoded::Name(p) => p,
        _ => backing_name.to_vec(),
    }
}

/// One line about one record: its old path and what it held that is now lost.
fn describe_record(path: &str, meta: &Meta, lost_links: &mut BTreeMap<u64, Vec<String>>) -> String {
    if let Some(id) = link_of(meta) {
        lost_links.entry(id).or_default().push(path.to_string());
        return format!("{path} (a name of hard link {id})");
    }
    let kind = match Kind::from_mode(meta.mode) {
        Some(Kind::Dir) => "folder",
        Some(Kind::Symlink) => "symlink",
        _ => "file",
    };
    let mut d = format!("{path} ({kind}, mode {:04o}", meta.mode & 0o7777);
    if !meta.xattrs.is_empty() {
        let names: Vec<String> = meta
            .xattrs
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect();
        d.push_str(&format!(", xattrs {}", names.join(" ")));
    }
    d.push(')');
    d
}

/// At most this many records are listed per finding; the rest are counted.
const LISTED_RECORDS: usize = 40;

/// The read-only check.
fn examine(backing: &Path, s: &StoreNames, mode: OpenMode) -> Result<Report, FsckError> {
    let path = backing.display().to_string();
    let b = Backing::open(backing).map_err(io_err(format!("opening {path}")))?;
    // The journal is kept open (with its shared lock, in ReadOnly mode) for the whole walk,
    // so no mount starts writing while the tree is compared with the store.
    let (_journal, recovered) =
        Journal::open_in(b.root(), mode, s.layout).map_err(|source| FsckError::Store {
            path: path.clone(),
            source,
        })?;
    let mut report = Report::default();
    let add = |report: &mut Report, class, path: String, what: String| {
        report.findings.push(Finding { class, path, what })
    };
    for w in &recovered.warnings {
        add(
            &mut report,
            Class::Repairable,
            s.store.clone(),
            format!("store recovery: {w}"),
        );
    }
    let mut replayed = recovered.replayed;
    if replayed.refused > 0 {
        add(
            &mut report,
            Class::Repairable,
            s.store.clone(),
            format!(
                "the store holds more entries than pershome accepts ({} records ignored); it \
                 may have been tampered with; a repair keeps what was accepted",
                replayed.refused
            ),
        );
    }

    let contents = content_files(&b, s)?;
    let mode = s.layout.names();
    let content_ids: BTreeSet<u64> = contents
        .iter()
        .filter(|c| c.is_file)
        .filter_map(|c| c.id)
        .collect();
    // Hard-link id → the POSIX paths of the names that refer to it.
    let mut names_of: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    // Parts id → (parts, the file's path, its first part's length when known).
    let mut parts_of: BTreeMap<u64, (Parts, String, Option<u64>)> = BTreeMap::new();
    for (id, meta) in &replayed.inodes {
        if let Some(p) = meta.parts {
            let content = s.inode_path(*id);
            let len = contents
                .iter()
                .find(|c| c.id == Some(*id) && c.is_file)
                .map(|c| c.size);
            parts_of.insert(p.id, (p, content, len));
        }
    }

    let root_tree = std::mem::take(&mut replayed.root);
    let mut unplaced: Vec<Unplaced> = Vec::new();
    let mut moved_links: BTreeSet<u64> = BTreeSet::new();
    // (backing path, POSIX path, the store's records below it)
    let mut stack = vec![(Vec::<Vec<u8>>::new(), Vec::<Vec<u8>>::new(), root_tree)];
    while let Some((bpath, ppath, mut tree)) = stack.pop() {
        report.directories += 1;
        let refs: Vec<&[u8]> = bpath.iter().map(|c| c.as_slice()).collect();
        let rel = crate::backing::join(&refs);
        let dir = b
            .open_dir(&rel)
            .map_err(io_err(format!("opening {}", shown(&bpath))))?;
        let mut entries = b
            .list(dir.as_fd())
            .map_err(io_err(format!("listing {}", shown(&bpath))))?;
        entries.sort_by(|x, y| x.name.cmp(&y.name));
        let at_root = bpath.is_empty();
        let mut records = std::mem::take(&mut tree.children);
        let mut seen: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        // Recorded folders that vanished and were renamed beside it on another computer, as
        // a mount finds them (`meta::moved::match_dirs`): new backing name → old one.
        let mut renamed = renamed_dirs(&b, s, &rel, &records, &entries)?;
        for entry in entries {
            if !entry.stat.is_dir && !entry.stat.is_file {
                // Not shown by pershome; the FAT audit reports it. A record for it is stale.
                continue;
            }
            let mut record = records.remove(&entry.name);
            if record.is_none() && s.layout == StoreLayout::Short83 {
                // A `msdos` mount lists in lower case the names the records hold in upper.
                let key = records
                    .keys()
                    .find(|k| k.eq_ignore_ascii_case(&entry.name))
                    .cloned();
                record = key.and_then(|k| records.remove(&k));
            }
            if record.is_none() && entry.stat.is_dir {
                if let Some(m) = renamed.remove(&entry.name) {
                    record = records.remove(&m.from);
                    let mut old = ppath.clone();
                    old.push(posix_of(
                        mode,
                        &m.from,
                        record.as_ref().and_then(|t| t.meta.as_ref()),
                        at_root,
                    ));
                    // The POSIX name kept in the record was the old name's (as a mount).
                    if let Some(meta) = record.as_mut().and_then(|t| t.meta.as_mut()) {
                        meta.name = None;
                    }
                    add(
                        &mut report,
                        Class::Note,
                        shown(&old),
                        format!(
                            "renamed to {:?} on another computer (their contents are {}% \
                             alike); the next mount keeps the metadata of everything in it",
                            String::from_utf8_lossy(&entry.name),
                            m.percent()
                        ),
                    );
                }
            }
            let decoded = names::decode_in(mode, &entry.name, at_root);
            if matches!(decoded, Decoded::Reserved) {
                continue;
            }
            report.entries += 1;
            let (meta, subtree) = match record {
                Some(mut t) => (t.meta.take(), std::mem::take(&mut t.children)),
                None => (None, HashMap::new()),
            };
            let stored_name = meta
                .as_ref()
                .and_then(|m| m.name.clone())
                .filter(|n| names::is_valid_posix_name(n));
            let mut name = match (&stored_name, &decoded) {
                (Some(n), _) => n.clone(),
                (None, Decoded::Name(n)) if names::is_valid_posix_name(n) => n.clone(),
                _ => entry.name.clone(),
            };
            let mut child_path = ppath.clone();
            child_path.push(name.clone());
            if stored_name.is_none() {
                match &decoded {
                    Decoded::Hashed => add(
                        &mut report,
                        Class::Note,
                        shown(&child_path),
                        "a hashed backing name whose record (holding its real name) is gone; \
                         pershome shows the backing name itself"
                            .into(),
                    ),
                    _ if !is_canonical(mode, &entry.name, at_root) => add(
                        &mut report,
                        Class::Note,
                        shown(&child_path),
                        format!(
                            "the backing name {:?} is not the form pershome writes (made on \
                             another system); pershome shows it under this name, and renaming \
                             it through pershome gives it its usual backing name",
                            String::from_utf8_lossy(&entry.name)
                        ),
                    ),
                    _ => {}
                }
            }
            if let Some(first) = seen.get(&name) {
                let base = name.clone();
                let mut n = 1;
                while seen.contains_key(&name) {
                    name = base.clone();
                    name.extend_from_slice(format!("~dup{n}").as_bytes());
                    n += 1;
                }
                add(
                    &mut report,
                    Class::Note,
                    shown(&child_path),
                    format!(
                        "the backing names {:?} and {:?} both stand for this name; pershome \
                         shows the second as {:?} (rename one of them)",
                        String::from_utf8_lossy(first),
                        String::from_utf8_lossy(&entry.name),
                        String::from_utf8_lossy(&name)
                    ),
                );
                child_path.pop();
                child_path.push(name.clone());
            }
            seen.insert(name, entry.name.clone());

            if entry.stat.is_file && meta.is_none() && entry.stat.size == moved::PLACEHOLDER_LEN {
                let id = b
                    .read_small(dir.as_fd(), &entry.name, moved::PLACEHOLDER_LEN)
                    .ok()
                    .and_then(|body| moved::parse_placeholder(&body))
                    .filter(|id| replayed.inodes.contains_key(id));
                if let Some(id) = id {
                    names_of.entry(id).or_default().push(shown(&child_path));
                    moved_links.insert(id);
                    add(
                        &mut report,
                        Class::Note,
                        shown(&child_path),
                        format!(
                            "a name of hard link {id} moved here on another computer; the \
                             next mount shows its content here and records the name"
                        ),
                    );
                }
            }
            if entry.stat.is_file {
                if let Some(p) = meta.as_ref().and_then(|m| m.parts) {
                    parts_of.insert(p.id, (p, shown(&child_path), Some(entry.stat.size)));
                }
                if let Some(id) = meta.as_ref().and_then(link_of) {
                    names_of.entry(id).or_default().push(shown(&child_path));
                    let has_inode = replayed.inodes.contains_key(&id);
                    let has_content = content_ids.contains(&id);
                    let what = match (has_inode, has_content) {
                        (true, true) => None,
                        (false, true) => Some(format!(
                            "a hard-link name of inode {id}, which has no inode record; \
                             pershome shows it as an empty file, and a repair moves the \
                             content {} to {}/",
                            s.inode_path(id),
                            s.recovered()
                        )),
                        (_, false) => Some(format!(
                            "a hard-link name of inode {id}, whose content file {} is \
                             missing: its data is lost; pershome shows the placeholder (32 \
                             bytes naming the link, or empty if written before format 3), \
                             which a repair makes an ordinary file",
                            s.inode_path(id)
                        )),
                    };
                    if let Some(what) = what {
                        add(&mut report, Class::Repairable, shown(&child_path), what);
                    }
                }
            }
            if entry.stat.is_dir {
                let mut child_bpath = bpath.clone();
                child_bpath.push(entry.name.clone());
                stack.push((
                    child_bpath,
                    child_path,
                    PendingTree {
                        meta: None,
                        children: subtree,
                        base: None,
                    },
                ));
            }
        }
        let mut stale: Vec<(Vec<u8>, PendingTree)> = records
            .into_iter()
            .filter(|(_, t)| count_records(t) > 0)
            .collect();
        stale.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in stale {
            let mut old = ppath.clone();
            old.push(posix_of(mode, &name, t.meta.as_ref(), at_root));
            unplaced.push(Unplaced { old, tree: t });
        }
    }
    // Records nothing on the stick matches, named with their old paths (after the walk, so
    // that a hard link's name found moved elsewhere is known).
    for u in unplaced {
        let n = count_records(&u.tree);
        report.stale_records += n;
        let mut lines = Vec::new();
        let mut stack = vec![(u.old.clone(), &u.tree)];
        let mut more = 0usize;
        while let Some((path, t)) = stack.pop() {
            if let Some(m) = &t.meta {
                let alive = link_of(m).and_then(|id| names_of.get(&id));
                if lines.len() < LISTED_RECORDS {
                    let mut line = describe_record(&shown(&path), m, &mut report.lost_links);
                    if let Some(names) = alive {
                        line.push_str(&format!(
                            ": its content is safe, shown at {}",
                            names.join(", ")
                        ));
                    }
                    lines.push(line);
                } else {
                    more += 1;
                    describe_record(&shown(&path), m, &mut report.lost_links);
                }
            }
            let mut kids: Vec<_> = t.children.iter().collect();
            kids.sort_by(|a, b| b.0.cmp(a.0));
            for (kname, kt) in kids {
                let mut p = path.clone();
                p.push(posix_of(mode, kname, kt.meta.as_ref(), false));
                stack.push((p, kt));
            }
        }
        if more > 0 {
            lines.push(format!("and {more} more"));
        }
        let why = if moved::matchable(&u.tree) {
            "this folder is gone: deleted, or renamed or moved on another computer where no \
             new folder is clearly the same"
        } else {
            "this entry is gone: deleted, or renamed or moved on another computer"
        };
        add(
            &mut report,
            Class::Repairable,
            shown(&u.old),
            format!(
                "{n} metadata record(s) that pershome cannot place ({why}); what they kept is \
                 lost at the next mount or repair: {}",
                lines.join("; ")
            ),
        );
    }
    // A hard link with a name found elsewhere is not lost.
    report
        .lost_links
        .retain(|id, _| !names_of.contains_key(id) && !moved_links.contains(id));

    let mut inode_ids: Vec<(&u64, &Meta)> = replayed.inodes.iter().collect();
    inode_ids.sort_by_key(|(id, _)| **id);
    for (&id, meta) in inode_ids {
        let content = s.inode_path(id);
        match names_of.get(&id) {
            None => add(
                &mut report,
                Class::Repairable,
                content.clone(),
                if content_ids.contains(&id) {
                    format!(
                        "inode {id} (link count {}) has no name; a repair moves its content to \
                         {}/ and drops its record",
                        meta.nlink,
                        s.recovered()
                    )
                } else {
                    format!(
                        "inode {id} has a record but neither a name nor content; a repair \
                         drops the record"
                    )
                },
            ),
            Some(found) if content_ids.contains(&id) => {
                let n = u32::try_from(found.len()).unwrap_or(u32::MAX);
                if meta.nlink != n {
                    add(
                        &mut report,
                        Class::Repairable,
                        found[0].clone(),
                        format!(
                            "hard-linked file (inode {id}) has link count {} in the store but \
                             {n} name(s) ({}); a repair sets it to {n}",
                            meta.nlink,
                            found.join(", ")
                        ),
                    );
                }
            }
            Some(_) => {}
        }
    }
    for ContentFile {
        name,
        id,
        size,
        is_file,
    } in &contents
    {
        let p = format!("{}/{}", s.inodes, String::from_utf8_lossy(name));
        match id {
            Some(id) if *is_file && !replayed.inodes.contains_key(id) => add(
                &mut report,
                Class::Repairable,
                p,
                format!(
                    "orphaned hard-link content ({size} bytes) with no inode record; a repair \
                     moves it to {}",
                    s.recovered_inode(*id)
                ),
            ),
            Some(_) if *is_file => {}
            _ => add(
                &mut report,
                Class::Unrepairable,
                p,
                format!(
                    "not something pershome puts in {}/; left alone (look at it, then move \
                     or delete it)",
                    s.inodes
                ),
            ),
        }
    }

    check_parts(&b, s, &parts_of, &mut report)?;

    let problems =
        audit::audit_tree_as_listed(backing, mode).map_err(io_err("auditing the backing tree"))?;
    for problem in problems {
        let rel = problem.path.strip_prefix(backing).unwrap_or(&problem.path);
        add(
            &mut report,
            Class::Unrepairable,
            rel.display().to_string(),
            format!(
                "cannot be on a FAT stick: {}; Windows (or the stick's own filesystem) may \
                 refuse or lose it",
                problem.what
            ),
        );
    }
    Ok(report)
}

/// Files stored in parts (`docs/format.md` § Parts): every parts directory must belong to a
/// file, every part before the last must be present and one part long, and the first part of a
/// file with further parts must be one part long too (else it was rewritten elsewhere).
fn check_parts(
    b: &Backing,
    s: &StoreNames,
    parts_of: &BTreeMap<u64, (Parts, String, Option<u64>)>,
    report: &mut Report,
) -> Result<(), FsckError> {
    let mut add =
        |class, path: String, what: String| report.findings.push(Finding { class, path, what });
    let rel = s.parts.clone();
    let dirs = match b.open_dir(rel.as_bytes()) {
        Ok(d) => b
            .list(d.as_fd())
            .map_err(io_err(format!("listing {rel}")))?,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Vec::new(),
        Err(e) => return Err(io_err(format!("opening {rel}"))(e)),
    };
    let mut on_disk = BTreeSet::new();
    for d in dirs {
        let path = format!("{rel}/{}", String::from_utf8_lossy(&d.name));
        let Some(id) = s
            .layout
            .parse_parts_id_dir(&d.name)
            .filter(|_| d.stat.is_dir)
        else {
            add(
                Class::Unrepairable,
                path,
                format!(
                    "not something pershome puts in {rel}/; left alone (look at it, then move \
                     or delete it)"
                ),
            );
            continue;
        };
        on_disk.insert(id);
        let dir = b
            .open_dir(path.as_bytes())
            .map_err(io_err(format!("opening {path}")))?;
        let listed = b
            .list(dir.as_fd())
            .map_err(io_err(format!("listing {path}")))?;
        let mut parts: Vec<(u64, u64)> = Vec::new();
        for e in &listed {
            match s.layout.parse_part_file(&e.name).filter(|_| e.stat.is_file) {
                Some(k) => parts.push((k, e.stat.size)),
                None => add(
                    Class::Unrepairable,
                    format!("{path}/{}", String::from_utf8_lossy(&e.name)),
                    "not a part pershome writes; left alone".into(),
                ),
            }
        }
        parts.sort_unstable();
        let bytes: u64 = parts.iter().map(|(_, n)| n).sum();
        let Some((p, file, first_len)) = parts_of.get(&id) else {
            add(
                Class::Repairable,
                path,
                format!(
                    "orphaned parts ({} part(s), {bytes} bytes) of a file that no longer \
                     has them (a crash while a file was split or deleted, or its first part \
                     rewritten on another computer); a repair moves them to {}/",
                    parts.len(),
                    s.recovered_parts(id)
                ),
            );
            continue;
        };
        let Some(&(last, _)) = parts.last() else {
            continue;
        };
        if first_len.is_some_and(|n| n != p.size) {
            add(
                Class::Repairable,
                file.clone(),
                format!(
                    "its first part is {} bytes, not one part ({}): it was rewritten on \
                     another computer; pershome shows only the first part, and a repair \
                     moves the later parts to {}/",
                    first_len.unwrap_or_default(),
                    p.size,
                    s.recovered_parts(id)
                ),
            );
            continue;
        }
        // From the listing only: a planted part `ffffffff` must not make fsck walk (and
        // list) four billion indexes.
        let (count, first) = crate::fs::parts::missing_or_short(&parts, last, p.size, 10);
        if count > crate::fs::parts::MAX_MENDABLE_PARTS {
            add(
                Class::Unrepairable,
                file.clone(),
                format!(
                    "{path} names part {last}, but {count} parts before it are missing: no \
                     file pershome wrote looks like this (a part planted or misnamed on \
                     another computer); the file reads as zeros up to that part. Copy its \
                     data out and move {path} away"
                ),
            );
        } else if count > 0 {
            let mut shown: Vec<String> = first.iter().map(u64::to_string).collect();
            if count > first.len() as u64 {
                shown.push(format!("… ({count} in all)"));
            }
            add(
                Class::Repairable,
                file.clone(),
                format!(
                    "part(s) {} of {path} are missing or short: those bytes read as zeros \
                     (their data is lost); a repair makes them holes of the right length",
                    shown.join(", ")
                ),
            );
        }
        let long: Vec<String> = parts
            .iter()
            .filter(|(_, n)| *n > p.size)
            .map(|(k, _)| format!("{k}"))
            .collect();
        if !long.is_empty() {
            add(
                Class::Unrepairable,
                file.clone(),
                format!(
                    "part(s) {} of {path} are longer than a part ({} bytes): pershome never \
                     shows the bytes past a part's end; left alone",
                    long.join(", "),
                    p.size
                ),
            );
        }
    }
    for (id, (_, file, _)) in parts_of {
        if !on_disk.contains(id) {
            // A file split and then shrunk keeps no parts directory only after a crash; it
            // reads as its first part, which is all there is.
            add(
                Class::Note,
                file.clone(),
                format!(
                    "stored in parts, but {rel}/{} is missing: it holds only its first part",
                    s.layout
                        .parts_id_dir(*id)
                        .unwrap_or_else(|_| format!("{id:x}"))
                ),
            );
        }
    }
    Ok(())
}

/// The vanished recorded folders of the directory `rel` that were renamed beside it on
/// another computer, as a mount matches them: new backing name → the match. Candidates are
/// listed only when a matchable record vanished.
fn renamed_dirs(
    b: &Backing,
    s: &StoreNames,
    rel: &[u8],
    records: &HashMap<Vec<u8>, PendingTree>,
    entries: &[crate::backing::BackingEntry],
) -> Result<HashMap<Vec<u8>, moved::DirMatch>, FsckError> {
    let taken = |name: &[u8]| {
        entries.iter().any(|e| {
            e.name == name
                || (s.layout == StoreLayout::Short83 && e.name.eq_ignore_ascii_case(name))
        })
    };
    let mut vanished: Vec<(&[u8], &PendingTree)> = records
        .iter()
        .filter(|(n, t)| moved::matchable(t) && !taken(n))
        .map(|(n, t)| (n.as_slice(), t))
        .collect();
    if vanished.is_empty() {
        return Ok(HashMap::new());
    }
    vanished.sort_by(|x, y| x.0.cmp(y.0));
    let mut candidates = Vec::new();
    for e in entries {
        let recorded = records.contains_key(&e.name)
            || (s.layout == StoreLayout::Short83
                && records.keys().any(|k| k.eq_ignore_ascii_case(&e.name)));
        if !e.stat.is_dir || recorded {
            continue;
        }
        let mut path = rel.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&e.name);
        let shown_path = String::from_utf8_lossy(&path).into_owned();
        let dir = b
            .open_dir(&path)
            .map_err(io_err(format!("opening {shown_path}")))?;
        let listed: Vec<ListedChild> = b
            .list(dir.as_fd())
            .map_err(io_err(format!("listing {shown_path}")))?
            .into_iter()
            .filter_map(crate::backing::BackingEntry::into_listed_child)
            .collect();
        candidates.push((e.name.clone(), listed));
    }
    let cands: Vec<(&[u8], &[ListedChild])> = candidates
        .iter()
        .map(|(n, l)| (n.as_slice(), l.as_slice()))
        .collect();
    Ok(moved::match_dirs(&vanished, &cands)
        .into_iter()
        .map(|m| (m.to.clone(), m))
        .collect())
}

/// Repairs through the filesystem's own logic: open read-write (which cuts a torn journal
/// tail and takes the exclusive lock), load every directory (reconciling every record), fix
/// link counts and unreferenced inodes, write a checkpoint of the live state (stale records
/// vanish), then move orphaned content to the recovery directory (`pershome-recovered/`, or
/// `PHRECOV/` on an 8.3 stick). Returns what was done.
fn repair(
    backing: &Path,
    s: &StoreNames,
    stale: u64,
    lost_links: &BTreeMap<u64, Vec<String>>,
) -> Result<Vec<String>, FsckError> {
    let path = backing.display().to_string();
    let opts = FsOptions {
        // The store's owner id itself: ids then pass through unchanged, so no file owned by
        // the user running fsck (root, say) is rewritten as owned by "whoever mounts".
        commit_interval: Duration::from_secs(3600),
        // The stick's own mode, whichever it is.
        names: None,
        // Repair splits nothing; files already in parts stay so.
        parts: crate::fs::PartsMode::Never,
        ..FsOptions::new(OWNER_ID, OWNER_ID)
    };
    let fs = Fs::open_backing(backing, opts).map_err(|e| match e {
        OpenError::Store(StoreError::Busy) => FsckError::Busy(path.clone()),
        OpenError::Store(source) => FsckError::Store {
            path: path.clone(),
            source,
        },
        OpenError::Backing { path, source } => FsckError::Io {
            context: format!("opening {path}"),
            source,
        },
        // Cannot happen with `names: None`, which adopts the stick's mode.
        e @ (OpenError::NameMode { .. } | OpenError::OldShortStore | OpenError::PartSize(_)) => {
            FsckError::Io {
                context: format!("opening {path}"),
                source: io::Error::other(e.to_string()),
            }
        }
    })?;
    let fs_err = |what: &str| {
        let what = what.to_string();
        move |e: nix::errno::Errno| FsckError::Io {
            context: what,
            source: io::Error::from(e),
        }
    };
    let mut done: Vec<String> = fs
        .recovery_warnings()
        .into_iter()
        .map(|w| format!("store recovered: {w}"))
        .collect();
    // Load every directory. An error aborts before anything more is written: a partial view
    // would make inodes look unreferenced whose names are in the unread directories.
    let mut dirs = vec![ROOT];
    while let Some(ino) = dirs.pop() {
        let fh = fs.opendir(ino).map_err(fs_err("loading a directory"))?;
        let entries = fs.readdir(fh, 0);
        fs.releasedir(fh);
        for (_, e) in entries.map_err(fs_err("reading a directory"))? {
            if e.kind == Kind::Dir && e.name != b"." && e.name != b".." {
                dirs.push(e.ino);
            }
        }
    }
    fs.record_reconciliation();
    if stale > 0 {
        done.push(format!("dropped {stale} stale record(s)"));
    }
    for l in fs.link_inodes() {
        if l.nlink != l.names && l.names > 0 {
            fs.set_link_count(l.id, l.names)
                .map_err(fs_err("setting a link count"))?;
            done.push(format!(
                "inode {}: link count {} → {}",
                l.id, l.nlink, l.names
            ));
        }
    }
    let live: BTreeSet<u64> = fs.link_inodes().iter().map(|l| l.id).collect();
    for id in fs.unreferenced_link_inodes() {
        fs.forget_link_inode(id)
            .map_err(fs_err("dropping an inode record"))?;
        done.push(format!(
            "dropped the record of inode {id}, which has no name"
        ));
    }
    fs.compact().map_err(fs_err("writing a fresh checkpoint"))?;
    done.push("wrote a fresh checkpoint of the live state".into());
    // Content no name refers to any more: the store no longer mentions it, so moving it is
    // safe whenever it happens; it is done last so a failure leaves a consistent store.
    let b = Backing::open(backing).map_err(io_err(format!("opening {path}")))?;
    for c in content_files(&b, s)? {
        let Some(id) = c.id.filter(|id| c.is_file && !live.contains(id)) else {
            continue;
        };
        let to = fs
            .recover_link_content(id)
            .map_err(fs_err("moving orphaned content to the recovery directory"))?;
        done.push(match lost_links.get(&id) {
            Some(old) => format!(
                "moved the content of the hard-linked file {} (hard link {id}, kept in {}) to \
                 {to}: every name of it was deleted or renamed on another computer, so no \
                 name shows it any more; rename it to whatever you like",
                old.join(", "),
                s.inode_path(id)
            ),
            None => format!(
                "moved orphaned content {} to {to}: no name refers to it any more (its names \
                 were deleted on another computer, or a crash came between steps)",
                s.inode_path(id)
            ),
        });
    }
    // Parts: holes for missing or short parts of live files, then parts directories no file
    // refers to (also those reconciliation just detached) moved where the user sees them.
    done.extend(
        fs.mend_parts()
            .map_err(fs_err("mending the parts of a file"))?,
    );
    for id in fs.orphan_parts() {
        let to = fs
            .recover_parts(id)
            .map_err(fs_err("moving orphaned parts to the recovery directory"))?;
        done.push(format!(
            "moved orphaned parts {}/{} to {to}",
            s.parts,
            s.layout
                .parts_id_dir(id)
                .unwrap_or_else(|_| format!("{id:x}"))
        ));
    }
    fs.shutdown();
    Ok(done)
}
