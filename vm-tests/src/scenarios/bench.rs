//! Scenario 11, speed on a real stick (issue 14): the tree workloads of `cargo xtask bench`
//! (tar x, find, ls -lR cold and warm, rm -rf) and a large-file write, in one VM on one FAT32
//! stick, on pershomefs over the kernel's vfat driver and on a plain vfat directory of the
//! same mount (the login hook's stick options), side by side. Informational: the ratios are
//! printed, kept in `target/vm/runs/bench/bench.txt` and quoted in docs/testing.md, never
//! judged (TCG on a shared machine is noisy; issue 14: no timing assertions). What fails the
//! scenario is a workload that fails, or a tree that does not read back with every file.
//!
//! This module owns the workload list and its sizes, the tarball (made on the host, with the
//! bench's deterministic generator, so both sides untar the same bytes) and the table. It
//! never times anything on the host: every time is measured in the guest around one command.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pershome::requests::{difference, parse_report, total, Report};

use crate::guest;
use crate::qemu::Vm;
use crate::stick::{self, StickFs};
use crate::Ctx;

/// Small enough for CI under TCG (≤ 4 min for this scenario), large enough that per-file
/// costs dominate: 400 files of 0–8 KiB in 20 folders (20 per folder, as the host bench), a
/// 32 MiB file. Measured with 2,000 files and 64 MiB: 760 s, of which `tar x` took 260 s on
/// plain vfat and 279 s on pershomefs (the hook mounts the stick with `flush`, so every
/// close waits for the USB stick).
const FILES: u32 = 400;
const DIRS: u32 = 20;
const BIG_MIB: u32 = 32;
/// Both trees, the big file (one side at a time) and slack; sparse on the host.
const STICK_MIB: u64 = 256;

/// Where the two sides live in the guest: a plain folder on the stick, and joseph's home as
/// pershomefs over the stick's `pershome/` (as the login hook mounts it, plus `counters`).
const PLAIN_DIR: &str = "/media/stick/plain";
const HOME: &str = "/home/joseph";
const HOME_OPTS: &str = "uid=joseph,gid=joseph,allow_other,counters";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Extract,
    FindCold,
    FindWarm,
    LsCold,
    LsWarm,
    Write,
    Remove,
}

const WORKLOADS: [Workload; 7] = [
    Workload::Extract,
    Workload::FindCold,
    Workload::FindWarm,
    Workload::LsCold,
    Workload::LsWarm,
    Workload::Write,
    Workload::Remove,
];

impl Workload {
    fn label(self) -> String {
        match self {
            Workload::Extract => format!("tar x ({FILES} files)"),
            Workload::FindCold => "find, cold".into(),
            Workload::FindWarm => "find, warm".into(),
            Workload::LsCold => "ls -lR, cold".into(),
            Workload::LsWarm => "ls -lR, warm".into(),
            Workload::Write => format!("write {BIG_MIB} MiB+fsync"),
            Workload::Remove => "rm -rf tree".into(),
        }
    }

    /// The command joseph runs in `dir` (the caches were dropped before a cold one).
    fn command(self, dir: &str) -> String {
        match self {
            Workload::Extract => format!("tar -xf /tmp/bench-tree.tar -C {dir}"),
            Workload::FindCold | Workload::FindWarm => format!("find {dir}/tree"),
            Workload::LsCold | Workload::LsWarm => format!("ls -lR {dir}/tree"),
            Workload::Write => {
                format!("dd if=/tmp/bench-big.bin of={dir}/big.bin bs=1M conv=fsync status=none")
            }
            Workload::Remove => format!("rm -rf {dir}/tree {dir}/big.bin"),
        }
    }

