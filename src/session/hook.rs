//! Session open and close for one user: the decisions, their order, and the messages a person
//! sees on the greeter or terminal (pam_exec's `stdout`) and in the desktop dialog.
//!
//! This module owns the login hook's policy: a login never fails because of pershome (when
//! the stick home cannot be had, the session goes on with the normal home and the person is
//! told why and what to do); the stick home is mounted once per user however many sessions
//! they open, and torn down at the close of the last one; no wait at logout is unbounded.
//! It never runs a shell, and never acts on a user name the passwd database does not know.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Uid};

use super::claim::SiteKey;
use super::mounts;
use super::rundir::{self, State, UserRunDir};
use super::stick::{self, Missing, Source};
use crate::stick::mount::{unmount_within, Unmounted};
use crate::stick::mountinfo::mount_at;
use crate::sysconfig::SystemConfig;

/// How long the daemon may take to write its last commit and exit after the unmount.
const DAEMON_EXIT_WAIT: Duration = Duration::from_secs(30);

/// What the hook works with: the root, where the stick is looked for, and the system
/// configuration (`/etc/pershome/config.toml`).
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// The root the runtime directory and the users' homes live under (`/`; a temporary
    /// root in tests, as `--root` gives).
    pub root: PathBuf,
    /// Where the stick is looked for.
    pub source: Source,
    /// The system configuration.
    pub system: SystemConfig,
}

impl HookConfig {
    /// pershomefs `commit=` seconds.
    fn commit_secs(&self) -> u32 {
        self.system.commit_interval.0
    }

    /// How long the close waits for programs still using the home or stick.
    fn linger(&self) -> Duration {
        self.system.logout_timeout.duration()
    }
}

/// A user as the passwd database knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl Account {
    /// Looks `name` up in the passwd database (NSS; `root/etc/passwd` under another root)
    /// and returns the account with its home as seen under `root`, and the passwd entry.
    /// Refuses names that are not plain file names before asking.
    pub fn lookup(root: &Path, name: &str) -> Result<(Account, nix::unistd::User)> {
        if !rundir::is_safe_component(name) {
            bail!("refusing the user name {name:?}");
        }
        let user = crate::wants::lookup_user(root, name)
            .with_context(|| format!("looking up user {name:?}"))?
            .with_context(|| format!("there is no user {name:?}"))?;
        let account = Account {
            name: user.name.clone(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: crate::wants::under_root(root, &user.dir),
        };
        Ok((account, user))
    }
}

/// What the open did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// The user does not want a stick home: nothing was done.
    NotWanted,
    /// pershomefs now serves the user's home from this backing.
    Mounted {
        backing: PathBuf,
        /// What was mounted at `/run/pershome/USER/raw/stick` (see `stick::Found::mounted`).
        mounted: Option<PathBuf>,
    },
    /// Another session of the user already has the stick home mounted.
    AlreadyMounted,
    /// The stick home could not be had: the session uses the normal home. The text was shown.
    Fallback(String),
}

/// What the close did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Nothing of pershome was open for this user.
    Nothing,
    /// Other sessions of the user remain: the stick home stays.
    StillInUse(u32),
    /// Unmounted; the stick may be removed.
    Done,
    /// Programs still use the home: a background finisher unmounts when they are gone.
    Deferred,
}

/// Why there is no stick home, as a clause for a person (also used on LTSP clients, where the
/// fallback is the server home: `session::ltsp`).
pub fn missing_reason(missing: &Missing, user: &str) -> String {
    match missing {
        Missing::NoStick => "no USB stick with a pershome folder was found".to_owned(),
        Missing::NoPershomeDir(what) => format!(
            "the stick ({what}) has no folder named \"pershome\" at its top, so it is not \
             prepared for pershome yet"
        ),
        Missing::OtherUsers(names) => format!(
            "the stick that is plugged in is the home of another user ({}); pershome does not \
             open one person's stick as someone else's home",
            names.join(", ")
        ),
        Missing::Ambiguous(n) => format!(
            "{n} new prepared sticks are plugged in and none is claimed as yours yet, so \
             pershome cannot tell which one to use"
        ),
        Missing::Unclaimed(what) => format!(
            "the stick ({what}) already holds files but is not claimed as your home on this \
             computer, so pershome does not open it: a stick is only opened as the home of the \
             person it was claimed for. If it is yours, ask the administrator to claim it for \
             you (`pershome-config claim {name} ...`), or log in once with a stick whose \
             pershome folder is still empty",
            name = user
        ),
    }
}

