//! Finding sticks and mounts: parsing `/proc/self/mountinfo`, telling removable FAT/exFAT
//! filesystems from the rest (`/sys/class/block/*/removable`, `blkid`), locating the backing
//! directory (`pershome/`, any case) on a stick, and mounting a device for a moment.
//!
//! This module owns those look-ups for the user tools (`prepare`, `status`, `migrate`). It never
//! writes to a stick and never passes a user string to a shell: external programs (`blkid`,
//! `mount`, `umount`, `mount.exfat-fuse`) get fixed arguments and paths as separate argv items.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The directory on a stick that holds the home (matched in any case, as FAT does).
pub const BACKING_DIR: &str = "pershome";

/// The filesystem type pershomefs mounts show in mountinfo.
pub const PERSHOMEFS_TYPE: &str = "fuse.pershomefs";

/// One line of `/proc/self/mountinfo`, the fields the tools need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    pub dev: (u32, u32),
    /// The directory inside the filesystem that is mounted (`/` for a whole filesystem).
    pub root: PathBuf,
    pub mountpoint: PathBuf,
    /// Per-mount options (`rw`, `nosuid`, ...).
    pub mount_options: String,
    pub fstype: String,
    pub source: String,
    /// Per-superblock options (`user_id=1000,...` for FUSE).
    pub super_options: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }

    /// A per-superblock option's value (`user_id` of a FUSE mount).
    pub fn super_option(&self, key: &str) -> Option<&str> {
        self.super_options
            .split(',')
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn path_field(field: &str) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&unescape(field)))
}

/// Parses the text of a mountinfo file; malformed lines are skipped (the kernel writes it, but
/// a parser of it must still never panic).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 3 {
                return None;
            }
            let (maj, min) = l[2].split_once(':')?;
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                root: path_field(l[3]),
                mountpoint: path_field(l[4]),
                mount_options: l[5].to_owned(),
                fstype: r[0].to_owned(),
                source: String::from_utf8_lossy(&unescape(r[1])).into_owned(),
                super_options: r[2].to_owned(),
            })
        })
        .collect()
}

/// The mounts of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// The mount that holds `path` (the entry with the longest mount point that is a prefix of
/// the canonical path; the last such entry wins, as the kernel stacks later mounts on top).
pub fn mount_of<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let canon = path.canonicalize().ok()?;
    mounts
        .iter()
        .filter(|m| canon.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len())
}

/// The same, skipping pershomefs mounts: the filesystem *under* a backing directory.
pub fn underlying_mount_of<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let canon = path.canonicalize().ok()?;
    mounts
        .iter()
        .filter(|m| m.fstype != PERSHOMEFS_TYPE && canon.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len())
}

/// The kinds of filesystem a stick may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickFs {
    Fat,
    Exfat,
}

impl StickFs {
    pub fn name(self) -> &'static str {
        match self {
            StickFs::Fat => "FAT",
            StickFs::Exfat => "exFAT",
        }
    }
}

/// What `blkid` says a block device holds (`vfat`, `exfat`, ...), if anything.
/// `blkid -p` reads the device (root only); an ordinary user gets udev's answer through
/// `lsblk`.
pub fn probe_type(device: &Path) -> Option<String> {
    let tries: [(&str, &[&str]); 2] = [
        ("blkid", &["-p", "-o", "value", "-s", "TYPE"]),
        ("lsblk", &["-n", "-d", "-o", "FSTYPE"]),
    ];
    tries.iter().find_map(|(prog, args)| {
        let out = Command::new(prog).args(*args).arg(device).output().ok()?;
        let t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !t.is_empty()).then_some(t)
    })
}

fn stick_fs_of_type(t: &str) -> Option<StickFs> {
    match t {
        "vfat" | "msdos" | "fat" => Some(StickFs::Fat),
        "exfat" => Some(StickFs::Exfat),
        _ => None,
    }
}

