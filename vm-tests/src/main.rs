//! `cargo vm-test`: pershome end to end in QEMU: a Debian 12 thin client, a FAT32 or exFAT
//! USB stick that can be pulled, the project's Debian package, the real kernel drivers.
//!
//! This file owns the command line, the scenario list and the PASS/FAIL report. Every
//! scenario gets a fresh run directory under `target/vm/runs/`; on failure the report shows
//! the error and the tail of each guest console log the scenario produced. No QEMU process
//! outlives its scenario (see `qemu::Vm`).

mod deps;
mod guest;
mod image;
mod ltsp_image;
mod protocol;
mod qemu;
mod qmp;
mod scenarios;
mod stick;
mod util;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use xshell::{cmd, Shell};

use crate::image::{GuestImage, Kernel};

#[derive(Parser)]
#[command(
    name = "cargo vm-test",
    about = "pershome end-to-end tests in QEMU (a thin client with a USB stick)"
)]
struct Cli {
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Install the host packages the suite needs (apt, as root) and exit.
    #[arg(long)]
    install_deps: bool,
    /// The guest kernel for scenarios that boot one kernel (the kernel matrix boots both).
    #[arg(long, value_enum, default_value = "6.1")]
    kernel: Kernel,
    /// Scenarios to run (names or numbers, see --list); all when none is given.
    scenarios: Vec<String>,
}

/// What a scenario gets to work with.
pub struct Ctx {
    pub sh: Shell,
    pub image: GuestImage,
    /// The project's package (the LTSP server installs it too).
    pub deb: PathBuf,
    pub kernel: Kernel,
    /// This scenario's run directory (sticks, sockets, logs).
    pub run_dir: PathBuf,
    /// The 9p share: `tools/` (test tools, installed in the guest at boot) and `results/`.
    pub share: PathBuf,
    /// Console logs of the guests this scenario booted, for the failure report.
    pub consoles: Vec<PathBuf>,
    /// Figures the scenario reports (printed after PASS or FAIL).
    pub notes: Vec<String>,
}

impl Ctx {
    /// Boot a guest with `stick` plugged in (or none), remembering its console log.
    pub fn boot(&mut self, name: &str, kernel: Kernel, stick: Option<&Path>) -> Result<qemu::Vm> {
        self.consoles
            .push(self.run_dir.join(format!("console-{name}.log")));
        qemu::Vm::boot(&qemu::VmConfig {
            image: &self.image,
            kernel,
            stick,
            share: &self.share,
            run_dir: &self.run_dir,
            name,
        })
    }

    /// As `boot`, with the stick served over NBD on the unix socket `socket`.
    pub fn boot_nbd(&mut self, name: &str, kernel: Kernel, socket: &Path) -> Result<qemu::Vm> {
        self.consoles
            .push(self.run_dir.join(format!("console-{name}.log")));
        qemu::Vm::boot_nbd(
            &qemu::VmConfig {
                image: &self.image,
                kernel,
                stick: None,
                share: &self.share,
                run_dir: &self.run_dir,
                name,
            },
            socket,
        )
    }

