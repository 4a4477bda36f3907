//! Finding sticks: the removable disks the kernel knows (`/sys/block`), their partitions, the
//! filesystem type on each (`blkid -p`, by absolute path with a cleared environment
//! (`crate::exec`), an argument vector and `--`, never through a shell), and the two views built on them: the unmounted candidates the login hook probes,
//! and the sticks (mounted or not) a person picks from in the tools.
//!
//! This module owns enumeration and probing only. It never mounts anything and never decides
//! which stick a user gets (`session::stick` does); it never trusts a device's label or any
//! other string on the stick beyond comparing its filesystem type with a list (the label is
//! only shown to a person choosing).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};

use super::mountinfo::MountEntry;
use super::StickFs;

/// The kernel's list of disks.
pub const SYS_BLOCK: &str = "/sys/block";

/// A block device (a partition, or a whole unpartitioned "superfloppy" stick) that may hold a
/// pershome directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The device node, e.g. `/dev/sdb1`.
    pub devnode: PathBuf,
    /// The filesystem blkid found on it.
    pub fs: StickFs,
}

/// Whether the disk whose sysfs directory is `disk` is removable: its `removable` attribute
/// is 1, or it sits on a USB bus. Many USB sticks report `removable=0` (they present
/// themselves as fixed disks), which is also how lsblk's HOTPLUG column decides.
fn disk_is_removable(disk: &Path) -> bool {
    let removable = std::fs::read_to_string(disk.join("removable"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    // /sys/block/sdb links to .../usb1/1-1/.../block/sdb for a USB disk.
    let on_usb = std::fs::canonicalize(disk)
        .map(|p| {
            p.components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with("usb"))
        })
        .unwrap_or(false);
    removable || on_usb
}

/// Whether the disk or partition whose sysfs directory is `dir` has a medium: a card reader
/// without a card shows a size of 0, and blkid would wait on it. Unreadable counts as none.
fn has_medium(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|sectors| sectors > 0)
}

/// The kernel names of the partitions of removable disks under `sys_block` (normally
/// [`SYS_BLOCK`]), or of the disk itself when it has none, sorted by name so the order is
/// stable. Devices without a medium are left out.
pub fn removable_partitions(sys_block: &Path) -> Result<Vec<String>> {
    let mut disks: Vec<String> = Vec::new();
    let entries =
        std::fs::read_dir(sys_block).with_context(|| format!("listing {}", sys_block.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", sys_block.display()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if disk_is_removable(&sys_block.join(&name)) {
            disks.push(name);
        }
    }
    disks.sort();
    let mut out = Vec::new();
    for disk in disks {
        let dir = sys_block.join(&disk);
        let mut parts: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("partition").is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        if parts.is_empty() {
            if has_medium(&dir) {
                out.push(disk);
            }
        } else {
            parts.sort();
            out.extend(parts.into_iter().filter(|p| has_medium(&dir.join(p))));
        }
    }
    Ok(out)
}

/// The filesystem type `blkid -p` (low-level probing, no cache; root only) reports for a
/// device, `None` when it finds none (an empty or unknown partition).
pub fn probe_fstype(devnode: &Path) -> Result<Option<String>> {
    let output = crate::exec::command(crate::exec::system_program_or_missing("blkid"))
        .args(["-p", "-o", "export", "--"])
        .arg(devnode)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running blkid -p on {}", devnode.display()))?;
    // blkid exits 2 when it finds nothing to report: not an error for us.
    if !output.status.success() {
        return Ok(None);
    }
    Ok(parse_blkid_export(&String::from_utf8_lossy(&output.stdout)))
}

/// The `TYPE=` value of `blkid -o export` output.
pub fn parse_blkid_export(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == "TYPE")
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// One value `program args -- device` prints, if it succeeds and prints one.
fn one_value(program: &str, args: &[&str], device: &Path) -> Option<String> {
    let out = crate::exec::command(crate::exec::system_program_or_missing(program))
        .args(args)
        .arg("--")
        .arg(device)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// What a block device holds (`vfat`, `exfat`, ...), for the tools: `blkid -p` as root, and
/// for an ordinary user (who cannot read the device) udev's answer through `lsblk`. The login
/// hook uses [`probe_fstype`] alone.
pub fn fstype_of(device: &Path) -> Option<String> {
    probe_fstype(device)
        .ok()
        .flatten()
        .or_else(|| one_value("lsblk", &["-n", "-d", "-o", "FSTYPE"], device))
}

/// The stick filesystem on a block device, if it holds one.
pub fn stick_fs_of_device(device: &Path) -> Option<StickFs> {
    fstype_of(device).as_deref().and_then(StickFs::from_blkid)
}

/// The stick filesystem of a mount, if it is one. exfat-fuse shows up as `fuseblk` (so does
/// ntfs-3g), so a `fuseblk` mount of a device is asked of the device.
pub fn stick_fs_of_mount(m: &MountEntry) -> Option<StickFs> {
    if let Some(fs) = StickFs::from_mount_type(&m.fstype) {
        return Some(fs);
    }
    match m.fstype.as_str() {
        "fuseblk" | "fuse.exfat" | "fuseblk.exfat" if m.source.starts_with("/dev/") => {
            stick_fs_of_device(Path::new(&m.source))
        }
        _ => None,
    }
}

/// The kernel's name of a block device (`sdb1` for `/dev/sdb1`, following udev symlinks such
/// as `/dev/disk/by-id/...`).
fn kernel_name(device: &Path) -> Option<String> {
    let canon = device.canonicalize().ok()?;
    Some(canon.file_name()?.to_string_lossy().into_owned())
}

/// Whether a block device (or the disk it is a partition of) is removable or sits on USB.
pub fn is_removable(device: &Path) -> bool {
    let Some(name) = kernel_name(device) else {
        return false;
    };
    let Ok(real) = Path::new("/sys/class/block").join(name).canonicalize() else {
        return false;
    };
    let disk = if real.join("partition").exists() {
        real.parent().map(Path::to_path_buf).unwrap_or(real)
    } else {
        real
    };
    disk_is_removable(&disk)
}

/// Every removable partition under `sys_block` holding one of `filesystems`, in a stable
/// order, by `blkid -p` alone (the login hook, as root). Probing errors of one device are
/// logged and skip that device: a flaky second stick must not keep the user from the first.
pub fn candidates(sys_block: &Path, filesystems: &[StickFs]) -> Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for name in removable_partitions(sys_block)? {
        let devnode = Path::new("/dev").join(&name);
        match probe_fstype(&devnode) {
            Ok(Some(fstype)) => match StickFs::from_blkid(&fstype) {
                Some(fs) if filesystems.contains(&fs) => out.push(Candidate { devnode, fs }),
                _ => {}
            },
            Ok(None) => {}
            Err(e) => tracing::warn!("skipping {}: {e:#}", devnode.display()),
        }
    }
    Ok(out)
}

