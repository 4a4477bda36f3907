//! The mounts of the login hook beyond the stick device itself: the stick directory bound
//! under root's `/run/pershome/USER/raw/stick`, pershomefs on the home directory (the
//! `pershomefs` binary run with an argument vector), the checks on the home path before
//! anything is mounted over it, and the wait for the daemon's last commit.
//!
//! This module owns those checks and waits: each wait has a deadline, so a logout never hangs
//! forever (except the pam_mount watcher, which lives as long as the mount). The stick mount,
//! its harmless flags and the bounded unmount are `crate::stick::mount`'s. It never decides
//! *whether* to mount (that is `session::hook`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::stick::mount::STICK_FLAGS;

/// Opens the `pershome/` directory (any letter case) of the stick directory `dir` for the root
/// hook, resolving `dir` one component at a time from `/` with `O_NOFOLLOW`: no component
/// may be a symlink, and every directory above `dir` must be root's and writable by nobody
/// else (a user who could write one could swap `dir` for another between this check and the
/// bind). `dir` itself and its `pershome/` are the stick's own (an sshfs mount shows the far
/// side's owner); they only must not be symlinks. `Ok(None)`: `dir` has no `pershome/`.
pub fn open_stick_dir(dir: &Path) -> Result<Option<OwnedFd>> {
    use std::os::unix::ffi::OsStrExt;
    if !dir.is_absolute() {
        bail!(
            "the stick directory {} is not an absolute path",
            dir.display()
        );
    }
    let open_at = |at: Option<&OwnedFd>, name: &[u8]| -> nix::Result<OwnedFd> {
        let fd = nix::fcntl::openat(
            at.map(|f| f.as_raw_fd()),
            name,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    };
    let mut cur = open_at(None, b"/").context("opening /")?;
    let mut shown = PathBuf::from("/");
    for comp in dir.components().skip(1) {
        let std::path::Component::Normal(name) = comp else {
            bail!(
                "the stick directory {} has a `.` or `..` component",
                dir.display()
            );
        };
        let st = nix::sys::stat::fstat(cur.as_raw_fd())?;
        if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
            bail!(
                "{} (above the stick directory {}) is not a directory only root can change \
                 (owner uid {}, mode {:o}): refusing a stick directory whose path a user could \
                 redirect",
                shown.display(),
                dir.display(),
                st.st_uid,
                st.st_mode & 0o7777
            );
        }
        shown.push(name);
        cur = match open_at(Some(&cur), name.as_bytes()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => bail!(
                "{} is a symlink or not a directory: the stick directory {} must be reached \
                 through real directories only",
                shown.display(),
                dir.display()
            ),
            Err(e) => bail!("opening {}: {e}", shown.display()),
        };
    }
    // `pershome` in any letter case, a real directory, exactly one.
    let mut listing = nix::dir::Dir::openat(
        Some(cur.as_raw_fd()),
        ".",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("listing {}", dir.display()))?;
    let mut found: Vec<Vec<u8>> = Vec::new();
    for entry in listing.iter() {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_bytes();
        if crate::stick::layout::is_pershome_name(std::ffi::OsStr::from_bytes(name)) {
            found.push(name.to_vec());
        }
    }
    let name = match found.as_slice() {
        [] => return Ok(None),
        [one] => one.clone(),
        _ => bail!(
            "{} holds several directories named pershome in different case; keep one",
            dir.display()
        ),
    };
    match open_at(Some(&cur), &name) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => Ok(None),
        Err(e) => bail!("opening {}/pershome: {e}", dir.display()),
    }
}

/// Binds the stick's `pershome/` directory, opened as `fd` by [`open_stick_dir`] (`shown` is
/// its path, for messages), on `target`, `nosuid,nodev,noexec,noatime`. The bind is made from
/// the descriptor (`/proc/self/fd/N`), so a directory swapped for a symlink after the check
/// (on an sshfs mount the far side can do that) is never what gets bound; pershomefs and the
/// claim check then only ever see `target`, a path only root controls.
pub fn bind_stick_dir(fd: &OwnedFd, shown: &Path, target: &Path) -> Result<()> {
    let dir = shown;
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::mount::mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| anyhow!("binding {} on {}: {e}", dir.display(), target.display()))?;
    // A bind mount takes its flags only from a remount.
    if let Err(e) = nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | STICK_FLAGS,
        None::<&str>,
    ) {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
        bail!(
            "making the bind of {} nosuid,nodev,noexec: {e}",
            dir.display()
        );
    }
    Ok(())
}

