//! Scenario 5, conformance on real FAT: pjdfstest and fsx inside the guest against
//! pershomefs over the real kernel vfat driver, then over the real exFAT driver, with the same
//! configuration as `cargo xtask pjdfstest` on the host. Over a directory the host run gives
//! 0 failed / 23 skipped / 375 passed; the guest must give the same counts, and the stick
//! must be clean afterwards for `pershome fsck` and for the filesystem's own fsck.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::guest;
use crate::qemu::Vm;
use crate::stick::{self, StickFs};
use crate::Ctx;

/// pjdfstest's configuration, as `xtask/src/pjdfstest.rs` writes it for the host run.
const PJDFSTEST_CONFIG: &str = "[features]\nposix_fallocate = {}\nutime_now = {}\nutimensat = {}\n\n[settings]\nnaptime = 0.01\n\n[dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"tests\", \"tests\"]]\n";

/// The host's figures over a directory backing (docs/testing.md), to compare with.
const HOST_SKIPPED: u32 = 23;
const HOST_PASSED: u32 = 375;

/// A 4 GiB stick: FAT has no sparse files, so pjdfstest's `open::interact_2gb` (a write at
/// offset 2 GiB) needs 2 GiB of free space; on a 256 MiB stick it fails with ENOSPC, as it
/// would on any real stick that small. The image file stays sparse on the host.
const STICK_MIB: u64 = 4096;

/// fsx operations in the guest: TCG runs it about 20 times slower than the host. 20,000
/// since the LTSP and power-cut scenarios joined the suite: 50,000 took 704 s on vfat and
/// 481 s on exFAT in the last loaded run, which CI's 75 minutes no longer hold. The host
/// runs fsx for 100,000 ops (and 50,000 in 4 KiB parts) in CI.
const FSX_OPS: u64 = 20_000;
const FSX_SEED: u64 = 6_006;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub failed: u32,
    pub skipped: u32,
    pub passed: u32,
    pub total: u32,
}

/// pjdfstest's last line: `Summary: 0 failed, 23 skipped, 375 passed, 0 expected failures, 398 total`.
pub fn parse_summary(output: &str) -> Option<Summary> {
    let line = output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("Summary:"))?;
    let mut summary = Summary::default();
    for part in line.split(',') {
        let (number, label) = part.trim().split_once(' ')?;
        let number: u32 = number.parse().ok()?;
        match label.trim() {
            "failed" => summary.failed = number,
            "skipped" => summary.skipped = number,
            "passed" => summary.passed = number,
            "total" => summary.total = number,
            "expected failures" => {}
            _ => return None,
        }
    }
    Some(summary)
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    for fs in [StickFs::Fat32, StickFs::Exfat] {
        one(ctx, fs).with_context(|| format!("on the {} stick", fs.name()))?;
    }
    Ok(())
}

fn one(ctx: &mut Ctx, fs: StickFs) -> Result<()> {
    let image = ctx.run_dir.join(format!("stick-{}.img", fs.name()));
    stick::create(&ctx.sh, &image, fs, STICK_MIB)?;
    let mut vm = ctx.boot(fs.name(), ctx.kernel, Some(&image))?;
    let device = guest::wait_for_stick(&mut vm)?;
    guest::mount_stick(&mut vm, &device, fs)?;

    // pjdfstest, as root, on a pershomefs mount every user can enter (as on the host).
    pjdfstest(ctx, &mut vm, "allow_other", fs.name())?;
    guest::pershome_fsck_clean(&mut vm).context("after pjdfstest")?;

    // fsx, then fsck of the store and of the stick itself.
    let mp = "/mnt/fsx";
    guest::mount_home(&mut vm, mp, "allow_other")?;
    let started = std::time::Instant::now();
    guest::fsx(&mut vm, &format!("{mp}/fsx.bin"), FSX_OPS, FSX_SEED)?;
    ctx.note(format!(
        "fsx -N {FSX_OPS} -S {FSX_SEED} on {}: A-OK in {:.0} s",
        fs.name(),
        started.elapsed().as_secs_f64()
    ));
    guest::unmount_home(&mut vm, mp)?;
    guest::pershome_fsck_clean(&mut vm).context("after fsx")?;
    guest::unmount_and_check_stick(&mut vm, &device, fs)?;
    vm.shutdown()?;
    if fs == StickFs::Fat32 {
        // And from the host, as a Windows machine would see it.
        stick::fsck_fat_host(&ctx.sh, &image).context("the stick, checked on the host")?;
        ctx.note("fsck.fat -n on the host: clean".to_owned());
    }
    Ok(())
}

