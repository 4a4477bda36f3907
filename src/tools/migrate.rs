//! `pershome migrate SRC_HOME DEST`: copies an existing home into a pershome home, keeping
//! what pershome can represent (content, modes with setuid/setgid/sticky, owners, atime and
//! mtime to the nanosecond, symlinks, hard links, fifos, sockets and device nodes, xattrs and
//! ACLs), verifying each file after copying, resumable after an interruption.
//!
//! DEST is a mounted pershomefs home, or a prepared stick (its `pershome/` directory, or the
//! directory holding it): then pershomefs is mounted on a private temporary directory for the
//! copy, so every name, mode and link goes through the same mapping code as a login.
//!
//! This module owns the walk, the copy, the verification and the resume journal
//! (`DEST/.pershome-migrate`, removed when a run ends with everything verified). It never
//! writes to SRC_HOME, never follows a symlink in SRC_HOME, never deletes a file in DEST that
//! SRC_HOME does not have, and never writes to the backing except through pershomefs.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use nix::errno::Errno;
use nix::sys::stat::{Mode, SFlag};
use sha2::{Digest, Sha256};

use crate::stick::layout::find_pershome_dir;
use crate::stick::mountinfo::{self, PERSHOMEFS_TYPE};

/// The resume journal at the top of DEST: one line per verified regular file.
pub const STATE_FILE: &str = ".pershome-migrate";

/// Exit codes of `pershome migrate`.
pub mod exit_code {
    /// Everything copied and verified.
    pub const DONE: u8 = 0;
    /// Copied and verified, with things that could not be kept (listed), e.g. owners or
    /// device nodes when not run as root.
    pub const WARNINGS: u8 = 1;
    /// Verification found differences (listed); run again to retry them.
    pub const MISMATCH: u8 = 2;
    /// The stick is full: the message says how much more is needed; run again after freeing.
    pub const NO_SPACE: u8 = 3;
    /// SRC_HOME or DEST cannot be used (missing, not prepared, in use).
    pub const TARGET: u8 = 4;
    /// An I/O or mount error stopped the copy; run again to continue.
    pub const FAILED: u8 = 5;
}

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Target(String),
    #[error(
        "the stick is full: about {} more is needed ({} free now). Nothing was lost: {} was not \
         changed and what was copied stays on the stick. Free space on the stick (or use a \
         bigger one), then run the same command again: it continues where it stopped",
        human(*needed), human(*available), src.display()
    )]
    NoSpace {
        needed: u64,
        available: u64,
        src: PathBuf,
    },
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl MigrateError {
    pub fn exit_code(&self) -> u8 {
        match self {
            MigrateError::Target(_) => exit_code::TARGET,
            MigrateError::NoSpace { .. } => exit_code::NO_SPACE,
            MigrateError::Failed(_) => exit_code::FAILED,
        }
    }
}

/// Bytes in words (binary units, one decimal).
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Options of `migrate`.
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// Show a progress bar on stderr (the CLI sets it when stderr is a terminal).
    pub progress: bool,
    /// Start even when the free space looks too small (the copy still stops cleanly at ENOSPC).
    pub no_space_check: bool,
    /// The pershomefs binary for a stick DEST (default: next to this program, else PATH).
    pub pershomefs: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    pub files_copied: u64,
    pub files_skipped: u64,
    pub bytes_copied: u64,
    pub bytes_resumed: u64,
    /// Things that could not be kept (owners, device nodes, xattr namespaces), one line each.
    pub warnings: Vec<String>,
    /// Differences found by verification, one line each.
    pub mismatches: Vec<String>,
}