/// Checks that `home` may be mounted over for user `uid`: an absolute path whose every
/// ancestor is a real directory (no symlink) owned by root and writable by nobody else, and
/// which is itself a directory (not a symlink) owned by the user or root. Otherwise a user
/// could point the mount at another place (a symlinked `$HOME`, a home under a directory
/// they control and swap between the check and the mount).
pub fn check_home(home: &Path, uid: u32) -> Result<()> {
    if !home.is_absolute() {
        bail!(
            "the home directory {} is not an absolute path",
            home.display()
        );
    }
    let mut cur = PathBuf::from("/");
    let comps: Vec<_> = home.components().skip(1).collect();
    for (i, comp) in comps.iter().enumerate() {
        let std::path::Component::Normal(name) = comp else {
            bail!(
                "the home directory {} has a `.` or `..` component",
                home.display()
            );
        };
        let parent_meta = std::fs::symlink_metadata(&cur)
            .with_context(|| format!("examining {}", cur.display()))?;
        if parent_meta.uid() != 0 || parent_meta.mode() & 0o022 != 0 {
            bail!(
                "{} (above the home {}) is not a directory only root can change (owner uid {}, \
                 mode {:o}): refusing to mount over a home whose path a user could redirect",
                cur.display(),
                home.display(),
                parent_meta.uid(),
                parent_meta.mode() & 0o7777
            );
        }
        cur.push(name);
        let meta = std::fs::symlink_metadata(&cur)
            .with_context(|| format!("examining {}", cur.display()))?;
        if meta.file_type().is_symlink() {
            bail!(
                "{} is a symlink: refusing to mount a stick home through it (make the home a \
                 real directory)",
                cur.display()
            );
        }
        if !meta.is_dir() {
            bail!("{} is not a directory", cur.display());
        }
        if i + 1 == comps.len() && meta.uid() != uid && meta.uid() != 0 {
            bail!(
                "the home directory {} belongs to uid {}, not to the user (uid {uid})",
                home.display(),
                meta.uid()
            );
        }
    }
    Ok(())
}

/// The `pershomefs` binary: beside the running program (both live in /usr/bin, and in
/// target/debug for the tests), else the installed one.
pub fn pershomefs_binary() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let beside = dir.join("pershomefs");
            if beside.is_file() {
                return beside;
            }
        }
    }
    PathBuf::from("/usr/bin/pershomefs")
}

/// Mounts pershomefs over `backing` on `home` for `uid`/`gid` and returns once it serves
/// (pershomefs returns only when the mount is ready). `options` are extra `-o` words.
///
/// Under systemd the daemon is started in a transient scope of its own (`systemd-run
/// --scope`), as LTSP's pamltsp does for its background work: otherwise it would stay in the
/// cgroup of the login program (getty@ttyN.service, gdm.service), and stopping or restarting
/// that unit would take the mounted home down with it.
pub fn mount_pershomefs(backing: &Path, home: &Path, options: &[String]) -> Result<()> {
    let binary = pershomefs_binary();
    let output = own_scope(&binary, &format!("pershome home {}", home.display()))
        .arg(backing)
        .arg(home)
        .arg("-o")
        .arg(options.join(","))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} {} failed ({}): {}",
            binary.display(),
            backing.display(),
            home.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `systemd-run` by absolute path, when systemd runs this machine and it is installed.
