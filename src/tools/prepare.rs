//! `pershome prepare [DEVICE|MOUNTPOINT|DIR]`: makes a stick ready for pershome by creating
//! its `pershome/` directory and an empty metadata store (`pershome/.pershome/`, through the
//! store's own `Journal::open`, so the bytes are exactly what a mount would write).
//!
//! This module owns choosing the target (a named device, mount point or directory, or the only
//! removable FAT/exFAT stick), the checks before writing, and the zenity front end. It never
//! formats anything, never writes anywhere but a new `pershome/` and its new store, never
//! writes to an already-prepared stick, and never follows a symlink for `pershome/`.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use crate::meta::journal::{Journal, OpenMode, StoreError};
use crate::meta::layout::{self, StoreLayout};
use crate::stick::discover::{self, Stick};
use crate::stick::layout::{find_pershome_dir, is_pershome_name, PERSHOME_DIR};
use crate::stick::mount::TempMount;
use crate::stick::mountinfo::{self, PERSHOMEFS_TYPE};
use crate::stick::StickFs;

/// Exit codes of `pershome prepare`.
pub mod exit_code {
    /// The stick is ready (prepared now, or it already was).
    pub const READY: u8 = 0;
    /// The person cancelled (in the dialogs, or by not choosing among several sticks).
    pub const CANCELLED: u8 = 1;
    /// The target cannot be used: missing, not a directory, read-only, not FAT/exFAT (without
    /// `--any-fs`), no stick found, or several found.
    pub const TARGET: u8 = 2;
    /// The stick's existing metadata store was refused (newer format, damaged: run fsck).
    pub const STORE: u8 = 3;
    /// Mounting the device failed, or an I/O error while creating.
    pub const FAILED: u8 = 4;
}

/// Why prepare did not make the stick ready.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{0}")]
    Target(String),
    #[error("{0}")]
    Store(String),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl PrepareError {
    pub fn exit_code(&self) -> u8 {
        match self {
            PrepareError::Target(_) => exit_code::TARGET,
            PrepareError::Store(_) => exit_code::STORE,
            PrepareError::Failed(_) => exit_code::FAILED,
        }
    }
}

/// What prepare found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// `pershome/` and its store were created now (`made_dir` false: the directory was there
    /// already, e.g. made on Windows, and `entries` files in it become the home's content).
    Created {
        backing: PathBuf,
        made_dir: bool,
        entries: usize,
    },
    /// The stick was prepared before; nothing was written.
    Already {
        backing: PathBuf,
        generation: u64,
        /// Recovery warnings of a read-only look at the store (advice to run fsck).
        warnings: Vec<String>,
    },
}

impl Prepared {
    pub fn backing(&self) -> &Path {
        match self {
            Prepared::Created { backing, .. } | Prepared::Already { backing, .. } => backing,
        }
    }

    /// The message for the person.
    pub fn message(&self) -> String {
        match self {
            Prepared::Created {
                backing,
                made_dir: true,
                ..
            } => format!(
                "prepared: created {} and its metadata store; log in with the stick plugged in \
                 to use it as your home",
                backing.display()
            ),
            Prepared::Created {
                backing, entries, ..
            } => format!(
                "prepared: {} was already there ({entries} entries, which become the content \
                 of your home); created its metadata store",
                backing.display()
            ),
            Prepared::Already {
                backing,
                generation,
                warnings,
            } => {
                let mut s = format!(
                    "already prepared: {} has a metadata store (generation {generation}); \
                     nothing was changed",
                    backing.display()
                );
                if !warnings.is_empty() {
                    s.push_str(&format!(
                        "\nbut its metadata needs a look ({}); run: pershome fsck {}",
                        warnings.join("; "),
                        backing.display()
                    ));
                }
                s
            }
        }
    }
}

/// Options of `prepare` beyond the target.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrepareOptions {
    /// Allow a directory on any filesystem (a plain directory, an sshfs mount of the thin
    /// client's stick, tests), not only FAT/exFAT.
    pub any_fs: bool,
    /// The naming mode of a new store (`--names 8.3`: the 8.3 layout, `meta::layout`). A stick
    /// already prepared keeps its own.
    pub names: crate::names::NameMode,
}

fn target_err(msg: impl Into<String>) -> PrepareError {
    PrepareError::Target(msg.into())
}

/// Where the stick to prepare is: a directory to work in, and the temporary mount that keeps
/// it reachable (dropped after the work).
pub struct Resolved {
    pub dir: PathBuf,
    pub device: Option<PathBuf>,
    _temp: Option<TempMount>,
}

/// Turns a command-line target into a directory: a block device is looked up in mountinfo
/// (or mounted for the moment); a directory is used as it is.
pub fn resolve(target: &Path) -> Result<Resolved, PrepareError> {
    let md =
        std::fs::metadata(target).map_err(|e| target_err(format!("{}: {e}", target.display())))?;
    if md.file_type().is_block_device() {
        return resolve_device(target);
    }
    if !md.is_dir() {
        return Err(target_err(format!(
            "{} is neither a directory nor a block device",
            target.display()
        )));
    }
    Ok(Resolved {
        dir: target.to_path_buf(),
        device: None,
        _temp: None,
    })
}

