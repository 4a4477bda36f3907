//! Small helpers shared by the harness: paths under `target/vm/`, running a command into a
//! log file, banners. Owns no state.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The repository root (this crate lives in `vm-tests/`).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory (CARGO_TARGET_DIR if set).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
}

/// Everything the VM suite keeps: images, sticks, run directories and logs.
pub fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}

pub fn banner(text: &str) {
    eprintln!("\n=== {text}");
}

/// The last `n` lines of a text file (empty if unreadable).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run a command with its output going to `log`; on failure the error quotes the log's tail.
pub fn run_logged(mut command: Command, what: &str, log: &Path) -> Result<()> {
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().context("duplicating a log file")?)
        .stderr(file);
    let status = command
        .status()
        .with_context(|| format!("starting {what} ({command:?})"))?;
    if !status.success() {
        bail!(
            "{what} failed ({status}); log {}:\n{}",
            log.display(),
            tail_lines(log, 30)
        );
    }
    Ok(())
}

/// Quote a string for the guest's /bin/sh (single quotes). Only the harness's own strings
/// reach the guest shell; this keeps paths with spaces working.
pub fn shq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Bytes available on the filesystem that holds `path`, as `df` shows them: on these
/// machines the free blocks count far more than a writer (root included) can use.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let st =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Human-readable GiB with one decimal.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// Delete the files of `dir` (recursively) that take more than `min_bytes` of disk, and
/// return the bytes freed. A passing scenario's stick images and disks are of no further
/// use, and the suite's scenarios together would otherwise hold over 10 GiB of them.
pub fn prune_large_files(dir: &Path, min_bytes: u64) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut freed = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let meta = entry
            .metadata()
            .with_context(|| format!("stat {}", entry.path().display()))?;
        if meta.is_dir() {
            freed += prune_large_files(&entry.path(), min_bytes)?;
        } else if meta.is_file() && meta.blocks() * 512 > min_bytes {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            freed += meta.blocks() * 512;
        }
    }
    Ok(freed)
}
