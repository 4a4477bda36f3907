//! `cargo xtask bench`: time the same workloads on the raw backing directory, on pershomefs over
//! a directory and on posixovl over a directory, in one run, and print seconds per workload
//! plus ratios to raw and between the two FUSE filesystems. pershomefs is mounted with
//! `-o counters`, so the bench also prints the FUSE requests each workload cost (exact, unlike
//! the timings) and the daemon's memory: idle, and per entry the kernel has looked up.
//!
//! This module owns the workload definitions, the deterministic test tarball and the fresh
//! filesystem every cell runs on. It never asserts anything about the numbers: the machines
//! are shared and noisy, so timings are reported, never judged. Cold runs drop the kernel
//! caches and remount FUSE filesystems.
//!
//! Why a fresh filesystem per cell: on a long-lived ext4 (the VM's disk), inode allocation is
//! very slow for a while after a large `rm -rf` (the kernel spends its time in
//! `recently_deleted`/`find_inode_bit`), so a cell's time depended on what ran before it (raw
//! `tar x` took 0.2 s in one cell and 3.9–6.9 s in another, minutes apart). Each filesystem in
//! each repetition therefore gets its own new ext4 on a loop device (or its own tmpfs, which
//! takes the disk out of the picture and leaves only the FUSE overhead).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use pershome::requests::{self, read_report, Report};

use crate::guards::{LoopDev, Mount, TempDir};
use crate::target::{pershomefs_binary, Fs, Target};
use crate::util;

/// What every cell's backing directory (or raw directory) lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackingFs {
    /// A new ext4 per cell: a sparse image under /var/tmp, attached to a loop device with
    /// direct I/O, mounted.
    Ext4,
    /// A new tmpfs per cell: no disk at all, so the differences are the FUSE overhead.
    Tmpfs,
}

impl BackingFs {
    /// How the table header describes it.
    fn describe(self) -> &'static str {
        match self {
            BackingFs::Ext4 => "each cell on a fresh ext4 loop filesystem (sparse image on /var/tmp, loop direct I/O)",
            BackingFs::Tmpfs => "each cell on a fresh tmpfs (no disk: FUSE overhead only)",
        }
    }
}

pub struct Options {
    pub files: u32,
    pub dirs: u32,
    pub big_mib: u32,
    pub quick: bool,
    pub fs: Vec<Fs>,
    pub backing_fs: BackingFs,
    /// Extra `-o` options for pershomefs (say `threads=1`).
    pub mount_opts: Vec<String>,
    /// Mount pershomefs without `-o counters` (a binary from before the counters, via
    /// `PERSHOMEFS=`): no request counts then.
    pub no_counters: bool,
}

/// The fresh filesystem one cell runs on, mounted on `<scratch>/e`. Field order is drop order:
/// the mount goes before the loop device it lives on.
struct CellFs {
    root: PathBuf,
    mount: Option<Mount>,
    _loop: Option<LoopDev>,
}

