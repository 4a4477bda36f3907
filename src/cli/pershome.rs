//! `pershome SUBCOMMAND`: the user's tools for a pershome stick: `prepare`, `status`,
//! `migrate`, `fsck`. `command()` is the clap definition (man pages are generated from it);
//! `main` parses, dispatches and maps every outcome to a documented exit code.
//!
//! This module owns the command line and the exit codes; the work is in `crate::tools` and
//! `crate::fsck`. It never panics on bad input: every failure is a message and a code.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::fsck::{self, FsckOptions};
use crate::tools::{migrate, prepare, status, zenity};

/// A wrong command line, for every subcommand (as fsck's, which follows e2fsck).
pub const USAGE: u8 = fsck::exit_code::USAGE;

#[derive(Debug, Parser)]
#[command(
    name = "pershome",
    version,
    about = "Tools for a pershome stick (a POSIX home on a FAT or exFAT USB stick)",
    after_help = "A wrong command line exits with 16 for every subcommand. See `pershome \
                  SUBCOMMAND --help` for each one's exit codes, and docs/user-guide.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Make a stick ready: create pershome/ and an empty metadata store (never formats).
    #[command(after_help = PREPARE_HELP)]
    Prepare(PrepareArgs),
    /// Show what is mounted, the last commit, and whether the stick may be removed.
    #[command(after_help = STATUS_HELP)]
    Status(StatusArgs),
    /// Copy an existing home onto a prepared stick (or into a mounted pershome home).
    #[command(after_help = MIGRATE_HELP)]
    Migrate(MigrateArgs),
    /// Check a stick's metadata store against its files, and repair it with --repair.
    #[command(after_help = FSCK_HELP)]
    Fsck(FsckArgs),
    /// Show the message the login left for you (why your stick home is not open and how to
    /// fix it), with zenity on a desktop, else on the terminal. Started at desktop login by
    /// /etc/xdg/autostart/pershome-notice.desktop; shows nothing when there is no message.
    Notice(NoticeArgs),
}

const PREPARE_HELP: &str = "\
TARGET is a device (/dev/sdb1: used where it is mounted, or mounted for a moment), the \
stick's mount point, or its pershome/ directory. Without TARGET the only removable FAT or \
exFAT stick is used; with several, they are listed. prepare creates pershome/ (unless a \
pershome folder in any case is there already: its files become the home) and the metadata \
store pershome/.pershome/. It never formats and never touches other files; on a prepared \
stick it writes nothing and says so.

--gui (the default without a terminal, when a display is there) asks with zenity dialogs.

Exit codes:
  0   the stick is ready (prepared now, or it already was)
  1   cancelled
  2   TARGET cannot be used: missing, read-only, not FAT/exFAT (see --any-fs), no stick
      found, several found
  3   the stick's existing metadata was refused (newer format, damaged: pershome fsck)
  4   mounting the device failed, or an I/O error
  16  usage error";

#[derive(Debug, Args)]
struct PrepareArgs {
    /// Allow a directory on any filesystem (a thin client's stick via sshfs, a test directory).
    #[arg(long)]
    any_fs: bool,
    /// The naming mode of the new store: long (the default) or 8.3, for a stick that only
    /// takes upper-case MS-DOS NAME.EXT names (mounted with Linux's msdos driver, or read by
    /// an old device). A stick already prepared keeps its mode.
    #[arg(long, default_value = "long", value_parser = parse_names)]
    names: crate::names::NameMode,
    /// Use zenity dialogs (the default when there is no terminal but a display).
    #[arg(long, conflicts_with = "no_gui")]
    gui: bool,
    /// Never use dialogs, even without a terminal.
    #[arg(long)]
    no_gui: bool,
    /// DEVICE, MOUNTPOINT or DIR; see below.
    target: Option<PathBuf>,
}

const STATUS_HELP: &str = "\
Lists every pershomefs home mounted here (for which user, over which pershome/ directory on \
which stick), each plugged-in stick that has a pershome/ directory, or only TARGET (a home, \
a pershome/ directory or a stick's mount point): the last commit of its metadata, whether it \
is clean, and whether the stick may be removed. The metadata is read without its lock and \
nothing is written.

