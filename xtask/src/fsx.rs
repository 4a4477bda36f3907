//! `cargo xtask fsx`: the File System eXerciser (crates.io fsx 0.3) on a file in a mount:
//! one plain run, then a run that crosses an unmount/remount.
//!
//! fsx 0.3 cannot resume on an existing file: it always opens with O_TRUNC, and `-b OPNUM`
//! only *simulates* the operations before OPNUM and then rewrites the whole file from its
//! in-memory copy. Its in-memory "good" copy is written out only on failure. So the remount
//! run checks persistence like this:
//!   1. `fsx -N HALF -S SEED` on the mount;
//!   2. the same on tmpfs, which gives the file fsx expects after HALF ops (fsx is
//!      deterministic per seed and version, whatever the filesystem);
//!   3. unmount, remount, compare the mounted file with that reference byte for byte;
//!   4. `fsx -b HALF+1 -N OPS -S SEED` on the remounted file: the same op sequence continues;
//!   5. the reference for all OPS ops, remount again, compare again.
//!
//! With `--part-size N` pershomefs stores the files in parts of N bytes (a test setting; real
//! parts are 4 GiB − 4 KiB), so every fsx operation crosses part boundaries.
//!
//! This module never judges timing; any fsx error or byte mismatch fails the run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::guards::TempDir;
use crate::target::{pershomefs_binary, Backing, BackingKind, Fs, Target};
use crate::{deps, util};

pub struct Options {
    pub ops: u64,
    pub seed: Option<u64>,
    pub fs: Fs,
    pub backing: BackingKind,
    /// pershomefs only: store the file in parts of this many bytes (`-o parts=always,
    /// part_size=N`), so fsx's operations cross part boundaries all the time.
    pub part_size: Option<u64>,
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // Fold the clock and pid into a seed; it only needs to differ between runs.
    (nanos as u64) ^ (u64::from(std::process::id()) << 32) ^ ((nanos >> 64) as u64)
}

/// Where the reference runs write: tmpfs when there is one (fast, and certainly not the
/// filesystem under test), else a run directory on the normal disk. Removed on drop.
struct ReferenceDir {
    path: PathBuf,
    /// Set when the directory is a run directory, which removes itself.
    on_disk: Option<TempDir>,
}

/// Prefix of the reference directories on /dev/shm; `sweep_stale_references` knows it.
const SHM_PREFIX: &str = "pershome-fsx-ref-";

impl ReferenceDir {
    fn new() -> Result<Self> {
        let shm = Path::new("/dev/shm");
        if crate::guards::mounted_type(shm)?.as_deref() == Some("tmpfs") {
            let path = shm.join(format!("{SHM_PREFIX}{}", std::process::id()));
            if path.exists() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
            std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
            return Ok(ReferenceDir {
                path,
                on_disk: None,
            });
        }
        let dir = TempDir::new("fsx-reference")?;
        Ok(ReferenceDir {
            path: dir.path().to_path_buf(),
            on_disk: Some(dir),
        })
    }
}

impl Drop for ReferenceDir {
    fn drop(&mut self) {
        if self.on_disk.is_none() {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!("warning: removing {}: {e}", self.path.display());
            }
        }
    }
}

/// Remove reference directories that runs killed outright left on /dev/shm.
fn sweep_stale_references() {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(SHM_PREFIX)) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                eprintln!("warning: removing stale {}: {e}", entry.path().display());
            }
        }
    }
}

/// Run fsx; fail with the log's tail if it reports an error.
fn fsx(args: &[String], file: &Path, artifacts: &Path, log: &Path) -> Result<()> {
    let mut command = Command::new(deps::tool("fsx"));
    command.args(args).arg("-P").arg(artifacts).arg(file);
    let what = format!("fsx {} {}", args.join(" "), file.display());
    eprintln!("running {what}");
    let status = util::run_logged(command, &what, log)?;
    let output =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    if !status.success() || !output.contains("All operations completed A-OK!") {
        let tail: Vec<&str> = output
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "{what} failed ({status}); full log {}, expected file contents in {}; last lines:\n{}",
            log.display(),
            artifacts.display(),
            tail.join("\n")
        );
    }
    Ok(())
}

/// Compare `got` with `expected` byte for byte; the error says where they first differ.
fn compare_files(expected: &Path, got: &Path) -> Result<()> {
    let want =
        std::fs::read(expected).with_context(|| format!("reading {}", expected.display()))?;
    let have = std::fs::read(got).with_context(|| format!("reading {}", got.display()))?;
    if want == have {
        eprintln!(
            "{} matches fsx's expected contents ({} bytes)",
            got.display(),
            have.len()
        );
        return Ok(());
    }
    let first = want.iter().zip(&have).position(|(a, b)| a != b);
    match first {
        Some(at) => bail!(
            "{} differs from the expected {} at byte {at}: expected {:#04x}, got {:#04x} (sizes: expected {}, got {})",
            got.display(),
            expected.display(),
            want[at],
            have[at],
            want.len(),
            have.len()
        ),
        None => bail!(
            "{} has {} bytes, expected {} (common prefix identical)",
            got.display(),
            have.len(),
            want.len()
        ),
    }
}

