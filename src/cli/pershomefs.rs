//! `pershomefs BACKING MOUNTPOINT [-o OPTIONS]... [-f] [-d]`: the front part of the FUSE daemon,
//! generic over the filesystem it mounts. It parses the command line as `mount.fuse3` and
//! `/etc/fstab` hand it over, checks BACKING and MOUNTPOINT, calls the opener, mounts, and
//! either stays in the foreground or goes to the background once the mount is ready.
//!
//! This module owns the command-line syntax, the checks before mounting, the messages a person
//! sees and the exit codes. It never mounts when a check fails, never reads the stick itself
//! (the opener does), and never panics on bad input: every failure is a message and a code.
//!
//! Exit codes (also in `--help`):
//! - 0: success (mounted; or `--help`/`--version`)
//! - 1: usage or mount-option error
//! - 2: BACKING or MOUNTPOINT problem (missing, not a directory, read-only, not accessible)
//! - 3: the metadata store refused the stick (newer format, unreadable)
//! - 4: mounting failed (FUSE, fusermount3, permissions)
//! - 5: internal error

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use nix::unistd::AccessFlags;

use crate::cli::OpenError;
use crate::daemon::{self, Forked, Readiness};
use crate::logging::{self, LogTarget};
use crate::mount_opts::{parse_options, MountOptions};

/// The exit codes of `pershomefs`.
pub mod exit_code {
    /// Mounted (or help/version shown).
    pub const SUCCESS: u8 = 0;
    /// Wrong command line or mount option.
    pub const USAGE: u8 = 1;
    /// BACKING or MOUNTPOINT cannot be used.
    pub const PATHS: u8 = 2;
    /// The metadata store refused the stick (newer format, unreadable).
    pub const METADATA: u8 = 3;
    /// The kernel mount failed.
    pub const MOUNT: u8 = 4;
    /// Internal error.
    pub const INTERNAL: u8 = 5;
    /// Served and unmounted, but the last metadata commit did not land on the stick (full or
    /// failing): changes since the last successful commit are lost.
    pub const NOT_SAVED: u8 = 6;
}

const OPTIONS_HELP: &str = "\
Mount options (-o, comma-separated, may be repeated; escape a comma in a value as \\,):
  uid=USER|N         the stick's owner appears as this user (default: you)
  gid=GROUP|N        the stick's owner appears in this group (default: your group)
  allow_other        let every user use the mount (non-root needs user_allow_other
                     in /etc/fuse.conf)
  allow_root         let root use the mount as well as you
  ro                 read-only: nothing is ever written to the stick
  rw                 read-write (the default)
  commit=SECONDS     commit metadata changes to the stick at least this often
                     (1-3600, default 5): a yanked stick loses at most that much
  names=long|8.3     how names are written on the stick: long (FAT long names,
                     the default for a new stick) or 8.3 (upper-case NAME.EXT only,
                     for a stick mounted msdos or an old device; the real names are
                     kept in the metadata store). A stick keeps the mode it was first
                     written in: without the option its own mode is used, and the
                     other mode is refused
  parts=auto|always|never
                     store files past 4 GiB - 4 KiB in parts (default auto: on a
                     FAT or unknown backing; files stay whole on exFAT, ext4 and
                     other file systems that hold large files)
  part_size=BYTES    for tests: the part size of newly split files (a multiple
                     of 4096; default 4294963200)
  status=PATH        when the daemon ends, write its exit status there (0: every
                     change is on the stick; 6: the last commit failed)
  compact_after=BYTES
                     for tests: compact the metadata store once its journal holds
                     this many bytes (default 4 MiB)
  threads=N          how many threads serve requests (1-16, default 4)
  counters           count requests per FUSE opcode; root reads the report as the
                     mount root's xattr trusted.pershome.requests (for the bench)
  fsname=NAME        the source name shown by mount and df (default: BACKING)
  subtype=...        ignored: the type is always fuse.pershomefs
  noexec, exec       forbid or allow running programs from the mount
  noatime, atime, relatime
                     access-time updates (relatime is the default)
  sync, async, dirsync
                     synchronous writes / synchronous directory changes
  defaults, auto, noauto, user, users, nouser, _netdev, nofail, x-*, comment=,
  default_permissions, nosuid, nodev
                     accepted and ignored (fstab bookkeeping, or always on)
  suid, dev          accepted (mount.fuse3 adds them for root) but ignored: a stick
                     is untrusted, so pershome always mounts nosuid,nodev

Environment:
  PERSHOME_LOG       log filter, e.g. debug or pershome=trace (default: info)

