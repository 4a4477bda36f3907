//! Finding the stick: the removable block devices the kernel knows (from `/sys/block`), their
//! partitions, and the filesystem type on each (probed with `blkid -p`, run with an argument
//! vector, never through a shell).
//!
//! This module owns enumeration and probing only. It never mounts anything and never decides
//! which stick a user gets (`session::stick` does); it never trusts a device's label or any
//! other string on the stick beyond comparing its filesystem type with the configured list.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

/// A block device (a partition, or a whole unpartitioned "superfloppy" stick) that may hold a
/// pershome directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The device node, e.g. `/dev/sdb1`.
    pub devnode: PathBuf,
    /// The filesystem type blkid found, e.g. `vfat` or `exfat`.
    pub fstype: String,
}

/// The kernel names of removable disks under `sys_block` (normally `/sys/block`), each with
/// its partitions (or itself when it has none), sorted by name so the order is stable.
///
/// A disk counts as removable when its `removable` attribute is 1 or when it sits on a USB
/// bus: many USB sticks report `removable=0` (they present themselves as fixed disks), which
/// is also how lsblk's HOTPLUG column decides.
pub fn removable_partitions(sys_block: &Path) -> Result<Vec<String>> {
    let mut disks: Vec<String> = Vec::new();
    let entries =
        std::fs::read_dir(sys_block).with_context(|| format!("listing {}", sys_block.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", sys_block.display()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let dir = sys_block.join(&name);
        let removable = std::fs::read_to_string(dir.join("removable"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false);
        // /sys/block/sdb links to .../usb1/1-1/.../block/sdb for a USB disk.
        let on_usb = std::fs::canonicalize(&dir)
            .map(|p| {
                p.components()
                    .any(|c| c.as_os_str().to_string_lossy().starts_with("usb"))
            })
            .unwrap_or(false);
        if removable || on_usb {
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
            out.push(disk);
        } else {
            parts.sort();
            out.append(&mut parts);
        }
    }
    Ok(out)
}

/// The filesystem type `blkid -p` (low-level probing, no cache) reports for a device, `None`
/// when it finds none (an empty or unknown partition).
pub fn probe_fstype(devnode: &Path) -> Result<Option<String>> {
    let output = Command::new(blkid_program())
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

/// blkid by absolute path: pam_exec runs the hook with an environment without PATH, so a
/// bare `blkid` would be looked up in the C library's default `/bin:/usr/bin` and miss
/// `/usr/sbin/blkid` (found by the QEMU login tests, vm-tests `fallback`). A root hook should
/// not search a PATH anyway.
fn blkid_program() -> &'static str {
    ["/usr/sbin/blkid", "/sbin/blkid"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("blkid")
}

/// The `TYPE=` value of `blkid -o export` output.
pub fn parse_blkid_export(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == "TYPE")
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Every removable partition whose filesystem type is one of `fstypes`, in a stable order.
/// Probing errors of one device are logged and skip that device: a flaky second stick must
/// not keep the user from the first.
pub fn candidates(sys_block: &Path, fstypes: &[String]) -> Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for name in removable_partitions(sys_block)? {
        let devnode = Path::new("/dev").join(&name);
        match probe_fstype(&devnode) {
            Ok(Some(fstype)) if fstypes.contains(&fstype) => {
                out.push(Candidate { devnode, fstype })
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("skipping {}: {e:#}", devnode.display()),
        }
    }
    Ok(out)
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
    /// sda fixed (not offered), loop0 fixed.
    #[test]
    fn removable_partitions_from_sysfs() -> Result<()> {
        let t = tempfile::tempdir()?;
        let mk = |disk: &str, removable: &str, parts: &[&str]| -> Result<()> {
            let d = t.path().join(disk);
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("removable"), removable)?;
            for p in parts {
                std::fs::create_dir_all(d.join(p))?;
                std::fs::write(d.join(p).join("partition"), "1\n")?;
            }
            Ok(())
        };
        mk("sda", "0\n", &["sda1", "sda2"])?;
        mk("sdb", "1\n", &["sdb2", "sdb1"])?;
        mk("sdc", "1\n", &[])?;
        mk("loop0", "0\n", &[])?;
        let got = removable_partitions(t.path())?;
        let expected = vec!["sdb1", "sdb2", "sdc"];
        assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
        Ok(())
    }
}