pub fn run(options: &Options) -> Result<()> {
    crate::guards::sweep_stale()?;
    sweep_stale_references();
    let seed = options.seed.unwrap_or_else(random_seed);
    let ops = options.ops.max(2);
    let half = ops / 2;
    let part_arg = options
        .part_size
        .map(|n| format!(" --part-size {n}"))
        .unwrap_or_default();
    util::banner(&format!(
        "fsx: {ops} ops on {} over {}{part_arg}, seed {seed} (replay: cargo xtask fsx --ops {ops} --seed {seed} --fs {} --backing {}{part_arg})",
        options.fs.name(),
        options.backing.name(),
        options.fs.name(),
        options.backing.name()
    ));
    let bin = match options.fs {
        Fs::Pershomefs => Some(pershomefs_binary()?),
        _ => None,
    };
    let logs = util::target_dir().join("fsx");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    let scratch = TempDir::new(&format!("fsx-{}", options.fs.name()))?;
    let backing = Backing::create(options.backing, &scratch)?;
    let parts_opts = match (options.part_size, options.fs) {
        (Some(n), Fs::Pershomefs) => vec!["parts=always".to_owned(), format!("part_size={n}")],
        (Some(_), _) => bail!("--part-size applies to pershomefs only"),
        (None, _) => Vec::new(),
    };
    let mount_opts: Vec<&str> = parts_opts.iter().map(String::as_str).collect();
    let mut target = Target::mount(
        options.fs,
        backing.dir(),
        &scratch.path().join("m"),
        &mount_opts,
        bin.as_deref(),
    )?;
    let reference = ReferenceDir::new()?;
    let seed_s = seed.to_string();

    // 1. The plain run.
    let plain = target.path().join("fsx-plain.bin");
    fsx(
        &["-N".into(), ops.to_string(), "-S".into(), seed_s.clone()],
        &plain,
        &logs,
        &logs.join("plain.log"),
    )?;
    println!("fsx plain run: {ops} ops, seed {seed}: OK");

    // 2. The run across a remount.
    let file = target.path().join("fsx-remount.bin");
    let first_half = ["-N".into(), half.to_string(), "-S".into(), seed_s.clone()];
    fsx(&first_half, &file, &logs, &logs.join("remount-1.log"))?;
    let ref_half = reference.path.join("half.bin");
    fsx(
        &first_half,
        &ref_half,
        &reference.path,
        &logs.join("reference-half.log"),
    )?;
    target.remount()?;
    let file = target.path().join("fsx-remount.bin");
    compare_files(&ref_half, &file).context("after the first half and a remount")?;
    let second_half = [
        "-b".into(),
        (half + 1).to_string(),
        "-N".into(),
        ops.to_string(),
        "-S".into(),
        seed_s.clone(),
    ];
    fsx(&second_half, &file, &logs, &logs.join("remount-2.log"))?;
    let ref_full = reference.path.join("full.bin");
    fsx(
        &["-N".into(), ops.to_string(), "-S".into(), seed_s],
        &ref_full,
        &reference.path,
        &logs.join("reference-full.log"),
    )?;
    target.remount()?;
    compare_files(&ref_full, &target.path().join("fsx-remount.bin"))
        .context("after the second half and a remount")?;
    println!(
        "fsx remount run: {half} ops, remount, compare, ops {}..{ops}, remount, compare: OK",
        half + 1
    );
    target.unmount()?;
    if options.fs == Fs::Pershomefs {
        crate::pjdfstest::audit_backing(backing.dir(), pershome::names::NameMode::Long)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private directory under the system temp dir (these tests need no root).
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("xtask-fsx-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test's temp dir");
        dir
    }

    #[test]
    fn compare_files_reports_first_difference_and_size() {
        let dir = scratch("compare");
        let cases: [(&[u8], &[u8], Option<&str>); 4] = [
            (b"abcdef", b"abcdef", None),
            (
                b"abcdef",
                b"abXdef",
                Some("at byte 2: expected 0x63, got 0x58"),
            ),
            (b"abcdef", b"abc", Some("has 3 bytes, expected 6")),
            (b"", b"x", Some("has 1 bytes, expected 0")),
        ];
        for (want, have, error) in cases {
            let (a, b) = (dir.join("want"), dir.join("have"));
            std::fs::write(&a, want).expect("writing want");
            std::fs::write(&b, have).expect("writing have");
            let got = compare_files(&a, &b).err().map(|e| e.to_string());
            match (error, &got) {
                (None, None) => {}
                (Some(fragment), Some(message)) if message.contains(fragment) => {}
                _ => panic!("want {want:?} vs have {have:?}: expected error containing {error:?}, got {got:?}"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