/// pjdfstest as root on a fresh pershomefs mount at /mnt/pjdfstest with `options` (over the
/// stick mounted at the guest's backing), judged against the host's figures: no failure, and
/// the same skipped and passed counts (a test skipped here but not there would be a
/// conformance check the real drivers never ran). `name` names the run in the log file and
/// the messages. Unmounts the home again.
pub(super) fn pjdfstest(ctx: &mut Ctx, vm: &mut Vm, options: &str, name: &str) -> Result<()> {
    let mp = "/mnt/pjdfstest";
    guest::mount_home(vm, mp, options)?;
    let log = format!("pjdfstest-{name}.log");
    let started = std::time::Instant::now();
    let script = format!(
        "set -e; chmod 755 {mp}; printf '%s' {config} > /tmp/pjdfstest.toml; \
         cd /tmp; umask 022; pjdfstest -c /tmp/pjdfstest.toml -p {mp} > /host/results/{log} 2>&1 || true",
        config = crate::util::shq(PJDFSTEST_CONFIG)
    );
    vm.ok(&script, Duration::from_secs(1800))
        .context("running pjdfstest in the guest")?;
    let secs = started.elapsed().as_secs_f64();
    let results = ctx.share.join("results").join(&log);
    let saved = ctx.run_dir.join(&log);
    std::fs::copy(&results, &saved)
        .with_context(|| format!("copying {} out of the share", results.display()))?;
    let output =
        std::fs::read_to_string(&saved).with_context(|| format!("reading {}", saved.display()))?;
    let Some(summary) = parse_summary(&output) else {
        bail!(
            "pjdfstest printed no summary (crashed?); log {}:\n{}",
            saved.display(),
            crate::util::tail_lines(&saved, 30)
        );
    };
    ctx.note(format!(
        "pjdfstest on {name} ({options}): {} failed, {} skipped, {} passed of {} in {secs:.0} s (host: 0 failed, {HOST_SKIPPED} skipped, {HOST_PASSED} passed); log {}",
        summary.failed,
        summary.skipped,
        summary.passed,
        summary.total,
        saved.display()
    ));
    if summary.failed > 0 {
        let failed: Vec<&str> = output
            .lines()
            .filter_map(|l| l.strip_suffix("FAILED"))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        bail!(
            "pjdfstest on {name}: expected 0 failed (as on the host), got {}: {}",
            summary.failed,
            failed.join(", ")
        );
    }
    if (summary.skipped, summary.passed) != (HOST_SKIPPED, HOST_PASSED) {
        bail!(
            "pjdfstest on {name}: expected {HOST_SKIPPED} skipped and {HOST_PASSED} passed as on the host, got {} and {}",
            summary.skipped,
            summary.passed
        );
    }
    guest::unmount_home(vm, mp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_summary_line() {
        let got = parse_summary(
            "x ok\nSummary: 1 failed, 23 skipped, 374 passed, 0 expected failures, 398 total\n",
        );
        let want = Summary {
            failed: 1,
            skipped: 23,
            passed: 374,
            total: 398,
        };
        assert_eq!(got, Some(want), "expected the counts of the summary line");
        assert_eq!(
            parse_summary("panicked\n"),
            None,
            "expected None without a summary"
        );
    }
}