impl CellFs {
    fn create(kind: BackingFs, scratch: &TempDir, options: &Options) -> Result<CellFs> {
        let root = scratch.path().join("e");
        std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        // The tree (about 40 MiB of data in 4 KiB blocks), the big file, and slack for the
        // journal, metadata and whatever the filesystem under test stores beside the data.
        let mut size_mib = u64::from(options.big_mib) + 2048;
        if options.files > MAX_FILES_WITH_DATA {
            // Room for the inode tables of a tree of empty files (see `tarball`).
            size_mib += u64::from(options.files) / 256;
        }
        match kind {
            BackingFs::Ext4 => {
                let image = scratch.path().join("ext4.img");
                let file = File::create(&image)
                    .with_context(|| format!("creating {}", image.display()))?;
                file.set_len(size_mib << 20)
                    .with_context(|| format!("sizing {} to {size_mib} MiB", image.display()))?;
                drop(file);
                // Inode tables and journal are initialised now, not by the kernel's lazyinit
                // thread in the background while the workloads run. (On a sparse image mkfs
                // punches holes instead of writing zeros, so this costs nothing.)
                let mut mkfs = Command::new("mkfs.ext4");
                mkfs.args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]);
                if options.files > MAX_FILES_WITH_DATA {
                    // One inode per 4 KiB, so a `--files 500000` tree fits (the default, one
                    // per 16 KiB, runs out first).
                    mkfs.args(["-i", "4096"]);
                }
                mkfs.arg(&image).stdout(Stdio::null());
                util::run_checked(mkfs, "mkfs.ext4")?;
                let loop_dev = LoopDev::attach_with(&image, true)?;
                let mut mount = Command::new("mount");
                mount.args(["-t", "ext4"]).arg(loop_dev.device()).arg(&root);
                let mount = Mount::start_kernel("ext4", mount, &root)?;
                Ok(CellFs {
                    root,
                    mount: Some(mount),
                    _loop: Some(loop_dev),
                })
            }
            BackingFs::Tmpfs => {
                let mut mount = Command::new("mount");
                mount
                    .args(["-t", "tmpfs", "-o"])
                    .arg(format!("size={size_mib}m,mode=0755"))
                    .arg("tmpfs")
                    .arg(&root);
                let mount = Mount::start_kernel("tmpfs", mount, &root)?;
                Ok(CellFs {
                    root,
                    mount: Some(mount),
                    _loop: None,
                })
            }
        }
    }

    /// Unmount and detach, reporting failures (drop only warns).
    fn release(mut self) -> Result<()> {
        if let Some(mount) = self.mount.take() {
            mount.unmount()?;
        }
        Ok(())
    }
}

/// The workloads in the order they run (each depends on the previous ones' files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Extract,
    FindCold,
    FindWarm,
    LsCold,
    LsWarm,
    MountLs,
    Write,
    ReadCold,
    Remove,
}

const WORKLOADS: [Workload; 9] = [
    Workload::Extract,
    Workload::FindCold,
    Workload::FindWarm,
    Workload::LsCold,
    Workload::LsWarm,
    Workload::MountLs,
    Workload::Write,
    Workload::ReadCold,
    Workload::Remove,
];

impl Workload {
    fn label(self, options: &Options) -> String {
        match self {
            Workload::Extract => format!("tar x ({} files)", options.files),
            Workload::FindCold => "find, cold".into(),
            Workload::FindWarm => "find, warm".into(),
            Workload::LsCold => "ls -lR, cold".into(),
            Workload::LsWarm => "ls -lR, warm".into(),
            Workload::MountLs => "mount + ls top, cold".into(),
            Workload::Write => format!("write {} MiB+fsync", options.big_mib),
            Workload::ReadCold => format!("read {} MiB, cold", options.big_mib),
            Workload::Remove => "rm -rf tree".into(),
        }
    }

    /// Data workloads are compared by throughput, the rest by time.
    fn is_throughput(self) -> bool {
        matches!(self, Workload::Write | Workload::ReadCold)
    }
}

/// The tarball is identical on every machine (`wear` builds the same tree with this generator).
pub(crate) use pershome::testing::Rng;

/// Above this many files the tree's files are empty: a home of half a million entries is
/// about metadata (mount, listing, memory), and 2 GB of contents would only fill the disk.
const MAX_FILES_WITH_DATA: u32 = 100_000;

/// Build (once, cached in target/bench/) a tarball of `files` files of 0–8 KiB (empty above
/// `MAX_FILES_WITH_DATA`) spread over `dirs` directories under `tree/`, with fixed owners,
/// mtimes and order.
fn tarball(options: &Options) -> Result<PathBuf> {
    let dir = util::target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tar = dir.join(format!("tree-{}-{}.tar", options.files, options.dirs));
    if tar.is_file() {
        return Ok(tar);
    }
    util::banner(&format!("generating {}", tar.display()));
    let scratch = TempDir::new("bench-gen")?;
    let tree = scratch.path().join("tree");
    pershome::testing::write_bench_tree(
        &tree,
        options.files,
        options.dirs,
        options.files <= MAX_FILES_WITH_DATA,
    )
    .with_context(|| format!("generating the tree in {}", tree.display()))?;
    let partial = dir.join(format!(
        "tree-{}-{}.tar.partial",
        options.files, options.dirs
    ));
    let mut command = Command::new("tar");
    command
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-cf",
        ])
        .arg(&partial)
        .arg("-C")
        .arg(scratch.path())
        .arg("tree");
    util::run_checked(command, "tar -c")?;
    std::fs::rename(&partial, &tar).with_context(|| format!("renaming to {}", tar.display()))?;
    Ok(tar)
}

