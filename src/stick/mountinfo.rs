//! Reading the mount table: parsing `/proc/self/mountinfo`, the mount *at* a path (the login
//! hook: is the home already mounted, is pershomefs still there) and the mount *holding* a
//! path (the tools: which filesystem is this directory on).
//!
//! This module owns the parser and nothing else: it never mounts, and never panics on a line
//! it does not understand (the kernel writes the file, but a mount point's name is chosen by
//! whoever mounted it, and it comes back here escaped).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The filesystem type pershomefs mounts show in mountinfo.
pub const PERSHOMEFS_TYPE: &str = "fuse.pershomefs";

/// One line of `/proc/self/mountinfo`.
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

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`). An escape
/// above `\377` is no byte and stays as it is (computed in u32: in u8 it would overflow).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
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

/// Parses the text of a mountinfo file. Malformed lines are skipped. The optional fields
/// (`shared:9`, `master:1`) end at the first ` - `: names are escaped, so a space can only be
/// a separator.
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

/// The topmost mount on exactly `path` (compared as given, no symlink resolved), if any: the
/// last such line, as the kernel lists later mounts after the ones they cover.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mountpoint == path))
}

/// The mount that holds `path` (the entry with the longest mount point that is a prefix of
/// the canonical path; the last such entry wins, as the kernel stacks later mounts on top).
/// For the tools, which run as the user on paths the user gave.
pub fn mount_of<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    holding(mounts, path, |_| true)
}

/// The same, skipping pershomefs mounts: the filesystem *under* a backing directory.
pub fn underlying_mount_of<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    holding(mounts, path, |m| m.fstype != PERSHOMEFS_TYPE)
}

fn holding<'a>(
    mounts: &'a [MountEntry],
    path: &Path,
    counts: impl Fn(&MountEntry) -> bool,
) -> Option<&'a MountEntry> {
    let canon = path.canonicalize().ok()?;
    mounts
        .iter()
        .filter(|m| counts(m) && canon.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "42 27 7:0 / /tmp/ex\\040probe rw,nosuid,nodev,relatime - fuseblk /dev/loop0 rw,user_id=0,group_id=0\n\
                    50 27 0:61 / /home/jo rw,nosuid,nodev - fuse.pershomefs /run/pershome/jo/pershome rw,user_id=1000,group_id=1000\n\
                    36 35 98:0 /sub /mnt1 ro,noatime master:1 shared:9 - ext3 /dev/root rw,errors=continue\n\
                    garbage line\n\
                    1 2 x:y / /bad rw - ext4 /dev/sda1 rw\n";
        let got = parse_mountinfo(text);
        assert_eq!(got.len(), 3, "expected 3 entries, got {got:?}");
        assert_eq!(got[0].mountpoint, PathBuf::from("/tmp/ex probe"));
        assert_eq!(got[0].dev, (7, 0));
        assert_eq!(got[0].fstype, "fuseblk");
        assert_eq!(got[0].source, "/dev/loop0");
        assert_eq!(got[1].fstype, PERSHOMEFS_TYPE);
        assert_eq!(got[1].source, "/run/pershome/jo/pershome");
        assert_eq!(got[1].super_option("user_id"), Some("1000"));
        assert_eq!(got[1].super_option("user"), None);
        assert!(!got[1].read_only());
        let expected = MountEntry {
            dev: (98, 0),
            root: "/sub".into(),
            mountpoint: "/mnt1".into(),
            mount_options: "ro,noatime".into(),
            fstype: "ext3".into(),
            source: "/dev/root".into(),
            super_options: "rw,errors=continue".into(),
        };
        assert_eq!(got[2], expected, "expected {expected:?}, got {:?}", got[2]);
        assert!(got[2].read_only());
    }

    #[test]
    fn unescape_leaves_odd_backslashes() {
        assert_eq!(unescape("a\\\\b"), b"a\\\\b".to_vec());
        assert_eq!(unescape("a\\134b"), b"a\\b".to_vec());
        assert_eq!(unescape("end\\04"), b"end\\04".to_vec());
        // Regression guard: `\777` is no byte; computing it in u8 overflowed (a panic in a
        // debug build of the root hook).
        assert_eq!(unescape("x\\777"), b"x\\777".to_vec());
    }

    #[test]
    fn the_mount_holding_a_path_is_the_longest_prefix() {
        let root = Path::new("/");
        let text = "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    2 1 0:5 / /proc rw - proc proc rw\n\
                    3 1 0:60 / /proc rw - fuse.pershomefs /x rw\n";
        let mounts = parse_mountinfo(text);
        let got = mount_of(&mounts, root).map(|m| m.source.as_str());
        assert_eq!(got, Some("/dev/sda1"), "holding /: got {got:?}");
        let got = mount_of(&mounts, Path::new("/proc/self")).map(|m| m.source.as_str());
        assert_eq!(got, Some("/x"), "topmost on /proc: got {got:?}");
        let got = underlying_mount_of(&mounts, Path::new("/proc/self")).map(|m| m.source.as_str());
        assert_eq!(got, Some("proc"), "under pershomefs: got {got:?}");
    }
}
