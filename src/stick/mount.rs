//! Mounting and unmounting sticks: the stick mount of the login hook (mount(2) with the
//! configured options), a device mounted for the length of one tools command
//! ([`TempMount`]), and the bounded unmount both use.
//!
//! This module owns the mount flags that make a stick harmless: [`STICK_FLAGS`]
//! (`nosuid,nodev,noexec,noatime`) are on every stick mount it makes, whatever the
//! configuration says. It never runs a shell: mounts are mount(2) calls, and the helpers it
//! runs (`mount.exfat-fuse`, `udisksctl`) get argument vectors. It never decides *whether* or
//! *which* stick to mount (`session::stick`, `tools::prepare`), and it never waits without a
//! deadline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::mountinfo;
use super::StickFs;
use crate::sysconfig::StickMount;

/// The mount flags every stick mount carries, whatever the configuration says. A stick is
/// attacker-controlled: a setuid binary or a device node on it must never gain power, no
/// program runs from the raw stick, and access times are never written (flash wear).
pub const STICK_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC)
    .union(MsFlags::MS_NOATIME);

/// [`STICK_FLAGS`] as `-o` words, for a FUSE helper (exfat-fuse) that takes no flags.
pub const STICK_OPTIONS: &str = "nosuid,nodev,noexec,noatime";

/// Mounts `device` on `target` as `mount` (from [`SystemConfig::stick_mount`]) says, with
/// [`STICK_FLAGS`] always added.
///
/// [`SystemConfig::stick_mount`]: crate::sysconfig::SystemConfig::stick_mount
pub fn mount_stick(device: &Path, target: &Path, mount: &StickMount) -> Result<()> {
    mount_as(device, target, mount.fstype.name(), mount)
}

/// [`mount_stick`] with the kernel's filesystem type given by name: the one place the flags
/// are put together (tests mount a tmpfs through it, as this host has no FAT driver).
fn mount_as(device: &Path, target: &Path, fstype: &str, mount: &StickMount) -> Result<()> {
    nix::mount::mount(
        Some(device),
        target,
        Some(fstype),
        mount.flags | STICK_FLAGS,
        Some(mount.data.as_str()),
    )
    .map_err(|e| {
        anyhow!(
            "mounting {} ({fstype}, {}) on {}: {e}",
            device.display(),
            mount.options,
            target.display()
        )
    })
}

/// How an unmount ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// The mount is gone.
    Clean,
    /// Still busy when the time was up; detached lazily (it goes once the last user lets go).
    Lazily,
}

/// Unmounts `path`, retrying while it is busy until `within` has passed, then detaching it
/// lazily (MNT_DETACH) so a logout is never stuck on a process that keeps a file open.
/// `Ok(Clean)` also when nothing is mounted there.
pub fn unmount_within(path: &Path, within: Duration) -> Result<Unmounted> {
    let deadline = Instant::now() + within;
    loop {
        match nix::mount::umount2(path, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(Unmounted::Clean),
            Err(Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(Errno::EBUSY) => {
                nix::mount::umount2(path, MntFlags::MNT_DETACH)
                    .map_err(|e| anyhow!("detaching {}: {e}", path.display()))?;
                return Ok(Unmounted::Lazily);
            }
            Err(e) => return Err(anyhow!("unmounting {}: {e}", path.display())),
        }
    }
}

/// Where the tools mount sticks as root: `/run/pershome/tools`, root's, mode 0700 (created
/// so, and refused when it is anything else: a symlink, another owner, open to others).
pub const TOOLS_DIR: &str = "/run/pershome/tools";

fn tools_dir() -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = Path::new(TOOLS_DIR);
    for (path, mode) in [(Path::new("/run/pershome"), 0o711), (dir, 0o700)] {
        match std::fs::DirBuilder::new().mode(mode).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
        let m = std::fs::symlink_metadata(path)
            .with_context(|| format!("examining {}", path.display()))?;
        if !m.is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
            bail!(
                "{} must be a directory of root's that nobody else can write (owner uid {}, \
                 mode {:o})",
                path.display(),
                m.uid(),
                m.mode() & 0o7777
            );
        }
    }
    let m = std::fs::symlink_metadata(dir)?;
    if m.mode() & 0o077 != 0 {
        bail!(
            "{} must be mode 0700 (it is {:o})",
            dir.display(),
            m.mode() & 0o7777
        );
    }
    Ok(dir.to_path_buf())
}