/// The text for a person when the stick home cannot be had, with the way to fix it.
pub fn missing_message(missing: &Missing, account: &Account) -> String {
    let why = missing_reason(missing, &account.name);
    format!(
        "pershome: {why}.\n\
         You are working in this computer's normal home folder ({home}) for this session: \
         files you save now stay on this computer and are not on your stick.\n\
         To use your stick home: log out, plug in your stick (only yours), and log in again. \
         A new stick must be prepared once: run `pershome prepare` (or open \"Prepare a \
         pershome stick\" from the menu), which adds a pershome folder and changes nothing \
         else on the stick.\n",
        home = account.home.display()
    )
}

/// Opens the stick home of `account` if `wants` (whether the user asked for one), writing
/// messages for the person to `out`. Errors are turned into a fallback by the caller.
pub fn open(
    cfg: &HookConfig,
    account: &Account,
    wants: bool,
    out: &mut dyn Write,
) -> Result<Opened> {
    if !wants {
        tracing::debug!("{} does not want a stick home", account.name);
        return Ok(Opened::NotWanted);
    }
    let run = UserRunDir::create(&cfg.root, &account.name)?;
    let mut count = run.lock_sessions()?;
    let n = count.get()?;
    if let Some(state) = run.read_state()? {
        if is_pershomefs(&state.home)? {
            // A second session, or a login while the finisher of the last logout still waits:
            // the finisher sees the count and leaves the mount alone.
            count.set(n + 1)?;
            tracing::info!(
                "{}: stick home {} already mounted on {} ({} sessions)",
                account.name,
                state.backing.display(),
                state.home.display(),
                n + 1
            );
            return Ok(Opened::AlreadyMounted);
        }
        // The record of a mount that is gone (the daemon died): start afresh.
        release_stick(&run, &state, cfg.linger())?;
        run.clear_state()?;
    }
    count.set(0)?;

    let fallback = |text: String, out: &mut dyn Write| -> Result<Opened> {
        tell(out, &text);
        if let Err(e) = run.write_notice(
            &text,
            Uid::from_raw(account.uid),
            Gid::from_raw(account.gid),
        ) {
            tracing::warn!(
                "{}: leaving the notice for the desktop: {e:#}",
                account.name
            );
        }
        Ok(Opened::Fallback(text))
    };

    if let Err(e) = mounts::check_home(&account.home, account.uid) {
        tracing::error!("{}: not mounting a stick home: {e:#}", account.name);
        return fallback(
            format!(
                "pershome: your stick home cannot be opened on this computer ({e:#}). You are \
                 working in the normal home folder; please tell the administrator.\n"
            ),
            out,
        );
    }
    if let Some(m) = mount_at(&account.home)? {
        tracing::error!(
            "{}: {} is already a mount point ({} from {}): not mounting a stick home over it",
            account.name,
            account.home.display(),
            m.fstype,
            m.source
        );
        return fallback(
            format!(
                "pershome: your home folder {} is already provided by {} on this computer, so \
                 your stick home was not opened. Please tell the administrator.\n",
                account.home.display(),
                m.fstype
            ),
            out,
        );
    }

    // The site key says whose home a stick is (session::claim); made at first use.
    let key = match SiteKey::load(&cfg.root, true) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!("{}: not mounting a stick home: {e:#}", account.name);
            return fallback(
                format!(
                    "pershome: your stick home cannot be opened on this computer ({e:#}). You \
                     are working in the normal home folder; please tell the administrator.\n"
                ),
                out,
            );
        }
    };
    let stick_mp = run.stick_mountpoint();
    let found = match stick::find(
        &cfg.source,
        &account.name,
        account.uid,
        account.gid,
        &stick_mp,
        Some(&key),
    )? {
        Ok(found) => found,
        Err(missing) => {
            tracing::warn!("{}: no stick home: {missing:?}", account.name);
            return fallback(missing_message(&missing, account), out);
        }
    };
    let stick_name = found
        .mounted
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| found.backing.display().to_string());
    let options = home_mount_options(
        account.uid,
        account.gid,
        cfg.commit_secs(),
        &status_file(&run),
        &stick_name,
    );
    // A status left by an earlier daemon must not speak for this one.
    let _ = std::fs::remove_file(status_file(&run));
    if let Err(e) = mounts::mount_pershomefs(&found.backing, &account.home, &options) {
        tracing::error!(
            "{}: mounting pershomefs from {stick_name}: {e:#}",
            account.name
        );
        let state = State {
            home: account.home.clone(),
            backing: found.backing.clone(),
            stick_mounted: found.mounted.clone(),
        };
        release_stick(&run, &state, cfg.linger())?;
        return fallback(
            format!(
                "pershome: your stick ({stick_name}) could not be opened as your home: {e:#}\n\
                 You are working in this computer's normal home folder for this session. \
                 Check the stick with `pershome fsck` on a computer where you are logged in \
                 without it, or tell the administrator.\n"
            ),
            out,
        );
    }
    run.write_state(&State {
        home: account.home.clone(),
        backing: found.backing.clone(),
        stick_mounted: found.mounted.clone(),
    })?;
    count.set(1)?;
    if let Err(e) = run.clear_notice() {
        tracing::warn!("{}: removing an old notice: {e:#}", account.name);
    }
    tracing::info!(
        "{}: mounted the stick home from {stick_name} on {}",
        account.name,
        account.home.display()
    );
    tell(
        out,
        &format!("pershome: your home folder is on your stick ({stick_name}).\n"),
    );
    Ok(Opened::Mounted {
        backing: found.backing,
        mounted: found.mounted,
    })
}

