//! The command-line entry points of the login hook, called from `pershome-config`:
//! `session [open|close|finish] [--user U] [--stick-dir DIR]` (pam_exec, pam_script) and
//! `mount-home MOUNTPOINT [-o OPTIONS]` (pam_mount through mount.fuse3).
//!
//! This module owns where the phase and the user come from (arguments, else PAM's
//! `PAM_TYPE`/`PAM_USER` environment), turning the configuration into a [`HookConfig`], and the
//! exit status PAM sees. Its rule: with `on_missing_stick = fallback` (the default) the open
//! exits 0 whatever happens, so pershome never costs anyone their login; every failure is
//! logged with the user's name and told to the person.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::hook::{self, Account, Closed, HookConfig, Opened};
use super::rundir::{self, State, UserRunDir};
use super::stick::Source;
use crate::sysconfig::{self, OnMissingStick, SystemConfig};

/// The exit codes of `pershome-config session` and `mount-home`.
pub mod exit_code {
    /// Done (including a fallback to the normal home).
    pub const SUCCESS: u8 = 0;
    /// `on_missing_stick = deny` and the stick home could not be had; or mount-home failed.
    pub const DENIED: u8 = 1;
    /// Wrong command line: no phase or no user known.
    pub const USAGE: u8 = 2;
}

/// The phase of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Session open: mount the stick home.
    Open,
    /// Session close: unmount at the last session.
    Close,
    /// The background half of a close whose home was still busy (started by `close`).
    #[value(hide = true)]
    Finish,
    /// The stick watcher of `mount-home` (started by it).
    #[value(hide = true)]
    ReleaseStick,
}

/// The phase from pam_exec's `PAM_TYPE` (`open_session`, `close_session`).
pub fn phase_from_pam_type(pam_type: Option<&str>) -> Result<Phase> {
    match pam_type {
        Some("open_session") => Ok(Phase::Open),
        Some("close_session") => Ok(Phase::Close),
        Some(other) => bail!(
            "PAM_TYPE={other}: pershome-config session only runs in the session stack \
             (`session optional pam_exec.so ...`), never for auth, account or password"
        ),
        None => {
            bail!("no phase given and PAM_TYPE is not set: say `session open` or `session close`")
        }
    }
}

/// Where the stick is looked for: the given directory (`{user}` in it replaced by the user
/// name, for per-user sshfs mounts on a thin-client server), else the removable devices.
pub(super) fn source(stick_dir: Option<PathBuf>, system: &SystemConfig, user: &str) -> Source {
    match stick_dir {
        Some(dir) => Source::Directory(expand_user(&dir, user)),
        None => Source::Devices {
            sys_block: PathBuf::from("/sys/block"),
            config: system.clone(),
        },
    }
}