JSON (--json): {\"sticks\": [{\"backing\", \"device\", \"device_fstype\", \
\"device_mountpoint\", \"removable\", \"homes\": [{\"mountpoint\", \"user\", \"uid\", \
\"read_only\"}], \"generation\", \"last_commit\" (seconds since 1970), \"state\" \
(clean|dirty|needs-fsck), \"warnings\", \"store_error\", \"writer_active\", \
\"safe_to_remove\", \"not_safe_because\"}], \"exit_code\"}

Exit codes:
  0   every stick shown may be removed now (or nothing to show)
  1   a stick is in use: mounted as a home, still being written, or still mounted itself
  2   TARGET is not a pershome home, pershome/ directory or stick
  3   nothing in use, but some metadata needs a check (pershome fsck)
  16  usage error";

#[derive(Debug, Args)]
struct NoticeArgs {
    /// Read the notice under DIR instead of / (DIR/run/pershome/USER/notice; tests use it).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// A mounted home, a pershome/ directory, or a stick's mount point.
    target: Option<PathBuf>,
}

const MIGRATE_HELP: &str = "\
Copies SRC_HOME (e.g. /home/you) into DEST: a prepared stick (its mount point or its \
pershome/ directory; pershomefs is then mounted on a private directory for the copy) or a \
mounted pershome home. Kept: content, modes, owners (as root), atime and mtime to the \
nanosecond, symlinks, hard links, fifos, sockets, device nodes (as root), xattrs and ACLs. \
Every file is read back and compared (sha256 and metadata) after copying. SRC_HOME is never \
changed and nothing in DEST that SRC_HOME lacks is removed.

Resumable: verified files are listed in DEST/.pershome-migrate; running the same command again \
skips them, keeps the verified part of a partly copied file, and the list is removed when \
a run ends with everything verified. A full stick stops the copy and says how much more space \
is needed.

Exit codes:
  0   everything copied and verified
  1   copied and verified, but some things could not be kept (listed; e.g. owners or
      device nodes without root)
  2   verification found differences (listed); run again to retry them
  3   the stick is full (the message says how much more is needed); run again after freeing
  4   SRC_HOME or DEST cannot be used (missing, not prepared, in use)
  5   an I/O or mount error stopped the copy; run again to continue
  16  usage error";

#[derive(Debug, Args)]
struct MigrateArgs {
    /// Start even when the free space looks too small (the copy still stops cleanly if full).
    #[arg(long)]
    no_space_check: bool,
    /// Never show the progress bar (it is shown when stderr is a terminal).
    #[arg(long)]
    no_progress: bool,
    /// The pershomefs program to mount a stick DEST with (default: next to pershome, or PATH).
    #[arg(long, value_name = "PATH")]
    pershomefs: Option<PathBuf>,
    /// The home to copy.
    src_home: PathBuf,
    /// A prepared stick (mount point or pershome/ directory) or a mounted pershome home.
    dest: PathBuf,
}

const FSCK_HELP: &str = "\
Checks the metadata store (BACKING/.pershome) against the files in BACKING: store damage \
(torn or corrupt journal, damaged checkpoint), records of files that no longer exist, broken \
hard-link bookkeeping (missing content, unreferenced or orphaned content, wrong link counts), \
names that clash or are not in pershome's own form, and everything a FAT stick cannot hold.

Without --repair nothing is written. --repair rewrites the store from what is really there \
and moves orphaned hard-link content to BACKING/pershome-recovered/; it never deletes or \
truncates file data. The stick must not be mounted: a mounted stick is refused, or with \
--force checked read-only (never repaired).

Exit codes (as e2fsck):
  0   no problems
  1   problems found and all repaired
  4   problems left unrepaired (found without --repair, or to be fixed by hand)
  8   operational error: not a directory, no .pershome/, store in use, newer format, I/O
  16  usage error";

#[derive(Debug, Args)]
struct FsckArgs {
    /// Repair what can be repaired (never deletes or truncates file data).
    #[arg(long)]
    repair: bool,
    /// Check even when the stick is mounted: read-only, without the store lock.
    #[arg(long)]
    force: bool,
    /// The backing directory: the stick's pershome/ directory.
    backing: PathBuf,
}

/// The clap definition of `pershome`, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Runs `pershome` with `args` (the program name first).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match command()
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { USAGE } else { 0 };
            // Printing help or an error message; nothing else to do if the terminal is gone.
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    ExitCode::from(match cli.command {
        Cmd::Prepare(a) => run_prepare(a),
        Cmd::Status(a) => run_status(a),
        Cmd::Migrate(a) => run_migrate(a),
        Cmd::Fsck(a) => fsck::run(
            &a.backing,
            &FsckOptions {
                repair: a.repair,
                force: a.force,
            },
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        ),
        Cmd::Notice(a) => run_notice(&a.root),
    })
}