fn systemd_run() -> Option<PathBuf> {
    if !Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    ["/usr/bin/systemd-run", "/bin/systemd-run"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A command running `program` (an absolute path) in a transient systemd scope of its own
/// (described by `description`) when systemd runs, else directly; either way by absolute
/// path with a cleared environment (`crate::exec::command`): this runs as root at logout,
/// with the environment PAM handed the hook. The caller adds the arguments.
pub fn own_scope(program: &Path, description: &str) -> Command {
    match systemd_run() {
        Some(systemd_run) => {
            let mut c = crate::exec::command(systemd_run);
            c.args(["--scope", "--quiet", "--collect", "--description"])
                .arg(description)
                .arg("--")
                .arg(program);
            c
        }
        None => crate::exec::command(program),
    }
}

/// Runs `work` on a thread of its own and waits for it at most `within`: `None` when the
/// time ran out (the thread is left to finish or to die with the process). For calls into a
/// filesystem whose server may hang (a stopped daemon, a stick that stopped answering).
fn within<T: Send + 'static>(
    within: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    rx.recv_timeout(within).ok()
}

/// Asks pershomefs to commit the metadata now: `fsync` on the home's top directory is a
/// `fsyncdir`, which commits the gathered changes. Waits at most `bound`; a failure or a
/// timeout is only logged: the unmount commits anyway.
pub fn commit(home: &Path, bound: Duration) {
    let path = home.to_path_buf();
    match within(bound, move || {
        std::fs::File::open(&path).and_then(|d| d.sync_all())
    }) {
        Some(Ok(())) => tracing::debug!("committed metadata of {}", home.display()),
        Some(Err(e)) => tracing::warn!("committing metadata of {}: {e}", home.display()),
        None => tracing::warn!(
            "committing metadata of {}: no answer within {}s; unmounting anyway",
            home.display(),
            bound.as_secs()
        ),
    }
}

/// Flushes the filesystem holding `path` (the stick) with `syncfs`, waiting at most `bound`:
/// a global `sync()` would wait for every other disk of the machine too.
pub fn sync_stick(path: &Path, bound: Duration) {
    let p = path.to_path_buf();
    let done = within(bound, move || {
        let dir = std::fs::File::open(&p)?;
        nix::unistd::syncfs(dir.as_raw_fd()).map_err(std::io::Error::from)
    });
    match done {
        Some(Ok(())) => {}
        Some(Err(e)) => tracing::warn!("syncing {}: {e}", path.display()),
        None => tracing::warn!(
            "syncing {}: no answer within {}s",
            path.display(),
            bound.as_secs()
        ),
    }
}

/// Whether `m` is the hook's own pershomefs mount: a `fuse.pershomefs` mount made by root
/// (`user_id=0`; a user's own FUSE mount carries their uid, and no user can make one with 0).
pub fn is_hook_mount(m: &crate::stick::mountinfo::MountEntry) -> bool {
    m.fstype == crate::stick::mountinfo::PERSHOMEFS_TYPE && m.super_option("user_id") == Some("0")
}

/// Makes the hook's pershomefs the top mount on `home` again: whatever a user mounted over
/// it (a FUSE mount of their own, which would take the unmount meant for ours and keep the
/// stick mounted) is detached. At most 16 layers; `Ok(false)` when nothing of ours is there.
pub fn uncover_home(home: &Path) -> Result<bool> {
    for _ in 0..16 {
        match crate::stick::mountinfo::mount_at(home)? {
            None => return Ok(false),
            Some(m) if is_hook_mount(&m) => return Ok(true),
            Some(m) => {
                tracing::warn!(
                    "{} is covered by a {} mount from {} that the login hook did not make: \
                     detaching it",
                    home.display(),
                    m.fstype,
                    m.source
                );
                nix::mount::umount2(home, MntFlags::MNT_DETACH)
                    .map_err(|e| anyhow!("detaching a mount over {}: {e}", home.display()))?;
            }
        }
    }
    bail!("{} has too many mounts over it", home.display())
}

/// Waits until nothing holds the store lock of `backing` (`.pershome/`, locked by the
/// pershomefs daemon for its whole life), i.e. until the daemon has written its last commit
/// and exited. `Ok(false)` when `within` passed first. A missing store counts as free.
pub fn wait_store_free(backing: &Path, within: Duration) -> Result<bool> {
    let Some((store, _)) = crate::meta::layout::find_store(backing) else {
        return Ok(true);
    };
    let dir = match nix::fcntl::open(
        &store,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        // SAFETY: open returned a new descriptor that nothing else owns.
        Ok(fd) => unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
        Err(Errno::ENOENT) => return Ok(true),
        Err(e) => bail!("opening {}: {e}", store.display()),
    };
    let deadline = Instant::now() + within;
    loop {
        // SAFETY: flock on a descriptor we own; the result is checked.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("locking {}", store.display()));
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_checks() -> Result<()> {
        if crate::testing::skip_without_root("home_checks") {
            return Ok(());
        }
        // /tmp is world-writable (sticky): a home under it is refused.
        let t = tempfile::tempdir()?;
        let got = check_home(t.path(), 0);
        assert!(
            got.is_err(),
            "expected a home under /tmp to be refused, got {got:?}"
        );
        // A root-only tree (under /run, which only root may write): accepted; a symlinked
        // home: refused.
        let root_dir = tempfile::Builder::new()
            .prefix("phhome")
            .tempdir_in("/run")?;
        std::fs::create_dir(root_dir.path().join("a"))?;
        std::os::unix::fs::symlink(root_dir.path().join("a"), root_dir.path().join("link"))?;
        let ok = check_home(&root_dir.path().join("a"), 0);
        assert!(ok.is_ok(), "expected a root-owned home to pass, got {ok:?}");
        let got = check_home(&root_dir.path().join("link"), 0);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("symlink")),
            "expected a symlinked home to be refused, got {got:?}"
        );
        let got = check_home(&root_dir.path().join("a"), 4242);
        assert!(
            got.is_ok(),
            "a root-owned home dir is accepted for any user: {got:?}"
        );
        Ok(())
    }
}