/// A stick the tools can offer: a removable FAT/exFAT filesystem, mounted or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stick {
    pub device: PathBuf,
    pub fs: StickFs,
    /// Where it is mounted, if it is.
    pub mountpoint: Option<PathBuf>,
    pub read_only: bool,
    /// The volume label, if any (for the person choosing; never trusted for anything else).
    pub label: Option<String>,
}

impl Stick {
    /// One line for a person choosing among sticks.
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({}", self.device.display(), self.fs.human_name());
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

/// The volume label blkid reads from a device, if any.
fn label_of(device: &Path) -> Option<String> {
    one_value("blkid", &["-p", "-o", "value", "-s", "LABEL"], device)
}

/// The removable FAT/exFAT filesystems of this machine, for the tools: every mounted one
/// (from `mounts`), then the unmounted removable partitions that hold one.
pub fn find_sticks(mounts: &[MountEntry]) -> Vec<Stick> {
    let mut sticks: Vec<Stick> = Vec::new();
    for m in mounts {
        if !m.source.starts_with("/dev/") || m.root != Path::new("/") {
            continue;
        }
        let device = PathBuf::from(&m.source);
        if sticks.iter().any(|s| s.device == device) || !is_removable(&device) {
            continue;
        }
        let Some(fs) = stick_fs_of_mount(m) else {
            continue;
        };
        sticks.push(Stick {
            label: label_of(&device),
            device,
            fs,
            mountpoint: Some(m.mountpoint.clone()),
            read_only: m.read_only(),
        });
    }
    let names = match removable_partitions(Path::new(SYS_BLOCK)) {
        Ok(names) => names,
        Err(e) => {
            tracing::warn!("looking for unmounted sticks: {e:#}");
            return sticks;
        }
    };
    for name in names {
        if sticks
            .iter()
            .any(|s| kernel_name(&s.device).as_deref() == Some(name.as_str()))
        {
            continue;
        }
        let device = Path::new("/dev").join(&name);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export_type() {
        let text =
            "DEVNAME=/dev/sdb1\nUUID=1234-ABCD\nVERSION=FAT32\nTYPE=vfat\nUSAGE=filesystem\n";
        assert_eq!(parse_blkid_export(text), Some("vfat".to_owned()));
        assert_eq!(parse_blkid_export("PTTYPE=dos\n"), None);
        assert_eq!(parse_blkid_export("TYPE=\n"), None);
        // A label with `TYPE=` inside is a different key and does not fool the parser.
        assert_eq!(
            parse_blkid_export("LABEL=TYPE=ext4\nTYPE=exfat\n"),
            Some("exfat".to_owned())
        );
    }

    /// A fake /sys/block: sdb removable with two partitions, sdc removable and unpartitioned,
    /// sdd removable with no medium (a card reader), sda fixed (not offered), loop0 fixed.
    #[test]
    fn removable_partitions_from_sysfs() -> Result<()> {
        let t = tempfile::tempdir()?;
        let mk = |disk: &str, removable: &str, size: &str, parts: &[&str]| -> Result<()> {
            let d = t.path().join(disk);
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("removable"), removable)?;
            std::fs::write(d.join("size"), size)?;
            for p in parts {
                std::fs::create_dir_all(d.join(p))?;
                std::fs::write(d.join(p).join("partition"), "1\n")?;
                std::fs::write(d.join(p).join("size"), "2048\n")?;
            }
            Ok(())
        };
        mk("sda", "0\n", "4096\n", &["sda1", "sda2"])?;
        mk("sdb", "1\n", "4096\n", &["sdb2", "sdb1"])?;
        mk("sdc", "1\n", "4096\n", &[])?;
        mk("sdd", "1\n", "0\n", &[])?;
        mk("loop0", "0\n", "4096\n", &[])?;
        let got = removable_partitions(t.path())?;
        let expected = vec!["sdb1", "sdb2", "sdc"];
        assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
        Ok(())
    }

    #[test]
    fn describe_for_a_person() {
        let s = Stick {
            device: "/dev/sdb1".into(),
            fs: StickFs::Exfat,
            mountpoint: None,
            read_only: false,
            label: Some("JO".into()),
        };
        let expected = "/dev/sdb1 (exFAT, label \"JO\", not mounted)";
        let got = s.describe();
        assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
    }
}
