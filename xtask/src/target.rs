//! The filesystem under test and what it is layered on: the three filesystems the harness can
//! drive (pershomefs, posixovl as a reference FUSE overlay, and the raw backing directory
//! itself) and the two backings (a directory on the normal disk, or an exFAT image on a loop
//! device mounted with exfat-fuse, the closest thing to a stick this kernel can mount).
//!
//! This module owns mounting, remounting and unmounting those; every resource it creates is an
//! RAII guard from `guards`. It never runs tests itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::guards::{LoopDev, Mount, TempDir};
use crate::util;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fs {
    /// pershomefs, built from this workspace (release).
    Pershomefs,
    /// posixovl (Debian fuse-posixovl): another POSIX-over-FAT FUSE overlay, for comparison.
    Posixovl,
    /// No FUSE layer: the backing directory itself.
    Raw,
}

impl Fs {
    pub fn name(self) -> &'static str {
        match self {
            Fs::Pershomefs => "pershomefs",
            Fs::Posixovl => "posixovl",
            Fs::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackingKind {
    /// A fresh directory on the normal disk (under /var/tmp).
    Dir,
    /// A 4 GiB exFAT image on a loop device, mounted with exfat-fuse. exFAT has no sparse
    /// files, so pjdfstest's write at the 2 GiB offset really allocates 2 GiB: a smaller image
    /// fails that test with ENOSPC.
    Exfat,
}

impl BackingKind {
    pub fn name(self) -> &'static str {
        match self {
            BackingKind::Dir => "dir",
            BackingKind::Exfat => "exfat",
        }
    }
}

/// Where the release `pershomefs` binary is: `$PERSHOMEFS` if set, else the workspace's
/// `target/release/pershomefs`, built first.
pub fn pershomefs_binary() -> Result<PathBuf> {
    release_binary("pershomefs", "PERSHOMEFS")
}

/// Where the release `pershome` binary (the user's tools: `pershome fsck`) is: `$PERSHOME`
/// if set, else the workspace's `target/release/pershome`, built first.
pub fn pershome_binary() -> Result<PathBuf> {
    release_binary("pershome", "PERSHOME")
}

/// The release binary `name`: the path in the environment variable `env` if set, else built
/// with cargo into the workspace's `target/release/`.
fn release_binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{env}={} is not a file", path.display());
        }
        return Ok(path);
    }
    util::banner(&format!("building {name} (release)"));
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(util::project_root())
        .args(["build", "--release", "--bin", name]);
    util::run_checked(cargo, &format!("cargo build --release --bin {name}"))?;
    let bin = util::target_dir().join("release").join(name);
    if !bin.is_file() {
        bail!("cargo build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// The backing directory a filesystem under test is layered on. Field order is drop order:
/// the exFAT mount goes before its loop device.
pub struct Backing {
    dir: PathBuf,
    _exfat: Option<Mount>,
    _loop: Option<LoopDev>,
}

impl Backing {
    /// Make a backing of `kind` inside `scratch` (a run's temporary directory).
    pub fn create(kind: BackingKind, scratch: &TempDir) -> Result<Backing> {
        match kind {
            BackingKind::Dir => {
                let dir = scratch.path().join("b");
                std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
                Ok(Backing {
                    dir,
                    _exfat: None,
                    _loop: None,
                })
            }
            BackingKind::Exfat => {
                let image = scratch.path().join("exfat.img");
                let file = std::fs::File::create(&image)
                    .with_context(|| format!("creating {}", image.display()))?;
                file.set_len(4 << 30)
                    .with_context(|| format!("sizing {} to 4 GiB", image.display()))?;
                drop(file);
                let mut mkfs = Command::new("mkfs.exfat");
                mkfs.args(["-L", "PERSHOME"])
                    .arg(&image)
                    .stdout(std::process::Stdio::null());
                util::run_checked(mkfs, "mkfs.exfat")?;
                let loop_dev = LoopDev::attach(&image)?;
                let stick = scratch.path().join("s");
                std::fs::create_dir(&stick)
                    .with_context(|| format!("creating {}", stick.display()))?;
                let mut mount = Command::new("mount.exfat-fuse");
                // allow_other only matters for `--fs raw`, where the suites use the exFAT
                // mount directly as other users.
                mount
                    .arg(loop_dev.device())
                    .arg(&stick)
                    .args(["-o", "allow_other"]);
                let exfat = Mount::start("mount.exfat-fuse", mount, &stick)?;
                let dir = stick.join("pershome");
                std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
                Ok(Backing {
                    dir,
                    _exfat: Some(exfat),
                    _loop: Some(loop_dev),
                })
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A filesystem under test, mounted (or, for `Fs::Raw`, just the backing directory).
pub struct Target {
    fs: Fs,
    backing: PathBuf,
    mountpoint: PathBuf,
    options: Vec<String>,
    pershomefs: Option<PathBuf>,
    mount: Option<Mount>,
}

impl Target {
    /// Mount `fs` over `backing` on `mountpoint` (created if missing) with extra `-o` options.
    /// `pershomefs` is the binary to use for `Fs::Pershomefs`.
    pub fn mount(
        fs: Fs,
        backing: &Path,
        mountpoint: &Path,
        options: &[&str],
        pershomefs: Option<&Path>,
    ) -> Result<Target> {
        if fs == Fs::Pershomefs && pershomefs.is_none() {
            bail!("internal: mounting pershomefs needs its binary path");
        }
        std::fs::create_dir_all(mountpoint)
            .with_context(|| format!("creating {}", mountpoint.display()))?;
        let mut target = Target {
            fs,
            backing: backing.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            options: options.iter().map(|s| (*s).to_owned()).collect(),
            pershomefs: pershomefs.map(Path::to_path_buf),
            mount: None,
        };
        target.mount_again()?;
        Ok(target)
    }

    fn mount_again(&mut self) -> Result<()> {
        let opts = self.options.join(",");
        let command = match self.fs {
            Fs::Raw => return Ok(()),
            Fs::Pershomefs => {
                let bin = self
                    .pershomefs
                    .as_deref()
                    .unwrap_or(Path::new("pershomefs"));
                let mut c = Command::new(bin);
                c.arg(&self.backing).arg(&self.mountpoint);
                if !opts.is_empty() {
                    c.args(["-o", &opts]);
                }
                c
            }
            Fs::Posixovl => {
                let mut c = Command::new("mount.posixovl");
                c.arg("-S").arg(&self.backing).arg(&self.mountpoint);
                if !opts.is_empty() {
                    c.args(["--", "-o", &opts]);
                }
                c
            }
        };
        let mount = Mount::start(self.fs.name(), command, &self.mountpoint)?;
        if let Some(fstype) = crate::guards::mounted_type(&self.mountpoint)? {
            let want = format!("fuse.{}", self.fs.name());
            if fstype != want {
                mount.unmount()?;
                bail!(
                    "{} is mounted as {fstype}, expected {want}",
                    self.mountpoint.display()
                );
            }
        }
        self.mount = Some(mount);
        Ok(())
    }

    /// Where to run tests: the mountpoint, or the backing directory for `Fs::Raw`.
    pub fn path(&self) -> &Path {
        match self.fs {
            Fs::Raw => &self.backing,
            _ => &self.mountpoint,
        }
    }

    /// Unmount (waiting for the daemon to finish) and mount again; nothing for `Fs::Raw`.
    pub fn remount(&mut self) -> Result<()> {
        if let Some(mount) = self.mount.take() {
            mount.unmount()?;
        }
        self.mount_again()
    }

    /// Make the next access cold: unmount, sync and drop the kernel caches, mount again.
    pub fn make_cold(&mut self) -> Result<()> {
        self.make_cold_timed().map(|_| ())
    }

    /// [`Target::make_cold`], returning how long the mount took (until it was ready).
    pub fn make_cold_timed(&mut self) -> Result<std::time::Duration> {
        if let Some(mount) = self.mount.take() {
            mount.unmount()?;
        }
        util::drop_caches()?;
        let start = std::time::Instant::now();
        self.mount_again()?;
        Ok(start.elapsed())
    }

    /// The filesystem under test.
    pub fn fs(&self) -> Fs {
        self.fs
    }

    pub fn unmount(mut self) -> Result<()> {
        match self.mount.take() {
            Some(mount) => mount.unmount(),
            None => Ok(()),
        }
    }
}
