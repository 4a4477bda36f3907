//! Opening the store: finding or creating the store directory, taking its lock, and
//! recovering the state from the newest trustworthy checkpoint and its journal (rules in
//! `docs/format.md` § Recovery).
//!
//! Damage never fails an open: it is repaired as far as possible and reported as warnings. It
//! never writes anything in a read-only mode and never removes a file it does not recognise.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};

use crate::backing::sys;

use super::base::BaseCheckpoint;
use super::file_io::{list_store, open_at, read_header, StoreReader};
use super::format::{
    check_header, encode_header, index_checkpoint, replay_journal, scan_checkpoint, HeaderProblem,
    Source, HEADER_LEN,
};
use super::{
    io_err, sys_err, Journal, Kind, OpenMode, Recovered, Replayed, StoreError, StoreLayout,
    WriteStats, FORMAT_VERSION, LOCK_WAIT,
};
use crate::meta::pending::BaseRef;

impl Journal {
    /// Opens (ReadWrite: creating if missing, and repairing) the store of `backing_root` and
    /// recovers its state. See `docs/format.md` § Recovery for the rules.
    pub fn open(
        backing_root: BorrowedFd<'_>,
        mode: OpenMode,
    ) -> Result<(Journal, Recovered), StoreError> {
        Journal::open_in(backing_root, mode, StoreLayout::Long)
    }

    /// `open` for a store of `layout`. The 8.3 store directory is found in any letter case.
    pub fn open_in(
        backing_root: BorrowedFd<'_>,
        mode: OpenMode,
        layout: StoreLayout,
    ) -> Result<(Journal, Recovered), StoreError> {
        Journal::open_with(backing_root, mode, layout, false)
    }

    /// `open_in` for the daemon: the base checkpoint is read lazily when it can be
    /// (`Recovered::replayed` then stands on a `BaseCheckpoint`, see `base`), so a mount
    /// holds the records of a directory only once the directory is needed.
    pub fn open_lazy_in(
        backing_root: BorrowedFd<'_>,
        mode: OpenMode,
        layout: StoreLayout,
    ) -> Result<(Journal, Recovered), StoreError> {
        Journal::open_with(backing_root, mode, layout, true)
    }