/// Closes one session of `account`; at the last one, commits and unmounts. When programs
/// still use the home, a finisher is started in the background (see [`finish`]) and the
/// logout goes on.
pub fn close(cfg: &HookConfig, account: &Account, out: &mut dyn Write) -> Result<Closed> {
    let Some(run) = UserRunDir::open(&cfg.root, &account.name)? else {
        return Ok(Closed::Nothing);
    };
    let mut count = run.lock_sessions()?;
    let n = count.get()?;
    let Some(state) = run.read_state()? else {
        count.set(0)?;
        return Ok(Closed::Nothing);
    };
    if n > 1 {
        count.set(n - 1)?;
        tracing::info!(
            "{}: {} sessions remain; the stick home stays",
            account.name,
            n - 1
        );
        return Ok(Closed::StillInUse(n - 1));
    }
    count.set(0)?;
    // Only our own mount is unmounted: one a user put over it is detached first, or the
    // unmount would take theirs and leave the stick mounted.
    if !mounts::uncover_home(&state.home)? {
        tracing::warn!(
            "{}: the stick home on {} was already gone",
            account.name,
            state.home.display()
        );
    }
    mounts::commit(&state.home, cfg.linger());
    match nix::mount::umount2(&state.home, nix::mount::MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {
            teardown(&run, &state, cfg.linger(), account, out)?;
            Ok(Closed::Done)
        }
        Err(nix::errno::Errno::EBUSY) => {
            drop(count);
            spawn_finisher(cfg, account)?;
            tracing::info!(
                "{}: {} is still in use; unmounting in the background within {}s",
                account.name,
                state.home.display(),
                cfg.linger().as_secs()
            );
            tell(
                out,
                "pershome: your files are saved. Programs are still closing: wait a few \
                 seconds before you remove the stick.\n",
            );
            Ok(Closed::Deferred)
        }
        Err(e) => bail!("unmounting {}: {e}", state.home.display()),
    }
}