/// `dir` with `{user}` replaced by `user` (a name already checked to be a plain file name).
fn expand_user(dir: &Path, user: &str) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let bytes = dir.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"{user}") {
            out.extend_from_slice(user.as_bytes());
            i += b"{user}".len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// `pershome-config session`: runs one phase for one user. `pam_type`/`pam_user` are the
/// environment's `PAM_TYPE`/`PAM_USER`, used when `phase`/`user` are not given.
pub fn run_session(
    root: &Path,
    phase: Option<Phase>,
    user: Option<String>,
    stick_dir: Option<PathBuf>,
    pam_type: Option<String>,
    pam_user: Option<String>,
    out: &mut dyn Write,
) -> u8 {
    let phase = match phase
        .map(Ok)
        .unwrap_or_else(|| phase_from_pam_type(pam_type.as_deref()))
    {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let Some(name) = user.or(pam_user).filter(|u| !u.is_empty()) else {
        return usage(anyhow::anyhow!(
            "no user given and PAM_USER is not set: say --user USER"
        ));
    };
    // pam_exec without `seteuid` runs us with the caller's real uid (a user running `su`);
    // the daemons started below must be root's entirely.
    if nix::unistd::geteuid().is_root() {
        let root_uid = nix::unistd::Uid::from_raw(0);
        if let Err(e) = nix::unistd::setresuid(root_uid, root_uid, root_uid) {
            tracing::warn!("becoming root entirely: {e}");
        }
    } else {
        tracing::error!(user = %name, "pershome-config session must run as root");
        let _ = writeln!(
            out,
            "pershome: the login hook does not run as root; your stick home was not opened."
        );
        return exit_code::SUCCESS;
    }
    // What pam_exec hands us is the PAM environment: nothing of it reaches a program we run
    // (crate::exec), but a loader variable there was already honoured for this process.
    for var in ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT"] {
        if std::env::var_os(var).is_some() {
            tracing::error!(
                user = %name,
                "the PAM environment sets {var}: a PAM module reads users' environment files \
                 (pam_env user_readenv=1?); run `pershome-config doctor`"
            );
        }
    }
    let (system, config_error) = match sysconfig::load(root) {
        Ok(c) => (c, None),
        Err(e) => (SystemConfig::default(), Some(e)),
    };
    let cfg = HookConfig {
        root: root.to_path_buf(),
        source: source(stick_dir, &system, &name),
        system,
    };
    // The server side of an LTSP login (pamltsp's ssh sessions), or any other remote session:
    // not ours, at open nor at close (a close must not count down a local session's mount).
    if matches!(phase, Phase::Open | Phase::Close)
        && super::ltsp::skips(
            &cfg.system,
            std::env::var("PAM_SERVICE").ok().as_deref(),
            std::env::var("PAM_RHOST").ok().as_deref(),
        )
    {
        tracing::debug!(user = %name, "remote session: left alone (remote_sessions = \"skip\")");
        return exit_code::SUCCESS;
    }
    match phase {
        Phase::Open => open_phase(&cfg, &name, config_error, out),
        Phase::ReleaseStick => {
            if let Err(e) = release_stick_when_free(root, &name) {
                tracing::error!(user = %name, "releasing the stick: {e:#}");
            }
            exit_code::SUCCESS
        }
        Phase::Close | Phase::Finish => {
            let account = match Account::lookup(root, &name) {
                Ok((a, _)) => a,
                Err(e) => {
                    tracing::error!(user = %name, "session close: {e:#}");
                    return exit_code::SUCCESS;
                }
            };
            let result = if phase == Phase::Close {
                hook::close(&cfg, &account, out)
            } else {
                hook::finish(&cfg, &account)
            };
            match result {
                Ok(Closed::Nothing) => {}
                Ok(how) => tracing::debug!(user = %name, "session close: {how:?}"),
                Err(e) => tracing::error!(user = %name, "session close: {e:#}"),
            }
            exit_code::SUCCESS
        }
    }
}

fn usage(e: anyhow::Error) -> u8 {
    eprintln!("pershome-config session: {e:#}");
    tracing::error!("session: {e:#}");
    exit_code::USAGE
}

fn open_phase(
    cfg: &HookConfig,
    name: &str,
    config_error: Option<sysconfig::ConfigError>,
    out: &mut dyn Write,
) -> u8 {
    let deny = cfg.system.on_missing_stick == OnMissingStick::Deny;
    let fallback_code = if deny {
        exit_code::DENIED
    } else {
        exit_code::SUCCESS
    };
    let (account, user) = match Account::lookup(&cfg.root, name) {
        Ok(found) => found,
        Err(e) => {
            // Not a user pershome can know (a remote-only account, say): nothing to do.
            tracing::warn!(user = %name, "session open: {e:#}");
            return exit_code::SUCCESS;
        }
    };
    if let Some(e) = config_error {
        tracing::error!(user = %name, "session open: {e}; using the default configuration");
    }
    let wants = match crate::wants::wants_stick_home(&cfg.root, &user, &cfg.system) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(user = %name, "session open: deciding whether a stick home is wanted: {e}");
            let _ = writeln!(
                out,
                "pershome: the list of stick homes is damaged ({e}); you are using the normal \
                 home folder. Please tell the administrator."
            );
            return fallback_code;
        }
    };
    tracing::debug!(user = %name, "wants a stick home: {wants}");
    if wants.yes() {
        match super::ltsp::client_open(&cfg.root, &cfg.source, &cfg.system, &account, out) {
            Ok(Some(code)) => return code,
            Ok(None) => {}
            Err(e) => tracing::error!(user = %name, "session open on an LTSP client: {e:#}"),
        }
    }
    match hook::open(cfg, &account, wants.yes(), out) {
        Ok(Opened::Fallback(_)) => fallback_code,
        Ok(_) => exit_code::SUCCESS,
        Err(e) => {
            tracing::error!(user = %name, "session open: {e:#}");
            let _ = writeln!(
                out,
                "pershome: your stick home could not be opened ({e:#}); you are using this \
                 computer's normal home folder. Please tell the administrator."
            );
            fallback_code
        }
    }
}