    fn open_with(
        backing_root: BorrowedFd<'_>,
        mode: OpenMode,
        layout: StoreLayout,
        lazy: bool,
    ) -> Result<(Journal, Recovered), StoreError> {
        let sd = layout.store_dir();
        let store_name: String = match layout {
            StoreLayout::Long => layout.store_dir().to_owned(),
            StoreLayout::Short83 => crate::meta::layout::detect(backing_root)
                .map_err(|source| StoreError::Io {
                    context: "listing the backing directory".into(),
                    source,
                })?
                .short
                .map_or_else(
                    || layout.store_dir().to_owned(),
                    |n| String::from_utf8_lossy(&n).into_owned(),
                ),
        };
        let store_name = store_name.as_str();
        let mut journal = Journal {
            layout,
            listed: BTreeMap::new(),
            mode,
            dir: None,
            file: None,
            generation: 0,
            len: 0,
            tail_dirty: false,
            stats: WriteStats::default(),
            faults: None,
            live_version: None,
            lazy,
            written_index: None,
        };
        let root = backing_root.as_raw_fd();
        let root_fd = backing_root.as_fd();
        let mut created_dir = false;
        match fstatat(Some(root), store_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
                if kind != SFlag::S_IFDIR {
                    return Err(StoreError::NotADirectory(format!(
                        "{sd} in the backing directory is not a directory{}",
                        if kind == SFlag::S_IFLNK {
                            " but a symlink"
                        } else {
                            ""
                        }
                    )));
                }
            }
            Err(Errno::ENOENT) if mode != OpenMode::ReadWrite => {
                let recovered = Recovered {
                    replayed: Replayed::default(),
                    generation: 0,
                    warnings: Vec::new(),
                    created: false,
                    unordered_base: false,
                };
                return Ok((journal, recovered));
            }
            Err(Errno::ENOENT) => {
                sys::mkdirat(None, root_fd, store_name.as_bytes())
                    .map_err(sys_err(format!("creating {sd}")))?;
                created_dir = true;
            }
            Err(e) => return Err(io_err(format!("examining {sd}"))(e)),
        }
        let dir = match sys::openat(
            None,
            root_fd,
            store_name.as_bytes(),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        ) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                return Err(StoreError::NotADirectory(format!(
                    "{sd} in the backing directory is not a directory"
                )))
            }
            Err(e) => return Err(sys_err(format!("opening {sd}"))(e)),
        };
        // One writer per stick: a second pershomefs (or an fsck) on the same store would
        // interleave batches. A shared lock lets read-only users coexist with each other only.
        let lock = match mode {
            OpenMode::ReadWrite => libc::LOCK_EX,
            OpenMode::ReadOnly => libc::LOCK_SH,
            // fsck --force on a live store: no lock, so the mount is not disturbed.
            OpenMode::ReadOnlyUnlocked => 0,
        };
        // A pershomefs that was just unmounted may still be writing its last commit: wait a
        // little for it rather than fail a quick `umount; mount`.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        if lock != 0 {
            loop {
                // SAFETY: flock on a descriptor we own; the result is checked.
                if unsafe { libc::flock(dir.as_raw_fd(), lock | libc::LOCK_NB) } == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(StoreError::Io {
                        context: format!("locking {sd}"),
                        source: e,
                    });
                }
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::Busy);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        journal.dir = Some(dir);
        if created_dir {
            // The new directory entry must survive a crash as well as the files in it. The
            // root is reopened because the caller's fd may be an O_PATH one, which cannot sync.
            let root_dir = sys::openat(None, root_fd, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map_err(sys_err("opening the backing directory"))?;
            journal.stats.syncs += 1;
            sys::sync(None, root_dir.as_fd(), false)
                .map_err(sys_err("syncing the backing directory"))?;
        }
        let recovered = journal.recover()?;
        Ok((journal, recovered))
    }

    pub(super) fn recover(&mut self) -> Result<Recovered, StoreError> {
        let sd = self.layout.store_dir();
        let store = self.dir.as_ref().ok_or(StoreError::ReadOnly)?;
        let (gens, listed) = list_store(store, self.layout)?;
        self.listed = listed;

        // Refuse a newer format before anything else is read or written.
        for (&generation, files) in &gens {
            for (kind, present) in [
                (Kind::Checkpoint, files.checkpoint),
                (Kind::Journal, files.journal),
            ] {
                if !present {
                    continue;
                }
                if let Some(header) = read_header(
                    store,
                    self.layout.store_dir(),
                    &self.name_of(kind, generation)?,
                )? {
                    if let Err(HeaderProblem::Newer(found)) =
                        check_header(&header, kind, generation)
                    {
                        return Err(StoreError::NewerFormat {
                            found,
                            supported: FORMAT_VERSION,
                        });
                    }
                }
            }
        }

        let mut warnings = Vec::new();
        if gens.is_empty() {
            let created = self.mode == OpenMode::ReadWrite;
            if created {
                let fd = self.write_first_journal()?;
                self.file = Some(fd);
                self.generation = 1;
                self.len = HEADER_LEN as u64;
            }
            return Ok(Recovered {
                replayed: Replayed::default(),
                generation: self.generation,
                warnings,
                created,
                unordered_base: false,
            });
        }
        let max_gen = gens.keys().next_back().copied().unwrap_or(1);

        // Files that hold damaged data are renamed to *.corrupt by a repair, for fsck.
        let mut corrupt: BTreeSet<String> = BTreeSet::new();
        let mut needs_repair = false;

        // The base: the newest generation with a complete checkpoint (or gen 1's implicit
        // empty one). Newer checkpoints that are not complete are crashed compactions.
        // Each checkpoint is replayed into a state of its own as it is read (never held as
        // bytes or records): the base's becomes the state; the newest damaged one's is kept
        // for a salvage.
        let mut base: Option<(u64, Replayed)> = None;
        // The base when it is read lazily (an indexed checkpoint).
        let mut base_state: Option<(u64, Replayed)> = None;
        let mut unordered_base = false;
        let mut salvage: Option<(u64, Replayed, usize)> = None;
        for (&generation, files) in gens.iter().rev() {
            if !files.checkpoint {
                if generation == 1 && files.journal {
                    base = Some((1, Replayed::default()));
                    break;
                }
                if files.journal {
                    warnings.push(format!(
                        "generation {generation} has a journal but no checkpoint"
                    ));
                }
                continue;
            }
            let name = self.name_of(Kind::Checkpoint, generation)?;
            let Some(file) = StoreReader::open(store, self.layout.store_dir(), &name)? else {
                warnings.push(format!("{sd}/{name} is not a regular file; ignored"));
                corrupt.insert(name);
                continue;
            };
            let mut header = vec![0u8; file.len().min(HEADER_LEN)];
            file.read_at(0, &mut header)?;
            if let Err(p) = check_header(&header, Kind::Checkpoint, generation) {
                warnings.push(format!("{sd}/{name} is unusable: {}", p.describe()));
                if file.len() >= HEADER_LEN {
                    corrupt.insert(name);
                }
                continue;
            }
            if self.lazy {
                let mut replayed = Replayed::default();
                if let Some((chunks, problem)) = index_checkpoint(&file, generation, &mut replayed)?
                {
                    if let Some(why) = problem {
                        warnings.push(format!("{sd}/{name}: {why}"));
                    }
                    let base = std::sync::Arc::new(BaseCheckpoint::new(file, generation, chunks));
                    replayed.root.base = Some(Box::new(BaseRef {
                        checkpoint: base,
                        path: Vec::new(),
                    }));
                    base_state = Some((generation, replayed));
                    break;
                }
            }
            let mut replayed = Replayed::default();
            let scan = scan_checkpoint(&file, generation, &mut replayed)?;
            // Complete, yet not indexed: its order is an earlier pershome's.
            unordered_base = self.lazy && scan.complete;
            if scan.complete {
                if let Some(why) = scan.problem {
                    warnings.push(format!("{sd}/{name}: {why}"));
                }
                base = Some((generation, replayed));
                break;
            }
            warnings.push(format!(
                "{sd}/{name} is incomplete or damaged ({}); {} records readable",
                scan.problem.unwrap_or_default(),
                scan.records
            ));
            // An incomplete checkpoint with no journal of its own is a compaction that
            // crashed before finishing: the older generation holds the whole state. With a
            // journal, it was complete once and is now damaged.
            if files.journal {
                corrupt.insert(name);
            }
            if salvage.is_none() {
                salvage = Some((generation, replayed, scan.records));
            }
        }

        let base = base_state.or(base);
        let (base_gen, mut state) = match base {
            Some(b) => b,
            None => {
                needs_repair = true;
                match salvage {
                    Some((generation, replayed, records)) => {
                        corrupt.insert(self.name_of(Kind::Checkpoint, generation)?);
                        warnings.push(format!(
                            "NO INTACT CHECKPOINT: recovered {records} records from the damaged \
                             checkpoint of generation {generation}; metadata of some files may \
                             be lost (run `pershome fsck`)"
                        ));
                        (generation, replayed)
                    }
                    None => {
                        let first = gens.keys().next().copied().unwrap_or(1);
                        warnings.push(format!(
                            "NO CHECKPOINT: replaying journals from generation {first} onto an \
                             empty state; metadata of some files may be lost (run `pershome fsck`)"
                        ));
                        (first, Replayed::default())
                    }
                }
            }
        };

        // Journals from the base generation up. A journal newer than the base means its own
        // checkpoint was damaged after it was complete: its batches still apply on top.
        let mut live_len: Option<usize> = None;
        let mut live_needs_header = false;
        let mut live_cut: Option<usize> = None;
        for (&generation, files) in gens.range(base_gen..) {
            let is_live = generation == base_gen;
            let name = self.name_of(Kind::Journal, generation)?;
            if !files.journal {
                if is_live {
                    live_needs_header = true;
                }
                continue;
            }
            if !is_live {
                needs_repair = true;
                warnings.push(format!(
                    "replaying {sd}/{name}, whose checkpoint is damaged, on top of \
                     generation {base_gen}"
                ));
            }
            let Some(file) = StoreReader::open(store, self.layout.store_dir(), &name)? else {
                warnings.push(format!("{sd}/{name} is not a regular file; ignored"));
                corrupt.insert(name);
                needs_repair = true;
                continue;
            };
            let mut header = vec![0u8; file.len().min(HEADER_LEN)];
            file.read_at(0, &mut header)?;
            if let Err(p) = check_header(&header, Kind::Journal, generation) {
                if file.len() < HEADER_LEN {
                    // Torn while being created: it never held a batch.
                    if is_live {
                        live_needs_header = true;
                    }
                    warnings.push(format!(
                        "{sd}/{name} was being created when the stick was last \
                         removed; it held no changes"
                    ));
                } else {
                    warnings.push(format!(
                        "{sd}/{name} is unusable ({}); its changes are lost",
                        p.describe()
                    ));
                    corrupt.insert(name);
                    needs_repair = true;
                }
                continue;
            }
            let scan = replay_journal(&file, generation, &mut state)?;
            if let Some(why) = &scan.problem {
                if scan.intact_after_problem {
                    warnings.push(format!(
                        "{sd}/{name} is damaged ({why}); kept {} batches, dropped the \
                         rest including later intact ones (run `pershome fsck`)",
                        scan.batches
                    ));
                    corrupt.insert(name.clone());
                    needs_repair = true;
                } else {
                    warnings.push(format!(
                        "{sd}/{name} ends in a torn batch ({why}); kept {} batches \
                         (the last one was not committed)",
                        scan.batches
                    ));
                    if is_live {
                        live_cut = Some(scan.good_end);
                    }
                }
            }
            if is_live {
                live_len = Some(scan.good_end);
            }
        }
        // Renames can nest the tree deeper than any record path may be; what lies deeper
        // could not be written back by the checkpoint below (or any later one).
        state.limit_depth();
        for (&generation, _) in gens.range(..base_gen) {
            warnings.push(format!(
                "found leftover files of superseded generation {generation} (an earlier \
                 compaction was interrupted); they go at the next read-write open"
            ));
        }
        if gens.range(base_gen + 1..).next().is_some() && !needs_repair {
            warnings.push(format!(
                "ignoring an incomplete checkpoint newer than generation {base_gen} (a \
                 compaction was interrupted)"
            ));
        }

        if self.mode != OpenMode::ReadWrite {
            self.generation = base_gen;
            self.len = live_len.unwrap_or(0) as u64;
            return Ok(Recovered {
                replayed: state,
                generation: base_gen,
                warnings,
                created: false,
                unordered_base,
            });
        }

        if needs_repair && state.root.base.is_some() {
            // A repair writes the whole recovered state as a new generation: recover again
            // with everything in memory (nothing was written yet).
            self.lazy = false;
            let again = self.recover();
            self.lazy = true;
            return again;
        }
        if needs_repair {
            let new = max_gen
                .checked_add(1)
                .ok_or(StoreError::GenerationOverflow)?;
            let snapshot = state
                .try_snapshot()
                .map_err(sys_err("reading the recovered state"))?;
            let fd = self.write_generation(new, &snapshot)?;
            self.file = Some(fd);
            self.generation = new;
            self.len = HEADER_LEN as u64;
            warnings.push(format!(
                "wrote a fresh checkpoint of the recovered state as generation {new}"
            ));
        } else {
            self.generation = base_gen;
            let name = self.name_of(Kind::Journal, base_gen)?;
            if live_needs_header {
                let fd = self.create_durable(&name, &encode_header(Kind::Journal, base_gen))?;
                self.file = Some(fd);
                self.len = HEADER_LEN as u64;
            } else {
                let fd = open_at(
                    self.dir()?,
                    &name,
                    OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
                    Mode::empty(),
                )
                .map_err(io_err(format!("opening {sd}/{name}")))?;
                let len = live_len.unwrap_or(HEADER_LEN);
                if let Some(cut) = live_cut {
                    self.stats.writes += 1;
                    sys::ftruncate(self.faults(), fd.as_fd(), cut as u64)
                        .map_err(sys_err(format!("cutting the torn batch off {sd}/{name}")))?;
                    self.sync_file(&fd, &name, false)?;
                }
                self.file = Some(fd);
                self.len = len as u64;
            }
        }

        // Everything but the live generation is now garbage, or evidence for fsck.
        let live = self.generation;
        for (&generation, files) in &gens {
            if generation == live {
                continue;
            }
            for (kind, present) in [
                (Kind::Checkpoint, files.checkpoint),
                (Kind::Journal, files.journal),
            ] {
                if !present {
                    continue;
                }
                let name = self.name_of(kind, generation)?;
                if corrupt.contains(&name) {
                    if let Some(w) = self.keep_as_corrupt(&name)? {
                        warnings.push(w);
                    }
                } else {
                    self.unlink(&name)?;
                }
            }
        }
        Ok(Recovered {
            replayed: state,
            generation: self.generation,
            warnings,
            created: false,
            unordered_base,
        })
    }

    pub(super) fn write_first_journal(&mut self) -> Result<OwnedFd, StoreError> {
        self.create_durable(
            &self.name_of(Kind::Journal, 1)?,
            &encode_header(Kind::Journal, 1),
        )
    }

    /// Renames a damaged file to `<name>.corrupt` (a new name: never a rename-over), so that
    /// fsck can look at it and it is no longer a store file. Returns a warning if it had to
    /// stay.
    pub(super) fn keep_as_corrupt(&mut self, name: &str) -> Result<Option<String>, StoreError> {
        let sd = self.layout.store_dir();
        let dir = self.dir()?.as_raw_fd();
        for n in 0..100u32 {
            let target = self.layout.corrupt_name(name, n);
            match fstatat(Some(dir), target.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(_) => continue,
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(io_err(format!("examining {sd}/{target}"))(e)),
            }
            let dir = self.dir()?.as_fd();
            sys::renameat(
                self.faults(),
                dir,
                name.as_bytes(),
                dir,
                target.as_bytes(),
                0,
            )
            .map_err(sys_err(format!("renaming {sd}/{name} to {target}")))?;
            return Ok(Some(format!("kept the damaged {sd}/{name} as {target}")));
        }
        Ok(Some(format!(
            "could not find a free *.corrupt name for {sd}/{name}; left in place"
        )))
    }
}
