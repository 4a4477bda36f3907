//! Every program pershome starts goes through here: [`command`] (by absolute path, with a
//! cleared environment and a fixed minimal one) and, for the few graphical programs a person
//! runs with their own rights, [`user_command`].
//!
//! This module owns the rule of docs/security.md "What root runs": the login hook runs as root
//! with the environment pam_exec hands it, which `pam_env.so user_readenv=1` fills from the
//! user's `~/.pam_environment`. A bare program name would be looked up in the user's `PATH`,
//! and an inherited `LD_PRELOAD` would load the user's library into a root process. So no
//! program is named by a bare name and no child inherits our environment. This is the only
//! module that may call `Command::new` (pinned by
//! `tests/pam_session.rs::every_program_is_run_by_absolute_path_with_a_cleared_environment`).
//! It never runs a shell.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `PATH` every child gets (it matters only for what the child itself runs).
pub const SAFE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The locale every child gets: messages we parse or show are then UTF-8 and predictable.
pub const SAFE_LANG: &str = "C.UTF-8";

/// The system directories a program is looked for in, in this order.
const SYSTEM_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// The variables a graphical program needs to reach the person's display, and nothing else.
const DISPLAY_VARS: [&str; 5] = [
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS",
];

/// A system program by absolute path: the first of `/usr/sbin`, `/usr/bin`, `/sbin`, `/bin`
/// that holds `name`. `None` when none does: the caller reports it ("is the package
/// installed?"); it never falls back to a `PATH` search.
pub fn system_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return None;
    }
    SYSTEM_DIRS
        .into_iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// [`system_program`], or a path that cannot exist, so that running it fails with "No such
/// file" naming the program (`/nonexistent/NAME`) instead of searching `PATH`.
pub fn system_program_or_missing(name: &str) -> PathBuf {
    system_program(name).unwrap_or_else(|| Path::new("/nonexistent").join(name))
}

/// A command for `program`, which must be an absolute path, with the environment cleared
/// and set to `PATH=`[`SAFE_PATH`] and `LANG=`[`SAFE_LANG`]. The caller adds arguments (and,
/// where a protocol needs one, a variable of its own, such as fusermount3's `_FUSE_COMMFD`).
/// A relative path is replaced by one that cannot exist: the spawn fails, nothing is searched.
pub fn command(program: impl AsRef<Path>) -> Command {
    let program = program.as_ref();
    let mut c = if program.is_absolute() {
        Command::new(program)
    } else {
        tracing::error!("refusing to run {} by a relative name", program.display());
        Command::new(Path::new("/nonexistent").join(program))
    };
    c.env_clear().env("PATH", SAFE_PATH).env("LANG", SAFE_LANG);
    c
}

/// A graphical program (zenity) that a person runs with their own rights (`pershome notice`,
/// the tools' dialogs): [`command`] plus the display variables of our environment. The login
/// hook never uses it.
pub fn user_command(program: impl AsRef<Path>) -> Command {
    let mut c = command(program);
    for var in DISPLAY_VARS {
        if let Some(v) = std::env::var_os(var) {
            c.env(var, v);
        }
    }
    c
}

/// The environment a [`command`] gives its child, for tests and `pershome-config doctor`.
pub fn child_env(c: &Command) -> Vec<(&OsStr, Option<&OsStr>)> {
    c.get_envs().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_absolute_with_a_fixed_environment() {
        let c = command("/usr/bin/true");
        assert_eq!(c.get_program(), OsStr::new("/usr/bin/true"));
        let mut env: Vec<_> = child_env(&c)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.map(OsStr::to_owned)))
            .collect();
        env.sort();
        let expected = vec![
            ("LANG".into(), Some(SAFE_LANG.into())),
            ("PATH".into(), Some(SAFE_PATH.into())),
        ];
        assert_eq!(env, expected, "expected only PATH and LANG");
        // Cleared: a variable of ours (the test runner's HOME, say) is not passed on.
        let out = command("/usr/bin/env")
            .output()
            .expect("running /usr/bin/env");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        assert_eq!(
            lines,
            vec!["LANG=C.UTF-8", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "expected the child to see only PATH and LANG"
        );
    }

    #[test]
    fn relative_names_are_never_searched() {
        let c = command("env");
        assert_eq!(c.get_program(), OsStr::new("/nonexistent/env"));
        assert_eq!(system_program("../bin/sh"), None);
        assert_eq!(
            system_program_or_missing("no-such-program-pershome"),
            PathBuf::from("/nonexistent/no-such-program-pershome")
        );
        let env = system_program("env").expect("env is in a system directory");
        assert!(env.is_absolute(), "got {env:?}");
    }
}