/// A device mounted by the tools for the length of one command; dropping it syncs and
/// unmounts (and removes the temporary directory).
#[derive(Debug)]
pub struct TempMount {
    pub mountpoint: PathBuf,
    dir: Option<tempfile::TempDir>,
    /// Set when udisks mounted it: udisks unmounts it again.
    udisks_device: Option<PathBuf>,
}

impl TempMount {
    /// Mounts `device` (holding `fs`) on a fresh private directory, [`STICK_FLAGS`] and the
    /// filesystem's defaults (the tools only create `pershome/` and the store, or write
    /// through pershomefs). exFAT falls back to `mount.exfat-fuse` where the kernel has no
    /// exfat driver. An ordinary user goes through udisks instead.
    pub fn mount(device: &Path, fs: StickFs) -> Result<TempMount> {
        if !nix::unistd::geteuid().is_root() {
            return TempMount::mount_udisks(device);
        }
        let dir = tempfile::Builder::new()
            .prefix("stick.")
            .tempdir_in(tools_dir()?)
            .context("creating a temporary mount point")?;
        let mp = dir.path().to_path_buf();
        // The files show as the caller's (root's) and closed to everybody else: the mount
        // point's directory is root's 0700 as well, so no other user sees the stick's files
        // while a tool works on it (never a world-readable mount under $TMPDIR).
        let owner = format!(
            "uid={},gid={},umask=077",
            nix::unistd::getuid(),
            nix::unistd::getgid()
        );
        let plain = StickMount {
            fstype: fs,
            flags: STICK_FLAGS,
            data: owner.clone(),
            options: format!("{STICK_OPTIONS},{owner}"),
        };
        if let Err(e) = mount_stick(device, &mp, &plain) {
            let fuse = fs == StickFs::Exfat
                && crate::exec::command(crate::exec::system_program_or_missing("mount.exfat-fuse"))
                    .args(["-o", &plain.options, "--"])
                    .arg(device)
                    .arg(&mp)
                    .stdin(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            if !fuse {
                bail!(
                    "could not mount {} ({}) on {}: {e:#}",
                    device.display(),
                    fs.human_name(),
                    mp.display()
                );
            }
        }
        Ok(TempMount {
            mountpoint: mp,
            dir: Some(dir),
            udisks_device: None,
        })
    }

    /// An ordinary user mounts through udisks, as the file manager does (it may ask for a
    /// password through polkit; `--no-user-interaction` makes that a clear failure instead).
    fn mount_udisks(device: &Path) -> Result<TempMount> {
        let out = crate::exec::command(crate::exec::system_program_or_missing("udisksctl"))
            .args(["mount", "--no-user-interaction", "-b"])
            .arg(device)
            .stdin(Stdio::null())
            .output();
        let ok = out.as_ref().is_ok_and(|o| o.status.success());
        if !ok {
            bail!(
                "{} is not mounted, and it could not be mounted for you (udisksctl {}); open \
                 the stick in the file manager, which mounts it, and run this again, or run it \
                 as root",
                device.display(),
                match &out {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                    Err(e) => e.to_string(),
                }
            );
        }
        let canon = device
            .canonicalize()
            .unwrap_or_else(|_| device.to_path_buf());
        let mp = mountinfo::mounts()?
            .into_iter()
            .find(|m| Path::new(&m.source).canonicalize().ok().as_deref() == Some(&*canon))
            .map(|m| m.mountpoint)
            .with_context(|| {
                format!(
                    "udisksctl mounted {} but it is not in mountinfo",
                    device.display()
                )
            })?;
        Ok(TempMount {
            mountpoint: mp,
            dir: None,
            udisks_device: Some(device.to_path_buf()),
        })
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Ok(dir) = std::fs::File::open(&self.mountpoint) {
            use std::os::fd::AsRawFd;
            let _ = nix::unistd::syncfs(dir.as_raw_fd());
        }
        if let Some(dev) = &self.udisks_device {
            let _ = crate::exec::command(crate::exec::system_program_or_missing("udisksctl"))
                .args(["unmount", "--no-user-interaction", "-b"])
                .arg(dev)
                .stdin(Stdio::null())
                .status();
            return;
        }
        // Busy (a program of the user still in it): detached at once, so the directory can
        // go; the kernel finishes when the last user lets go.
        if let Err(e) = unmount_within(&self.mountpoint, Duration::ZERO) {
            tracing::warn!("{e:#}");
        }
        if let Some(dir) = self.dir.take() {
            // Removing the empty mount point; a failure leaves an empty directory in /tmp.
            let _ = dir.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags `mount_stick` really gives the kernel, read back from mountinfo: a mount made
    /// with a configuration that asks for no flag at all still comes up
    /// nosuid,nodev,noexec,noatime. (A tmpfs stands for the stick: this host has no FAT
    /// driver; the filesystem type is the only thing that differs.) The configured data words
    /// (owner, umask) are the configuration's: checked on `stick_mount`'s output.
    #[test]
    fn stick_mounts_are_always_harmless() -> Result<()> {
        if crate::testing::skip_without_root("stick_mounts_are_always_harmless") {
            return Ok(());
        }
        let t = tempfile::tempdir()?;
        let bare = StickMount {
            fstype: StickFs::Vfat,
            flags: MsFlags::empty(),
            data: String::new(),
            options: String::new(),
        };
        mount_as(Path::new("pershome-test"), t.path(), "tmpfs", &bare)?;
        let got = mountinfo::mount_at(t.path());
        let _ = nix::mount::umount2(t.path(), MntFlags::MNT_DETACH);
        let m = got?.context("expected the tmpfs in mountinfo")?;
        for want in ["nosuid", "nodev", "noexec", "noatime"] {
            assert!(
                m.mount_options.split(',').any(|o| o == want),
                "expected {want} in {:?}",
                m.mount_options
            );
        }
        let cfg = crate::sysconfig::SystemConfig::default();
        let m = cfg.stick_mount(StickFs::Vfat, 1001, 100);
        for want in [
            "uid=1001",
            "gid=100",
            "umask=077",
            "utf8=1",
            "shortname=mixed",
            "flush",
        ] {
            assert!(
                m.data.split(',').any(|w| w == want),
                "expected {want} in {:?}",
                m.data
            );
        }
        Ok(())
    }

    /// The `-o` words for exfat-fuse say the same as the flags.
    #[test]
    fn stick_options_match_the_flags() {
        let mut flags = MsFlags::empty();
        for word in STICK_OPTIONS.split(',') {
            let flag = match word {
                "nosuid" => MsFlags::MS_NOSUID,
                "nodev" => MsFlags::MS_NODEV,
                "noexec" => MsFlags::MS_NOEXEC,
                "noatime" => MsFlags::MS_NOATIME,
                other => panic!("unexpected word {other:?} in {STICK_OPTIONS:?}"),
            };
            flags |= flag;
        }
        assert_eq!(
            flags, STICK_FLAGS,
            "expected {STICK_FLAGS:?}, got {flags:?}"
        );
    }

    /// Nothing mounted is a clean unmount for root (EINVAL), and a clear error for anyone
    /// else (EPERM): never a lazy detach.
    #[test]
    fn unmounting_nothing() -> Result<()> {
        let t = tempfile::tempdir()?;
        let got = unmount_within(t.path(), Duration::ZERO);
        if nix::unistd::geteuid().is_root() {
            assert!(
                matches!(got, Ok(Unmounted::Clean)),
                "expected Ok(Clean), got {got:?}"
            );
        } else {
            assert!(got.is_err(), "expected EPERM as a user, got {got:?}");
        }
        Ok(())
    }
}
