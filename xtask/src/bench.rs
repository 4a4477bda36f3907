//! `cargo xtask bench`: time the same workloads on the raw backing directory, on pershomefs over
//! a directory and on posixovl over a directory, in one run, and print seconds per workload
//! plus ratios to raw.
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
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

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
        let size_mib = u64::from(options.big_mib) + 2048;
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
                mkfs.args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                    .arg(&image)
                    .stdout(Stdio::null());
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
    Write,
    ReadCold,
    Remove,
}

const WORKLOADS: [Workload; 8] = [
    Workload::Extract,
    Workload::FindCold,
    Workload::FindWarm,
    Workload::LsCold,
    Workload::LsWarm,
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

/// xorshift64*: a tiny deterministic generator, so the tarball is identical on every machine
/// (`wear` builds the same tree with it).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Build (once, cached in target/bench/) a tarball of `files` files of 0–8 KiB spread over
/// `dirs` directories under `tree/`, with fixed owners, mtimes and order.
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
    let dirs = options.dirs.max(1);
    for d in 0..dirs {
        let path = tree.join(format!("d{d:04}"));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = Vec::with_capacity(8193);
    for f in 0..options.files {
        let size = usize::try_from(rng.next() % 8193).unwrap_or(0);
        buf.clear();
        while buf.len() < size {
            buf.extend_from_slice(&rng.next().to_le_bytes());
        }
        buf.truncate(size);
        let path = tree
            .join(format!("d{:04}", f % dirs))
            .join(format!("f{f:06}.dat"));
        File::create(&path)
            .and_then(|mut file| file.write_all(&buf))
            .with_context(|| format!("writing {}", path.display()))?;
    }
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

fn run_workloads(
    target: &mut Target,
    tar: &Path,
    options: &Options,
) -> Result<Vec<(Workload, Duration)>> {
    let mut times = Vec::new();
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    for workload in WORKLOADS {
        util::check_interrupted()?;
        if matches!(
            workload,
            Workload::FindCold | Workload::LsCold | Workload::ReadCold
        ) {
            target.make_cold()?;
        }
        let root = target.path().to_path_buf();
        let tree = root.join("tree");
        let big = root.join("big.bin");
        let elapsed = match workload {
            Workload::Extract => timed(
                "tar",
                &[os("-xf"), tar.as_os_str(), os("-C"), root.as_os_str()],
            )?,
            Workload::FindCold | Workload::FindWarm => timed("find", &[tree.as_os_str()])?,
            Workload::LsCold | Workload::LsWarm => timed("ls", &[os("-lR"), tree.as_os_str()])?,
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
        times.push((workload, elapsed));
    }
    Ok(times)
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
            let mut target =
                Target::mount(fs, &backing, &scratch.path().join("m"), &[], bin.as_deref())?;
            // Every cell starts with the same empty caches, whatever the previous cell left.
            util::drop_caches()?;
            let times = run_workloads(&mut target, &tar, options)?;
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
    let table = format_table(options, &filesystems, &best, reps);
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
    let _ = write!(out, "{:<24}", "workload");
    for fs in filesystems {
        let _ = write!(out, " | {:>22}", fs.name());
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "{}", "-".repeat(24 + 25 * filesystems.len()));
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
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "ratios: time workloads = seconds / raw seconds (higher is slower); write/read = throughput / raw throughput (lower is slower)"
    );
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

    #[test]
    fn table_ratios_use_time_for_trees_and_throughput_for_data() {
        let options = Options {
            files: 10,
            dirs: 2,
            big_mib: 100,
            quick: true,
            fs: vec![],
            backing_fs: BackingFs::Ext4,
        };
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