/// The background half of a close whose home was busy: retries the unmount until `linger`
/// has passed (giving up at once if the user logged in again), then detaches it lazily, and
/// releases the stick.
pub fn finish(cfg: &HookConfig, account: &Account) -> Result<Closed> {
    let Some(run) = UserRunDir::open(&cfg.root, &account.name)? else {
        return Ok(Closed::Nothing);
    };
    let deadline = std::time::Instant::now() + cfg.linger();
    loop {
        let mut count = run.lock_sessions()?;
        let Some(state) = run.read_state()? else {
            return Ok(Closed::Nothing);
        };
        if count.get()? > 0 {
            tracing::info!(
                "{}: logged in again; leaving the stick home mounted",
                account.name
            );
            return Ok(Closed::StillInUse(count.get()?));
        }
        let last_try = std::time::Instant::now() >= deadline;
        mounts::uncover_home(&state.home)?;
        let unmounted = if last_try {
            unmount_within(&state.home, Duration::ZERO)?
        } else {
            match nix::mount::umount2(&state.home, nix::mount::MntFlags::empty()) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {
                    Unmounted::Clean
                }
                Err(nix::errno::Errno::EBUSY) => {
                    drop(count);
                    std::thread::sleep(Duration::from_millis(250));
                    continue;
                }
                Err(e) => bail!("unmounting {}: {e}", state.home.display()),
            }
        };
        if unmounted == Unmounted::Lazily {
            tracing::warn!(
                "{}: programs still used {} after {}s: detached it; the stick is released when \
                 they exit",
                account.name,
                state.home.display(),
                cfg.linger().as_secs()
            );
        }
        teardown(&run, &state, cfg.linger(), account, &mut std::io::sink())?;
        return Ok(Closed::Done);
    }
}

/// After pershomefs is unmounted: waits for its daemon's last commit, releases the stick,
/// forgets the state. Called with the session lock held.
fn teardown(
    run: &UserRunDir,
    state: &State,
    linger: Duration,
    account: &Account,
    out: &mut dyn Write,
) -> Result<()> {
    let daemon_gone = mounts::wait_store_free(&state.backing, DAEMON_EXIT_WAIT)?;
    if !daemon_gone {
        tracing::error!(
            "{}: the pershomefs daemon of {} did not exit within {}s; leaving the stick mounted",
            account.name,
            state.backing.display(),
            DAEMON_EXIT_WAIT.as_secs()
        );
        tell(
            out,
            "pershome: your stick is still busy: do not remove it yet.\n",
        );
        return Ok(());
    }
    release_stick(run, state, linger)?;
    run.clear_state()?;
    let stick = state
        .stick_mounted
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| state.backing.display().to_string());
    // The daemon's exit status says whether its last commit landed (0) or not.
    let status = std::fs::read_to_string(status_file(run)).unwrap_or_default();
    let _ = std::fs::remove_file(status_file(run));
    if status.trim() != "0" {
        tracing::error!(
            "{}: the pershomefs daemon of {stick} did not report its last commit as saved \
             (exit status {status:?})",
            account.name
        );
        tell(
            out,
            "pershome: your last changes could NOT be saved to your stick (it may be full or \
             failing). Do not rely on them: log in again to check your files.\n",
        );
        return Ok(());
    }
    tracing::info!(
        "{}: stick home from {stick} closed; the stick may be removed",
        account.name
    );
    tell(
        out,
        "pershome: your files are saved; you can remove your stick now.\n",
    );
    Ok(())
}

