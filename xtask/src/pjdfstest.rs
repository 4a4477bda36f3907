//! `cargo xtask pjdfstest`: run the POSIX conformance suite pjdfstest (crates.io, Rust
//! rewrite) against a filesystem under test over a directory and/or an exFAT backing, and
//! report its summary counts.
//!
//! This module owns the suite's configuration, the `tests` user it needs, and the parsing of
//! its summary. It never decides what a filesystem should pass beyond "zero failures" for
//! pershomefs and raw; posixovl's failures are reported, not judged.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::guards::TempDir;
use crate::target::{pershomefs_binary, Backing, BackingKind, Fs, Target};
use crate::{deps, util};
use pershome::names::NameMode;

/// The configuration that mirrors upstream's ext4 run (see /work/shared/testing.md):
/// `nobody` and `tests` are the unprivileged users the suite switches to.
const CONFIG: &str = r#"# Written by `cargo xtask pjdfstest`.
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}

[settings]
naptime = 0.01

[dummy_auth]
entries = [["nobody", "nogroup"], ["tests", "tests"]]
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackingChoice {
    Dir,
    Exfat,
    Both,
}

/// pjdfstest's final line: `Summary: 0 failed, 22 skipped, 376 passed, 0 expected failures, 398 total`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub failed: u32,
    pub skipped: u32,
    pub passed: u32,
    pub expected_failures: u32,
    pub total: u32,
    /// Names of the failed tests, in output order.
    pub failed_tests: Vec<String>,
}

/// Parse pjdfstest's output; `None` when it has no summary line (the suite crashed).
pub fn parse_output(output: &str) -> Option<Summary> {
    let line = output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("Summary:"))?;
    let mut summary = Summary::default();
    for part in line.split(',') {
        let part = part.trim();
        let (number, label) = part.split_once(' ')?;
        let number: u32 = number.parse().ok()?;
        match label.trim() {
            "failed" => summary.failed = number,
            "skipped" => summary.skipped = number,
            "passed" => summary.passed = number,
            "expected failures" => summary.expected_failures = number,
            "total" => summary.total = number,
            _ => return None,
        }
    }
    summary.failed_tests = output
        .lines()
        .filter_map(|l| l.strip_suffix("FAILED"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    Some(summary)
}

/// Create group and user `tests` unless they exist.
fn ensure_tests_user(sh: &Shell) -> Result<()> {
    let have = |db: &str| {
        Command::new("getent")
            .args([db, "tests"])
            .stdout(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !have("group") {
        cmd!(sh, "groupadd tests").run().context("groupadd tests")?;
    }
    if !have("passwd") {
        cmd!(
            sh,
            "useradd --gid tests --no-create-home --shell /usr/sbin/nologin tests"
        )
        .run()
        .context("useradd tests")?;
    }
    Ok(())
}

/// pershomefs's `names=` mount option for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Names {
    /// FAT long names (the default).
    Long,
    /// MS-DOS 8.3 names only; the audit then checks every backing name is one.
    #[value(name = "8.3")]
    Short83,
}

impl Names {
    fn mode(self) -> NameMode {
        match self {
            Names::Long => NameMode::Long,
            Names::Short83 => NameMode::Short83,
        }
    }
}

pub struct Options {
    pub backing: BackingChoice,
    pub fs: Fs,
    pub names: Names,
}

pub fn run(sh: &Shell, options: &Options) -> Result<()> {
    util::require_root("pjdfstest")?;
    if options.names != Names::Long && options.fs != Fs::Pershomefs {
        bail!("--names 8.3 is a pershomefs mount option: use it with --fs pershomefs");
    }
    crate::guards::sweep_stale()?;
    ensure_tests_user(sh)?;
    // The suite's expectations (modes of new files, access as `tests`) assume umask 022; with
    // 077, 22 tests fail even on ext4. Children inherit the umask.
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o022) };
    let bin = match options.fs {
        Fs::Pershomefs => Some(pershomefs_binary()?),
        _ => None,
    };
    let kinds: &[BackingKind] = match options.backing {
        BackingChoice::Dir => &[BackingKind::Dir],
        BackingChoice::Exfat => &[BackingKind::Exfat],
        BackingChoice::Both => &[BackingKind::Dir, BackingKind::Exfat],
    };
    let mut failures = Vec::new();
    for &kind in kinds {
        let summary = run_one(options.fs, kind, options.names.mode(), bin.as_deref())?;
        // pershomefs must pass everything. The raw directory must too (that checks the harness
        // and the machine); raw exFAT and posixovl are yardsticks, reported but not judged.
        let judged =
            options.fs == Fs::Pershomefs || (options.fs == Fs::Raw && kind == BackingKind::Dir);
        if summary.failed > 0 && judged {
            failures.push(format!("{} failed over {}", summary.failed, kind.name()));
        }
    }
    if !failures.is_empty() {
        bail!(
            "pjdfstest on {}: {}",
            options.fs.name(),
            failures.join(", ")
        );
    }
    Ok(())
}