fn run_notice(root: &std::path::Path) -> u8 {
    match crate::session::entry::show_notice(root, &mut std::io::stdout().lock()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pershome notice: {e:#}");
            1
        }
    }
}

fn parse_names(s: &str) -> Result<crate::names::NameMode, String> {
    crate::names::NameMode::parse(s).ok_or_else(|| format!("{s:?} is not long or 8.3"))
}

fn run_prepare(a: PrepareArgs) -> u8 {
    let opts = prepare::PrepareOptions {
        any_fs: a.any_fs,
        names: a.names,
    };
    // Started from a desktop entry there is no terminal: the person gets dialogs.
    let has_display = zenity::has_display();
    let no_terminal = !std::io::stdin().is_terminal() && !std::io::stderr().is_terminal();
    if a.gui || (!a.no_gui && no_terminal && has_display) {
        return zenity::run(a.target, opts);
    }
    let resolved = match &a.target {
        Some(t) => prepare::resolve(t),
        None => prepare::choose_stick().and_then(|s| {
            eprintln!("pershome prepare: using {}", s.describe());
            prepare::resolve_stick(&s)
        }),
    };
    match resolved.and_then(|r| prepare::prepare_dir(&r.dir, opts)) {
        Ok(p) => {
            println!("{}", p.message());
            prepare::exit_code::READY
        }
        Err(e) => {
            eprintln!("pershome prepare: {e}");
            e.exit_code()
        }
    }
}

fn run_status(a: StatusArgs) -> u8 {
    match status::status(a.target.as_deref()) {
        Ok(list) => {
            if a.json {
                print!("{}", status::render_json(&list));
            } else {
                print!("{}", status::render_text(&list));
            }
            status::exit_code_of(&list)
        }
        Err(e) => {
            eprintln!("pershome status: {e:#}");
            status::exit_code::TARGET
        }
    }
}

fn run_migrate(a: MigrateArgs) -> u8 {
    let opts = migrate::MigrateOptions {
        progress: !a.no_progress && migrate::stderr_is_terminal(),
        no_space_check: a.no_space_check,
        pershomefs: a.pershomefs,
    };
    match migrate::migrate(&a.src_home, &a.dest, &opts) {
        Ok(s) => {
            println!(
                "migrated {} entries: {} files copied ({}{}), {} already done",
                s.entries,
                s.files_copied,
                migrate::human(s.bytes_copied),
                if s.bytes_resumed > 0 {
                    format!(
                        ", {} kept from an earlier run",
                        migrate::human(s.bytes_resumed)
                    )
                } else {
                    String::new()
                },
                s.files_skipped
            );
            for w in &s.warnings {
                println!("not kept: {w}");
            }
            for m in &s.mismatches {
                println!("MISMATCH: {m}");
            }
            if s.mismatches.is_empty() {
                println!("verified: every copied file was read back and matches");
            }
            s.exit_code()
        }
        Err(e) => {
            eprintln!("pershome migrate: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_is_valid() {
        command().debug_assert();
    }
}