Exit status:
  0  mounted (the background daemon is serving), or --help/--version
  1  usage or mount-option error
  2  BACKING or MOUNTPOINT problem (missing, not a directory, read-only,
     not accessible)
  3  the stick's metadata was refused (written by a newer pershome, unreadable)
  4  mounting failed (FUSE or fusermount3)
  5  internal error
  6  (the daemon, at unmount) the last metadata commit did not land on the stick
     (full or failing): changes since the last successful commit are lost;
     status=PATH receives this status too";

/// Mount a pershome directory of a USB stick as a full POSIX home directory.
#[derive(Debug, Parser)]
#[command(
    name = "pershomefs",
    version,
    about = "Mount the pershome/ directory of a FAT or exFAT stick as a POSIX home directory",
    long_about = "Mount the pershome/ directory of a FAT or exFAT USB stick as a full POSIX home \
                  directory. Without -f, pershomefs returns once the mount is ready and keeps \
                  serving it in the background, logging to syslog; unmount with \
                  `fusermount3 -u MOUNTPOINT` or `umount MOUNTPOINT`, or send SIGTERM.",
    after_help = OPTIONS_HELP
)]
struct Args {
    /// The pershome directory on the mounted stick, e.g. /media/alice/STICK/pershome
    #[arg(value_name = "BACKING")]
    backing: PathBuf,
    /// Where the home directory appears, e.g. /home/alice
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
    /// Mount options, comma-separated (see below)
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Stay in the foreground and log to stderr
    #[arg(short = 'f')]
    foreground: bool,
    /// Debug logging (implies -f)
    #[arg(short = 'd')]
    debug: bool,
}

/// The `pershomefs` command line as clap sees it: what `main` parses, and what the man page
/// pershomefs(1) and the shell completions are generated from (`cargo xtask man`), so they
/// cannot drift from the real syntax.
pub fn command() -> clap::Command {
    Args::command()
}

/// A failure before the session runs: the message for the person and the exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// BACKING and MOUNTPOINT after the checks, as absolute canonical paths (the daemon later
/// changes directory to `/`, so relative paths would stop meaning the same).
#[derive(Debug)]
struct Paths {
    backing: PathBuf,
    mountpoint: PathBuf,
}

/// Runs `pershomefs` with the given arguments (the first is the program name). `open` builds
/// the filesystem from the canonical BACKING path and the options; it runs in the process
/// that then serves the mount, after the checks and before mounting.
pub fn main<F, O>(args: impl IntoIterator<Item = OsString>, open: O) -> ExitCode
where
    F: fuser::Filesystem,
    O: FnOnce(&Path, &MountOptions) -> Result<F, OpenError>,
{
    ExitCode::from(run(args, open))
}

fn run<F, O>(args: impl IntoIterator<Item = OsString>, open: O) -> u8
where
    F: fuser::Filesystem,
    O: FnOnce(&Path, &MountOptions) -> Result<F, OpenError>,
{
    // First, while this process has one thread (see the function for why).
    daemon::limit_malloc_arenas();
    if let Err(e) = daemon::ensure_stdio_open() {
        eprintln!("pershomefs: cannot open /dev/null for closed standard descriptors: {e}");
        return exit_code::INTERNAL;
    }
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            // Help and version go to stdout and are a success; everything else is a usage
            // error (clap's own default code, 2, is taken by BACKING problems here).
            let code = if e.use_stderr() {
                exit_code::USAGE
            } else {
                exit_code::SUCCESS
            };
            let _ = e.print();
            return code;
        }
    };
    let option_lists: Vec<&str> = args.options.iter().map(String::as_str).collect();
    let opts = match parse_options(&option_lists) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("pershomefs: {e}");
            return exit_code::USAGE;
        }
    };
    let paths = match check_paths(&args.backing, &args.mountpoint, &opts) {
        Ok(paths) => paths,
        Err(f) => {
            eprintln!("pershomefs: {}", f.message);
            return f.code;
        }
    };

    if args.foreground || args.debug {
        if let Err(e) = logging::init(LogTarget::Stderr, args.debug) {
            eprintln!("pershomefs: {e:#}");
        }
        if let Err(e) = daemon::block_termination_signals() {
            eprintln!("pershomefs: blocking termination signals: {e}");
            return exit_code::INTERNAL;
        }
        return serve(&paths, &opts, open, None);
    }

    // Fork before opening: see the `daemon` module for why.
    match daemon::daemonize(exit_code::INTERNAL) {
        Err(e) => {
            eprintln!("pershomefs: cannot start the background process: {e}");
            exit_code::INTERNAL
        }
        Ok(Forked::Parent(code)) => code,
        Ok(Forked::Child(readiness)) => {
            if let Err(e) = logging::init(LogTarget::Syslog, false) {
                eprintln!("pershomefs: {e:#}");
            }
            if let Err(e) = daemon::block_termination_signals() {
                eprintln!("pershomefs: blocking termination signals: {e}");
                readiness.failed(exit_code::INTERNAL);
                return exit_code::INTERNAL;
            }
            serve(&paths, &opts, open, Some(readiness))
        }
    }
}

