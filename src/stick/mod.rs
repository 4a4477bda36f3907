//! Everything both the user tools (`pershome prepare/status/migrate`, `crate::tools`) and the
//! login hook (`crate::session`) need to know about a stick, in one place:
//!
//! - `mountinfo`: parsing `/proc/self/mountinfo`, the mount at or holding a path
//! - `discover`: removable disks and partitions (sysfs), their filesystem type (`blkid -p`),
//!   the sticks a person may pick
//! - `layout`: the `pershome/` directory at a stick's top (any case, never a symlink)
//! - `mount`: mounting a stick `nosuid,nodev,noexec,noatime` (mount(2), never a shell), a
//!   device mounted for one command, bounded unmounting
//!
//! and [`StickFs`], the filesystems a stick may have. The hook runs this code as root on an
//! attacker-controlled stick, so the rules of `docs/security.md` hold throughout: no string
//! from the stick or the user reaches a shell (external programs get argument vectors, with
//! `--` before a device path), nothing on the stick is followed through a symlink, and every
//! stick mount carries [`mount::STICK_FLAGS`]. This module never decides *which* stick a
//! user gets (`session::stick`) or what to write on it (`tools::prepare`).

pub mod discover;
pub mod layout;
pub mod mount;
pub mod mountinfo;

use std::fmt;

use serde::{Deserialize, Serialize};

/// A filesystem type that may count as a stick. Its serde form is the blkid name, as the
/// `filesystems` key of `/etc/pershome/config.toml` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StickFs {
    /// FAT12/16/32 with long names (blkid `TYPE="vfat"`).
    Vfat,
    /// exFAT (blkid `TYPE="exfat"`).
    Exfat,
}

impl StickFs {
    /// The name blkid and mount(2) use.
    pub fn name(self) -> &'static str {
        match self {
            StickFs::Vfat => "vfat",
            StickFs::Exfat => "exfat",
        }
    }

    /// The name a person knows (`FAT`, `exFAT`), for messages.
    pub fn human_name(self) -> &'static str {
        match self {
            StickFs::Vfat => "FAT",
            StickFs::Exfat => "exFAT",
        }
    }

    /// The filesystem for a blkid `TYPE`, if it is one that may count as a stick. `msdos` is
    /// not one: blkid reports every FAT as `vfat`, and the msdos driver only knows 8.3 names.
    pub fn from_blkid(fstype: &str) -> Option<StickFs> {
        match fstype {
            "vfat" => Some(StickFs::Vfat),
            "exfat" => Some(StickFs::Exfat),
            _ => None,
        }
    }

    /// The filesystem behind a kernel mount type of mountinfo: a FAT mounted with Linux's
    /// `msdos` driver is still a FAT stick (the tools may prepare it; only its names are
    /// short there). FUSE mounts (`fuseblk` of exfat-fuse) are not decided here: see
    /// [`discover::stick_fs_of_mount`].
    pub fn from_mount_type(fstype: &str) -> Option<StickFs> {
        match fstype {
            "msdos" => Some(StickFs::Vfat),
            other => StickFs::from_blkid(other),
        }
    }
}

impl fmt::Display for StickFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stick_fs_names() {
        for (blkid, expected) in [
            ("vfat", Some(StickFs::Vfat)),
            ("exfat", Some(StickFs::Exfat)),
            ("msdos", None),
            ("ntfs", None),
            ("", None),
        ] {
            let got = StickFs::from_blkid(blkid);
            assert_eq!(
                got, expected,
                "blkid {blkid:?}: expected {expected:?}, got {got:?}"
            );
        }
        let got = StickFs::from_mount_type("msdos");
        assert_eq!(got, Some(StickFs::Vfat), "mount type msdos: got {got:?}");
        assert_eq!(StickFs::Exfat.human_name(), "exFAT");
        assert_eq!(StickFs::Vfat.to_string(), "vfat");
    }
}
