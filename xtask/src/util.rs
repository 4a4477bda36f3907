//! Small shared helpers of the xtask: where the project lives, Ctrl-C handling, running a
//! child process so that an interrupt ends it, and printing step banners.
//!
//! This module owns the process-wide interrupt flag. It never kills a process it did not start
//! itself, and never exits the process: every failure is an `Err` so that the RAII guards of the
//! callers (mounts, loop devices, temporary directories) run their `Drop` on the way out.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: anything else is not async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catch SIGINT, SIGTERM and SIGHUP instead of dying on them. A Ctrl-C in the terminal reaches
/// the whole foreground process group, so the child we are waiting for dies of it while we
/// survive, notice the flag, return an error and let the guards unmount and clean up. A handler
/// (unlike SIG_IGN) is reset to the default by `exec`, so children still die of these signals.
pub fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `on_signal` only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Fail with "interrupted" if a signal arrived; called between steps.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal; cleaning up");
    }
    Ok(())
}

/// The workspace root (the parent of the `xtask` crate).
pub fn project_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                project_root().join(dir)
            }
        }
        None => project_root().join("target"),
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask {what}` must run as root (it mounts filesystems, creates users and drops caches); try `sudo -E cargo xtask {what}`");
    }
    Ok(())
}

/// Print a banner for a step, so a long log shows where it is.
pub fn banner(text: &str) {
    eprintln!("\n==> {text}");
}

/// Run a child to completion and return its status and wall-clock time. The wait polls so
/// that a SIGTERM sent to the xtask alone still ends the child (we kill it by its pid, which
/// we own); the poll interval grows with the elapsed time so the timing error stays below
/// about 2 % (benchmarks use these timings).
pub fn run_child(mut command: Command, what: &str) -> Result<(ExitStatus, Duration)> {
    check_interrupted()?;
    let start = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {what} ({command:?})"))?;
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            // A Ctrl-C reaches the child too: report the interrupt, not the child's death.
            check_interrupted()?;
            return Ok((status, start.elapsed()));
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            // The child is ours: kill it by its pid and reap it before reporting.
            let _ = child.kill();
            let _ = child.wait();
            bail!("interrupted by a signal while running {what}");
        }
        let elapsed = start.elapsed();
        std::thread::sleep(
            (elapsed / 50).clamp(Duration::from_micros(200), Duration::from_millis(20)),
        );
    }
}

/// Run a child, fail unless it exits 0.
pub fn run_checked(command: Command, what: &str) -> Result<Duration> {
    let (status, elapsed) = run_child(command, what)?;
    if !status.success() {
        bail!("{what} failed: {status}");
    }
    Ok(elapsed)
}

/// Run a child with stdout and stderr both written to `log`; returns its status.
pub fn run_logged(mut command: Command, what: &str, log: &Path) -> Result<ExitStatus> {
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let file2 = file
        .try_clone()
        .with_context(|| format!("duplicating the handle of {}", log.display()))?;
    command.stdout(Stdio::from(file)).stderr(Stdio::from(file2));
    let (status, _) = run_child(command, what)?;
    Ok(status)
}

/// Poll `ready` until it returns true or `timeout` passes. Used to wait for a condition that
/// has no notification (a mount appearing, a daemon exiting), never as a fixed sleep.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `sync` and drop the page, dentry and inode caches, so the next access reads from disk.
pub fn drop_caches() -> Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("writing 3 to /proc/sys/vm/drop_caches (needs root)")
}