/// Run a shell-free command with stdout discarded; return its wall time.
fn timed(program: &str, args: &[&std::ffi::OsStr]) -> Result<Duration> {
    let mut command = Command::new(program);
    command.args(args).stdout(Stdio::null());
    util::run_checked(command, program)
}

/// What one cell measured besides times: pershomefs's requests per workload and its memory.
#[derive(Default)]
struct CellStats {
    requests: BTreeMap<Workload, Report>,
    /// Daemon RSS (KiB) of a fresh mount of the full store, before any access.
    idle_rss_kib: Option<u64>,
    /// Daemon RSS (KiB) after a cold `ls -lR` looked up every entry.
    listed_rss_kib: Option<u64>,
}

/// The resident set (KiB) of the pershomefs daemon serving `mountpoint`, if there is one:
/// the process that has the mountpoint among its arguments and `/dev/fuse` open. Not by
/// program name, because a `PERSHOMEFS=` binary (an older build kept for a before/after run)
/// may be called anything.
fn daemon_rss_kib(mountpoint: &Path) -> Option<u64> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !cmdline.split(|&b| b == 0).skip(1).any(|a| a == want) {
            continue;
        }
        let holds_fuse = std::fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/fuse")));
        if !holds_fuse {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
        return status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    }
    None
}

fn run_workloads(
    target: &mut Target,
    tar: &Path,
    options: &Options,
) -> Result<(Vec<(Workload, Duration)>, CellStats)> {
    let mut times = Vec::new();
    let mut stats = CellStats::default();
    let counting = target.fs() == Fs::Pershomefs && !options.no_counters;
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    for workload in WORKLOADS {
        util::check_interrupted()?;
        let mut mount_time = Duration::ZERO;
        if matches!(
            workload,
            Workload::FindCold | Workload::LsCold | Workload::ReadCold
        ) {
            target.make_cold()?;
        }
        if workload == Workload::MountLs {
            mount_time = target.make_cold_timed()?;
        }
        if workload == Workload::FindCold && target.fs() == Fs::Pershomefs {
            stats.idle_rss_kib = daemon_rss_kib(target.path());
        }
        let root = target.path().to_path_buf();
        let tree = root.join("tree");
        let big = root.join("big.bin");
        // Snapshots are taken outside the timed command; reading one is not counted.
        let before = if counting {
            Some(read_report(&root).context("reading pershomefs's request report")?)
        } else {
            None
        };
        let elapsed = match workload {
            Workload::Extract => timed(
                "tar",
                &[os("-xf"), tar.as_os_str(), os("-C"), root.as_os_str()],
            )?,
            Workload::FindCold | Workload::FindWarm => timed("find", &[tree.as_os_str()])?,
            Workload::LsCold | Workload::LsWarm => timed("ls", &[os("-lR"), tree.as_os_str()])?,
            Workload::MountLs => mount_time + timed("ls", &[root.as_os_str()])?,
            Workload::Write => {
                let of = format!("of={}", big.display());
                let count = format!("count={}", options.big_mib);
                timed(
                    "dd",
                    &[
                        os("if=/dev/zero"),
                        of.as_ref(),
                        os("bs=1M"),
                        count.as_ref(),
                        os("conv=fsync"),
                        os("status=none"),
                    ],
                )?
            }
            Workload::ReadCold => {
                let input = format!("if={}", big.display());
                timed(
                    "dd",
                    &[
                        input.as_ref(),
                        os("of=/dev/null"),
                        os("bs=1M"),
                        os("status=none"),
                    ],
                )?
            }
            Workload::Remove => timed("rm", &[os("-rf"), tree.as_os_str()])?,
        };
        if let Some(before) = before {
            let after = read_report(&root).context("reading pershomefs's request report")?;
            stats
                .requests
                .insert(workload, requests::difference(&before, &after));
        }
        if workload == Workload::LsCold && target.fs() == Fs::Pershomefs {
            stats.listed_rss_kib = daemon_rss_kib(&root);
        }
        times.push((workload, elapsed));
    }
    Ok((times, stats))
}

