//! The login hook on LTSP 23: which sessions it stays out of, and what it does on a netbooted
//! client beside pamltsp (see `crate::ltsp` for the set-up and docs/admin-guide.md for the
//! administrator's side).
//!
//! This module owns three decisions. A *remote* session (`PAM_RHOST` set, or the `sshd`
//! service) is skipped when `remote_sessions = "skip"` (the default): on an LTSP server those
//! are the `ssh … sftp` sessions pamltsp opens to check a client login's password and to mount
//! its SSHFS home, and failing them (`on_missing_stick = "deny"`) would fail every client
//! login. The *SSHFS decision* (`pershome-config ltsp skip-sshfs`, asked by pershome's block in
//! pamltsp.conf before pamltsp mounts the server home in the auth phase): a listed user whose
//! stick is plugged in gets `SSHFS=0`; one without a usable stick keeps the SSHFS server home,
//! which is the safe fallback on LTSP (a client's own home is a tmpfs that vanishes at reboot),
//! unless `on_missing_stick = "deny"` refuses the session anyway. And at session open on a
//! client: when pamltsp mounted the server home, say so (greeter and desktop notice) instead of
//! mounting over it; when nobody made `/home/USER` (autologin, guest), make it.
//!
//! It never fails a session that is not its own, never mounts over an SSHFS home (pamltsp's
//! close unmounts "whatever is on top" of `$HOME`), and never runs a program.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::hook::{self, Account};
use super::rundir::UserRunDir;
use super::stick::{self, Missing, Source};
use crate::ltsp::Role;
use crate::stick::mount::unmount_within;
use crate::stick::mountinfo::{mount_at, PERSHOMEFS_TYPE};
use crate::sysconfig::{OnMissingStick, RemoteSessions, SystemConfig};

/// The type pamltsp's SSHFS home has in the mount table.
pub const SSHFS_TYPE: &str = "fuse.sshfs";

/// Whether a session with PAM's `service` and `rhost` comes from another machine.
pub fn is_remote(service: Option<&str>, rhost: Option<&str>) -> bool {
    service == Some("sshd") || rhost.is_some_and(|h| !h.trim().is_empty())
}

/// Whether the hook must leave this session alone (`remote_sessions = "skip"` and a remote
/// session). `service`/`rhost` are pam_exec's `PAM_SERVICE` and `PAM_RHOST`.
pub fn skips(system: &SystemConfig, service: Option<&str>, rhost: Option<&str>) -> bool {
    system.remote_sessions == RemoteSessions::Skip && is_remote(service, rhost)
}

/// What the probe at pamltsp's auth found for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The user's stick home is mounted already (another session, or a screen unlock).
    Mounted,
    /// A stick the hook would use for the user is plugged in.
    Present,
    /// No usable stick, and why.
    Missing(Missing),
}

/// The SSHFS decision: `true` means `SSHFS=0` (no server home mounted on `$HOME`).
pub fn skip_sshfs(wants: bool, on_missing: OnMissingStick, probe: &Probe) -> bool {
    if !wants {
        return false;
    }
    match probe {
        Probe::Mounted | Probe::Present => true,
        // With `deny` the session open refuses the login: mounting the server home first would
        // only leave an SSHFS mount behind it.
        Probe::Missing(_) => on_missing == OnMissingStick::Deny,
    }
}

/// Looks for `account`'s stick as the session open will, without keeping anything mounted:
/// a stick mounted for the probe is unmounted again (on a vfat stick that costs the dirty-bit
/// write of one mount, as a plain `mount`/`umount` does). Holds the user's session lock, so a
/// session open of the same user waits.
pub fn probe(root: &Path, source: &Source, account: &Account) -> Result<Probe> {
    let run = UserRunDir::create(root, &account.name)?;
    let _lock = run.lock_sessions()?;
    if let Some(state) = run.read_state()? {
        if mount_at(&state.home)?.is_some_and(|m| m.fstype == PERSHOMEFS_TYPE) {
            return Ok(Probe::Mounted);
        }
    }
    let mp = run.stick_mountpoint();
    if mount_at(&mp)?.is_some() {
        // A stick home's stick whose home is gone: the session open cleans it up; meanwhile
        // it is the user's stick and it is here.
        return Ok(Probe::Present);
    }
    let key = super::claim::SiteKey::load(root, true)?;
    let found = stick::look_for(source, &account.name, account.uid, account.gid, &mp, &key)?;
    if mount_at(&mp)?.is_some() {
        unmount_within(&mp, Duration::from_secs(10)).context("unmounting the probed stick")?;
    }
    Ok(match found {
        Ok(_) => Probe::Present,
        Err(missing) => Probe::Missing(missing),
    })
}

/// The text for a person whose home on an LTSP client is the server home (SSHFS), because no
/// stick home could be had at login.
pub fn server_home_message(why: &str, account: &Account) -> String {
    format!(
        "pershome: {why}.\n\
         You are working in your home folder on the server ({home}, over the network): files \
         you save now are kept on the server, not on your stick.\n\
         To use your stick home: log out, plug in your stick (only yours), and log in again. \
         A new stick must be prepared once: run `pershome prepare` (or open \"Prepare a \
         pershome stick\" from the menu).\n",
        home = account.home.display()
    )
}