fn resolve_device(device: &Path) -> Result<Resolved, PrepareError> {
    let mounts = mountinfo::mounts().map_err(PrepareError::Failed)?;
    let canon = device
        .canonicalize()
        .map_err(|e| target_err(format!("{}: {e}", device.display())))?;
    let mounted = mounts.iter().find(|m| {
        m.root == Path::new("/")
            && Path::new(&m.source).canonicalize().ok().as_deref() == Some(&*canon)
    });
    if let Some(m) = mounted {
        return Ok(Resolved {
            dir: m.mountpoint.clone(),
            device: Some(device.to_path_buf()),
            _temp: None,
        });
    }
    let Some(fs) = discover::stick_fs_of_device(device) else {
        return Err(target_err(format!(
            "{} holds no FAT or exFAT filesystem (blkid says: {}); pershome never formats a \
             stick: format it FAT32 or exFAT on any computer first (this erases it)",
            device.display(),
            discover::fstype_of(device).unwrap_or_else(|| "nothing it knows".into())
        )));
    };
    let temp = TempMount::mount(device, fs).map_err(PrepareError::Failed)?;
    Ok(Resolved {
        dir: temp.mountpoint.clone(),
        device: Some(device.to_path_buf()),
        _temp: Some(temp),
    })
}

/// Finds the one stick to prepare when none was named. Several: the error lists them.
pub fn choose_stick() -> Result<Stick, PrepareError> {
    let mounts = mountinfo::mounts().map_err(PrepareError::Failed)?;
    let mut sticks = discover::find_sticks(&mounts);
    match sticks.len() {
        0 => Err(target_err(
            "no USB stick with a FAT or exFAT filesystem was found; plug one in, or name it: \
             pershome prepare /dev/sdX1 or pershome prepare /media/YOU/STICK",
        )),
        1 => Ok(sticks.remove(0)),
        _ => Err(target_err(format!(
            "several sticks are plugged in; name the one to prepare:\n{}",
            sticks
                .iter()
                .map(|s| format!(
                    "  pershome prepare {}    # {}",
                    s.device.display(),
                    s.describe()
                ))
                .collect::<Vec<_>>()
                .join("\n")
        ))),
    }
}

/// Resolves a chosen stick to a directory (mounting it for the moment if needed).
pub fn resolve_stick(s: &Stick) -> Result<Resolved, PrepareError> {
    match &s.mountpoint {
        Some(mp) => Ok(Resolved {
            dir: mp.clone(),
            device: Some(s.device.clone()),
            _temp: None,
        }),
        None => resolve_device(&s.device),
    }
}