fn log_path(fs: Fs, kind: BackingKind, names: NameMode) -> std::path::PathBuf {
    let name = match (fs, names) {
        (Fs::Pershomefs, NameMode::Long) => format!("pjdfstest-{}.log", kind.name()),
        (Fs::Pershomefs, NameMode::Short83) => format!("pjdfstest-{}-names8.3.log", kind.name()),
        (other, _) => format!("pjdfstest-{}-{}.log", other.name(), kind.name()),
    };
    util::target_dir().join(name)
}

fn run_one(fs: Fs, kind: BackingKind, names: NameMode, bin: Option<&Path>) -> Result<Summary> {
    util::banner(&format!(
        "pjdfstest: {} (names={}) over a {} backing",
        fs.name(),
        names.as_str(),
        kind.name()
    ));
    // Drop order (reverse of declaration): target, backing, scratch.
    let scratch = TempDir::new(&format!("pjdfstest-{}-{}", fs.name(), kind.name()))?;
    let backing = Backing::create(kind, &scratch)?;
    let mount_opts: &[&str] = match names {
        NameMode::Long => &["allow_other"],
        NameMode::Short83 => &["allow_other", "names=8.3"],
    };
    let target = Target::mount(
        fs,
        backing.dir(),
        &scratch.path().join("m"),
        mount_opts,
        bin,
    )?;
    let config = scratch.path().join("pjdfstest.toml");
    std::fs::write(&config, CONFIG).with_context(|| format!("writing {}", config.display()))?;
    // The suite runs parts as `tests` and `nobody`: they must be able to enter the root.
    set_mode(target.path(), 0o755)?;

    std::fs::create_dir_all(util::target_dir())
        .with_context(|| format!("creating {}", util::target_dir().display()))?;
    let log = log_path(fs, kind, names);
    let mut command = Command::new(deps::tool("pjdfstest"));
    command.arg("-c").arg(&config).arg("-p").arg(target.path());
    // The suite chdirs into -p itself; run it from the scratch dir so nothing lands elsewhere.
    command.current_dir(scratch.path());
    let status = util::run_logged(command, "pjdfstest", &log)?;
    target.unmount()?;
    if fs == Fs::Pershomefs {
        audit_backing(backing.dir(), names)?;
    }
    let output =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let Some(summary) = parse_output(&output) else {
        bail!(
            "pjdfstest printed no summary line (exit {status}); see {}",
            log.display()
        );
    };
    for name in &summary.failed_tests {
        eprintln!("  FAILED {name}");
    }
    println!(
        "pjdfstest {} (names={}) over {}: {} failed, {} skipped, {} passed (of {}); log: {}",
        fs.name(),
        names.as_str(),
        kind.name(),
        summary.failed,
        summary.skipped,
        summary.passed,
        summary.total,
        log.display()
    );
    // The exit status and the summary must agree; a mismatch means the output format changed.
    if status.success() != (summary.failed == 0) {
        bail!(
            "pjdfstest exit status {status} disagrees with its summary ({} failed)",
            summary.failed
        );
    }
    Ok(summary)
}

/// After a run that wrote through pershomefs, the backing must hold only what FAT can: the
/// audit of `docs/testing.md` (names, case clashes, file types, hard links, sizes), and with
/// `names=8.3` only upper-case 8.3 names.
pub fn audit_backing(dir: &Path, names: NameMode) -> Result<()> {
    let problems = pershome::audit::audit_tree_in(dir, names)
        .with_context(|| format!("auditing the backing tree {}", dir.display()))?;
    if problems.is_empty() {
        println!(
            "FAT audit ({} names) of the backing tree {}: clean",
            names.as_str(),
            dir.display()
        );
        return Ok(());
    }
    for p in problems.iter().take(50) {
        eprintln!("  FAT audit: {p}");
    }
    bail!(
        "the backing tree breaks FAT's rules in {} places",
        problems.len()
    )
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_summary_and_failed_names() {
        let output = "\
chmod::change_perm::dir                                                   FAILED
\tassertion `left == right` failed
chown::eloop_comp                                                             ok
chown::erofs_named                                                       skipped

Summary: 37 failed, 23 skipped, 338 passed, 0 expected failures, 398 total
Error: Some tests have failed
";
        let got = parse_output(output);
        let want = Summary {
            failed: 37,
            skipped: 23,
            passed: 338,
            expected_failures: 0,
            total: 398,
            failed_tests: vec!["chmod::change_perm::dir".to_owned()],
        };
        assert_eq!(got, Some(want.clone()), "expected {want:?}, got {got:?}");
    }

    #[test]
    fn no_summary_is_none() {
        for output in ["", "thread 'main' panicked\n", "Summary: lots failed\n"] {
            let got = parse_output(output);
            assert_eq!(got, None, "output {output:?}: expected None, got {got:?}");
        }
    }
}