pub fn run(options: &Options) -> Result<()> {
    util::require_root("bench")?;
    crate::guards::sweep_stale()?;
    let mut filesystems = vec![Fs::Raw];
    for &fs in &options.fs {
        if !filesystems.contains(&fs) {
            filesystems.push(fs);
        }
    }
    let bin = if filesystems.contains(&Fs::Pershomefs) {
        Some(pershomefs_binary()?)
    } else {
        None
    };
    let tar = tarball(options)?;
    let reps = if options.quick { 1 } else { 3 };
    eprintln!(
        "bench: backing filesystem: {}",
        options.backing_fs.describe()
    );
    // best[(fs index, workload)] = fastest time seen.
    let mut best: BTreeMap<(usize, Workload), Duration> = BTreeMap::new();
    let mut stats = CellStats::default();
    for rep in 1..=reps {
        // Each repetition visits every filesystem, so slow drift of the machine's load
        // spreads over all of them instead of favouring one.
        for (index, &fs) in filesystems.iter().enumerate() {
            util::banner(&format!("bench run {rep}/{reps}: {}", fs.name()));
            // Declaration order is the reverse of drop order: on an error the FUSE mount
            // goes first, then the cell filesystem (and its loop device), then the directory.
            let scratch = TempDir::new(&format!("bench-{}", fs.name()))?;
            let cell = CellFs::create(options.backing_fs, &scratch, options)?;
            let backing = cell.root.join("b");
            std::fs::create_dir(&backing)
                .with_context(|| format!("creating {}", backing.display()))?;
            let mut mount_opts: Vec<&str> = Vec::new();
            if fs == Fs::Pershomefs {
                // Counting costs one relaxed atomic add per request; the snapshots
                // are read outside the timed commands.
                if !options.no_counters {
                    mount_opts.push("counters");
                }
                mount_opts.extend(options.mount_opts.iter().map(String::as_str));
            }
            let mut target = Target::mount(
                fs,
                &backing,
                &scratch.path().join("m"),
                &mount_opts,
                bin.as_deref(),
            )?;
            // Every cell starts with the same empty caches, whatever the previous cell left.
            util::drop_caches()?;
            let (times, cell_stats) = run_workloads(&mut target, &tar, options)?;
            if fs == Fs::Pershomefs {
                // The last repetition's counts and memory (counts are the same in every one).
                stats = cell_stats;
            }
            target.unmount()?;
            cell.release()?;
            drop(scratch);
            for (workload, elapsed) in times {
                eprintln!(
                    "  {:<24} {:>8.3} s",
                    workload.label(options),
                    elapsed.as_secs_f64()
                );
                let cell = best.entry((index, workload)).or_insert(elapsed);
                *cell = (*cell).min(elapsed);
            }
        }
    }
    let mut table = format_table(options, &filesystems, &best, reps);
    if filesystems.contains(&Fs::Pershomefs) {
        table.push_str(&format_requests(options, &stats));
    }
    println!("\n{table}");
    let out = util::target_dir().join("bench.txt");
    std::fs::write(&out, &table).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("table saved to {}", out.display());
    Ok(())
}