/// What the session open does on an LTSP client before the hook proper, for a user who wants
/// a stick home: `Some(exit code)` when the session is settled here (pamltsp mounted the server
/// home: the person is told, on the greeter and by the desktop notice), `None` to go on with
/// `hook::open` (after making a missing `/home/USER`).
pub fn client_open(
    root: &Path,
    source: &Source,
    system: &SystemConfig,
    account: &Account,
    out: &mut dyn Write,
) -> Result<Option<u8>> {
    if crate::ltsp::role(root) != Role::Client {
        return Ok(None);
    }
    match mount_at(&account.home)? {
        Some(m) if m.fstype == SSHFS_TYPE => {
            // Why no stick home: ask again now (the stick may also have been plugged in after
            // the password was typed).
            let why = match probe(root, source, account) {
                Ok(Probe::Missing(missing)) => hook::missing_reason(&missing, &account.name),
                Ok(_) => "your stick was not there yet when you typed your password".to_owned(),
                Err(e) => format!("your stick could not be checked ({e:#})"),
            };
            let text = server_home_message(&why, account);
            tracing::warn!(
                "{}: no stick home ({why}); the home is the server's, over SSHFS",
                account.name
            );
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            let run = UserRunDir::create(root, &account.name)?;
            if let Err(e) = run.write_notice(
                &text,
                nix::unistd::Uid::from_raw(account.uid),
                nix::unistd::Gid::from_raw(account.gid),
            ) {
                tracing::warn!("{}: leaving the notice: {e:#}", account.name);
            }
            Ok(Some(match system.on_missing_stick {
                OnMissingStick::Deny => super::entry::exit_code::DENIED,
                OnMissingStick::Fallback => super::entry::exit_code::SUCCESS,
            }))
        }
        Some(_) => Ok(None),
        None => {
            make_home(account)?;
            Ok(None)
        }
    }
}

/// Makes the missing home of `account` (a login pamltsp did not prepare: autologin, a guest
/// account): mode 0700, owned by the user, under a parent only root can change (checked as the
/// hook checks homes, so nothing is created through a symlink or in a user's directory).
fn make_home(account: &Account) -> Result<()> {
    let home = &account.home;
    if std::fs::symlink_metadata(home).is_ok() {
        return Ok(());
    }
    let parent = home
        .parent()
        .with_context(|| format!("the home {} has no parent", home.display()))?;
    super::mounts::check_home(parent, 0)
        .with_context(|| format!("not creating the home {}", home.display()))?;
    match nix::unistd::mkdir(home, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EEXIST) => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("creating {}", home.display())),
    }
    std::os::unix::fs::lchown(home, Some(account.uid), Some(account.gid))
        .with_context(|| format!("giving {} to {}", home.display(), account.name))?;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", home.display()))?;
    tracing::info!(
        "{}: created the missing home {} (0700)",
        account.name,
        home.display()
    );
    Ok(())
}

/// `pershome-config ltsp skip-sshfs --user USER [--stick-dir DIR]`, asked by pershome's block
/// in pamltsp.conf: exit 0 when pamltsp must not mount the server home (`SSHFS=0`), 1 when it
/// goes on as configured. Anything unexpected answers 1: pamltsp then does what it did before
/// pershome was installed. As a user (pamltsp's screen unlock) it answers 1 at once: the home
/// is mounted already and pamltsp only checks the password.
pub fn run_skip_sshfs(root: &Path, user: &str, stick_dir: Option<std::path::PathBuf>) -> u8 {
    const SKIP: u8 = 0;
    const KEEP: u8 = 1;
    if !nix::unistd::geteuid().is_root() {
        return KEEP;
    }
    let system = match crate::sysconfig::load(root) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(user = %user, "skip-sshfs: {e}; pamltsp keeps the SSHFS home");
            return KEEP;
        }
    };
    let (account, entry) = match Account::lookup(root, user) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(user = %user, "skip-sshfs: {e:#}");
            return KEEP;
        }
    };
    let wants = match crate::wants::wants_stick_home(root, &entry, &system) {
        Ok(w) => w.yes(),
        Err(e) => {
            tracing::error!(user = %user, "skip-sshfs: {e}; pamltsp keeps the SSHFS home");
            return KEEP;
        }
    };
    if !wants {
        return KEEP;
    }
    let source = super::entry::source(stick_dir, &system, user);
    let found = match probe(root, &source, &account) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(user = %user, "skip-sshfs: looking for the stick: {e:#}");
            Probe::Missing(Missing::NoStick)
        }
    };
    let skip = skip_sshfs(wants, system.on_missing_stick, &found);
    tracing::info!(
        user = %user,
        "pamltsp: {} ({found:?})",
        if skip { "SSHFS=0, the stick home will be mounted" } else { "the SSHFS server home stays" }
    );
    if skip {
        SKIP
    } else {
        KEEP
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_sessions() {
        assert!(is_remote(Some("sshd"), None));
        assert!(is_remote(Some("login"), Some("10.0.0.7")));
        assert!(!is_remote(Some("login"), Some("")));
        assert!(!is_remote(Some("lightdm"), None));
        let mut cfg = SystemConfig::default();
        assert!(skips(&cfg, Some("sshd"), Some("192.168.67.20")));
        cfg.remote_sessions = RemoteSessions::Open;
        assert!(!skips(&cfg, Some("sshd"), Some("192.168.67.20")));
    }

    #[test]
    fn sshfs_decision() {
        use OnMissingStick::{Deny, Fallback};
        let missing = Probe::Missing(Missing::NoStick);
        for (wants, on, probe, skip) in [
            (false, Fallback, &Probe::Present, false),
            (false, Deny, &Probe::Mounted, false),
            (true, Fallback, &Probe::Present, true),
            (true, Fallback, &Probe::Mounted, true),
            (true, Fallback, &missing, false),
            (true, Deny, &missing, true),
        ] {
            assert_eq!(
                skip_sshfs(wants, on, probe),
                skip,
                "wants {wants}, {on:?}, {probe:?}"
            );
        }
    }
}
