//! `cargo xtask`: the project's developer automation (dependencies, tests, the demo, the
//! conformance suites, the benchmark and CI), in Rust with xshell so it runs the same on every
//! machine and needs no shell scripts beyond `.ci/run`.
//!
//! This file owns the command line and dispatch only. No subcommand may leave a mount, a
//! daemon or a loop device behind, even when it fails or is interrupted: see `guards`.

mod bench;
mod ci;
mod deb;
mod demo;
mod deps;
mod fsx;
mod fuzz;
mod guards;
mod install;
mod nix;
mod pjdfstest;
mod target;
mod util;
mod wear;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xshell::{cmd, Shell};

use crate::target::{BackingKind, Fs};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "pershome developer automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the Debian packages and cargo tools the project needs (idempotent).
    Deps,
    /// `deps`, then `cargo test --workspace`.
    Test,
    /// Mount pershomefs over a demo "stick" in /tmp/pershome-demo and show what it stores.
    Demo,
    /// Run pjdfstest (as root) against a filesystem over a directory and/or exFAT backing.
    Pjdfstest {
        #[arg(long, value_enum, default_value = "both")]
        backing: pjdfstest::BackingChoice,
        #[arg(long, value_enum, default_value = "pershomefs")]
        fs: Fs,
        /// pershomefs's `names=` option: `long` (the default) or `8.3`.
        #[arg(long, value_enum, default_value = "long")]
        names: pjdfstest::Names,
    },
    /// Run fsx on a file in a mount, then again across an unmount/remount.
    Fsx {
        /// Operations per run.
        #[arg(long, default_value_t = 100_000)]
        ops: u64,
        /// fsx seed (default: random, printed so a failure can be replayed).
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, value_enum, default_value = "pershomefs")]
        fs: Fs,
        #[arg(long, value_enum, default_value = "dir")]
        backing: BackingKind,
        /// Store the files in parts of this many bytes (pershomefs `part_size=`, a multiple
        /// of 4096), so operations cross part boundaries.
        #[arg(long)]
        part_size: Option<u64>,
    },
    /// Time raw, pershomefs and posixovl side by side, each on a fresh filesystem (as root).
    Bench {
        #[arg(long, default_value_t = 10_000)]
        files: u32,
        #[arg(long, default_value_t = 500)]
        dirs: u32,
        #[arg(long, default_value_t = 1024)]
        big_mib: u32,
        /// One run per cell instead of the best of three.
        #[arg(long)]
        quick: bool,
        /// Filesystems to compare, comma-separated (raw is always included).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "raw,pershomefs,posixovl"
        )]
        fs: Vec<Fs>,
        /// What each cell (one filesystem in one repetition) runs on: a fresh ext4 on a loop
        /// device, or a fresh tmpfs (takes the disk out, leaves the FUSE overhead).
        #[arg(long, value_enum, default_value = "ext4")]
        backing_fs: bench::BackingFs,
        /// Extra -o options for pershomefs, comma-separated (say `threads=1`).
        #[arg(long, value_delimiter = ',')]
        mount_opts: Vec<String>,
        /// Mount pershomefs without -o counters (for a PERSHOMEFS= binary that predates them).
        #[arg(long)]
        no_counters: bool,
    },
    /// Flash wear: bytes pershome writes to the stick (data vs metadata) for four workloads,
    /// in-process, next to the raw directory; fails only if reading the tree writes anything.
    Wear {
        /// Files in the tree (default 10,000; 2,000 with --quick).
        #[arg(long)]
        files: Option<u32>,
        #[arg(long, default_value_t = 500)]
        dirs: u32,
        /// 2,000 files and 400 churn rounds instead of 10,000 and 2,000.
        #[arg(long)]
        quick: bool,
    },
    /// One flash-wear workload step on a mounted directory, with plain file calls (the VM
    /// suite runs this inside its guest; see docs/vm-tests.md).
    WearStep {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, value_enum)]
        step: wear::Step,
        #[arg(long, default_value_t = 1000)]
        files: u32,
        #[arg(long, default_value_t = 100)]
        dirs: u32,
        #[arg(long, default_value_t = 200)]
        appends: u32,
        #[arg(long, default_value_t = 200)]
        rounds: u32,
    },
    /// Run every fuzz target in `fuzz/` (libFuzzer through cargo-fuzz) for a fixed time.
    Fuzz {
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Run only these targets (repeatable; default: every target).
        #[arg(long = "target")]
        targets: Vec<String>,
    },
    /// Write the man pages, generated from the clap definitions, into a directory.
    Man {
        #[arg(long, default_value = "target/man")]
        out: PathBuf,
    },
    /// The install recipe every package uses: binaries, man pages, completions, the PAM
    /// profile, the autostart entry, docs and the example configuration, below DESTDIR.
    Install {
        /// Staging root (packagers); without it, files go straight into the live system.
        #[arg(long)]
        destdir: Option<PathBuf>,
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        #[arg(long, default_value = "/etc")]
        sysconfdir: PathBuf,
        /// zsh completion directory below the prefix (Nix: share/zsh/site-functions).
        #[arg(long, default_value = "share/zsh/vendor-completions")]
        zsh_dir: PathBuf,
        /// Take the binaries from this directory instead of running cargo build --release.
        #[arg(long, conflicts_with = "no_bins")]
        bin_dir: Option<PathBuf>,
        /// Install everything except the binaries (Nix's buildRustPackage installs those).
        #[arg(long)]
        no_bins: bool,
    },
    /// Build the Debian package (target/debian/pershome_*.deb) with cargo-deb.
    Deb,
    /// Build the Debian package, run lintian, install and purge it in clean Debian 12 and 13 roots.
    DebCheck {
        /// Check this .deb instead of building one.
        #[arg(long)]
        deb: Option<PathBuf>,
    },
    /// Check that every .nix file parses (nix-instantiate --parse).
    NixCheck,
    /// Everything CI runs: deps, fmt, clippy, tests, pjdfstest, fsx, the QEMU suite, fuzz, a
    /// short bench, wear, the Nix parse check and the Debian package checks.
    Ci,
}