    fn is_cold(self) -> bool {
        matches!(self, Workload::FindCold | Workload::LsCold)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Plain,
    Pershome,
}

/// Writes `tree/dNNNN/fNNNNNN.dat` under `scratch` and tars it (fixed owner, mtimes and
/// order) into `tar`.
fn make_tarball(ctx: &Ctx, scratch: &Path, tar: &Path) -> Result<()> {
    let tree = scratch.join("tree");
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)
            .with_context(|| format!("removing {}", scratch.display()))?;
    }
    // The host bench's own generator (pershome::testing), so the sizes are the same.
    pershome::testing::write_bench_tree(&tree, FILES, DIRS, true)
        .with_context(|| format!("generating the tree in {}", tree.display()))?;
    let sh = &ctx.sh;
    xshell::cmd!(
        sh,
        "tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf {tar} -C {scratch} tree"
    )
    .quiet()
    .run()
    .context("tar -c of the bench tree")?;
    std::fs::remove_dir_all(scratch).with_context(|| format!("removing {}", scratch.display()))
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let results = ctx.share.join("results");
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let tar = results.join("bench-tree.tar");
    make_tarball(ctx, &ctx.run_dir.join("bench-src"), &tar)?;
    let image = ctx.run_dir.join("stick-bench.img");
    stick::create(&ctx.sh, &image, StickFs::Fat32, STICK_MIB)?;
    let mut vm = ctx.boot("bench", ctx.kernel, Some(&image))?;
    let device = guest::wait_for_stick(&mut vm)?;
    // The tarball comes to the guest's own disk once, readable by joseph, so 9p is not timed.
    // The big file's bytes are random, made once: zeros would be holes in the stick image
    // (`qemu::stick_file_node` unmaps zero writes), not writes, and time nothing real.
    vm.ok(
        &format!(
            "cp /host/results/bench-tree.tar /tmp/bench-tree.tar && chmod 644 /tmp/bench-tree.tar && cat /tmp/bench-tree.tar >/dev/null && \
             head -c {}M /dev/urandom > /tmp/bench-big.bin && chmod 644 /tmp/bench-big.bin",
            BIG_MIB
        ),
        guest::SHORT,
    )?;
    guest::mount_stick(&mut vm, &device, StickFs::Fat32)?;
    vm.ok(
        &format!("mkdir -p {PLAIN_DIR} && chown joseph:joseph {PLAIN_DIR}"),
        guest::SHORT,
    )?;
    let plain = side(&mut vm, &device, Side::Plain)?;
    guest::mount_home(&mut vm, HOME, HOME_OPTS)?;
    vm.ok(&format!("chown joseph:joseph {HOME}"), guest::SHORT)?;
    let pershome = side(&mut vm, &device, Side::Pershome)?;
    guest::unmount_home(&mut vm, HOME)?;
    guest::unmount_and_check_stick(&mut vm, &device, StickFs::Fat32)?;
    vm.shutdown()?;
    let _ = std::fs::remove_file(&tar);

    let table = format_table(&plain, &pershome);
    println!(
        "\nbench on a real stick (kernel {}):\n{table}",
        ctx.kernel.name()
    );
    let saved = ctx.run_dir.join("bench.txt");
    std::fs::write(&saved, &table).with_context(|| format!("writing {}", saved.display()))?;
    ctx.note(format!("bench table in {}", saved.display()));
    Ok(())
}

/// One side's results: per workload, microseconds and (pershome) the requests it cost.
struct Timed {
    micros: u64,
    requests: Option<Report>,
}

