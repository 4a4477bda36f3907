//! What the VM suite needs on the host, the check that refuses to start without it, and
//! `cargo vm-test --install-deps`, which installs it the way `/work/shared/testing.md`
//! measured: qemu-system-x86 from bookworm-backports (the machines ship qemu-utils 10 from
//! there, which Debian 12's own qemu-system-x86 7.2 cannot sit beside), the rest from bookworm.
//!
//! This module owns the host-side requirements. It never upgrades or removes a package.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

/// (program, Debian package that provides it).
pub const TOOLS: &[(&str, &str)] = &[
    (
        "qemu-system-x86_64",
        "qemu-system-x86 (from bookworm-backports)",
    ),
    ("mmdebstrap", "mmdebstrap"),
    ("sfdisk", "fdisk"),
    ("mkfs.vfat", "dosfstools"),
    ("fsck.fat", "dosfstools"),
    ("mkfs.exfat", "exfatprogs"),
    ("mmd", "mtools"),
    ("mcopy", "mtools"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mtype", "mtools"),
    ("openssl", "openssl"),
    // The power-loss scenario's write-back cache (`--filter=cache cache=writeback`).
    ("nbdkit", "nbdkit"),
];

/// Packages from bookworm itself.
pub const APT_PACKAGES: &[&str] = &[
    "mmdebstrap",
    "fdisk",
    "dosfstools",
    "mtools",
    "exfatprogs",
    "e2fsprogs",
    "nbdkit",
];

const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The guest needs these from the host build and from `cargo install` (copied in over 9p).
pub fn cargo_tool(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

/// Fail, saying what to install, unless every host tool is there and we are root.
/// `fs_tools`: whether pjdfstest and fsx are needed (every scenario but `ltsp`).
pub fn check(fs_tools: bool) -> Result<()> {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(program, _)| on_path(program).is_none())
        .map(|(program, package)| format!("  {program}: install {package}"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the VM suite cannot run on this machine; missing:\n{}\nRun `cargo vm-test --install-deps` (as root), or see docs/vm-tests.md",
            missing.join("\n")
        );
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the VM suite must run as root (mmdebstrap --mode=root builds the guest image)");
    }
    for tool in ["pjdfstest", "fsx"] {
        if fs_tools && !cargo_tool(tool).is_file() {
            bail!(
                "{} is missing: run `cargo xtask deps` (it installs pjdfstest and fsx from crates.io)",
                cargo_tool(tool).display()
            );
        }
    }
    if !Path::new("/usr/share/keyrings/debian-archive-keyring.gpg").exists() {
        bail!("/usr/share/keyrings/debian-archive-keyring.gpg is missing: install debian-archive-keyring");
    }
    Ok(())
}

/// The mirror the host's own Debian source uses, for the backports source.
fn host_mirror() -> String {
    let text =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("http://deb.debian.org/debian")
        .to_owned()
}

/// Add bookworm-backports (if no source names it yet) and install everything. Idempotent.
pub fn install(sh: &Shell) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("--install-deps must run as root (it runs apt-get)");
    }
    let have_backports = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|entries| {
            entries.flatten().any(|e| {
                std::fs::read_to_string(e.path())
                    .map(|t| t.contains("bookworm-backports"))
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
        || std::fs::read_to_string("/etc/apt/sources.list")
            .map(|t| t.contains("bookworm-backports"))
            .unwrap_or(false);
    if !have_backports {
        let source = format!(
            "Types: deb\nURIs: {}\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
            host_mirror()
        );
        std::fs::write(BACKPORTS_SOURCE, source)
            .with_context(|| format!("writing {BACKPORTS_SOURCE}"))?;
        eprintln!("added {BACKPORTS_SOURCE}");
    }
    cmd!(sh, "apt-get update").run().context("apt-get update")?;
    cmd!(
        sh,
        "apt-get install -y --no-install-recommends -t bookworm-backports qemu-system-x86"
    )
    .env("DEBIAN_FRONTEND", "noninteractive")
    .run()
    .context("installing qemu-system-x86 from bookworm-backports")?;
    cmd!(
        sh,
        "apt-get install -y --no-install-recommends {APT_PACKAGES...}"
    )
    .env("DEBIAN_FRONTEND", "noninteractive")
    .run()
    .context("installing the image and stick tools")?;
    check(true)
}