/// The `-o` words the hook mounts a user's home with (`mounts::mount_pershomefs`): a root
/// daemon serving `uid`/`gid`, committing every `commit_secs`, leaving its exit status in
/// `status`, shown in `mount` and `df` as `pershome:<stick_name>`. Public so that
/// `cargo xtask many-mounts` mounts its homes exactly as a login does.
pub fn home_mount_options(
    uid: u32,
    gid: u32,
    commit_secs: u32,
    status: &Path,
    stick_name: &str,
) -> Vec<String> {
    vec![
        format!("uid={uid}"),
        format!("gid={gid}"),
        // The daemon runs as root, so the kernel must let the user in (allow_other);
        // default_permissions (always on) then applies the modes. private_home makes the
        // daemon show every stored owner as the user and the top directory as theirs, 0700,
        // from the mount on (no chmod afterwards), so other users get EACCES as with a
        // normal home whatever the stick says.
        "allow_other".to_owned(),
        "private_home".to_owned(),
        format!("commit={commit_secs}"),
        // Where the daemon leaves its exit status: whether its last commit landed.
        format!(
            "status={}",
            crate::mount_opts::escape_option_value(&status.to_string_lossy())
        ),
        format!(
            "fsname=pershome:{}",
            crate::mount_opts::escape_option_value(stick_name)
        ),
    ]
}

/// The file the pershomefs daemon writes its exit status to (`status=`), in the hook's
/// root-only runtime directory.
fn status_file(run: &UserRunDir) -> PathBuf {
    run.path().join("daemon-status")
}

/// Flushes (`syncfs`, bounded) and unmounts the stick the hook mounted (if it did).
fn release_stick(run: &UserRunDir, state: &State, linger: Duration) -> Result<()> {
    if state.stick_mounted.is_some() {
        let mp = run.stick_mountpoint();
        if mount_at(&mp)?.is_some() {
            mounts::sync_stick(&mp, linger.max(Duration::from_secs(10)));
            let how = unmount_within(&mp, linger)?;
            if how == Unmounted::Lazily {
                tracing::warn!(
                    "{}: still busy after {}s; detached lazily",
                    mp.display(),
                    linger.as_secs()
                );
            }
        }
    }
    Ok(())
}

/// Whether `path` is a pershomefs mount.
fn is_pershomefs(path: &Path) -> Result<bool> {
    Ok(mount_at(path)?.is_some_and(|m| mounts::is_hook_mount(&m)))
}

/// Starts `finish` in the background, outside the session being closed: in its own systemd
/// scope when systemd runs (as LTSP's pamltsp does, so that stopping the session's scope
/// neither waits for nor kills it), else as a detached process of its own session.
fn spawn_finisher(cfg: &HookConfig, account: &Account) -> Result<()> {
    let exe = std::env::current_exe().context("finding the running program")?;
    let mut cmd = mounts::own_scope(&exe, &format!("pershome logout of {}", account.name));
    cmd.arg("--root")
        .arg(&cfg.root)
        .args(["session", "finish"])
        // One argument: a name can never be read as an option of its own.
        .arg(format!("--user={}", account.name))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the finisher from the session's
    // terminal and process group.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        })
    };
    cmd.spawn().context("starting the background unmount")?;
    Ok(())
}

/// Writes a message for the person; a closed stdout is not an error worth failing for.
fn tell(out: &mut dyn Write, text: &str) {
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_why_and_how() {
        let a = Account {
            name: "alice".into(),
            uid: 1,
            gid: 1,
            home: "/home/alice".into(),
        };
        for (m, needle) in [
            (Missing::NoStick, "no USB stick"),
            (Missing::NoPershomeDir("/dev/sdb1".into()), "/dev/sdb1"),
            (Missing::OtherUsers(vec!["bob".into()]), "bob"),
            (Missing::Ambiguous(2), "2 new prepared sticks"),
            (
                Missing::Unclaimed("/dev/sdb1".into()),
                "pershome-config claim alice",
            ),
        ] {
            let text = missing_message(&m, &a);
            for want in [needle, "/home/alice", "pershome prepare", "log in again"] {
                assert!(text.contains(want), "expected {want:?} in {text:?}");
            }
        }
    }
}