fn format_table(
    options: &Options,
    filesystems: &[Fs],
    best: &BTreeMap<(usize, Workload), Duration>,
    reps: u32,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench: {} files in {} dirs, {} MiB file; {} per cell; {}",
        options.files,
        options.dirs,
        options.big_mib,
        if reps == 1 {
            "one run".to_owned()
        } else {
            format!("best of {reps}")
        },
        options.backing_fs.describe()
    );
    // The two FUSE filesystems side by side: how many times faster pershomefs is.
    let pershomefs = filesystems.iter().position(|&f| f == Fs::Pershomefs);
    let posixovl = filesystems.iter().position(|&f| f == Fs::Posixovl);
    let versus = pershomefs.zip(posixovl);
    let _ = write!(out, "{:<24}", "workload");
    for fs in filesystems {
        let _ = write!(out, " | {:>22}", fs.name());
    }
    if versus.is_some() {
        let _ = write!(out, " | {:>19}", "pershomefs speed-up");
    }
    let _ = writeln!(out);
    let width = 24 + 25 * filesystems.len() + if versus.is_some() { 22 } else { 0 };
    let _ = writeln!(out, "{}", "-".repeat(width));
    for workload in WORKLOADS {
        let _ = write!(out, "{:<24}", workload.label(options));
        let raw = best.get(&(0, workload)).copied();
        for index in 0..filesystems.len() {
            let cell = match best.get(&(index, workload)) {
                None => "n/a".to_owned(),
                Some(t) => {
                    let secs = t.as_secs_f64();
                    let mut cell = if workload.is_throughput() {
                        format!(
                            "{secs:.3}s {:.0}MiB/s",
                            f64::from(options.big_mib) / secs.max(1e-9)
                        )
                    } else {
                        format!("{secs:.3}s")
                    };
                    if let (true, Some(raw)) = (index > 0, raw) {
                        let raw = raw.as_secs_f64().max(1e-9);
                        // Time workloads: how many times slower than raw. Data workloads:
                        // throughput as a fraction of raw's.
                        if workload.is_throughput() {
                            let _ = write!(cell, " {:.2}x", raw / secs.max(1e-9));
                        } else {
                            let _ = write!(cell, " {:.1}x", secs / raw);
                        }
                    }
                    cell
                }
            };
            let _ = write!(out, " | {cell:>22}");
        }
        if let Some((p, o)) = versus {
            let cell = match (best.get(&(p, workload)), best.get(&(o, workload))) {
                // posixovl's time over pershomefs's: above 1 means pershomefs is faster.
                (Some(p), Some(o)) => {
                    format!("{:.1}x", o.as_secs_f64() / p.as_secs_f64().max(1e-9))
                }
                _ => "n/a".to_owned(),
            };
            let _ = write!(out, " | {cell:>19}");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "ratios: time workloads = seconds / raw seconds (higher is slower); write/read = throughput / raw throughput (lower is slower)"
    );
    if versus.is_some() {
        let _ = writeln!(
            out,
            "pershomefs speed-up = posixovl seconds / pershomefs seconds (above 1: pershomefs is faster)"
        );
    }
    out
}

