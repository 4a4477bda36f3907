//! `pershome status [--json] [TARGET]`: what is mounted (pershomefs mounts, for which user,
//! over which backing directory on which stick), the last commit of each store, and whether
//! the stick may be pulled out now.
//!
//! This module owns that report. It never writes: the store is read with
//! `OpenMode::ReadOnlyUnlocked` (no lock, so a mount is never disturbed), and the writer check
//! takes and at once drops a non-blocking shared `flock`, which writes nothing.

use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::meta::journal::{Journal, OpenMode};
use crate::meta::layout::{find_store, StoreFile, StoreLayout};

/// Whether `dir` holds a store directory of either layout.
fn has_store(dir: &Path) -> bool {
    find_store(dir).is_some_and(|(store, _)| store.is_dir())
}
use crate::stick::discover;
use crate::stick::layout::{find_pershome_dir, is_pershome_name};
use crate::stick::mountinfo::{self, MountEntry, PERSHOMEFS_TYPE};

/// Exit codes of `pershome status`.
pub mod exit_code {
    /// Shown; every stick shown may be removed now (or there is nothing to show).
    pub const SAFE: u8 = 0;
    /// Some stick is in use (mounted home, daemon still writing, stick filesystem mounted).
    pub const IN_USE: u8 = 1;
    /// TARGET is not a pershome backing, stick or home, or cannot be read.
    pub const TARGET: u8 = 2;
    /// Nothing is in use, but a store needs attention (`pershome fsck`).
    pub const STORE: u8 = 3;
}

/// A pershomefs mount over a backing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeMount {
    pub mountpoint: PathBuf,
    /// The owner the home shows (the user it was mounted for), if the mount answers.
    pub user: Option<String>,
    pub uid: Option<u32>,
    pub read_only: bool,
}

/// What a read-only look at a store found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreState {
    /// 0: no store (not prepared).
    pub generation: u64,
    /// Modification time of the live journal: when the last batch was committed.
    pub last_commit: Option<SystemTime>,
    /// Recovery warnings (torn tail after a yank, damage); empty after a clean unmount.
    pub warnings: Vec<String>,
}

/// Whether the stick may be pulled out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    Safe,
    /// Still mounted as a home (or a daemon is still writing its last commit).
    InUse(String),
    /// Only the stick's own filesystem is still mounted: unmount (eject) it first.
    UnmountFirst(PathBuf),
}

/// The status of one backing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingStatus {
    pub backing: PathBuf,
    pub homes: Vec<HomeMount>,
    pub store: std::result::Result<StoreState, String>,
    /// A process (a pershomefs daemon) holds the store's write lock.
    pub writer_active: bool,
    /// The device of the filesystem holding the backing (`/dev/sdb1`), if a device.
    pub device: Option<String>,
    pub device_fstype: Option<String>,
    pub device_mountpoint: Option<PathBuf>,
    /// The device is removable (a stick) rather than a fixed disk.
    pub removable: bool,
    pub removal: Removal,
}

impl BackingStatus {
    /// "clean", "dirty" (in use: changes may be in memory) or "needs-fsck".
    pub fn state_word(&self) -> &'static str {
        match &self.store {
            Err(_) => "needs-fsck",
            Ok(_) if !self.homes.is_empty() || self.writer_active => "dirty",
            Ok(s) if !s.warnings.is_empty() => "needs-fsck",
            Ok(_) => "clean",
        }
    }
}

/// The backing directory of a pershomefs mount: its mountinfo source when that is a backing
/// (the default `fsname`), else the daemon's command line (`pershomefs BACKING MOUNTPOINT`).
fn backing_of_mount(m: &MountEntry) -> Option<PathBuf> {
    let src = Path::new(&m.source);
    if src.is_absolute() && has_store(src) {
        return Some(src.to_path_buf());
    }
    let want = m.mountpoint.as_os_str().as_bytes();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if !args.first().is_some_and(|a| a.ends_with(b"pershomefs")) {
            continue;
        }
        let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
        let positional: Vec<&[u8]> = args[1..]
            .iter()
            .copied()
            .filter(|a| !a.is_empty() && !a.starts_with(b"-"))
            .collect();
        for pair in positional.windows(2) {
            let mp = cwd.join(std::ffi::OsStr::from_bytes(pair[1]));
            if mp.as_os_str().as_bytes() == want
                || mp.canonicalize().ok() == Some(m.mountpoint.clone())
            {
                return Some(cwd.join(std::ffi::OsStr::from_bytes(pair[0])));
            }
        }
    }
    None
}