/// Whether a mount is a FAT-family filesystem. exfat-fuse shows up as `fuseblk` (so does
/// ntfs-3g), so a `fuseblk` mount of a device is asked of `blkid`.
pub fn stick_fs_of_mount(m: &MountEntry) -> Option<StickFs> {
    if let Some(fs) = stick_fs_of_type(&m.fstype) {
        return Some(fs);
    }
    match m.fstype.as_str() {
        "fuseblk" | "fuse.exfat" | "fuseblk.exfat" if m.source.starts_with("/dev/") => {
            probe_type(Path::new(&m.source))
                .as_deref()
                .and_then(stick_fs_of_type)
        }
        _ => None,
    }
}

/// The file system type of a block device, if it is one a stick may have.
pub fn stick_fs_of_device(device: &Path) -> Option<StickFs> {
    probe_type(device).as_deref().and_then(stick_fs_of_type)
}

/// The kernel's name of a block device (`sdb1` for `/dev/sdb1`, following udev symlinks).
fn kernel_name(device: &Path) -> Option<String> {
    let canon = device.canonicalize().ok()?;
    Some(canon.file_name()?.to_string_lossy().into_owned())
}

/// Whether a block device (or the disk it is a partition of) is removable or sits on USB.
/// Many USB sticks claim `removable=0`, so a `/usb` in the sysfs path counts too.
pub fn is_removable(device: &Path) -> bool {
    let Some(name) = kernel_name(device) else {
        return false;
    };
    let sys = Path::new("/sys/class/block").join(&name);
    let Ok(real) = sys.canonicalize() else {
        return false;
    };
    let disk = if real.join("partition").exists() {
        real.parent().map(Path::to_path_buf).unwrap_or(real.clone())
    } else {
        real.clone()
    };
    let removable = std::fs::read_to_string(disk.join("removable"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    removable || real.to_string_lossy().contains("/usb")
}

/// A stick the tools can offer: a removable FAT/exFAT filesystem, mounted or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stick {
    pub device: PathBuf,
    pub fs: StickFs,
    /// Where it is mounted, if it is.
    pub mountpoint: Option<PathBuf>,
    pub read_only: bool,
    /// The volume label, if any (for the person choosing).
    pub label: Option<String>,
}

impl Stick {
    /// One line for a person choosing among sticks.
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({}", self.device.display(), self.fs.name());
        if let Some(l) = &self.label {
            s.push_str(&format!(", label {l:?}"));
        }
        match &self.mountpoint {
            Some(m) => s.push_str(&format!(", mounted on {}", m.display())),
            None => s.push_str(", not mounted"),
        }
        s.push(')');
        s
    }
}

fn label_of(device: &Path) -> Option<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "LABEL"])
        .arg(device)
        .output()
        .ok()?;
    let t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !t.is_empty()).then_some(t)
}

/// The removable FAT/exFAT filesystems of this machine: every mounted one, and unmounted
/// partitions of removable disks that `blkid` recognises.
pub fn find_sticks(mounts: &[MountEntry]) -> Vec<Stick> {
    let mut sticks: Vec<Stick> = Vec::new();
    for m in mounts {
        if !m.source.starts_with("/dev/") || m.root != Path::new("/") {
            continue;
        }
        let device = PathBuf::from(&m.source);
        if !is_removable(&device) {
            continue;
        }
        let Some(fs) = stick_fs_of_mount(m) else {
            continue;
        };
        if sticks.iter().any(|s| s.device == device) {
            continue;
        }
        sticks.push(Stick {
            label: label_of(&device),
            device,
            fs,
            mountpoint: Some(m.mountpoint.clone()),
            read_only: m.read_only(),
        });
    }
    let Ok(entries) = std::fs::read_dir("/sys/class/block") else {
        return sticks;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_owned()))
        .collect();
    names.sort();
    for name in names {
        let device = Path::new("/dev").join(&name);
        if sticks
            .iter()
            .any(|s| kernel_name(&s.device).as_deref() == Some(name.as_str()))
        {
            continue;
        }
        if !is_removable(&device) {
            continue;
        }
        // Removable disks with no medium make blkid wait; only ask about real sizes.
        let size = std::fs::read_to_string(Path::new("/sys/class/block").join(&name).join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if size == 0 {
            continue;
        }
        if let Some(fs) = stick_fs_of_device(&device) {
            sticks.push(Stick {
                label: label_of(&device),
                device,
                fs,
                mountpoint: None,
                read_only: false,
            });
        }
    }
    sticks
}

