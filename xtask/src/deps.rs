//! `cargo xtask deps`: install what building and testing pershome needs on Debian 12: the
//! Debian packages (through apt-get, as root or via sudo) and the two conformance tools from
//! crates.io (pjdfstest, fsx) through `cargo install --locked`.
//!
//! Idempotent and fast on a second run: it asks dpkg and the tools' `--version` first and
//! only installs what is missing. It never removes or upgrades anything already installed.

use std::process::Command;

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::util;

/// Debian packages: FUSE (runtime and headers for fuser), pkg-config, ACL headers (pjdfstest
/// builds against libacl), attr/acl tools, exFAT (mkfs + FUSE driver), posixovl (the
/// comparison filesystem), the FAT image tools, and pam_mount's DTD plus xmllint (the generated
/// pam_mount.conf.xml is validated against it), and the GUI test tools.
pub const APT_PACKAGES: &[&str] = &[
    "fuse3",
    "libfuse3-dev",
    "pkg-config",
    "libacl1-dev",
    "attr",
    "acl",
    "exfatprogs",
    "exfat-fuse",
    "fuse-posixovl",
    "dosfstools",
    "mtools",
    "libpam-mount",
    "libxml2-utils",
    // The PAM session tests (tests/pam_session.rs) drive real PAM sessions with the
    // pam-client crate: libpam's headers, and libclang for pam-sys's bindgen.
    "libpam0g-dev",
    "libclang-dev",
    // The GUI tests (tests/gui.rs) run the zenity dialogs on an Xvfb display driven with
    // xdotool, and check the .desktop files with desktop-file-validate.
    "zenity",
    "xvfb",
    "xdotool",
    "desktop-file-utils",
];

/// crates.io tools: (crate, exact version, binary). Exact versions because the harness parses
/// their output (pjdfstest's summary line) and fsx's op sequence per seed depends on its
/// version.
pub const CARGO_TOOLS: &[(&str, &str, &str)] =
    &[("pjdfstest", "0.2.2", "pjdfstest"), ("fsx", "0.3.2", "fsx")];

fn missing_packages(sh: &Shell, wanted: &[&'static str]) -> Result<Vec<&'static str>> {
    // dpkg-query exits 1 when some package is unknown; its stdout still lists the known ones.
    let format = "${Package}\t${Status}\n";
    let out = cmd!(sh, "dpkg-query -W --showformat={format} {wanted...}")
        .quiet()
        .ignore_status()
        .ignore_stderr()
        .read()
        .context("running dpkg-query (is this Debian?)")?;
    let installed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, status)| *status == "install ok installed")
        .map(|(pkg, _)| pkg.split(':').next().unwrap_or(pkg))
        .collect();
    Ok(wanted
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

/// The directory `cargo install` puts binaries in.
pub fn cargo_bin_dir() -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| std::path::PathBuf::from("/root/.cargo"));
    home.join("bin")
}

/// Path of an installed cargo tool (`~/.cargo/bin/NAME`, else NAME on PATH).
pub fn tool(name: &str) -> std::path::PathBuf {
    let in_cargo = cargo_bin_dir().join(name);
    if in_cargo.is_file() {
        in_cargo
    } else {
        std::path::PathBuf::from(name)
    }
}

pub fn tool_version_ok(bin: &str, version: &str) -> bool {
    Command::new(tool(bin))
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1) == Some(version)
        })
        .unwrap_or(false)
}

/// Install those of `wanted` that are missing (apt-get, as root or through sudo).
pub fn ensure_apt(sh: &Shell, wanted: &[&'static str]) -> Result<()> {
    let missing = missing_packages(sh, wanted)?;
    if missing.is_empty() {
        eprintln!("all {} Debian packages are installed", wanted.len());
        return Ok(());
    }
    eprintln!("installing missing Debian packages: {}", missing.join(" "));
    let sudo: &[&str] = if util::is_root() {
        &[]
    } else if Command::new("sudo").arg("-n").arg("true").status().is_ok() {
        &["sudo"]
    } else {
        bail!("missing Debian packages {missing:?}: run as root or install sudo");
    };
    cmd!(sh, "env {sudo...} apt-get update")
        .run()
        .context("apt-get update")?;
    cmd!(sh, "env {sudo...} DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {missing...}")
        .run()
        .context("apt-get install")?;
    let still = missing_packages(sh, wanted)?;
    if !still.is_empty() {
        bail!("apt-get install finished but these packages are still not installed: {still:?}");
    }
    Ok(())
}

pub fn run(sh: &Shell) -> Result<()> {
    util::banner("deps: Debian packages and cargo tools");
    ensure_apt(sh, APT_PACKAGES)?;
    for (krate, version, bin) in CARGO_TOOLS {
        if tool_version_ok(bin, version) {
            eprintln!("{bin} {version} is installed");
            continue;
        }
        eprintln!("installing {krate} {version} from crates.io");
        let spec = format!("{krate}@={version}");
        cmd!(sh, "cargo install --locked {spec}")
            .run()
            .with_context(|| format!("cargo install {spec}"))?;
        if !tool_version_ok(bin, version) {
            bail!("cargo install {spec} finished but `{bin} --version` does not report {version}");
        }
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("warning: /dev/fuse does not exist: FUSE mounts will fail on this machine");
    }
    Ok(())
}
