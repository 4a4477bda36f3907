//! `pershome`: tools for a pershome stick. `pershome fsck [--repair] [--force] BACKING` checks
//! (and repairs) a stick's metadata; see `pershome --help` and docs/fsck.md. More subcommands
//! (prepare, status, migrate) join the `Command` enum.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use pershome::fsck::{self, exit_code, FsckOptions};

#[derive(Debug, Parser)]
#[command(
    name = "pershome",
    version,
    about = "Tools for a pershome stick (a POSIX home on a FAT or exFAT USB stick)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a stick's metadata store against its files, and repair it with --repair.
    #[command(after_help = FSCK_HELP)]
    Fsck(FsckArgs),
    /// Show the message the login left for you (why your stick home is not open and how to
    /// fix it), with zenity on a desktop, else on the terminal. Started at desktop login by
    /// /etc/xdg/autostart/pershome-notice.desktop; shows nothing when there is no message.
    Notice,
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit_code::USAGE
            } else {
                exit_code::CLEAN
            };
            // Printing help or an error message; nothing else to do if the terminal is gone.
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Notice => {
            match pershome::session::entry::show_notice(
                std::path::Path::new("/"),
                &mut std::io::stdout().lock(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pershome notice: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Fsck(args) => {
            let opts = FsckOptions {
                repair: args.repair,
                force: args.force,
            };
            let code = fsck::run(
                &args.backing,
                &opts,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            );
            ExitCode::from(code)
        }
    }
}