/// The mount points of the pershomefs homes mounted over `backing` now.
pub fn homes_over(backing: &Path) -> Result<Vec<PathBuf>> {
    Ok(home_mounts(&mountinfo::mounts()?, &canon(backing))
        .map(|m| m.mountpoint.clone())
        .collect())
}

/// The pershomefs mounts among `mounts` whose backing is `backing` (canonical).
fn home_mounts<'a>(
    mounts: &'a [MountEntry],
    backing: &'a Path,
) -> impl Iterator<Item = &'a MountEntry> + 'a {
    mounts
        .iter()
        .filter(|m| m.fstype == PERSHOMEFS_TYPE)
        .filter(move |m| backing_of_mount(m).map(|b| canon(&b)).as_deref() == Some(backing))
}

fn canon(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// Reads a store without its lock and finds when it was last committed.
pub fn store_state(backing: &Path) -> std::result::Result<StoreState, String> {
    let dir = nix::fcntl::open(
        backing,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("opening {}: {e}", backing.display()))?;
    // SAFETY: open just returned this descriptor; nobody else owns it.
    let dir = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dir) };
    let (store, layout) = find_store(backing).unwrap_or_else(|| {
        (
            backing.join(StoreLayout::Long.store_dir()),
            StoreLayout::Long,
        )
    });
    let (_, rec) = Journal::open_in(
        std::os::fd::AsFd::as_fd(&dir),
        OpenMode::ReadOnlyUnlocked,
        layout,
    )
    .map_err(|e| e.to_string())?;
    let journal = layout
        .store_file(StoreFile::Journal, rec.generation)
        .map(|name| store.join(name));
    // On a `msdos` mount the name is found in any case; elsewhere a lower-cased copy of an
    // 8.3 stick shows no commit time, which is all that is lost.
    let last_commit = journal
        .ok()
        .and_then(|j| std::fs::symlink_metadata(j).ok())
        .filter(|m| m.is_file())
        .and_then(|m| m.modified().ok());
    Ok(StoreState {
        generation: rec.generation,
        last_commit,
        warnings: rec.warnings,
    })
}

/// Whether some process holds the store's exclusive lock (a mount, or its daemon finishing).
fn writer_active(backing: &Path) -> bool {
    let Some((store, _)) = find_store(backing) else {
        return false;
    };
    let Ok(dir) = std::fs::File::open(store) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; a lock taken is dropped with the file at once.
    let r = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

fn home_of(m: &MountEntry) -> HomeMount {
    let uid = std::fs::metadata(&m.mountpoint).ok().map(|md| md.uid());
    let user = uid.and_then(|u| {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u))
            .ok()
            .flatten()
            .map(|u| u.name)
    });
    HomeMount {
        mountpoint: m.mountpoint.clone(),
        user,
        uid,
        read_only: m.read_only(),
    }
}

/// The backing directory that TARGET names: a pershomefs home, a backing directory itself
/// (it has `.pershome/` or is named pershome), or a stick (its `pershome/`).
fn backing_of_target(mounts: &[MountEntry], target: &Path) -> Result<PathBuf> {
    let t = target
        .canonicalize()
        .with_context(|| format!("{}", target.display()))?;
    if let Some(m) = mounts
        .iter()
        .find(|m| m.fstype == PERSHOMEFS_TYPE && m.mountpoint == t)
    {
        return backing_of_mount(m).with_context(|| {
            format!(
                "{} is a pershome home, but its backing directory cannot be found",
                t.display()
            )
        });
    }
    if has_store(&t) || t.file_name().is_some_and(is_pershome_name) {
        return Ok(t);
    }
    match find_pershome_dir(&t)? {
        Some(b) => Ok(canon(&b)),
        None => anyhow::bail!(
            "{} is not a pershome home, backing directory or prepared stick (no pershome/ in \
             it); to prepare it: pershome prepare {}",
            t.display(),
            t.display()
        ),
    }
}