/// `pershome-config mount-home MOUNTPOINT [-o OPTIONS]`: what pam_mount's volume runs through
/// mount.fuse3 (`path="/usr/bin/pershome-config#mount-home"`, so mount.fuse3 calls
/// `pershome-config mount-home MOUNTPOINT -o OPTIONS`). The options name the user
/// (`pershome_user=NAME`, as `pershome-config pam --mode mount` writes it) when run as root;
/// as a user, the user is the caller. Only `pershome_user=`, `stick_dir=` and mount.fuse3's
/// own bookkeeping words are accepted.
///
/// The stick home is opened as the session hook does, but without counting sessions
/// (pam_mount counts them). If the hook mounted a stick device, a watcher is started in the
/// background: it waits for the pershomefs daemon to let go of the store (after pam_mount
/// unmounts the home and the daemon writes its last commit), then unmounts the stick.
pub fn run_mount_home(
    root: &Path,
    mountpoint: &Path,
    options: &[String],
    out: &mut dyn Write,
) -> u8 {
    let mut user = None;
    let mut stick_dir = None;
    for word in options.iter().flat_map(|o| o.split(',')) {
        match word.split_once('=') {
            Some(("pershome_user", v)) => user = Some(v.to_owned()),
            Some(("stick_dir", v)) => stick_dir = Some(PathBuf::from(v)),
            // mount.fuse3 and pam_mount add these; the stick home is always nosuid,nodev.
            None if matches!(
                word,
                "" | "rw"
                    | "nosuid"
                    | "nodev"
                    | "noatime"
                    | "suid"
                    | "dev"
                    | "exec"
                    | "noexec"
                    | "defaults"
            ) => {}
            _ => {
                eprintln!("pershome-config mount-home: unknown option `{word}`");
                return exit_code::USAGE;
            }
        }
    }
    let euid = nix::unistd::geteuid();
    let name = if euid.is_root() {
        match user {
            Some(u) => u,
            None => {
                eprintln!(
                    "pershome-config mount-home: as root, say whose home: -o pershome_user=NAME"
                );
                return exit_code::USAGE;
            }
        }
    } else {
        match nix::unistd::User::from_uid(euid) {
            Ok(Some(u)) if user.as_deref().is_none_or(|n| n == u.name) => u.name,
            _ => {
                eprintln!("pershome-config mount-home: a user may only mount their own home");
                return exit_code::USAGE;
            }
        }
    };
    let system = match sysconfig::load(root) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pershome-config mount-home: {e}");
            return exit_code::DENIED;
        }
    };
    let cfg = HookConfig {
        root: root.to_path_buf(),
        source: source(stick_dir, &system, &name),
        system,
    };
    let (mut account, _) = match Account::lookup(root, &name) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("pershome-config mount-home: {e:#}");
            return exit_code::DENIED;
        }
    };
    // pam_mount expands `~` itself; the mount point it passes is the one to use.
    account.home = mountpoint.to_path_buf();
    match hook::open(&cfg, &account, true, out) {
        Ok(Opened::Mounted { mounted, backing }) => {
            // pam_mount counts sessions itself: forget ours so a later `session close` of
            // the pam_exec hook (if both are configured) does not unmount under pam_mount.
            if let Ok(Some(run)) = UserRunDir::open(root, &name) {
                if let Ok(mut count) = run.lock_sessions() {
                    let _ = count.set(0);
                }
            }
            // The watcher releases the stick (if one was mounted) and forgets the state once
            // pam_mount has unmounted the home.
            tracing::debug!(user = %name, "mount-home: {} (stick {mounted:?})", backing.display());
            if let Err(e) = spawn_stick_watcher(root, &name) {
                tracing::error!(user = %name, "starting the stick watcher: {e:#}");
            }
            exit_code::SUCCESS
        }
        Ok(Opened::AlreadyMounted) => exit_code::SUCCESS,
        Ok(_) => exit_code::DENIED,
        Err(e) => {
            eprintln!("pershome-config mount-home: {e:#}");
            tracing::error!(user = %name, "mount-home: {e:#}");
            exit_code::DENIED
        }
    }
}

