//! Scenario 6, flash wear: the workloads of `cargo xtask wear` (xtask/src/wear.rs: create a
//! tree, read it twice after a remount, appends with fsync, desktop churn), run inside the
//! guest by `xtask wear-step` with plain file calls, once on the stick through pershomefs and
//! once on the plain vfat mount of an identical fresh stick. The bytes the stick receives are
//! counted by QEMU (QMP query-blockstats on the USB device), so they include everything: file
//! data, FAT and directory sectors, pershome's metadata store.
//!
//! Each step is bracketed the same way on both sides: counters read, stick mounted (and
//! pershomefs), the step, everything unmounted (pershomefs commits then), counters read. So
//! the mount's dirty-bit write is in every figure on both sides. The ratio is reported, not
//! judged; the one hard rule is the wear benchmark's: reading the tree must not make pershome
//! write anything beyond what a mount and unmount without reads cost (the `idle` step).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest;
use crate::qemu::Vm;
use crate::stick::{self, StickFs};
use crate::Ctx;

/// Sizes scaled for TCG (the host benchmark's --quick is 2,000 files and 400 rounds).
const FILES: u32 = 500;
const DIRS: u32 = 50;
const APPENDS: u32 = 200;
const ROUNDS: u32 = 100;

/// In run order. `idle` mounts and unmounts without touching a file: what a mount of the
/// populated stick costs by itself, so that the read step right after it can be judged on
/// what the reads add (a first mount of a fresh stick writes more: FSInfo and the like).
const STEPS: [(&str, &str); 6] = [
    ("create", "(b) create tree"),
    ("idle", "(0) mount+unmount only"),
    ("read", "(a) remount, read x2"),
    ("appends", "(c) appends+fsync"),
    ("churn-setup", "(d) setup (not compared)"),
    ("churn", "(d) desktop churn"),
];

#[derive(Clone, Copy, Default)]
struct Written {
    bytes: u64,
    ops: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Plain,
    Pershome,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Plain => "plain vfat",
            Side::Pershome => "pershome",
        }
    }
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let plain = side(ctx, Side::Plain)?;
    let pershome = side(ctx, Side::Pershome)?;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<26} {:>14} {:>8} {:>14} {:>8} {:>7}",
        "workload", "vfat bytes", "writes", "pershome bytes", "writes", "ratio"
    );
    let (mut total_plain, mut total_pershome) = (0u64, 0u64);
    for (i, (_, label)) in STEPS.iter().enumerate() {
        let (p, q) = (plain[i], pershome[i]);
        let ratio = if p.bytes > 0 {
            format!("{:.2}", q.bytes as f64 / p.bytes as f64)
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            table,
            "{label:<26} {:>14} {:>8} {:>14} {:>8} {ratio:>7}",
            p.bytes, p.ops, q.bytes, q.ops
        );
        if !matches!(STEPS[i].0, "churn-setup" | "idle") {
            total_plain += p.bytes;
            total_pershome += q.bytes;
        }
    }
    let ratio = total_pershome as f64 / total_plain.max(1) as f64;
    let _ = writeln!(
        table,
        "{:<26} {total_plain:>14} {:>8} {total_pershome:>14} {:>8} {ratio:>7.2}",
        "total (a)+(b)+(c)+(d)", "", ""
    );
    println!("\nflash wear, bytes the stick received (QMP query-blockstats):\n{table}");
    let saved = ctx.run_dir.join("wear.txt");
    std::fs::write(&saved, &table).with_context(|| format!("writing {}", saved.display()))?;
    ctx.note(format!(
        "wear: pershome wrote {ratio:.2}x the bytes of plain vfat over (a)-(d) ({total_pershome} vs {total_plain}); table in {}",
        saved.display()
    ));
    // Reads: a mount, two reads of the tree and an unmount may cost what a mount and an
    // unmount alone cost, not a byte more (docs/architecture.md: reads never write).
    let step = |name: &str| STEPS.iter().position(|s| s.0 == name).unwrap_or(0);
    let (idle, read) = (pershome[step("idle")], pershome[step("read")]);
    ctx.note(format!(
        "a pershome mount+unmount alone writes {} bytes ({} writes); plain vfat {}",
        idle.bytes,
        idle.ops,
        plain[step("idle")].bytes
    ));
    if read.bytes > idle.bytes {
        bail!(
            "reading the tree made pershome write {} bytes more than mounting and unmounting alone ({} vs {})",
            read.bytes - idle.bytes,
            read.bytes,
            idle.bytes
        );
    }
    Ok(())
}

fn side(ctx: &mut Ctx, side: Side) -> Result<Vec<Written>> {
    let tag = match side {
        Side::Plain => "plain",
        Side::Pershome => "pershome",
    };
    let image = ctx.run_dir.join(format!("stick-{tag}.img"));
    stick::create(&ctx.sh, &image, StickFs::Fat32, 512)?;
    let mut vm = ctx.boot(&format!("wear-{tag}"), ctx.kernel, Some(&image))?;
    let device = guest::wait_for_stick(&mut vm)?;
    let mut results = Vec::new();
    for (step, label) in STEPS {
        let started = Instant::now();
        let written = one_step(&mut vm, &device, side, step)
            .with_context(|| format!("{} step {label}", side.name()))?;
        eprintln!(
            "  {}: {label}: {} bytes in {} writes ({:.0} s)",
            side.name(),
            written.bytes,
            written.ops,
            started.elapsed().as_secs_f64()
        );
        results.push(written);
    }
    vm.shutdown()?;
    Ok(results)
}

fn one_step(vm: &mut Vm, device: &str, side: Side, step: &str) -> Result<Written> {
    // Everything queued before this step is on the stick before the first reading.
    vm.ok("sync", guest::SHORT)?;
    let before = vm.stick_writes()?;
    guest::mount_stick(vm, device, StickFs::Fat32)?;
    let dir = match side {
        Side::Plain => {
            vm.ok(
                &format!(
                    "mkdir -p {0}/plain && chown joseph:joseph {0}/plain",
                    guest::STICK_MNT
                ),
                guest::SHORT,
            )?;
            format!("{}/plain", guest::STICK_MNT)
        }
        Side::Pershome => {
            guest::mount_home(vm, "/home/joseph", "uid=joseph,gid=joseph,allow_other")?;
            vm.ok("chown joseph:joseph /home/joseph", guest::SHORT)?;
            "/home/joseph".to_owned()
        }
    };
    if step != "idle" {
        let script = format!(
            "runuser -u joseph -- xtask wear-step --dir {dir} --step {step} --files {FILES} --dirs {DIRS} --appends {APPENDS} --rounds {ROUNDS}"
        );
        vm.ok(&script, Duration::from_secs(1800))?;
    }
    if side == Side::Pershome {
        guest::unmount_home(vm, "/home/joseph")?;
    }
    vm.ok(
        &format!("umount {} && sync", guest::STICK_MNT),
        guest::SHORT,
    )?;
    let after = vm.stick_writes()?;
    Ok(Written {
        bytes: after.wr_bytes - before.wr_bytes,
        ops: after.wr_operations - before.wr_operations,
    })
}