/// Prepares the stick whose root (or whose `pershome/` itself) is `dir`.
pub fn prepare_dir(dir: &Path, opts: PrepareOptions) -> Result<Prepared, PrepareError> {
    let md = std::fs::metadata(dir).map_err(|e| target_err(format!("{}: {e}", dir.display())))?;
    if !md.is_dir() {
        return Err(target_err(format!("{} is not a directory", dir.display())));
    }
    let mounts = mountinfo::mounts().map_err(PrepareError::Failed)?;
    let under = mountinfo::mount_of(&mounts, dir);
    if under.is_some_and(|m| m.fstype == PERSHOMEFS_TYPE) {
        return Err(target_err(format!(
            "{} is inside a mounted pershome home; prepare the stick itself, not the home",
            dir.display()
        )));
    }
    let fs = under.and_then(discover::stick_fs_of_mount);
    if fs.is_none() && !opts.any_fs {
        return Err(target_err(format!(
            "{} is on a {} filesystem, not on a FAT or exFAT stick; to use a plain directory \
             (a thin client's stick seen through sshfs, a test), add --any-fs",
            dir.display(),
            under.map_or("unknown", |m| m.fstype.as_str())
        )));
    }
    if under.is_some_and(|m| m.read_only())
        || nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err()
    {
        return Err(target_err(format!(
            "{} is read-only (is the stick's write-protect switch on, or is it mounted \
             read-only?); nothing was changed",
            dir.display()
        )));
    }

    // The backing directory: `dir` itself if it is named pershome, else its pershome/ entry
    // in any case, else a new one.
    let named_backing = dir.file_name().is_some_and(is_pershome_name);
    let (parent, name, existing) = if named_backing {
        let canon = dir
            .canonicalize()
            .map_err(|e| PrepareError::Failed(anyhow::anyhow!("{}: {e}", dir.display())))?;
        let parent = canon.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = canon
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        (parent, name, true)
    } else {
        match find_pershome_dir(dir).map_err(|e| target_err(format!("{e:#}")))? {
            Some(p) => {
                let name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                (dir.to_path_buf(), name, true)
            }
            None => (dir.to_path_buf(), PERSHOME_DIR.into(), false),
        }
    };
    let backing = parent.join(&name);
    let parent_fd = open_dir(&parent, None).map_err(PrepareError::Failed)?;
    if !existing {
        // 0700: on a plain directory (a server, a thin client) the home is private; FAT
        // ignores the mode.
        nix::sys::stat::mkdirat(
            Some(fd_raw(&parent_fd)),
            name.as_os_str(),
            Mode::from_bits_truncate(0o700),
        )
        .map_err(|e| {
            PrepareError::Failed(anyhow::anyhow!("creating {}: {e}", backing.display()))
        })?;
        // The new entry must outlive a yank right after prepare.
        nix::unistd::fsync(fd_raw(&parent_fd)).map_err(|e| {
            PrepareError::Failed(anyhow::anyhow!("syncing {}: {e}", parent.display()))
        })?;
    }
    let backing_fd = open_dir(&parent, Some(&name)).map_err(PrepareError::Failed)?;

    // Look before writing: an existing store (even one a mount holds right now) means the
    // stick is prepared, and prepare writes nothing.
    let found = layout::detect(backing_fd.as_fd())
        .map_err(|e| PrepareError::Failed(anyhow::anyhow!("listing {}: {e}", backing.display())))?;
    let existing_layout = found.layout();
    let seen_layout = existing_layout.unwrap_or(StoreLayout::Long);
    let store_err = |e: StoreError| match e {
        StoreError::Io { .. } => PrepareError::Failed(anyhow::anyhow!(
            "the metadata store in {}: {e}",
            backing.display()
        )),
        e => PrepareError::Store(format!(
            "the metadata store in {} cannot be used: {e}; run: pershome fsck {}",
            backing.display(),
            backing.display()
        )),
    };
    let (_, seen) = Journal::open_in(backing_fd.as_fd(), OpenMode::ReadOnlyUnlocked, seen_layout)
        .map_err(store_err)?;
    if seen.generation > 0 {
        return Ok(Prepared::Already {
            backing,
            generation: seen.generation,
            warnings: seen.warnings,
        });
    }
    let entries = std::fs::read_dir(&backing)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| {
                    use std::os::unix::ffi::OsStrExt;
                    let name = e.file_name();
                    !StoreLayout::Long.is_store_dir(name.as_bytes())
                        && !StoreLayout::Short83.is_store_dir(name.as_bytes())
                })
                .count()
        })
        .unwrap_or(0);
    let new_layout = StoreLayout::for_names(opts.names);
    if existing_layout == Some(StoreLayout::Long) && new_layout == StoreLayout::Short83 {
        // An empty long store directory (an interrupted first open): nothing is recorded
        // in it, so the mode asked for now is still free; rmdir refuses anything non-empty.
        nix::unistd::unlinkat(
            Some(fd_raw(&backing_fd)),
            StoreLayout::Long.store_dir(),
            nix::unistd::UnlinkatFlags::RemoveDir,
        )
        .map_err(|e| {
            PrepareError::Failed(anyhow::anyhow!(
                "removing the empty {}/{}: {e}",
                backing.display(),
                StoreLayout::Long.store_dir()
            ))
        })?;
    }
    let (journal, rec) =
        Journal::open_in(backing_fd.as_fd(), OpenMode::ReadWrite, new_layout).map_err(store_err)?;
    drop(journal);
    if !rec.created {
        // Another prepare (or a mount) won the race; the stick is prepared all the same.
        return Ok(Prepared::Already {
            backing,
            generation: rec.generation,
            warnings: rec.warnings,
        });
    }
    Ok(Prepared::Created {
        backing,
        made_dir: !existing,
        entries,
    })
}

fn fd_raw(fd: &OwnedFd) -> std::os::fd::RawFd {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// Opens `parent` (or its entry `name`, without following a symlink) as a directory.
fn open_dir(parent: &Path, name: Option<&std::ffi::OsStr>) -> anyhow::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let (fd, shown) = match name {
        None => (
            nix::fcntl::open(parent, flags, Mode::empty()),
            parent.display().to_string(),
        ),
        Some(n) => (
            openat(
                None,
                &parent.join(n),
                flags | OFlag::O_NOFOLLOW,
                Mode::empty(),
            ),
            parent.join(n).display().to_string(),
        ),
    };
    let fd = fd.map_err(|e| match e {
        nix::errno::Errno::ELOOP => anyhow::anyhow!("{shown} is a symlink; refusing to follow it"),
        e => anyhow::anyhow!("opening {shown}: {e}"),
    })?;
    // SAFETY: open just returned this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A stick's filesystem for messages.
pub fn fs_name(fs: Option<StickFs>) -> &'static str {
    fs.map_or("directory", StickFs::human_name)
}