fn spawn_stick_watcher(root: &Path, name: &str) -> Result<()> {
    let exe = std::env::current_exe().context("finding the running program")?;
    let mut cmd = super::mounts::own_scope(&exe, &format!("pershome stick watcher of {name}"));
    cmd.arg("--root")
        .arg(root)
        .args(["session", "release-stick"])
        .arg(format!("--user={name}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the watcher from the caller.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        })
    };
    cmd.spawn().context("starting the stick watcher")?;
    Ok(())
}

/// `session release-stick`: the watcher of `mount-home`. Waits (without a deadline: it lives
/// as long as the home is mounted) until the daemon has let go of the store, then unmounts
/// the stick and forgets the state.
pub fn release_stick_when_free(root: &Path, name: &str) -> Result<()> {
    let Some(run) = UserRunDir::open(root, name)? else {
        return Ok(());
    };
    let Some(state) = run.read_state()? else {
        return Ok(());
    };
    // One wait per day at most, repeated: the home stays mounted for a whole session.
    while !super::mounts::wait_store_free(&state.backing, Duration::from_secs(86_400))? {}
    let _count = run.lock_sessions()?;
    if run.read_state()? != Some(state.clone()) {
        return Ok(());
    }
    release(&run, &state)?;
    tracing::info!(user = %name, "pam_mount unmounted the stick home; stick released");
    Ok(())
}

fn release(run: &UserRunDir, state: &State) -> Result<()> {
    if state.stick_mounted.is_some() {
        super::mounts::sync_stick(&run.stick_mountpoint(), Duration::from_secs(10));
        crate::stick::mount::unmount_within(&run.stick_mountpoint(), Duration::from_secs(10))?;
    }
    run.clear_state()
}

/// The title of the notice dialog (tests find the window by it).
pub const NOTICE_TITLE: &str = "Your stick home is not open";

/// `pershome notice`: shows the message the hook left under `root` (`/` on a real system) for
/// the user who runs it (from the XDG autostart entry at desktop start): with zenity when there
/// is a display and zenity is installed, else on stdout. Exit 0 also when there is nothing to
/// show.
pub fn show_notice(root: &Path, out: &mut dyn Write) -> Result<()> {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .context("looking up the current user")?
        .with_context(|| format!("there is no user with uid {uid}"))?;
    show_notice_for(root, &user.name, crate::tools::zenity::has_display(), out)
}

/// zenity's arguments for the notice `text`: a warning with the text as it is (`--no-markup`:
/// a path may hold `<` or `&`), wrapped to a readable width, each line of the notice (why;
/// what it means; how to fix it) a paragraph of its own.
pub fn notice_args(text: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "--warning",
        "--no-markup",
        "--title",
        NOTICE_TITLE,
        "--text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let paragraphs: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    a.push(crate::tools::zenity::wrap(
        &paragraphs.join("\n\n"),
        crate::tools::zenity::WRAP_COLUMNS,
    ));
    a
}

/// Shows `user`'s notice: with zenity when `graphical` and zenity runs, else on `out`. The
/// notice stays (root owns its directory): it is shown at every desktop start until a login
/// opens the stick home, and the hook replaces it.
pub fn show_notice_for(
    root: &Path,
    user: &str,
    graphical: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let Some(text) = rundir::read_notice(root, user)? else {
        return Ok(());
    };
    if graphical {
        let shown = crate::exec::user_command(crate::exec::system_program_or_missing("zenity"))
            .args(notice_args(&text))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .output();
        match shown {
            // 0: OK; 1: closed or Escape, unless GTK could not reach the display (zenity
            // exits 1 for that too, and says so).
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o)
                if o.status.code() == Some(1)
                    && !String::from_utf8_lossy(&o.stderr).contains("cannot open display") =>
            {
                return Ok(())
            }
            Ok(o) => tracing::warn!(
                "zenity could not show the notice ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => tracing::warn!("running zenity for the notice: {e}"),
        }
    }
    out.write_all(text.as_bytes()).context("writing the notice")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notice_is_plain_text_wrapped() {
        let text = "pershome: a <b> & c, in a long sentence that goes on and on past the width \
                    of a readable dialog.\nSecond line.\n";
        let a = notice_args(text);
        assert!(a.iter().any(|x| x == "--no-markup"), "got {a:?}");
        let shown = a.last().map(String::as_str).unwrap_or_default();
        assert!(shown.starts_with("pershome: a <b> & c,"), "got {shown:?}");
        assert!(shown.ends_with(".\n\nSecond line."), "got {shown:?}");
        assert!(
            shown.lines().all(|l| l.chars().count() <= 64),
            "a line is too long: {shown:?}"
        );
    }

    #[test]
    fn phase_from_pam() {
        assert_eq!(
            phase_from_pam_type(Some("open_session")).ok(),
            Some(Phase::Open)
        );
        assert_eq!(
            phase_from_pam_type(Some("close_session")).ok(),
            Some(Phase::Close)
        );
        for bad in [Some("auth"), Some("account"), None] {
            assert!(
                phase_from_pam_type(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
