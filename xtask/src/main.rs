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
mod many_mounts;
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
    /// Many users on one machine: N pershomefs homes mounted at once as the login hook mounts
    /// them, each used by its own unprivileged uid with a light desktop-like load (as root).
    #[command(long_about = MANY_MOUNTS_HELP)]
    ManyMounts {
        /// How many homes (one user each) are mounted at once.
        #[arg(long, default_value_t = 30)]
        mounts: u32,
        /// Seconds of load, counted from when every worker has made its tree.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Mean pause between two rounds of a worker, in milliseconds (each round is one stat
        /// and one other operation; the pause varies from half to one and a half times this).
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// The first user's uid: home i is used by uid FIRST_UID + i (gid the same). The
        /// default lies above the subordinate-id ranges Debian's adduser hands out; a uid that
        /// belongs to an account is refused.
        #[arg(long, default_value_t = 700_000_000)]
        first_uid: u32,
        /// Seed of the workers' choices (each home derives its own).
        #[arg(long, default_value_t = 14)]
        seed: u64,
        /// Checks the harness itself: SIGKILL home N's daemon halfway through. The run must
        /// then fail, naming that home.
        #[arg(long, value_name = "N")]
        kill_daemon: Option<u32>,
    },
    /// One user's load for `many-mounts` (started by it as that user; not for direct use).
    #[command(hide = true)]
    ManyMountsWorker {
        #[arg(long)]
        home: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        interval_ms: u64,
        #[arg(long)]
        neighbour: Option<PathBuf>,
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
    /// Everything CI runs: deps, fmt, clippy, tests, pjdfstest, fsx, many-mounts, the QEMU
    /// suite, fuzz, a short bench, wear, the Nix parse check and the Debian package checks.
    Ci,
}

const MANY_MOUNTS_HELP: &str = "\
Many users on one machine (issue 14): MOUNTS pershomefs homes at once, for SECONDS, with no errors.

Each home is mounted as the login hook mounts one: the release pershomefs as root with the \
hook's options (uid=, gid=, allow_other, private_home, commit=, status=, fsname=), over its own \
backing directory on one fresh ext4 loop filesystem, for its own unprivileged uid. One worker \
per home runs as that uid (no supplementary groups): it makes a small tree (5 folders of 20 \
files, 4 documents, 2 files of 64 KiB), then, every INTERVAL_MS on average, a stat and one of: \
a 4 KiB write + fsync into a file kept open, readdir, a read, an editor save (temp file, fsync, \
rename over), a temp file, mkdir/rmdir, an xattr set and get, a lookup of a missing name, a \
look into the next user's home (which must be refused).

At the end each home is unmounted (its daemon must exit 0), checked with `pershome fsck` and \
the FAT audit, mounted again and compared with what its worker wrote, and unmounted.

Reported (never judged: the figures depend on the machine): the daemons' total and largest \
RSS, sampled every second; their CPU time and its share of the machine; the machine's load \
(uptime); per home and overall, p50/p99 latency of a stat and of a 4 KiB write + fsync. The \
table is also saved to target/many-mounts.txt.

Fails, naming the home, the operation and the error, on: any operation error or wrong bytes, a \
daemon that dies, a worker that hangs, a failed unmount, daemon exit status, fsck, audit or \
comparison. Everything (workers, mounts, daemons, the loop device) is cleaned up on failure \
and on Ctrl-C.";

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
        Cmd::ManyMounts {
            mounts,
            seconds,
            interval_ms,
            first_uid,
            seed,
            kill_daemon,
        } => many_mounts::run(&many_mounts::Options {
            mounts,
            seconds,
            interval_ms,
            first_uid,
            seed,
            kill_daemon,
        }),
        Cmd::ManyMountsWorker {
            home,
            seed,
            seconds,
            interval_ms,
            neighbour,
        } => many_mounts::worker(&many_mounts::WorkerArgs {
            home,
            seed,
            seconds,
            interval_ms,
            neighbour,
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