/// Opens, mounts, reports readiness and serves until unmounted. `readiness` is `Some` in the
/// background daemon, whose stderr is still the caller's until the mount is ready.
fn serve<F, O>(paths: &Paths, opts: &MountOptions, open: O, readiness: Option<Readiness>) -> u8
where
    F: fuser::Filesystem,
    O: FnOnce(&Path, &MountOptions) -> Result<F, OpenError>,
{
    let fail = |code: u8, message: String, readiness: Option<Readiness>| {
        eprintln!("pershomefs: {message}");
        if let Some(readiness) = readiness {
            // Stderr may be a terminal that is gone by the time someone looks: keep it in
            // the log too.
            tracing::error!("{message}");
            readiness.failed(code);
        }
        code
    };
    let fs = match open(&paths.backing, opts) {
        Ok(fs) => fs,
        Err(e) => {
            let message = format!("cannot open {}: {e}", paths.backing.display());
            return fail(e.exit_code(), message, readiness);
        }
    };
    let config = opts.to_fuser_config(&opts.source_name(&paths.backing));
    let mounted = match daemon::mount(fs, &paths.mountpoint, &config) {
        Ok(mounted) => mounted,
        Err(e) => {
            let message = format!(
                "mounting on {} failed: {e}{}",
                paths.mountpoint.display(),
                mount_hint(opts)
            );
            return fail(exit_code::MOUNT, message, readiness);
        }
    };
    tracing::info!(
        "mounted {} on {} (commit every {}s{})",
        paths.backing.display(),
        paths.mountpoint.display(),
        opts.commit_interval.as_secs(),
        if opts.read_only { ", read-only" } else { "" }
    );
    if let Some(readiness) = readiness {
        if let Err(e) = readiness.ready() {
            tracing::warn!("detaching from the terminal: {e}");
        }
    }
    let code = match mounted.run() {
        Ok(()) if crate::fuse::last_commit_landed() => {
            tracing::info!("{} unmounted", paths.mountpoint.display());
            exit_code::SUCCESS
        }
        Ok(()) => {
            tracing::error!(
                "{} unmounted, but the last metadata commit failed: changes since the last \
                 successful commit are not on the stick",
                paths.mountpoint.display()
            );
            exit_code::NOT_SAVED
        }
        Err(e) => {
            tracing::error!("the FUSE session ended with an error: {e}");
            exit_code::INTERNAL
        }
    };
    if let Some(path) = &opts.status_file {
        if let Err(e) = write_status(path, code) {
            tracing::error!("writing the exit status to {}: {e}", path.display());
        }
    }
    code
}

/// Writes `code` and a newline to `path` (`status=`), replacing a file there but never
/// following a symlink.
fn write_status(path: &Path, code: u8) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    writeln!(f, "{code}")?;
    f.sync_all()
}

/// A hint for the most common reason a mount fails.
fn mount_hint(opts: &MountOptions) -> &'static str {
    use crate::mount_opts::Access;
    if opts.access == Access::Everyone && !nix::unistd::geteuid().is_root() {
        " (allow_other needs `user_allow_other` in /etc/fuse.conf)"
    } else {
        ""
    }
}