fn side(vm: &mut Vm, device: &str, side: Side) -> Result<Vec<Timed>> {
    let dir = match side {
        Side::Plain => PLAIN_DIR,
        Side::Pershome => HOME,
    };
    let mut out = Vec::new();
    for workload in WORKLOADS {
        if workload.is_cold() {
            make_cold(vm, device, side)?;
        }
        let before = requests(vm, side)?;
        // `date +%s%N` around the command alone, in the guest: no agent or serial time.
        let script = format!(
            "s=$(date +%s%N); runuser -u joseph -- {} >/dev/null || exit 1; e=$(date +%s%N); echo $(( (e - s) / 1000 ))",
            workload.command(dir)
        );
        let side_name = match side {
            Side::Plain => "plain vfat",
            Side::Pershome => "pershomefs",
        };
        let micros: u64 = vm
            .ok(&script, Duration::from_secs(900))
            .with_context(|| format!("{side_name}: {}", workload.label()))?
            .trim()
            .parse()
            .with_context(|| format!("{side_name}: {}: the time", workload.label()))?;
        let after = requests(vm, side)?;
        let requests = before.zip(after).map(|(b, a)| difference(&b, &a));
        eprintln!(
            "  {side_name}: {:<22} {:>9.3} s",
            workload.label(),
            micros as f64 / 1e6
        );
        if workload == Workload::Extract {
            // Every file arrived (a failed tar would have failed above; this catches a
            // silently short tree).
            let count = vm.ok(&format!("find {dir}/tree -type f | wc -l"), guest::SHORT)?;
            if count.trim() != FILES.to_string() {
                bail!(
                    "{side_name}: expected {FILES} files after tar x, found {}",
                    count.trim()
                );
            }
        }
        out.push(Timed { micros, requests });
    }
    Ok(out)
}

/// The kernel forgets what it cached: for pershome the home is unmounted and mounted again
/// (the daemon starts from the store), for both the stick is remounted and caches dropped.
fn make_cold(vm: &mut Vm, device: &str, side: Side) -> Result<()> {
    if side == Side::Pershome {
        guest::unmount_home(vm, HOME)?;
    }
    vm.ok(&format!("umount {}", guest::STICK_MNT), guest::SHORT)?;
    guest::mount_stick(vm, device, StickFs::Fat32)?;
    if side == Side::Pershome {
        guest::mount_home(vm, HOME, HOME_OPTS)?;
    }
    vm.ok("sync && echo 3 > /proc/sys/vm/drop_caches", guest::SHORT)
        .map(drop)
}

/// pershomefs's request counters (the root's `trusted.pershome.requests`).
fn requests(vm: &mut Vm, side: Side) -> Result<Option<Report>> {
    if side == Side::Plain {
        return Ok(None);
    }
    let text = vm.ok(
        &format!("getfattr --only-values -n trusted.pershome.requests {HOME}"),
        guest::SHORT,
    )?;
    parse_report(&text)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("pershomefs's request report: {e}"))
}

fn format_table(plain: &[Timed], pershome: &[Timed]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{FILES} files in {DIRS} folders, a {BIG_MIB} MiB file; one run; FAT32 stick on qemu-xhci usb-storage, TCG"
    );
    let _ = writeln!(
        out,
        "{:<22} | {:>10} | {:>10} | {:>7} | {:>13}",
        "workload", "plain vfat", "pershomefs", "ratio", "requests"
    );
    let _ = writeln!(out, "{}", "-".repeat(74));
    for (i, workload) in WORKLOADS.iter().enumerate() {
        let (p, q) = (&plain[i], &pershome[i]);
        let (ps, qs) = (p.micros as f64 / 1e6, q.micros as f64 / 1e6);
        // Time workloads: pershome's time over vfat's (above 1 is slower). The write:
        // pershome's throughput over vfat's (below 1 is slower).
        let ratio = if *workload == Workload::Write {
            format!("{:.2}x", ps / qs.max(1e-9))
        } else {
            format!("{:.2}x", qs / ps.max(1e-9))
        };
        let requests = q.requests.as_ref().map(|r| {
            let answered = total(r) - r.get("FORGET").copied().unwrap_or(0);
            match workload {
                Workload::Extract => {
                    format!("{:.2}/file", answered as f64 / f64::from(FILES))
                }
                Workload::Write => format!("{answered}"),
                _ => format!("{:.2}/entry", answered as f64 / f64::from(FILES + DIRS + 1)),
            }
        });
        let _ = writeln!(
            out,
            "{:<22} | {:>9.3}s | {:>9.3}s | {ratio:>7} | {:>13}",
            workload.label(),
            ps,
            qs,
            requests.unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "ratio: pershomefs time / plain vfat time (above 1: slower); for the write, pershomefs throughput / vfat throughput (below 1: slower)"
    );
    out
}
