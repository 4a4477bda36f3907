//! The metadata an inode keeps in memory: `meta::Meta` in a compact form (issue 14, Scale:
//! memory per looked-up entry).
//!
//! Every inode of every loaded directory carries one, so its size counts once per entry of a
//! home. What nearly every entry has (mode, owners, times, the backing file's size and mtime)
//! is kept inline; what few entries have (a device number, xattrs, a hard-link count, parts)
//! lives behind one optional box, allocated only for an entry that has one of them. The POSIX
//! name a record may keep (`Meta::name`) is not kept: the inode knows its own names, and the
//! commit works out again whether a record needs one (`Fs::name_to_store`).
//!
//! This module owns that representation and the conversions to and from `Meta`; it never
//! decides what a field's value is.

use crate::meta::{Meta, Parts, Timespec};

/// An inode's metadata, with real ids (the store's `OWNER_ID` already mapped to the mount
/// owner). The public fields mean what `Meta`'s fields of the same name mean.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct InodeMeta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub btime: Timespec,
    pub backing_size: u64,
    pub backing_mtime: Timespec,
    /// `None` whenever every field of `Rare` is at its default.
    rare: Option<Box<Rare>>,
}

/// The fields few inodes have.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Rare {
    rdev: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    link: Option<u64>,
    nlink: u32,
    parts: Option<Parts>,
}

impl Rare {
    fn is_default(&self) -> bool {
        self.rdev == 0
            && self.xattrs.is_empty()
            && self.link.is_none()
            && self.nlink == 0
            && self.parts.is_none()
    }
}

impl From<Meta> for InodeMeta {
    fn from(m: Meta) -> InodeMeta {
        let rare = Rare {
            rdev: m.rdev,
            xattrs: m.xattrs,
            link: m.link,
            nlink: m.nlink,
            parts: m.parts,
        };
        InodeMeta {
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            atime: m.atime,
            mtime: m.mtime,
            ctime: m.ctime,
            btime: m.btime,
            backing_size: m.backing_size,
            backing_mtime: m.backing_mtime,
            rare: (!rare.is_default()).then(|| Box::new(rare)),
        }
    }
}

impl InodeMeta {
    /// The metadata as a record states it, without a stored POSIX name.
    pub fn to_meta(&self) -> Meta {
        let rare = self.rare.as_deref();
        Meta {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev(),
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            btime: self.btime,
            xattrs: rare.map(|r| r.xattrs.clone()).unwrap_or_default(),
            link: rare.and_then(|r| r.link),
            name: None,
            backing_size: self.backing_size,
            backing_mtime: self.backing_mtime,
            nlink: self.nlink(),
            parts: self.parts(),
        }
    }

    pub fn rdev(&self) -> u64 {
        self.rare.as_ref().map_or(0, |r| r.rdev)
    }

    /// The link count of a hard-linked file (`Meta::nlink`); 0 for every other inode.
    pub fn nlink(&self) -> u32 {
        self.rare.as_ref().map_or(0, |r| r.nlink)
    }

    pub fn set_nlink(&mut self, nlink: u32) {
        self.change(|r| r.nlink = nlink);
    }

    pub fn parts(&self) -> Option<Parts> {
        self.rare.as_ref().and_then(|r| r.parts)
    }

    pub fn set_parts(&mut self, parts: Option<Parts>) {
        self.change(|r| r.parts = parts);
    }

    /// Extended attributes, sorted by name, names unique.
    pub fn xattrs(&self) -> &[(Vec<u8>, Vec<u8>)] {
        self.rare.as_ref().map_or(&[], |r| r.xattrs.as_slice())
    }

    /// Changes the extended attributes; `f`'s result is passed on.
    pub fn change_xattrs<T>(&mut self, f: impl FnOnce(&mut Vec<(Vec<u8>, Vec<u8>)>) -> T) -> T {
        let mut out = None;
        self.change(|r| out = Some(f(&mut r.xattrs)));
        out.expect("change runs its closure once")
    }

    /// Runs `f` on the rare fields, then drops the box again when all of them are defaults.
    fn change(&mut self, f: impl FnOnce(&mut Rare)) {
        let rare = self.rare.get_or_insert_with(Default::default);
        f(rare);
        if rare.is_default() {
            self.rare = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_inodes_metadata_is_small_and_holds_no_box() {
        let m = InodeMeta::from(Meta {
            mode: libc::S_IFREG | 0o644,
            uid: 1000,
            gid: 1000,
            name: Some(b"kept by the inode itself".to_vec()),
            ..Meta::default()
        });
        assert!(m.rare.is_none());
        assert!(
            std::mem::size_of::<InodeMeta>() <= 112,
            "InodeMeta is {} bytes",
            std::mem::size_of::<InodeMeta>()
        );
    }

    #[test]
    fn every_field_but_the_name_comes_back() {
        let meta = Meta {
            mode: libc::S_IFCHR | 0o600,
            uid: 1,
            gid: 2,
            rdev: 0x0501,
            atime: Timespec { sec: 1, nsec: 2 },
            mtime: Timespec { sec: 3, nsec: 4 },
            ctime: Timespec { sec: 5, nsec: 6 },
            btime: Timespec { sec: 7, nsec: 8 },
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
            link: Some(9),
            name: None,
            backing_size: 10,
            backing_mtime: Timespec { sec: 11, nsec: 12 },
            nlink: 3,
            parts: Some(Parts { id: 13, size: 4096 }),
        };
        assert_eq!(InodeMeta::from(meta.clone()).to_meta(), meta);
    }

    #[test]
    fn clearing_the_rare_fields_frees_their_box() {
        let mut m = InodeMeta::default();
        m.change_xattrs(|x| x.push((b"user.a".to_vec(), Vec::new())));
        m.set_nlink(2);
        assert!(m.rare.is_some());
        m.change_xattrs(Vec::clear);
        m.set_nlink(0);
        assert!(m.rare.is_none());
    }
}
