//! `cargo xtask ci`: every check CI runs, in order, stopping at the first failure with the
//! step's name in the error. `.ci/run` calls this on a clean Debian 12 machine as root. The
//! packaging checks (the .nix syntax check, the .deb build with its lintian and install/purge
//! checks) run right after the tests, before the long conformance runs; the QEMU suite
//! (`cargo vm-test`) after the host's own conformance runs.
//!
//! This module owns the order and the parameters of the CI steps. The short many-mounts run
//! fails CI on an error (an operation, a daemon, fsck, the comparison after a remount), never
//! on its figures. The short benchmark and the flash-wear table at the end are informational:
//! their tables are printed, and neither their numbers nor their failure to complete can fail
//! the run, with one exception: the wear run's check that reading the tree writes nothing to
//! the stick (a design property) fails CI.

use anyhow::{Context, Result};
use xshell::{cmd, Shell};

use crate::target::{BackingKind, Fs};
use crate::{bench, deps, fsx, fuzz, many_mounts, pjdfstest, util, wear};

pub fn run(sh: &Shell) -> Result<()> {
    let started = std::time::Instant::now();
    // Each banner says how much disk is left: CI's disk is shared, and a run that ran out of
    // space in the QEMU suite must show where the space went.
    let step = |name: &str| {
        util::banner(&format!(
            "CI step: {name} (at {:.0} s, {} free)",
            started.elapsed().as_secs_f64(),
            free_space()
        ))
    };

    step("deps");
    deps::run(sh).context("CI step `deps` failed")?;

    step("cargo fmt --all -- --check");
    cmd!(sh, "cargo fmt --all -- --check")
        .run()
        .context("CI step `cargo fmt --check` failed: run `cargo fmt --all`")?;

    step("cargo clippy --workspace --all-targets -- -D warnings");
    cmd!(sh, "cargo clippy --workspace --all-targets -- -D warnings")
        .run()
        .context("CI step `cargo clippy` failed")?;

    step("nix-check: every .nix file parses");
    crate::nix::check(sh).context("CI step `nix-check` failed")?;

    step("cargo test --workspace");
    crate::cargo_test(sh).context("CI step `cargo test` failed")?;

    step("deb + deb-check: lintian, install, doctor and purge in clean Debian 12 and 13 roots");
    let deb = crate::deb::build(sh).context("CI step `deb` failed")?;
    crate::deb::check(sh, &deb).context("CI step `deb-check` failed")?;

    step("pjdfstest --backing both");
    pjdfstest::run(
        sh,
        &pjdfstest::Options {
            backing: pjdfstest::BackingChoice::Both,
            fs: Fs::Pershomefs,
            names: pjdfstest::Names::Long,
        },
    )
    .context("CI step `pjdfstest --backing both` failed")?;

    step("pjdfstest --backing both --names 8.3");
    pjdfstest::run(
        sh,
        &pjdfstest::Options {
            backing: pjdfstest::BackingChoice::Both,
            fs: Fs::Pershomefs,
            names: pjdfstest::Names::Short83,
        },
    )
    .context("CI step `pjdfstest --backing both --names 8.3` failed")?;

    step("fsx");
    fsx::run(&fsx::Options {
        ops: 100_000,
        seed: None,
        fs: Fs::Pershomefs,
        backing: BackingKind::Dir,
        part_size: None,
    })
    .context("CI step `fsx` failed")?;

    step("fsx --part-size 4096 (files in parts across every boundary)");
    fsx::run(&fsx::Options {
        ops: 50_000,
        seed: None,
        fs: Fs::Pershomefs,
        backing: BackingKind::Dir,
        part_size: Some(4096),
    })
    .context("CI step `fsx --part-size 4096` failed")?;

    // Many users on one machine (issue 14), short: errors fail CI, the figures never do.
    step("many-mounts --mounts 30 --seconds 15 (fails on errors only)");
    many_mounts::run(&many_mounts::Options {
        mounts: 30,
        seconds: 15,
        interval_ms: 50,
        first_uid: 700_000_000,
        seed: 14,
        kill_daemon: None,
    })
    .context("CI step `many-mounts` failed")?;

    // The QEMU end-to-end suite (vm-tests/, docs/vm-tests.md): real vfat and exFAT, a stick
    // that is pulled, both kernels. Budgeted at 35 minutes of CI's 90.
    step("cargo vm-test (the QEMU suite)");
    cmd!(sh, "cargo vm-test")
        .run()
        .context("CI step `cargo vm-test` failed (see its summary and target/vm/runs/)")?;

    step("fuzz --seconds 20");
    fuzz::run(
        sh,
        &fuzz::Options {
            seconds: 20,
            targets: Vec::new(),
        },
    )
    .context("CI step `fuzz` failed")?;

    step("bench --quick --files 2000 --big-mib 128 (informational)");
    let quick = bench::Options {
        files: 2000,
        dirs: 500,
        big_mib: 128,
        quick: true,
        fs: vec![Fs::Raw, Fs::Pershomefs, Fs::Posixovl],
        backing_fs: bench::BackingFs::Ext4,
        mount_opts: vec![],
        no_counters: false,
    };
    if let Err(e) = bench::run(&quick) {
        // Informational only: a broken benchmark is reported, it does not fail CI.
        eprintln!("warning: the benchmark did not complete (this does not fail CI): {e:#}");
    }
    util::check_interrupted()?;

    step("wear --quick (informational, except: reads must write nothing)");
    match wear::measure(&wear::Options::new(None, 500, true)) {
        Ok(report) => {
            if let Err(e) = wear::print_and_save(&report) {
                eprintln!("warning: could not save the wear table (this does not fail CI): {e:#}");
            }
            report
                .check_reads()
                .context("CI step `wear --quick` failed")?;
        }
        Err(e) => {
            util::check_interrupted()?;
            eprintln!("warning: the wear run did not complete (this does not fail CI): {e:#}");
        }
    }

    eprintln!(
        "\nCI passed in {:.0} s ({} free)",
        started.elapsed().as_secs_f64(),
        free_space()
    );
    Ok(())
}

/// Free space on the disk of the working directory (the clone, whose `target/` takes the
/// builds and the QEMU suite's images), for the step banners.
fn free_space() -> String {
    let Ok(path) = std::ffi::CString::new(".") else {
        return "? GiB".to_owned();
    };
    // SAFETY: statvfs writes into the zeroed struct it is given and reads a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return "? GiB".to_owned();
    }
    let bytes = st.f_bavail as f64 * st.f_frsize as f64;
    format!("{:.1} GiB", bytes / f64::from(1u32 << 30))
}
