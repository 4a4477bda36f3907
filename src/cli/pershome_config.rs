//! `pershome-config`: the administrator's command. It edits `/etc/ltsp/persistent_homes`,
//! answers whether a user wants a stick home, and (in later subcommands) sets up PAM and checks
//! the installation. Every subcommand takes `--root DIR` to act on another root, as
//! `useradd --root` does; tests use it on temporary directories.
//!
//! This module owns the command line, the messages and the exit codes. The file formats and
//! rules live in `sysconfig`, `homes_list` and `wants`; this module never parses a file itself
//! and never passes a user-supplied string to a shell. What it changes is logged to syslog
//! (journald) with the user's name; what it prints is for the person at the terminal.
//!
//! Exit codes (also in `--help`): see [`exit_code`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::homes_list::{self, ListError};
use crate::logging::{self, LogTarget};
use crate::sysconfig;
use crate::wants::{self, Wants};

/// The exit codes of `pershome-config`.
pub mod exit_code {
    /// Success; for `wants`: the user wants a stick home.
    pub const SUCCESS: u8 = 0;
    /// `wants`: the user does not want a stick home. `doctor`: a check found a problem.
    pub const NO: u8 = 1;
    /// Wrong command line (clap's code), or an invalid user name given.
    pub const USAGE: u8 = 2;
    /// `/etc/pershome/config.toml` or `/etc/ltsp/persistent_homes` is malformed.
    pub const CONFIG: u8 = 3;
    /// No such user (`wants`).
    pub const NO_USER: u8 = 4;
    /// Anything else failed: reading or writing a file, running a program.
    pub const FAILED: u8 = 5;
}

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success; for `wants`: the user wants a stick home
  1  `wants`: the user does not; `doctor`: a problem was found
  2  wrong command line or invalid user name
  3  /etc/pershome/config.toml or /etc/ltsp/persistent_homes is malformed (the message names
     the line)
  4  no such user
  5  another failure (reading or writing a file, running a program)

Files:
  /etc/ltsp/persistent_homes   users who get a stick home, one per line, # comments
  /etc/pershome/config.toml    system settings (see docs/admin-guide.md); defaults built in
  $HOME/.persistent_home       a user's own request for a stick home (if honour_user_file)

Changes are logged to syslog (journalctl -t pershome-config).";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "pershome-config",
    version,
    about = "Set up pershome (a POSIX home on a FAT or exFAT USB stick) for LTSP logins",
    long_about = "Set up pershome for LTSP logins: choose which users get their home from a \
                  USB stick, install the PAM session hook, and check the installation.",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// Act on the files under DIR instead of / (as `useradd --root`): DIR/etc/ltsp/...,
    /// DIR/etc/pershome/..., users from DIR/etc/passwd.
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Give users a stick home: add them to /etc/ltsp/persistent_homes.
    #[command(
        long_about = "Add users to /etc/ltsp/persistent_homes (created if missing). A user \
                      already listed is left as is. Comments and order of the file are kept; \
                      the file is replaced atomically and concurrent runs wait for each other."
    )]
    AddUser {
        /// User names (letters, digits, . _ -; not starting with -).
        #[arg(required = true, value_name = "USER")]
        users: Vec<String>,
    },
    /// Take the stick home away from users: remove them from /etc/ltsp/persistent_homes.
    #[command(
        long_about = "Remove users from /etc/ltsp/persistent_homes, with the comment on their \
                      line. A user who created $HOME/.persistent_home still gets a stick home \
                      unless honour_user_file = false."
    )]
    RemoveUser {
        /// User names.
        #[arg(required = true, value_name = "USER")]
        users: Vec<String>,
    },
    /// List the users of /etc/ltsp/persistent_homes, one per line.
    List,
    /// Say whether USER gets a stick home, and why (exit 0 yes, 1 no).
    #[command(
        long_about = "Say whether USER gets a stick home at login, and why: listed in \
                      /etc/ltsp/persistent_homes, or a $HOME/.persistent_home file owned by \
                      the user (a symlink, a file owned by someone else, or a home others can \
                      write is ignored). Exit 0 yes, 1 no, 4 no such user."
    )]
    Wants {
        /// The user name.
        user: String,
        /// Print nothing; only the exit code tells.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Open or close the stick home of a login session (run by PAM as root).
    #[command(long_about = SESSION_HELP)]
    Session {
        /// open or close; default: from PAM_TYPE (open_session, close_session)
        #[arg(value_enum)]
        phase: Option<crate::session::entry::Phase>,
        /// The user; default: PAM_USER
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// Use DIR as the stick (its pershome/ directory, used as it is; nothing is
        /// mounted) instead of looking for a removable device: the thin-client case (an
        /// sshfs mount of the client's stick) and tests
        #[arg(long, value_name = "DIR")]
        stick_dir: Option<PathBuf>,
    },
    /// Mount a stick home on MOUNTPOINT: the pam_mount entry point, through mount.fuse3.
    #[command(long_about = MOUNT_HOME_HELP)]
    MountHome {
        /// Where the home goes (pam_mount passes the user's home)
        mountpoint: PathBuf,
        /// Options: pershome_user=NAME (needed as root), stick_dir=DIR; mount.fuse3's
        /// rw,nosuid,nodev and similar words are accepted and ignored
        #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
        options: Vec<String>,
    },
}