    pub fn note(&mut self, text: String) {
        eprintln!("  {text}");
        self.notes.push(text);
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("\nvm-test: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    let cli = Cli::parse();
    let sh = Shell::new().context("creating the xshell")?;
    sh.change_dir(util::project_root());
    if cli.list {
        for s in scenarios::ALL {
            println!("{:>2}  {:<12} {}", s.number, s.name, s.summary);
        }
        return Ok(true);
    }
    if cli.install_deps {
        deps::install(&sh)?;
        return Ok(true);
    }
    let selected = select(&cli.scenarios)?;
    let only_ltsp = selected.iter().all(|s| s.name == "ltsp");
    deps::check(!only_ltsp)?;
    let started = Instant::now();
    build_binaries(&sh)?;
    let deb = build_deb(&sh)?;
    // The `ltsp` scenario boots its own server and client, not the thin-client image.
    let image = if only_ltsp {
        image::GuestImage::not_built()
    } else {
        image::ensure(&deb)?
    };
    let share = util::vm_dir().join("share");
    stage_share(&share, !only_ltsp)?;

    let mut results = Vec::new();
    for scenario in selected {
        util::banner(&format!(
            "scenario {} {}: {}",
            scenario.number, scenario.name, scenario.summary
        ));
        let run_dir = util::vm_dir().join("runs").join(scenario.name);
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("removing {}", run_dir.display()))?;
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let results_dir = share.join("results");
        if results_dir.exists() {
            std::fs::remove_dir_all(&results_dir).context("clearing the results dir")?;
        }
        std::fs::create_dir_all(&results_dir).context("creating the results dir")?;
        let mut ctx = Ctx {
            sh: Shell::new().context("creating the xshell")?,
            image: image.clone(),
            deb: deb.clone(),
            kernel: cli.kernel,
            run_dir,
            share: share.clone(),
            consoles: Vec::new(),
            notes: Vec::new(),
        };
        let t = Instant::now();
        let outcome = check_disk(&ctx.run_dir).and_then(|()| (scenario.run)(&mut ctx));
        let secs = t.elapsed().as_secs_f64();
        match &outcome {
            Ok(()) => {
                eprintln!(
                    "\nPASS  {} {} ({secs:.0} s)",
                    scenario.number, scenario.name
                );
                let freed = util::prune_large_files(&ctx.run_dir, PRUNE_ABOVE)?;
                if freed > 0 {
                    eprintln!(
                        "  removed its images ({}); its logs stay in {}",
                        util::gib(freed),
                        ctx.run_dir.display()
                    );
                }
            }
            Err(e) => {
                eprintln!(
                    "\nFAIL  {} {} ({secs:.0} s): {e:#}",
                    scenario.number, scenario.name
                );
                for console in &ctx.consoles {
                    eprintln!(
                        "--- last lines of the guest console {}:\n{}",
                        console.display(),
                        util::tail_lines(console, 40)
                    );
                }
            }
        }
        results.push((scenario, outcome.is_ok(), secs, ctx.notes));
    }
    util::banner("summary");
    let mut all_ok = true;
    for (scenario, ok, secs, notes) in &results {
        all_ok &= ok;
        println!(
            "{}  {:>2} {:<12} {secs:>5.0} s",
            if *ok { "PASS" } else { "FAIL" },
            scenario.number,
            scenario.name
        );
        for note in notes {
            println!("        {note}");
        }
    }
    println!(
        "{} of {} scenarios passed in {:.0} s",
        results.iter().filter(|r| r.1).count(),
        results.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(all_ok)
}

/// A passing scenario's files that take more disk than this (stick images, disks) are
/// deleted; its logs and listings stay. A failing scenario keeps everything until its next
/// run, for inspection.
const PRUNE_ABOVE: u64 = 16 << 20;

/// The least free space a scenario starts with. The largest need is a conformance stick
/// (4 GiB, sparse on the host but for what the tests leave on it) plus the guest's own
/// writes; below this the failure would be a confusing ENOSPC deep inside a scenario.
const MIN_FREE: u64 = 3 << 30;

fn check_disk(run_dir: &Path) -> Result<()> {
    let free = util::free_bytes(run_dir)?;
    eprintln!("  {} free under {}", util::gib(free), run_dir.display());
    if free < MIN_FREE {
        bail!(
            "only {} is free on the disk of {}; a scenario needs at least {}: free some \
             space (old runs are in {}) and run it again",
            util::gib(free),
            run_dir.display(),
            util::gib(MIN_FREE),
            util::vm_dir().join("runs").display()
        );
    }
    Ok(())
}

fn select(names: &[String]) -> Result<Vec<&'static scenarios::Scenario>> {
    if names.is_empty() {
        return Ok(scenarios::ALL.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            scenarios::ALL
                .iter()
                .find(|s| s.name == name || s.number.to_string() == *name)
                .with_context(|| format!("no scenario {name:?} (see `cargo vm-test --list`)"))
        })
        .collect()
}

/// Build the test tools that go into the guest, in the harness's own profile.
fn build_binaries(sh: &Shell) -> Result<()> {
    util::banner("building the guest-side test tools and xtask");
    cmd!(sh, "cargo build --quiet -p vm-tests -p xtask --bins")
        .run()
        .context("cargo build of the test tools the guest runs")
}

/// The project's Debian package, as `cargo xtask deb` builds it (release build, cargo-deb).
/// Cargo and cargo-deb do the freshness check: an unchanged tree rebuilds nothing and gives a
/// byte-identical package (about 15 s), so the image cache keyed on its hash stays valid.
fn build_deb(sh: &Shell) -> Result<PathBuf> {
    util::banner("building the Debian package (cargo xtask deb)");
    cmd!(sh, "cargo xtask deb")
        .run()
        .context("cargo xtask deb (the package the guest image installs)")?;
    let dir = util::target_dir().join("debian");
    let mut debs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("pershome_") && name.ends_with(".deb")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    // A version bump leaves the old package beside the new one: take the newest.
    debs.sort();
    let (_, deb) = debs.pop().with_context(|| {
        format!(
            "cargo xtask deb left no pershome_*.deb in {}",
            dir.display()
        )
    })?;
    eprintln!("the guest image installs {}", deb.display());
    Ok(deb)
}

/// The directory of the running harness binary: the same profile's other binaries are there.
fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the harness binary")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("the harness binary has no directory")
}

/// Fill the share's `tools/` with the test tools (installed in /usr/local/bin at boot). The
/// project's own binaries are not shared: the guest runs the ones its package installed.
fn stage_share(share: &Path, fs_tools: bool) -> Result<()> {
    let built = bin_dir()?;
    // Left by older versions of the suite, which shared the project's binaries.
    let stale = share.join("bin");
    if stale.exists() {
        std::fs::remove_dir_all(&stale).with_context(|| format!("removing {}", stale.display()))?;
    }
    let mut tools: Vec<PathBuf> = ["vm-guest-agent", "vm-pam-login", "vm-tty-login", "xtask"]
        .iter()
        .map(|name| built.join(name))
        .collect();
    if fs_tools {
        tools.push(deps::cargo_tool("pjdfstest"));
        tools.push(deps::cargo_tool("fsx"));
    }
    let dir = share.join("tools");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in tools {
        if !file.is_file() {
            bail!(
                "{} is missing (the build above should have made it)",
                file.display()
            );
        }
        let name = file.file_name().context("binary name")?;
        std::fs::copy(&file, dir.join(name))
            .with_context(|| format!("copying {} into the share", file.display()))?;
    }
    Ok(())
}
