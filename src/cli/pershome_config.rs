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

use crate::atomic_file;
use crate::homes_list::{self, ListError};
use crate::logging::{self, LogTarget};
use crate::pam_setup;
use crate::sysconfig;
use crate::wants::{self, Wants};

mod doctor;

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
    /// Set up PAM: the pam_exec session hook (default), pam_mount volumes, or pam_script hooks.
    #[command(long_about = PAM_HELP)]
    Pam(PamArgs),
    /// Check the installation and say what is wrong and how to fix it (exit 0 all OK, 1 not).
    #[command(
        long_about = "Check what a stick home needs: /dev/fuse, fuse3 (fusermount3), \
                      /etc/fuse.conf, the PAM set-up (the pershome profile enabled in \
                      /etc/pam.d/common-session, or pershome's volumes in pam_mount.conf.xml), \
                      /etc/pershome/config.toml and /etc/ltsp/persistent_homes (every listed \
                      user exists). Each check prints OK or the problem and how to fix it. \
                      Exit 0 when all are OK, 1 otherwise."
    )]
    Doctor,
    /// LTSP 23: keep pershome's block in /etc/ltsp/pamltsp.conf, answer pamltsp's SSHFS question.
    #[command(subcommand, long_about = LTSP_HELP)]
    Ltsp(LtspCommand),
    /// Create this site's claim key (/etc/pershome/claim.key) if there is none.
    #[command(
        long_about = "Create the site's claim key, /etc/pershome/claim.key (32 random bytes, \
                      root's, mode 0600), if there is none; an existing key is checked and \
                      kept. The login hook claims new sticks with it, and opens a stick only \
                      for the user it was claimed for with this key: give every machine of one \
                      site the same key (on LTSP it reaches the clients through the image; read \
                      docs/security.md on what that means)."
    )]
    ClaimKey,
    /// Claim a stick as USER's home (as an administrator).
    #[command(
        long_about = "Claim the stick STICK (a block device, the mount point of a stick, or a \
                      directory holding pershome/) as the home of USER on the machines sharing \
                      this site's claim key. The login hook opens a stick with content only for \
                      the user it is claimed for; one that is still empty is claimed by the \
                      first person who logs in with it. Check that the stick is really USER's \
                      first: its files will run as USER."
    )]
    Claim {
        /// The user name.
        user: String,
        /// The stick: a device, its mount point, or a directory holding pershome/.
        stick: PathBuf,
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
        /// sshfs mount of the client's stick) and tests. `{user}` in DIR is replaced by the
        /// user name
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

const LTSP_HELP: &str = "\
LTSP 23 support. pamltsp mounts a client user's server home over SSHFS in the auth phase, \
before the session hook runs. pershome keeps a block in /etc/ltsp/pamltsp.conf (which pamltsp \
sources with PAM_USER set) that sets SSHFS=0 for a user whose stick home will be mounted; \
everybody else keeps the SSHFS home. `ltsp init` rewrites that file at client boot when \
ltsp.conf sets PAM_AUTH_TYPE, SSH_SERVER or SSH_OPTIONS; pershome-ltsp-client.service runs \
`pershome-config ltsp setup` after it, before logins are allowed.";

#[derive(Debug, Subcommand)]
enum LtspCommand {
    /// Put pershome's block into /etc/ltsp/pamltsp.conf (on the server: then `ltsp initrd`).
    Setup,
    /// Exit 0 when pamltsp must not mount USER's server home (their stick home will be
    /// mounted), 1 when it goes on as configured. Asked by the block in pamltsp.conf.
    SkipSshfs {
        /// The user logging in (pamltsp's PAM_USER).
        #[arg(long, value_name = "USER")]
        user: String,
        /// As for `session --stick-dir`: a directory standing for the stick.
        #[arg(long, value_name = "DIR")]
        stick_dir: Option<PathBuf>,
    },
}

const SESSION_HELP: &str = "\
Open or close the stick home of a login session. PAM runs it as root through pam_exec \
(`session optional pam_exec.so quiet stdout /usr/bin/pershome-config session`, phase \
and user from PAM_TYPE and PAM_USER) or from pam_script's pam_script_ses_open/close hooks \
(`pershome-config session open --user \"$PAM_USER\"`).

open: if the user wants a stick home (see `wants`), find the stick (a removable vfat or exFAT \
device with a pershome folder; with several, the one marked as this user's), mount it under \
/run/pershome/USER/raw/stick (nosuid,nodev,noexec), and mount pershomefs on the home. When that \
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

const PAM_HELP: &str = "\
Set up PAM for pershome. Exactly one of --install and --print.

--mode exec (default): a pam-auth-update profile, /usr/share/pam-configs/pershome, with the \
session line `session optional pam_exec.so quiet stdout /usr/bin/pershome-config session` \
(`required` when config.toml says on_missing_stick = \"deny\"). Session only, never auth. \
--install writes it and, when --root is /, runs `pam-auth-update --package --enable pershome`.

--mode mount: pershome's <volume> entries for the users of /etc/ltsp/persistent_homes, merged \
into /etc/security/pam_mount.conf.xml between two marker comments. Other volumes, comments \
and settings are kept as they are; running it again replaces only pershome's block. Re-run \
it after add-user/remove-user. Users with only a $HOME/.persistent_home are not covered in \
this mode.

--mode script: pam_script hooks pam_script_ses_open and pam_script_ses_close in \
/usr/share/libpam-script (never pam_script_auth), for sites that already use pam_script.

--print writes to stdout what --install would write.";

#[derive(Debug, clap::Args)]
struct PamArgs {
    /// How the hook is wired into PAM.
    #[arg(long, value_enum, default_value = "exec")]
    mode: PamMode,
    /// Write the files (and enable the profile when --root is /).
    #[arg(long, conflicts_with = "print", required_unless_present = "print")]
    install: bool,
    /// Write to stdout what --install would write.
    #[arg(long)]
    print: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PamMode {
    /// pam_exec session hook through a pam-auth-update profile.
    Exec,
    /// pam_mount volumes in pam_mount.conf.xml.
    Mount,
    /// pam_script session hooks.
    Script,
}

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
        Command::Pam(args) => pam(root, &args),
        Command::Doctor => doctor::run(root),
        Command::Ltsp(LtspCommand::Setup) => ltsp_setup(root),
        Command::Ltsp(LtspCommand::SkipSshfs { user, stick_dir }) => {
            crate::session::ltsp::run_skip_sshfs(root, &user, stick_dir)
        }
        Command::ClaimKey => match crate::session::claim::SiteKey::load(root, true) {
            Ok(_) => {
                println!(
                    "{} is in place",
                    root.join(crate::session::claim::KEY_PATH).display()
                );
                exit_code::SUCCESS
            }
            Err(e) => fail(exit_code::FAILED, format!("{e:#}")),
        },
        Command::Claim { user, stick } => claim(root, &user, &stick),
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

/// `claim USER STICK`: writes USER's claim on the stick with this site's key.
fn claim(root: &Path, user: &str, stick: &Path) -> u8 {
    if let Err(e) = crate::session::hook::Account::lookup(root, user) {
        return fail(exit_code::NO_USER, format!("{e:#}"));
    }
    let key = match crate::session::claim::SiteKey::load(root, true) {
        Ok(k) => k,
        Err(e) => return fail(exit_code::FAILED, format!("{e:#}")),
    };
    let resolved = match crate::tools::prepare::resolve(stick) {
        Ok(r) => r,
        Err(e) => return fail(exit_code::FAILED, e),
    };
    let backing = match crate::stick::layout::find_pershome_dir(&resolved.dir) {
        Ok(Some(b)) => b,
        Ok(None) => {
            return fail(
                exit_code::FAILED,
                format!(
                    "{} has no pershome folder: run `pershome prepare` on it first",
                    stick.display()
                ),
            )
        }
        Err(e) => return fail(exit_code::FAILED, format!("{e:#}")),
    };
    match crate::session::claim::write_claim(&backing, user, &key) {
        Ok(()) => {
            println!("claimed {} as the home of {user}", backing.display());
            tracing::info!("claim: {} claimed for {user}", backing.display());
            exit_code::SUCCESS
        }
        Err(e) => fail(exit_code::FAILED, format!("{e:#}")),
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
    ltsp_follow_up(root);
    exit_code::SUCCESS
}

/// `ltsp setup`: the block in pamltsp.conf, and on a server what must follow.
fn ltsp_setup(root: &Path) -> u8 {
    match crate::ltsp::ensure_block(root) {
        Ok(changed) => {
            let path = root.join(crate::ltsp::PAMLTSP_CONF);
            if changed {
                println!("{}: pershome's block added", path.display());
                tracing::info!("added pershome's block to {}", path.display());
            } else {
                println!("{}: pershome's block is in place", path.display());
            }
            if changed && crate::ltsp::role(root) == crate::ltsp::Role::Server {
                println!("next: {}", crate::ltsp::FollowUp::Initrd.advice());
            }
            exit_code::SUCCESS
        }
        Err(e) => fail(exit_code::FAILED, format!("{e:#}")),
    }
}

/// After add-user/remove-user on an LTSP server: the block in pamltsp.conf (the clients need
/// it for the list to mean anything), and what the administrator runs next.
fn ltsp_follow_up(root: &Path) {
    if crate::ltsp::role(root) != crate::ltsp::Role::Server {
        return;
    }
    match crate::ltsp::ensure_block(root) {
        Ok(true) => println!(
            "{}: pershome's block added (users with a stick home get no SSHFS home)",
            root.join(crate::ltsp::PAMLTSP_CONF).display()
        ),
        Ok(false) => {}
        Err(e) => eprintln!("pershome-config: warning: {e:#}"),
    }
    println!("next: {}", crate::ltsp::FollowUp::Initrd.advice());
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

fn load_config(root: &Path) -> Result<sysconfig::SystemConfig, u8> {
    sysconfig::load(root).map_err(|e| match e {
        sysconfig::ConfigError::Invalid { .. } => fail(exit_code::CONFIG, e),
        sysconfig::ConfigError::Read { .. } => fail(exit_code::FAILED, e),
    })
}

fn pam(root: &Path, args: &PamArgs) -> u8 {
    let files = match pam_files(root, args.mode) {
        Ok(files) => files,
        Err(code) => return code,
    };
    if args.print {
        let several = files.len() > 1;
        for (path, contents, _) in &files {
            if several {
                // Only the script mode has several files; they are shell scripts, so a
                // comment line tells them apart without breaking either.
                println!("# ==> {} <==", path.display());
            }
            print!("{contents}");
        }
        return exit_code::SUCCESS;
    }
    for (path, contents, mode) in &files {
        if let Err(e) = atomic_file::replace(path, contents.as_bytes(), *mode) {
            return fail(exit_code::FAILED, e);
        }
        println!("wrote {}", path.display());
        tracing::info!("pam --mode {:?}: wrote {}", args.mode, path.display());
    }
    match args.mode {
        PamMode::Exec if root == Path::new("/") => {
            // Fixed arguments, no shell: pam-auth-update regenerates /etc/pam.d/common-*.
            let status =
                crate::exec::command(crate::exec::system_program_or_missing("pam-auth-update"))
                    .args(["--package", "--enable", pam_setup::PROFILE_NAME])
                    .status();
            match status {
                Ok(s) if s.success() => {
                    println!("enabled the {} profile", pam_setup::PROFILE_NAME);
                    tracing::info!("pam-auth-update --enable {}", pam_setup::PROFILE_NAME);
                }
                Ok(s) => {
                    return fail(
                        exit_code::FAILED,
                        format!("pam-auth-update --package --enable pershome failed: {s}"),
                    )
                }
                Err(e) => {
                    return fail(
                        exit_code::FAILED,
                        format!("running pam-auth-update (package libpam-runtime): {e}"),
                    )
                }
            }
        }
        PamMode::Exec => println!(
            "not running pam-auth-update under --root {}: run `pam-auth-update --package \
             --enable pershome` inside that system",
            root.display()
        ),
        PamMode::Mount => println!(
            "pam_mount must be in the session stack (libpam-mount enables it); re-run this \
             after add-user/remove-user"
        ),
        PamMode::Script => println!(
            "pam_script.so must be in the session stack (libpam-script) for the hooks to run"
        ),
    }
    exit_code::SUCCESS
}

/// The files `pam --install` writes for a mode: (path under root, contents, mode if new).
fn pam_files(root: &Path, mode: PamMode) -> Result<Vec<(PathBuf, String, u32)>, u8> {
    match mode {
        PamMode::Exec => {
            let cfg = load_config(root)?;
            let deny = cfg.on_missing_stick == sysconfig::OnMissingStick::Deny;
            Ok(vec![(
                root.join(pam_setup::PROFILE_PATH),
                pam_setup::pam_auth_update_profile(deny),
                0o644,
            )])
        }
        PamMode::Script => Ok(pam_setup::pam_script_hooks()
            .into_iter()
            .map(|(name, text)| (root.join(pam_setup::PAM_SCRIPT_DIR).join(name), text, 0o755))
            .collect()),
        PamMode::Mount => {
            let users = homes_list::list(root).map_err(|e| fail(list_error_code(&e), e))?;
            let path = root.join(pam_setup::PAM_MOUNT_CONF);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    pam_setup::EMPTY_PAM_MOUNT_CONF.to_owned()
                }
                Err(e) => {
                    return Err(fail(
                        exit_code::FAILED,
                        format!("reading {}: {e}", path.display()),
                    ))
                }
            };
            let merged = pam_setup::merge_pam_mount(&text, &users, &path)
                .map_err(|e| fail(exit_code::CONFIG, e))?;
            Ok(vec![(path, merged, 0o644)])
        }
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