impl Summary {
    pub fn exit_code(&self) -> u8 {
        if !self.mismatches.is_empty() {
            exit_code::MISMATCH
        } else if !self.warnings.is_empty() {
            exit_code::WARNINGS
        } else {
            exit_code::DONE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small syscall helpers (xattrs and *at calls on paths, never following symlinks)
// ---------------------------------------------------------------------------------------------

fn cpath(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("{p:?} contains a NUL byte"))
}

fn xattr_names(p: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let c = cpath(p).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: c is a valid C string; buf is writable for its length.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

fn xattr_get(p: &Path, name: &[u8]) -> std::io::Result<Vec<u8>> {
    let c = cpath(p).map_err(std::io::Error::other)?;
    let n = CString::new(name).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: valid C strings; buf is writable for its length.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

fn xattr_set(p: &Path, name: &[u8], value: &[u8]) -> std::io::Result<()> {
    let c = cpath(p).map_err(std::io::Error::other)?;
    let n = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: valid C strings; value is readable for its length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_times(p: &Path, md: &std::fs::Metadata) -> nix::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let at = TimeSpec::new(md.atime(), md.atime_nsec());
    let mt = TimeSpec::new(md.mtime(), md.mtime_nsec());
    utimensat(None, p, &at, &mt, UtimensatFlags::NoFollowSymlink)
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

// ---------------------------------------------------------------------------------------------
// DEST: a mounted home, or a stick mounted for the copy
// ---------------------------------------------------------------------------------------------

/// pershomefs mounted by migrate over a stick's backing, in the foreground as a child that
/// the kernel ends (SIGTERM: a clean unmount) if migrate dies, so a killed migrate leaves no
/// mount behind and the next run can mount the stick again.
struct ChildMount {
    child: Child,
    mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildMount {
    fn start(bin: &Path, backing: &Path, uid: Option<(u32, u32)>) -> anyhow::Result<ChildMount> {
        let dir = tempfile::Builder::new()
            .prefix("pershome-migrate.")
            .tempdir()
            .context("creating a temporary mount point")?;
        let mp = dir.path().canonicalize().context("temporary mount point")?;
        let mut cmd = crate::exec::command(bin);
        cmd.arg(backing).arg(&mp).arg("-f");
        if let Some((u, g)) = uid {
            cmd.arg("-o").arg(format!("uid={u},gid={g}"));
        }
        // The daemon's messages go to a file, not a pipe: if migrate is killed, a pipe
        // without a reader would make the daemon's last log lines (its unmount) fail.
        let mut log = tempfile::tempfile().context("creating a log file for pershomefs")?;
        let log_w = log.try_clone().context("log file")?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_w));
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut m = ChildMount {
            child,
            mountpoint: mp,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = mountinfo::mounts()?
                .iter()
                .any(|e| e.mountpoint == m.mountpoint && e.fstype == PERSHOMEFS_TYPE);
            if up {
                return Ok(m);
            }
            if let Some(status) = m.child.try_wait().context("waiting for pershomefs")? {
                let mut err = String::new();
                let _ = log.seek(SeekFrom::Start(0));
                let _ = log.read_to_string(&mut err);
                return Err(anyhow!(
                    "pershomefs could not mount {} ({status}): {}",
                    backing.display(),
                    err.trim()
                ));
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "pershomefs did not mount {} within 30 s",
                    backing.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildMount {
    fn drop(&mut self) {
        // SIGTERM is the daemon's clean unmount; it exits after its last commit, which must
        // be on the stick before migrate says it is done.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn pershomefs_binary(opt: &Option<PathBuf>) -> PathBuf {
    if let Some(p) = opt {
        // Run by absolute path (`crate::exec`): a relative one is made absolute here.
        return std::path::absolute(p).unwrap_or_else(|_| p.clone());
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("pershomefs");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("/usr/bin/pershomefs")
}

/// Where the copy goes: the home's root directory, and the mount migrate made, if any.
struct Dest {
    root: PathBuf,
    _mount: Option<ChildMount>,
}

fn resolve_dest(
    dest: &Path,
    src_md: &std::fs::Metadata,
    opts: &MigrateOptions,
) -> Result<Dest, MigrateError> {
    let t = dest
        .canonicalize()
        .map_err(|e| MigrateError::Target(format!("{}: {e}", dest.display())))?;
    let mounts = mountinfo::mounts().map_err(MigrateError::Failed)?;
    if mounts
        .iter()
        .any(|m| m.mountpoint == t && m.fstype == PERSHOMEFS_TYPE)
    {
        return Ok(Dest {
            root: t,
            _mount: None,
        });
    }
    if mountinfo::mount_of(&mounts, &t).is_some_and(|m| m.fstype == PERSHOMEFS_TYPE) {
        return Err(MigrateError::Target(format!(
            "{} is inside a pershome home; give the home's top directory (its mount point)",
            t.display()
        )));
    }
    let has_store =
        |dir: &Path| crate::meta::layout::find_store(dir).is_some_and(|(store, _)| store.is_dir());
    let backing = if has_store(&t) {
        t
    } else {
        match find_pershome_dir(&t).map_err(|e| MigrateError::Target(format!("{e:#}")))? {
            Some(b) if has_store(&b) => b,
            _ => {
                return Err(MigrateError::Target(format!(
                    "{} is not a prepared stick or a mounted pershome home; prepare the stick \
                     first: pershome prepare {}",
                    t.display(),
                    t.display()
                )))
            }
        }
    };
    // Refuse at once rather than after the store's lock wait: a home mounted from this stick
    // is where the copy should go instead. A daemon that is only finishing its last commit
    // (its home just unmounted, or an interrupted migrate's) holds the store for a moment:
    // the mount below waits for it, as every mount does.
    let homes = crate::tools::status::homes_over(&backing)
        .map_err(|e| MigrateError::Target(format!("{e:#}")))?;
    if let Some(home) = homes.first() {
        return Err(MigrateError::Target(format!(
            "{}: the stick is in use, mounted as a home on {}; migrate into that home \
             instead, or log out first",
            backing.display(),
            home.display()
        )));
    }
    // As root, the home is mounted for the owner of SRC_HOME, so that their files are stored
    // as the stick owner's (docs/format.md: OWNER_ID).
    let uid = nix::unistd::geteuid()
        .is_root()
        .then(|| (src_md.uid(), src_md.gid()));
    // As root (an administrator migrating a user's home), the stick is also claimed for that
    // user with this site's key, so the login hook opens it as their home
    // (docs/security.md). A user migrating their own home cannot claim (the key is root's):
    // a stick that was fresh gets its claim at the first login, before the copy.
    if uid.is_some() {
        let key_path = Path::new("/").join(crate::session::claim::KEY_PATH);
        match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(src_md.uid()))
            .ok()
            .flatten()
        {
            // No site key (pershome-config claim-key makes one; the package does at install):
            // nothing to claim with.
            _ if !key_path.exists() => tracing::warn!(
                "{} does not exist: the stick is not claimed (pershome-config claim)",
                key_path.display()
            ),
            Some(owner) => crate::session::claim::SiteKey::load(Path::new("/"), false)
                .and_then(|key| crate::session::claim::write_claim(&backing, &owner.name, &key))
                .map_err(MigrateError::Failed)?,
            None => tracing::warn!(
                "the home's owner (uid {}) is no user here: the stick is not claimed",
                src_md.uid()
            ),
        }
    }
    let m =
        ChildMount::start(&pershomefs_binary(&opts.pershomefs), &backing, uid).map_err(|e| {
            if format!("{e:#}").contains("in use") {
                MigrateError::Target(format!(
                    "{}: the stick is in use (mounted as a home?); migrate into the mounted home \
                 instead, or log out first ({e:#})",
                    backing.display()
                ))
            } else {
                MigrateError::Failed(e)
            }
        })?;
    Ok(Dest {
        root: m.mountpoint.clone(),
        _mount: Some(m),
    })
}

// ---------------------------------------------------------------------------------------------
// Resume journal
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct Done {
    size: u64,
    mtime: (i64, i64),
    sha256: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reads the resume journal; a torn or foreign line is ignored (that file is checked again).
fn read_state(path: &Path) -> HashMap<Vec<u8>, Done> {
    let mut m = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return m;
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 6 || f[0] != "v1" {
            continue;
        }
        let (Some(p), Ok(size), Ok(s), Ok(ns)) =
            (unhex(f[1]), f[2].parse(), f[3].parse(), f[4].parse())
        else {
            continue;
        };
        if f[5].len() != 64 {
            continue;
        }
        m.insert(
            p,
            Done {
                size,
                mtime: (s, ns),
                sha256: f[5].to_owned(),
            },
        );
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Progress
// ---------------------------------------------------------------------------------------------

struct Progress {
    enabled: bool,
    total: u64,
    done: u64,
    last: Instant,
}

impl Progress {
    fn tick(&mut self, force: bool) {
        if !self.enabled || (!force && self.last.elapsed() < Duration::from_millis(100)) {
            return;
        }
        self.last = Instant::now();
        let frac = if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        };
        let width = 30usize;
        let filled = ((frac * width as f64) as usize).min(width);
        eprint!(
            "\r[{}{}] {:3.0}%  {} / {}   ",
            "#".repeat(filled),
            ".".repeat(width - filled),
            frac * 100.0,
            human(self.done),
            human(self.total)
        );
    }

    fn finish(&mut self) {
        if self.enabled {
            self.tick(true);
            eprintln!();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The copy
// ---------------------------------------------------------------------------------------------

struct Run<'a> {
    src: &'a Path,
    dest: &'a Path,
    state: HashMap<Vec<u8>, Done>,
    state_file: File,
    /// Source hard links: (dev, ino) → the relative path of the first name copied.
    links: HashMap<(u64, u64), PathBuf>,
    summary: Summary,
    progress: Progress,
    warned_owner: bool,
    /// Content bytes of regular files not yet done, for the "how much more" of ENOSPC.
    remaining: u64,
}

/// Copies SRC_HOME into DEST; see the module documentation.
pub fn migrate(src: &Path, dest: &Path, opts: &MigrateOptions) -> Result<Summary, MigrateError> {
    let src_md = std::fs::symlink_metadata(src)
        .map_err(|e| MigrateError::Target(format!("{}: {e}", src.display())))?;
    if !src_md.is_dir() {
        return Err(MigrateError::Target(format!(
            "{} is not a directory",
            src.display()
        )));
    }
    let dest = resolve_dest(dest, &src_md, opts)?;
    let root = dest.root.clone();
    let state_path = root.join(STATE_FILE);
    let state = read_state(&state_path);
    let state_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&state_path)
        .map_err(|e| {
            if is_enospc(&e) {
                MigrateError::NoSpace {
                    needed: src_md.size(),
                    available: free_space(&root),
                    src: src.to_path_buf(),
                }
            } else {
                MigrateError::Failed(anyhow!("creating {}: {e}", state_path.display()))
            }
        })?;

    // The scan gives the progress bar its total and the space check its figure.
    let mut total = 0u64;
    let mut pending = 0u64;
    scan(src, Path::new(""), &state, &mut total, &mut pending).map_err(MigrateError::Failed)?;
    let available = free_space(&root);
    if !opts.no_space_check && pending > available {
        return Err(MigrateError::NoSpace {
            needed: pending - available,
            available,
            src: src.to_path_buf(),
        });
    }

    let mut run = Run {
        src,
        dest: &root,
        state,
        state_file,
        links: HashMap::new(),
        summary: Summary::default(),
        progress: Progress {
            enabled: opts.progress,
            total,
            done: 0,
            last: Instant::now() - Duration::from_secs(1),
        },
        warned_owner: false,
        remaining: pending,
    };
    let result = run.copy_dir(Path::new(""), &src_md);
    run.progress.finish();
    result?;
    let summary = std::mem::take(&mut run.summary);
    drop(run);
    if summary.mismatches.is_empty() {
        // Everything is verified: the journal has done its job.
        let _ = std::fs::remove_file(&state_path);
    }
    Ok(summary)
}

fn free_space(p: &Path) -> u64 {
    nix::sys::statvfs::statvfs(p)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0)
}

/// Adds up the content to copy: all of it (for the bar), and what is not yet done.
fn scan(
    src: &Path,
    rel: &Path,
    state: &HashMap<Vec<u8>, Done>,
    total: &mut u64,
    pending: &mut u64,
) -> anyhow::Result<()> {
    let dir = src.join(rel);
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let r = rel.join(e.file_name());
        let md = e
            .metadata()
            .with_context(|| format!("examining {}", src.join(&r).display()))?;
        if md.is_dir() {
            scan(src, &r, state, total, pending)?;
        } else if md.is_file() {
            *total += md.size();
            let done = state
                .get(r.as_os_str().as_bytes())
                .is_some_and(|d| d.size == md.size() && d.mtime == (md.mtime(), md.mtime_nsec()));
            if !done {
                *pending += md.size();
            }
        }
    }
    Ok(())
}

impl Run<'_> {
    fn no_space(&self, extra: u64) -> MigrateError {
        MigrateError::NoSpace {
            needed: self.remaining.saturating_add(extra).max(1),
            available: free_space(self.dest),
            src: self.src.to_path_buf(),
        }
    }

    fn io(&self, what: &str, rel: &Path, e: std::io::Error) -> MigrateError {
        if is_enospc(&e) {
            return self.no_space(0);
        }
        MigrateError::Failed(anyhow!("{what} {}: {e}", rel.display()))
    }

    fn warn(&mut self, msg: String) {
        self.summary.warnings.push(msg);
    }

    fn copy_dir(&mut self, rel: &Path, md: &std::fs::Metadata) -> Result<(), MigrateError> {
        let s = self.src.join(rel);
        let d = self.dest.join(rel);
        if !rel.as_os_str().is_empty() {
            match std::fs::symlink_metadata(&d) {
                // A directory an earlier run finished may have lost its owner-write bit
                // (its final mode); new entries need it until this directory's mode is set
                // again below.
                Ok(m) if m.is_dir() && m.mode() & 0o700 != 0o700 => {
                    let open = Mode::from_bits_truncate((m.mode() | 0o700) & 0o7777);
                    nix::sys::stat::fchmodat(
                        None,
                        &d,
                        open,
                        nix::sys::stat::FchmodatFlags::FollowSymlink,
                    )
                    .map_err(|e| self.io("opening up", rel, e.into()))?;
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    std::fs::remove_file(&d).map_err(|e| self.io("replacing", rel, e))?;
                    self.mkdir(rel, &d)?;
                }
                Err(_) => self.mkdir(rel, &d)?,
            }
        }
        let mut entries: Vec<(OsString, std::fs::Metadata)> = Vec::new();
        for e in std::fs::read_dir(&s)
            .map_err(|e| MigrateError::Failed(anyhow!("listing {}: {e}", s.display())))?
        {
            let e = e.map_err(|e| MigrateError::Failed(anyhow!("listing {}: {e}", s.display())))?;
            // A live home changes under the copy: an entry gone since the listing is skipped.
            let m = match e.metadata() {
                Ok(m) => m,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(MigrateError::Failed(anyhow!(
                        "examining {}: {err}",
                        e.path().display()
                    )))
                }
            };
            entries.push((e.file_name(), m));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, m) in entries {
            let r = rel.join(&name);
            if rel.as_os_str().is_empty() && name == STATE_FILE {
                self.warn(format!(
                    "{}: skipped (the name of migrate's own journal)",
                    r.display()
                ));
                continue;
            }
            self.summary.entries += 1;
            let ft = m.file_type();
            if ft.is_dir() {
                self.copy_dir(&r, &m)?;
            } else {
                self.copy_leaf(&r, &m)?;
            }
        }
        // A directory's own metadata last: creating its entries moved its times.
        self.apply_meta(rel, md)?;
        self.verify_meta(rel, md);
        Ok(())
    }

    fn mkdir(&mut self, rel: &Path, d: &Path) -> Result<(), MigrateError> {
        std::fs::create_dir(d).map_err(|e| self.io("creating directory", rel, e))
    }

    fn copy_leaf(&mut self, rel: &Path, md: &std::fs::Metadata) -> Result<(), MigrateError> {
        let d = self.dest.join(rel);
        let ft = md.file_type();
        let existing = std::fs::symlink_metadata(&d).ok();

        // A further name of a hard-linked source file: link it to the first name copied.
        if md.nlink() > 1 && !ft.is_dir() {
            let key = (md.dev(), md.ino());
            if let Some(first) = self.links.get(&key).cloned() {
                let fd = self.dest.join(&first);
                let same = match (&existing, std::fs::symlink_metadata(&fd)) {
                    (Some(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                    _ => false,
                };
                if !same {
                    if existing.is_some() {
                        std::fs::remove_file(&d).map_err(|e| self.io("replacing", rel, e))?;
                    }
                    std::fs::hard_link(&fd, &d).map_err(|e| self.io("linking", rel, e))?;
                }
                if ft.is_file() {
                    self.progress.done += md.size();
                    self.progress.tick(false);
                }
                return Ok(());
            }
            self.links.insert(key, rel.to_path_buf());
        }

        if ft.is_file() {
            self.copy_file(rel, md, existing)?;
        } else {
            // Anything but a matching node is replaced; never a directory (SRC has a file here).
            if let Some(e) = &existing {
                if e.is_dir() {
                    return Err(MigrateError::Failed(anyhow!(
                        "{}: a directory on the stick where the home has a {}; move it away and run again",
                        rel.display(),
                        kind_word(md)
                    )));
                }
            }
            if ft.is_symlink() {
                let target = std::fs::read_link(self.src.join(rel)).map_err(|e| {
                    MigrateError::Failed(anyhow!("reading link {}: {e}", rel.display()))
                })?;
                let keep = existing
                    .as_ref()
                    .is_some_and(|e| e.file_type().is_symlink())
                    && std::fs::read_link(&d).ok().as_ref() == Some(&target);
                if !keep {
                    if existing.is_some() {
                        std::fs::remove_file(&d).map_err(|e| self.io("replacing", rel, e))?;
                    }
                    std::os::unix::fs::symlink(&target, &d)
                        .map_err(|e| self.io("creating symlink", rel, e))?;
                }
            } else {
                let keep = existing.as_ref().is_some_and(|e| {
                    e.mode() & libc::S_IFMT == md.mode() & libc::S_IFMT && e.rdev() == md.rdev()
                });
                if !keep {
                    if existing.is_some() {
                        std::fs::remove_file(&d).map_err(|e| self.io("replacing", rel, e))?;
                    }
                    let kind = SFlag::from_bits_truncate(md.mode() & libc::S_IFMT);
                    let perm = Mode::from_bits_truncate(md.mode() & 0o7777);
                    match nix::sys::stat::mknod(&d, kind, perm, md.rdev()) {
                        Ok(()) => {}
                        Err(Errno::EPERM) => {
                            self.warn(format!(
                                "{}: a {} cannot be created without root; not copied",
                                rel.display(),
                                kind_word(md)
                            ));
                            return Ok(());
                        }
                        Err(e) => return Err(self.io("creating", rel, e.into())),
                    }
                }
            }
            self.apply_meta(rel, md)?;
            self.verify_meta(rel, md);
        }
        Ok(())
    }

    fn copy_file(
        &mut self,
        rel: &Path,
        md: &std::fs::Metadata,
        existing: Option<std::fs::Metadata>,
    ) -> Result<(), MigrateError> {
        let key = rel.as_os_str().as_bytes().to_vec();
        let d = self.dest.join(rel);
        let size = md.size();
        let mtime = (md.mtime(), md.mtime_nsec());
        // Verified in an earlier run, and neither side has changed since.
        if let (Some(done), Some(e)) = (self.state.get(&key), &existing) {
            if done.size == size
                && done.mtime == mtime
                && e.is_file()
                && e.size() == size
                && (e.mtime(), e.mtime_nsec()) == mtime
            {
                self.summary.files_skipped += 1;
                self.progress.done += size;
                self.progress.tick(false);
                return Ok(());
            }
        }
        if existing.as_ref().is_some_and(|e| !e.is_file()) {
            let e = existing.as_ref().map(|e| e.is_dir()).unwrap_or(false);
            if e {
                return Err(MigrateError::Failed(anyhow!(
                    "{}: a directory on the stick where the home has a file; move it away and run again",
                    rel.display()
                )));
            }
            std::fs::remove_file(&d).map_err(|e| self.io("replacing", rel, e))?;
        }
        // A file that vanished or cannot be read (another user's, without root) is reported
        // and the copy goes on: one unreadable file must not stop a whole home.
        let mut input = match File::open(self.src.join(rel)) {
            Ok(f) => f,
            Err(e) => {
                self.warn(format!("{}: not copied: {e}", rel.display()));
                self.remaining = self.remaining.saturating_sub(size);
                return Ok(());
            }
        };
        let mut out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&d)
            .map_err(|e| self.io("creating", rel, e))?;
        let mut hasher = Sha256::new();
        // Resume a partial file: keep the prefix already on the stick if it matches.
        let have = out.metadata().map(|m| m.size()).unwrap_or(0);
        let mut start = 0u64;
        if have > 0 && have <= size {
            let a = hash_prefix(&mut input, have).map_err(|e| self.io("reading", rel, e))?;
            let b = hash_prefix(&mut out, have).map_err(|e| self.io("reading back", rel, e))?;
            if a.0.clone().finalize() == b.0.finalize() {
                hasher = a.0;
                start = have;
            }
        }
        if start == size && size > 0 {
            // All there from an earlier run whose journal line was lost (or a complete run
            // whose journal was removed): only metadata and verification remain.
            self.summary.files_skipped += 1;
        } else if start == 0 {
            input
                .seek(SeekFrom::Start(0))
                .map_err(|e| self.io("reading", rel, e))?;
            out.set_len(0).map_err(|e| self.io("truncating", rel, e))?;
            self.summary.files_copied += 1;
        } else {
            self.summary.bytes_resumed += start;
            self.summary.files_copied += 1;
        }
        out.seek(SeekFrom::Start(start))
            .map_err(|e| self.io("seeking", rel, e))?;
        self.progress.done += start;
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = start;
        loop {
            let n = input
                .read(&mut buf)
                .map_err(|e| self.io("reading", rel, e))?;
            if n == 0 {
                break;
            }
            if let Err(e) = out.write_all(&buf[..n]) {
                // What could not be written, plus the rest still to come.
                return Err(if is_enospc(&e) {
                    self.no_space(0)
                } else {
                    self.io("writing", rel, e)
                });
            }
            hasher.update(&buf[..n]);
            pos += n as u64;
            self.summary.bytes_copied += n as u64;
            self.progress.done += n as u64;
            self.remaining = self.remaining.saturating_sub(n as u64);
            self.progress.tick(false);
        }
        out.sync_all().map_err(|e| self.io("syncing", rel, e))?;
        if pos != size {
            self.summary.mismatches.push(format!(
                "{}: changed while being copied ({size} bytes before, {pos} read); run again",
                rel.display()
            ));
        }
        let want = hex(&hasher.finalize());
        drop(out);
        self.apply_meta(rel, md)?;
        // Read back what the stick now holds, past the page cache.
        let got = match File::open(&d).and_then(|mut f| {
            // SAFETY: fadvise on a descriptor we own; only drops clean cached pages.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            hash_prefix(&mut f, u64::MAX)
        }) {
            Ok((h, _)) => hex(&h.finalize()),
            Err(e) => return Err(self.io("reading back", rel, e)),
        };
        if got != want {
            self.summary.mismatches.push(format!(
                "{}: content differs after copying (sha256 {want} expected, {got} read back)",
                rel.display()
            ));
            return Ok(());
        }
        if self.verify_meta(rel, md) {
            let line = format!("v1 {} {size} {} {} {want}\n", hex(&key), mtime.0, mtime.1);
            if let Err(e) = self.state_file.write_all(line.as_bytes()) {
                return Err(self.io("recording progress of", rel, e));
            }
        }
        Ok(())
    }

    /// Owner, xattrs (ACLs included), mode, then times (each step may move ctime/mtime).
    fn apply_meta(&mut self, rel: &Path, md: &std::fs::Metadata) -> Result<(), MigrateError> {
        let d = self.dest.join(rel);
        let is_link = md.file_type().is_symlink();
        let cur = std::fs::symlink_metadata(&d).map_err(|e| self.io("examining", rel, e))?;
        if (cur.uid(), cur.gid()) != (md.uid(), md.gid()) {
            let r = nix::unistd::fchownat(
                None,
                &d,
                Some(nix::unistd::Uid::from_raw(md.uid())),
                Some(nix::unistd::Gid::from_raw(md.gid())),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
            match r {
                Ok(()) => {}
                Err(Errno::EPERM) => {
                    if !self.warned_owner {
                        self.warned_owner = true;
                        self.warn(format!(
                            "owners: files owned by others (first: {}, uid {} gid {}) keep your \
                             ownership; run as root to keep every owner",
                            rel.display(),
                            md.uid(),
                            md.gid()
                        ));
                    }
                }
                Err(e) => return Err(self.io("changing the owner of", rel, e.into())),
            }
        }
        if !is_link {
            let s = self.src.join(rel);
            let names = xattr_names(&s).map_err(|e| {
                MigrateError::Failed(anyhow!("listing xattrs of {}: {e}", s.display()))
            })?;
            for n in names {
                let v = match xattr_get(&s, &n) {
                    Ok(v) => v,
                    Err(e) => {
                        self.warn(format!(
                            "{}: xattr {} unreadable: {e}",
                            rel.display(),
                            String::from_utf8_lossy(&n)
                        ));
                        continue;
                    }
                };
                if xattr_get(&d, &n).ok().as_ref() == Some(&v) {
                    continue;
                }
                if let Err(e) = xattr_set(&d, &n, &v) {
                    if is_enospc(&e) {
                        return Err(self.no_space(0));
                    }
                    self.warn(format!(
                        "{}: xattr {} not kept: {e}",
                        rel.display(),
                        String::from_utf8_lossy(&n)
                    ));
                }
            }
            let r = nix::sys::stat::fchmodat(
                None,
                &d,
                Mode::from_bits_truncate(md.mode() & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            );
            if let Err(e) = r {
                return Err(self.io("changing the mode of", rel, e.into()));
            }
        }
        set_times(&d, md).map_err(|e| self.io("setting the times of", rel, e.into()))?;
        Ok(())
    }

    /// Compares the copy's metadata with the source's; differences go to the summary.
    /// Returns whether everything matched.
    fn verify_meta(&mut self, rel: &Path, md: &std::fs::Metadata) -> bool {
        let d = self.dest.join(rel);
        let got = match std::fs::symlink_metadata(&d) {
            Ok(g) => g,
            Err(e) => {
                self.summary
                    .mismatches
                    .push(format!("{}: missing after copying: {e}", rel.display()));
                return false;
            }
        };
        let mut diffs = Vec::new();
        if got.mode() & libc::S_IFMT != md.mode() & libc::S_IFMT {
            diffs.push(format!("type {} expected", kind_word(md)));
        }
        if !md.file_type().is_symlink() && got.mode() & 0o7777 != md.mode() & 0o7777 {
            diffs.push(format!(
                "mode {:o} expected, {:o} got",
                md.mode() & 0o7777,
                got.mode() & 0o7777
            ));
        }
        if !self.warned_owner && (got.uid(), got.gid()) != (md.uid(), md.gid()) {
            diffs.push(format!(
                "owner {}:{} expected, {}:{} got",
                md.uid(),
                md.gid(),
                got.uid(),
                got.gid()
            ));
        }
        if md.is_file() && got.size() != md.size() {
            diffs.push(format!("size {} expected, {} got", md.size(), got.size()));
        }
        if (got.mtime(), got.mtime_nsec()) != (md.mtime(), md.mtime_nsec()) {
            diffs.push(format!(
                "mtime {}.{:09} expected, {}.{:09} got",
                md.mtime(),
                md.mtime_nsec(),
                got.mtime(),
                got.mtime_nsec()
            ));
        }
        if md.file_type().is_symlink() {
            let a = std::fs::read_link(self.src.join(rel)).ok();
            let b = std::fs::read_link(&d).ok();
            if a != b {
                diffs.push(format!("link target {a:?} expected, {b:?} got"));
            }
        } else if let Ok(names) = xattr_names(&self.src.join(rel)) {
            for n in names {
                let a = xattr_get(&self.src.join(rel), &n).ok();
                if a.is_some() && xattr_get(&d, &n).ok() != a {
                    let shown = String::from_utf8_lossy(&n).into_owned();
                    // An xattr already reported as not kept is a warning, not a mismatch.
                    if !self
                        .summary
                        .warnings
                        .iter()
                        .any(|w| w.contains(&format!("xattr {shown} ")))
                    {
                        diffs.push(format!("xattr {shown} differs"));
                    }
                }
            }
        }
        if diffs.is_empty() {
            true
        } else {
            self.summary
                .mismatches
                .push(format!("{}: {}", rel.display(), diffs.join(", ")));
            false
        }
    }
}

fn kind_word(md: &std::fs::Metadata) -> &'static str {
    let ft = md.file_type();
    if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "file"
    }
}

/// Hashes up to `len` bytes from the start of `f`; leaves the position after them.
fn hash_prefix(f: &mut File, len: u64) -> std::io::Result<(Sha256, u64)> {
    f.seek(SeekFrom::Start(0))?;
    let mut h = Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        left -= n as u64;
        n_total += n as u64;
    }
    Ok((h, n_total))
}

/// Whether stderr shows a progress bar by default.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_lines_round_trip_and_torn_lines_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        let key = b"a:b/\xff?".to_vec();
        let line = format!("v1 {} 12 34 56 {}\nv1 6162 1", hex(&key), "ab".repeat(32));
        std::fs::write(&p, line).expect("write");
        let got = read_state(&p);
        assert_eq!(got.len(), 1, "got {got:?}");
        assert_eq!(
            got.get(&key),
            Some(&Done {
                size: 12,
                mtime: (34, 56),
                sha256: "ab".repeat(32)
            })
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