/// The entry of `dir` named `pershome` in any case (FAT is case-insensitive, and Windows users
/// may have made `PersHome`), if there is one that is a real directory (not a symlink).
pub fn find_backing(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    let mut found = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        if e.file_name()
            .as_bytes()
            .eq_ignore_ascii_case(BACKING_DIR.as_bytes())
        {
            let ft = e
                .file_type()
                .with_context(|| format!("examining {}", e.path().display()))?;
            if ft.is_dir() {
                found.push(e.path());
            }
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => bail!(
            "{} holds several directories named pershome in different case ({}); keep one",
            dir.display(),
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
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
    /// Mounts `device` (holding `fs`) on a fresh private directory. Needs root. exFAT falls
    /// back to `mount.exfat-fuse` where the kernel has no exfat driver.
    pub fn mount(device: &Path, fs: StickFs) -> Result<TempMount> {
        if !nix::unistd::geteuid().is_root() {
            return TempMount::mount_udisks(device);
        }
        let dir = tempfile::Builder::new()
            .prefix("pershome-stick.")
            .tempdir_in(std::env::temp_dir())
            .context("creating a temporary mount point")?;
        let mp = dir.path().to_path_buf();
        // Flash-friendly and safe: nothing on the stick may run or act as a device.
        let opts = "nosuid,nodev,noexec,noatime";
        let fstype = match fs {
            StickFs::Fat => "vfat",
            StickFs::Exfat => "exfat",
        };
        let status = Command::new("mount")
            .args(["-t", fstype, "-o", opts])
            .arg(device)
            .arg(&mp)
            .stderr(std::process::Stdio::null())
            .status()
            .context("running mount")?;
        if !status.success() {
            let ok = fs == StickFs::Exfat
                && Command::new("mount.exfat-fuse")
                    .args(["-o", opts])
                    .arg(device)
                    .arg(&mp)
                    .status()
                    .is_ok_and(|s| s.success());
            if !ok {
                bail!(
                    "could not mount {} ({}) on {}",
                    device.display(),
                    fs.name(),
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
        let out = Command::new("udisksctl")
            .args(["mount", "--no-user-interaction", "-b"])
            .arg(device)
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
        let mp = mounts()?
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
        nix::unistd::sync();
        if let Some(dev) = &self.udisks_device {
            let _ = Command::new("udisksctl")
                .args(["unmount", "--no-user-interaction", "-b"])
                .arg(dev)
                .status();
            return;
        }
        let ok = Command::new("umount")
            .arg(&self.mountpoint)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Lazy, so the directory can go; the kernel finishes when the last user lets go.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
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

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "42 27 7:0 / /tmp/ex\\040probe rw,nosuid,nodev,relatime - fuseblk /dev/loop0 rw,user_id=0,group_id=0\n\
                    50 27 0:61 / /home/jo rw,nosuid,nodev - fuse.pershomefs /run/pershome/jo/pershome rw,user_id=1000,group_id=1000\n\
                    garbage line\n";
        let got = parse_mountinfo(text);
        assert_eq!(got.len(), 2, "got {got:?}");
        assert_eq!(got[0].mountpoint, PathBuf::from("/tmp/ex probe"));
        assert_eq!(got[0].dev, (7, 0));
        assert_eq!(got[0].fstype, "fuseblk");
        assert_eq!(got[1].fstype, PERSHOMEFS_TYPE);
        assert_eq!(got[1].super_option("user_id"), Some("1000"));
        assert_eq!(got[1].super_option("user"), None);
        assert!(!got[1].read_only());
    }

    #[test]
    fn unescape_leaves_odd_backslashes() {
        assert_eq!(unescape("a\\\\b"), b"a\\\\b".to_vec());
        assert_eq!(unescape("a\\134b"), b"a\\b".to_vec());
        assert_eq!(unescape("end\\04"), b"end\\04".to_vec());
    }
}