const SESSION_HELP: &str = "\
Open or close the stick home of a login session. PAM runs it as root through pam_exec \
(`session optional pam_exec.so quiet stdout seteuid /usr/bin/pershome-config session`, phase \
and user from PAM_TYPE and PAM_USER) or from pam_script's pam_script_ses_open/close hooks \
(`pershome-config session open --user \"$PAM_USER\"`).

open: if the user wants a stick home (see `wants`), find the stick (a removable vfat or exFAT \
device with a pershome folder; with several, the one marked as this user's), mount it under \
/run/pershome/USER/stick (nosuid,nodev,noexec), and mount pershomefs on the home. When that \
cannot be done the login goes on with the normal home, and the person is told why and how \
to fix it (on the terminal, and by the desktop dialog `pershome notice`). Exit 0 then, or 1 \
with on_missing_stick = deny.

close: at the close of the user's last session, commit, unmount the home (waiting up to \
logout_timeout seconds in the background for programs still using it), unmount the stick, \
sync, and say that the stick may be removed.

Everything is logged to syslog (journalctl -t pershome-config) with the user and the stick.";

const MOUNT_HOME_HELP: &str = "\
Mount a stick home on MOUNTPOINT, for pam_mount. pam_mount.conf.xml names it as \
<volume fstype=\"fuse\" path=\"/usr/bin/pershome-config#mount-home\" mountpoint=\"~\" .../>; \
mount.fuse3 then runs `pershome-config mount-home MOUNTPOINT -o OPTIONS`. Run as root (with \
-o pershome_user=NAME) it finds and mounts the stick itself, and a background watcher unmounts the \
stick once pam_mount has unmounted the home and pershomefs has written its last commit. Run \
as the user it can only use a stick directory (-o stick_dir=DIR).";

/// The clap command, for man pages and shell completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Runs `pershome-config` with `args` (the program name first).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    ExitCode::from(run(args))
}