/// The checks before anything is opened or mounted.
fn check_paths(backing: &Path, mountpoint: &Path, opts: &MountOptions) -> Result<Paths, Failure> {
    let shown = backing.display();
    let meta = std::fs::metadata(backing).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => failure(
            exit_code::PATHS,
            format!(
                "BACKING {shown} does not exist: is the stick mounted? Create the directory \
                 with `pershome prepare`."
            ),
        ),
        _ => failure(
            exit_code::PATHS,
            format!("cannot reach BACKING {shown}: {e}"),
        ),
    })?;
    if !meta.is_dir() {
        return Err(failure(
            exit_code::PATHS,
            format!(
                "BACKING {shown} is not a directory: give the pershome directory on the stick, \
                 e.g. /media/USER/STICK/pershome"
            ),
        ));
    }
    let backing_abs = backing.canonicalize().map_err(|e| {
        failure(
            exit_code::PATHS,
            format!("cannot resolve BACKING {shown}: {e}"),
        )
    })?;
    let uid = nix::unistd::getuid();
    if nix::unistd::access(backing, AccessFlags::R_OK | AccessFlags::X_OK).is_err() {
        return Err(failure(
            exit_code::PATHS,
            format!(
                "BACKING {shown} is not readable by you (uid {uid}): check how the stick is \
                 mounted (its uid= and umask= options)"
            ),
        ));
    }
    if !opts.read_only {
        let on_ro_fs = nix::sys::statvfs::statvfs(backing)
            .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
            .unwrap_or(false);
        if on_ro_fs {
            return Err(failure(
                exit_code::PATHS,
                format!(
                    "BACKING {shown} is on a read-only filesystem: is the stick's write-protect \
                     switch on? Remount it read-write, or mount with `-o ro` to use it \
                     read-only."
                ),
            ));
        }
        if let Err(e) = nix::unistd::access(backing, AccessFlags::W_OK) {
            return Err(failure(
                exit_code::PATHS,
                format!(
                    "BACKING {shown} is not writable by you (uid {uid}): {e}. Check how the \
                     stick is mounted (its uid= and umask= options), or mount with `-o ro`."
                ),
            ));
        }
    }

    let shown = mountpoint.display();
    let meta = std::fs::metadata(mountpoint).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => failure(
            exit_code::PATHS,
            format!("MOUNTPOINT {shown} does not exist: create it first (mkdir {shown})."),
        ),
        _ => failure(
            exit_code::PATHS,
            format!("cannot reach MOUNTPOINT {shown}: {e}"),
        ),
    })?;
    if !meta.is_dir() {
        return Err(failure(
            exit_code::PATHS,
            format!("MOUNTPOINT {shown} is not a directory: give an empty directory."),
        ));
    }
    let mountpoint_abs = mountpoint.canonicalize().map_err(|e| {
        failure(
            exit_code::PATHS,
            format!("cannot resolve MOUNTPOINT {shown}: {e}"),
        )
    })?;
    // Mounting inside the backing directory would make the filesystem its own backing:
    // every access to that part of the stick would call back into the daemon.
    if mountpoint_abs.starts_with(&backing_abs) {
        return Err(failure(
            exit_code::PATHS,
            format!(
                "MOUNTPOINT {} is inside BACKING {}: choose a mount point outside the stick's \
                 pershome directory.",
                mountpoint_abs.display(),
                backing_abs.display()
            ),
        ));
    }
    Ok(Paths {
        backing: backing_abs,
        mountpoint: mountpoint_abs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(args)
    }

    #[test]
    fn command_line_like_mount_fuse3() {
        let a = match parse(&["pershomefs", "/b", "/m", "-o", "ro,uid=1", "-o", "commit=9"]) {
            Ok(a) => a,
            Err(e) => panic!("expected the mount.fuse3 form to parse, got {e}"),
        };
        assert_eq!(
            (a.backing, a.mountpoint, a.options, a.foreground, a.debug),
            (
                PathBuf::from("/b"),
                PathBuf::from("/m"),
                vec!["ro,uid=1".to_owned(), "commit=9".to_owned()],
                false,
                false
            )
        );
        let a = parse(&["pershomefs", "-f", "-d", "-o", "ro", "/b", "/m"]);
        assert!(
            a.as_ref().is_ok_and(|a| a.foreground && a.debug),
            "got {a:?}"
        );
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &["pershomefs"][..],
            &["pershomefs", "/b"],
            &["pershomefs", "/b", "/m", "/extra"],
            &["pershomefs", "/b", "/m", "-x"],
            &["pershomefs", "/b", "/m", "-o"],
        ] {
            let got = parse(bad);
            assert!(
                got.as_ref().is_err_and(|e| e.use_stderr()),
                "expected a usage error for {bad:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn help_mentions_every_option_and_exit_code() {
        use clap::CommandFactory;
        let help = Args::command().render_long_help().to_string();
        for needle in [
            "uid=",
            "gid=",
            "allow_other",
            "allow_root",
            "ro ",
            "rw ",
            "commit=",
            "parts=",
            "part_size=",
            "threads=",
            "counters",
            "fsname=",
            "subtype=",
            "noexec",
            "noatime",
            "relatime",
            "sync",
            "dirsync",
            "x-*",
            "suid, dev",
            "Exit status",
            "  3  ",
            "  5  ",
            "  6  ",
            "status=",
            "PERSHOME_LOG",
        ] {
            assert!(
                help.contains(needle),
                "expected {needle:?} in --help:\n{help}"
            );
        }
    }
}