/// The FUSE requests pershomefs served per workload (its own counters; exact, not timings)
/// and the daemon's memory.
fn format_requests(options: &Options, stats: &CellStats) -> String {
    let mut out = String::new();
    let files = u64::from(options.files);
    let entries = files + u64::from(options.dirs.max(1));
    let _ = writeln!(
        out,
        "\npershomefs requests per workload (daemon counters; FORGET, which is never answered, apart)"
    );
    let _ = writeln!(
        out,
        "{:<24} | {:>9} | {:>10} | {:>7} | by opcode",
        "workload", "requests", "per", "FORGET"
    );
    for workload in WORKLOADS {
        let Some(report) = stats.requests.get(&workload) else {
            continue;
        };
        let forget = report.get("FORGET").copied().unwrap_or(0);
        let answered = requests::total(report) - forget;
        // tar x is counted per file (the target), the tree walks per entry.
        let per = match workload {
            Workload::Extract => format!("{:.2}/file", answered as f64 / files.max(1) as f64),
            Workload::FindCold
            | Workload::FindWarm
            | Workload::LsCold
            | Workload::LsWarm
            | Workload::Remove => {
                format!("{:.2}/entry", answered as f64 / entries.max(1) as f64)
            }
            _ => String::new(),
        };
        let mut by: Vec<(&String, &u64)> = report.iter().filter(|(n, _)| *n != "FORGET").collect();
        by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let by: Vec<String> = by.iter().map(|(n, c)| format!("{n} {c}")).collect();
        let _ = writeln!(
            out,
            "{:<24} | {answered:>9} | {per:>10} | {forget:>7} | {}",
            workload.label(options),
            by.join(", ")
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    match (stats.idle_rss_kib, stats.listed_rss_kib) {
        (Some(idle), Some(listed)) => {
            let _ = writeln!(
                out,
                "pershomefs daemon RSS: idle mount of the full store {:.1} MiB; after a cold ls -lR of {entries} entries {:.1} MiB ({:.0} bytes per looked-up entry)",
                mib(idle),
                mib(listed),
                (listed.saturating_sub(idle) * 1024) as f64 / entries.max(1) as f64
            );
        }
        _ => {
            let _ = writeln!(out, "pershomefs daemon RSS: not found");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_not_constant() {
        let mut a = Rng(0x9e37_79b9_7f4a_7c15);
        let mut b = Rng(0x9e37_79b9_7f4a_7c15);
        let xs: Vec<u64> = (0..4).map(|_| a.next()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next()).collect();
        assert_eq!(
            xs, ys,
            "same seed must give the same sequence: expected {xs:?}, got {ys:?}"
        );
        assert!(
            xs.windows(2).all(|w| w[0] != w[1]),
            "expected changing values, got {xs:?}"
        );
    }

    /// The options the table tests format with (10 files in 2 dirs, 100 MiB files).
    fn table_options() -> Options {
        Options {
            files: 10,
            dirs: 2,
            big_mib: 100,
            quick: true,
            fs: vec![],
            backing_fs: BackingFs::Ext4,
            mount_opts: vec![],
            no_counters: false,
        }
    }

    #[test]
    fn table_ratios_use_time_for_trees_and_throughput_for_data() {
        let options = table_options();
        let mut best = BTreeMap::new();
        for workload in WORKLOADS {
            best.insert((0, workload), Duration::from_secs(1));
            best.insert((1, workload), Duration::from_secs(4));
        }
        let table = format_table(&options, &[Fs::Raw, Fs::Posixovl], &best, 1);
        let extract = table.lines().find(|l| l.starts_with("tar x")).unwrap_or("");
        let write = table.lines().find(|l| l.starts_with("write")).unwrap_or("");
        assert!(
            extract.contains("4.000s 4.0x"),
            "expected a 4.0x time ratio, got {extract:?}"
        );
        assert!(
            write.contains("25MiB/s 0.25x"),
            "expected 25 MiB/s at 0.25x raw, got {write:?}"
        );
    }

    #[test]
    fn table_puts_pershomefs_and_posixovl_side_by_side() {
        let options = table_options();
        let mut best = BTreeMap::new();
        for workload in WORKLOADS {
            best.insert((0, workload), Duration::from_secs(1));
            best.insert((1, workload), Duration::from_secs(2));
            best.insert((2, workload), Duration::from_secs(8));
        }
        let table = format_table(&options, &[Fs::Raw, Fs::Pershomefs, Fs::Posixovl], &best, 1);
        let extract = table.lines().find(|l| l.starts_with("tar x")).unwrap_or("");
        assert!(
            extract.contains("2.000s 2.0x") && extract.trim_end().ends_with(" 4.0x"),
            "expected pershomefs at 2.0x raw and 4.0x faster than posixovl, got {extract:?}"
        );
    }

    #[test]
    fn table_header_names_the_backing_filesystem() {
        for (backing_fs, want) in [
            (BackingFs::Ext4, "fresh ext4 loop filesystem"),
            (BackingFs::Tmpfs, "fresh tmpfs"),
        ] {
            let options = Options {
                files: 10,
                dirs: 2,
                big_mib: 100,
                quick: false,
                fs: vec![],
                backing_fs,
                mount_opts: vec![],
                no_counters: false,
            };
            let table = format_table(&options, &[Fs::Raw], &BTreeMap::new(), 3);
            let header = table.lines().next().unwrap_or("");
            assert!(
                header.contains(want) && header.contains("best of 3"),
                "expected a header naming {want:?} and \"best of 3\", got {header:?}"
            );
        }
    }
}