fn main() -> ExitCode {
    util::install_signal_handlers();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let sh = Shell::new().context("creating the xshell")?;
    sh.change_dir(util::project_root());
    match cli.command {
        Cmd::Deps => deps::run(&sh),
        Cmd::Test => {
            deps::run(&sh)?;
            cargo_test(&sh)
        }
        Cmd::Demo => demo::run(&sh),
        Cmd::Pjdfstest { backing, fs, names } => {
            pjdfstest::run(&sh, &pjdfstest::Options { backing, fs, names })
        }
        Cmd::Fsx {
            ops,
            seed,
            fs,
            backing,
            part_size,
        } => fsx::run(&fsx::Options {
            ops,
            seed,
            fs,
            backing,
            part_size,
        }),
        Cmd::Bench {
            files,
            dirs,
            big_mib,
            quick,
            fs,
            backing_fs,
            mount_opts,
            no_counters,
        } => bench::run(&bench::Options {
            files,
            dirs,
            big_mib,
            quick,
            fs,
            backing_fs,
            mount_opts,
            no_counters,
        }),
        Cmd::Wear { files, dirs, quick } => wear::run(&wear::Options::new(files, dirs, quick)),
        Cmd::WearStep {
            dir,
            step,
            files,
            dirs,
            appends,
            rounds,
        } => wear::run_step(
            &dir,
            step,
            &wear::Options {
                files,
                dirs: dirs.max(1),
                appends,
                rounds,
            },
        ),
        Cmd::Fuzz { seconds, targets } => fuzz::run(&sh, &fuzz::Options { seconds, targets }),
        Cmd::Man { out } => install::man(&util::project_root().join(out)),
        Cmd::Install {
            destdir,
            prefix,
            sysconfdir,
            zsh_dir,
            bin_dir,
            no_bins,
        } => install::install(
            &sh,
            &install::Options {
                destdir,
                prefix,
                sysconfdir,
                zsh_dir,
                binaries: match (bin_dir, no_bins) {
                    (_, true) => install::Binaries::Skip,
                    (Some(dir), false) => install::Binaries::From(dir),
                    (None, false) => install::Binaries::Build,
                },
            },
        ),
        Cmd::Deb => deb::build(&sh).map(|_| ()),
        Cmd::DebCheck { deb } => {
            let deb = match deb {
                Some(deb) => deb,
                None => deb::build(&sh)?,
            };
            deb::check(&sh, &deb)
        }
        Cmd::NixCheck => nix::check(&sh),
        Cmd::Ci => ci::run(&sh),
    }
}

pub fn cargo_test(sh: &Shell) -> Result<()> {
    util::banner("cargo test --workspace");
    // The long variants of the crash tests (tests/crash.rs) run in CI.
    cmd!(sh, "cargo test --workspace")
        .env("PERSHOME_LONG_TESTS", "1")
        .run()
        .context("cargo test --workspace failed")
}