fn run(args: impl IntoIterator<Item = OsString>) -> u8 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit_code::USAGE
            } else {
                exit_code::SUCCESS
            };
            let _ = e.print();
            return code;
        }
    };
    // What this command changes goes to syslog; what the person needs to see is printed.
    // A missing /dev/log (a container) only loses the log lines.
    let _ = logging::init_with_ident(LogTarget::Syslog, false, c"pershome-config");
    let root = cli.root.as_path();
    match cli.command {
        Command::AddUser { users } => edit_users(root, &users, Edit::Add),
        Command::RemoveUser { users } => edit_users(root, &users, Edit::Remove),
        Command::List => list(root),
        Command::Wants { user, quiet } => wants(root, &user, quiet),
        Command::Session {
            phase,
            user,
            stick_dir,
        } => crate::session::entry::run_session(
            root,
            phase,
            user,
            stick_dir,
            std::env::var("PAM_TYPE").ok(),
            std::env::var("PAM_USER").ok(),
            &mut std::io::stdout().lock(),
        ),
        Command::MountHome {
            mountpoint,
            options,
        } => crate::session::entry::run_mount_home(
            root,
            &mountpoint,
            &options,
            &mut std::io::stdout().lock(),
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edit {
    Add,
    Remove,
}

/// Prints an error as `pershome-config: ...` and logs it; returns its exit code.
fn fail(code: u8, message: impl std::fmt::Display) -> u8 {
    eprintln!("pershome-config: {message}");
    tracing::error!("{message}");
    code
}

fn list_error_code(e: &ListError) -> u8 {
    match e {
        ListError::Malformed { .. } => exit_code::CONFIG,
        ListError::InvalidName(_) => exit_code::USAGE,
        ListError::Io { .. } => exit_code::FAILED,
    }
}

fn edit_users(root: &Path, users: &[String], edit: Edit) -> u8 {
    // Refuse the whole command before changing anything if one name is invalid.
    for user in users {
        if let Err(why) = homes_list::check_user_name(user) {
            return fail(exit_code::USAGE, why);
        }
    }
    let file = root.join(homes_list::LIST_PATH);
    for user in users {
        let result = match edit {
            Edit::Add => homes_list::add(root, user),
            Edit::Remove => homes_list::remove(root, user),
        };
        match (edit, result) {
            (_, Err(e)) => return fail(list_error_code(&e), e),
            (Edit::Add, Ok(true)) => {
                println!("{user}: added to {}", file.display());
                tracing::info!(user = %user, "added to {}", file.display());
                match wants::lookup_user(root, user) {
                    Ok(Some(_)) => {}
                    Ok(None) => eprintln!(
                        "pershome-config: warning: there is no user {user:?} (yet); the entry \
                         takes effect once the user exists"
                    ),
                    Err(e) => eprintln!("pershome-config: warning: looking up {user:?}: {e}"),
                }
            }
            (Edit::Add, Ok(false)) => println!("{user}: already listed"),
            (Edit::Remove, Ok(true)) => {
                println!("{user}: removed from {}", file.display());
                tracing::info!(user = %user, "removed from {}", file.display());
            }
            (Edit::Remove, Ok(false)) => println!("{user}: was not listed"),
        }
    }
    exit_code::SUCCESS
}

fn list(root: &Path) -> u8 {
    match homes_list::list(root) {
        Ok(users) => {
            for user in users {
                println!("{user}");
            }
            exit_code::SUCCESS
        }
        Err(e) => fail(list_error_code(&e), e),
    }
}

fn wants(root: &Path, name: &str, quiet: bool) -> u8 {
    let cfg = match sysconfig::load(root) {
        Ok(cfg) => cfg,
        Err(e @ sysconfig::ConfigError::Invalid { .. }) => return fail(exit_code::CONFIG, e),
        Err(e) => return fail(exit_code::FAILED, e),
    };
    let user = match wants::lookup_user(root, name) {
        Ok(Some(user)) => user,
        Ok(None) => return fail(exit_code::NO_USER, format!("no such user: {name:?}")),
        Err(e) => return fail(exit_code::FAILED, format!("looking up {name:?}: {e}")),
    };
    match wants::wants_stick_home(root, &user, &cfg) {
        Ok(answer) => {
            if !quiet {
                println!("{}: {answer}", user.name);
            }
            match answer {
                Wants::Yes(_) => exit_code::SUCCESS,
                Wants::No(_) => exit_code::NO,
            }
        }
        Err(wants::WantsError::List(e)) => fail(list_error_code(&e), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_is_consistent() {
        command().debug_assert();
    }
}