/// Gathers the status of TARGET, or of every pershome mount and every mounted stick that has
/// a `pershome/`.
pub fn status(target: Option<&Path>) -> Result<Vec<BackingStatus>> {
    let mounts = mountinfo::mounts()?;
    let mut backings: Vec<PathBuf> = Vec::new();
    match target {
        Some(t) => backings.push(backing_of_target(&mounts, t)?),
        None => {
            for m in mounts.iter().filter(|m| m.fstype == PERSHOMEFS_TYPE) {
                if let Some(b) = backing_of_mount(m) {
                    backings.push(canon(&b));
                }
            }
            for s in discover::find_sticks(&mounts) {
                if let Some(mp) = &s.mountpoint {
                    if let Ok(Some(b)) = find_pershome_dir(mp) {
                        backings.push(canon(&b));
                    }
                }
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    backings.retain(|b| seen.insert(b.clone()));
    Ok(backings.into_iter().map(|b| one(&mounts, b)).collect())
}

fn one(mounts: &[MountEntry], backing: PathBuf) -> BackingStatus {
    let homes: Vec<HomeMount> = home_mounts(mounts, &backing).map(home_of).collect();
    let store = store_state(&backing);
    let writer = writer_active(&backing);
    let under = mountinfo::underlying_mount_of(mounts, &backing);
    let device = under
        .filter(|m| m.source.starts_with("/dev/"))
        .map(|m| m.source.clone());
    let removable = device
        .as_deref()
        .is_some_and(|d| discover::is_removable(Path::new(d)));
    let removal = if let Some(h) = homes.first() {
        Removal::InUse(format!(
            "mounted as a home on {}; log out (or unmount it) first",
            h.mountpoint.display()
        ))
    } else if writer {
        Removal::InUse(
            "a pershomefs daemon is still writing the last commit; wait a few seconds".into(),
        )
    } else if removable {
        Removal::UnmountFirst(under.map(|m| m.mountpoint.clone()).unwrap_or_default())
    } else {
        Removal::Safe
    };
    BackingStatus {
        backing,
        homes,
        store,
        writer_active: writer,
        device_fstype: under.filter(|_| device.is_some()).map(|m| m.fstype.clone()),
        device_mountpoint: under
            .filter(|_| device.is_some())
            .map(|m| m.mountpoint.clone()),
        device,
        removable,
        removal,
    }
}

/// The exit code for a gathered status.
pub fn exit_code_of(list: &[BackingStatus]) -> u8 {
    if list.iter().any(|s| s.removal != Removal::Safe) {
        exit_code::IN_USE
    } else if list.iter().any(|s| s.state_word() == "needs-fsck") {
        exit_code::STORE
    } else {
        exit_code::SAFE
    }
}

fn secs(t: SystemTime) -> Option<(u64, u32)> {
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    Some((d.as_secs(), d.subsec_nanos()))
}

/// How long ago, in words.
fn ago(t: SystemTime) -> String {
    match SystemTime::now().duration_since(t) {
        Ok(d) if d.as_secs() < 120 => format!("{} s ago", d.as_secs()),
        Ok(d) if d.as_secs() < 7200 => format!("{} min ago", d.as_secs() / 60),
        Ok(d) if d.as_secs() < 172_800 => format!("{} h ago", d.as_secs() / 3600),
        Ok(d) => format!("{} days ago", d.as_secs() / 86_400),
        Err(_) => "in the future (clock skew between computers)".into(),
    }
}

/// The report for a person.
pub fn render_text(list: &[BackingStatus]) -> String {
    let mut out = String::new();
    if list.is_empty() {
        out.push_str("No pershome home is mounted and no prepared stick is plugged in.\n");
        return out;
    }
    for s in list {
        let _ = writeln!(out, "{}", s.backing.display());
        match (&s.device, &s.device_fstype) {
            (Some(d), Some(t)) if !s.removable => {
                let _ = writeln!(
                    out,
                    "  stick:        none: a directory on {d} ({t}), not a removable stick"
                );
            }
            (Some(d), Some(t)) => {
                let _ = writeln!(
                    out,
                    "  stick:        {d} ({t}), mounted on {}",
                    s.device_mountpoint
                        .as_deref()
                        .unwrap_or(Path::new("?"))
                        .display()
                );
            }
            _ => {
                let _ = writeln!(out, "  stick:        (a directory, not a device)");
            }
        }
        if s.homes.is_empty() {
            let _ = writeln!(out, "  home:         not mounted");
        }
        for h in &s.homes {
            let _ = writeln!(
                out,
                "  home:         mounted on {} for {}{}",
                h.mountpoint.display(),
                match (&h.user, h.uid) {
                    (Some(u), Some(id)) => format!("{u} (uid {id})"),
                    (None, Some(id)) => format!("uid {id}"),
                    _ => "? (the mount does not answer)".into(),
                },
                if h.read_only { ", read-only" } else { "" }
            );
        }
        match &s.store {
            Ok(st) if st.generation == 0 => {
                let _ = writeln!(
                    out,
                    "  metadata:     none yet (not prepared: pershome prepare)"
                );
            }
            Ok(st) => {
                let _ = writeln!(
                    out,
                    "  last commit:  {} (generation {})",
                    st.last_commit.map_or("unknown".into(), ago),
                    st.generation
                );
                for w in &st.warnings {
                    let _ = writeln!(out, "  warning:      {w}");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "  metadata:     unreadable: {e}");
            }
        }
        let state = match s.state_word() {
            "dirty" => "in use (recent changes may still be in memory; they are committed every few seconds and at logout)",
            "clean" => "clean (everything is committed)",
            _ => "needs a check: run pershome fsck on it",
        };
        let _ = writeln!(out, "  state:        {state}");
        let removal = match &s.removal {
            Removal::Safe => "yes".to_string(),
            Removal::InUse(why) => format!("NO: {why}"),
            Removal::UnmountFirst(mp) => format!(
                "not yet: eject it in the file manager, or run: umount {}",
                mp.display()
            ),
        };
        let _ = writeln!(out, "  safe to remove: {removal}");
    }
    out
}

/// JSON string escaping (RFC 8259), for paths and messages.
fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_path(p: &Path) -> String {
    json_str(&p.to_string_lossy())
}

fn json_opt(s: Option<String>) -> String {
    s.unwrap_or_else(|| "null".into())
}

/// The report as JSON: `{"sticks": [...], "exit_code": N}` (keys documented in
/// docs/user-guide.md).
pub fn render_json(list: &[BackingStatus]) -> String {
    let mut items = Vec::new();
    for s in list {
        let homes: Vec<String> = s
            .homes
            .iter()
            .map(|h| {
                format!(
                    "{{\"mountpoint\":{},\"user\":{},\"uid\":{},\"read_only\":{}}}",
                    json_path(&h.mountpoint),
                    json_opt(h.user.as_deref().map(json_str)),
                    json_opt(h.uid.map(|u| u.to_string())),
                    h.read_only
                )
            })
            .collect();
        let (generation, last, warnings, error) = match &s.store {
            Ok(st) => (
                st.generation.to_string(),
                json_opt(
                    st.last_commit
                        .and_then(secs)
                        .map(|(s, ns)| format!("{s}.{ns:09}")),
                ),
                st.warnings
                    .iter()
                    .map(|w| json_str(w))
                    .collect::<Vec<_>>()
                    .join(","),
                "null".to_string(),
            ),
            Err(e) => ("null".into(), "null".into(), String::new(), json_str(e)),
        };
        let (safe, why) = match &s.removal {
            Removal::Safe => (true, "null".to_string()),
            Removal::InUse(w) => (false, json_str(w)),
            Removal::UnmountFirst(mp) => (false, json_str(&format!("unmount {}", mp.display()))),
        };
        items.push(format!(
            "{{\"backing\":{},\"device\":{},\"device_fstype\":{},\"device_mountpoint\":{},\
             \"removable\":{},\"homes\":[{}],\"generation\":{generation},\
             \"last_commit\":{last},\"state\":{},\"warnings\":[{warnings}],\"store_error\":{error},\
             \"writer_active\":{},\"safe_to_remove\":{safe},\"not_safe_because\":{why}}}",
            json_path(&s.backing),
            json_opt(s.device.as_deref().map(json_str)),
            json_opt(s.device_fstype.as_deref().map(json_str)),
            json_opt(s.device_mountpoint.as_deref().map(json_path)),
            s.removable,
            homes.join(","),
            json_str(s.state_word()),
            s.writer_active,
        ));
    }
    format!(
        "{{\"sticks\":[{}],\"exit_code\":{}}}\n",
        items.join(","),
        exit_code_of(list)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }
}
