//! `pershome`: the user's tools for a pershome stick (prepare, status, migrate, fsck). The
//! command line lives in `pershome::cli::pershome` (so man pages can be generated from it).

use std::process::ExitCode;

fn main() -> ExitCode {
    pershome::cli::pershome::main(std::env::args_os())
}
