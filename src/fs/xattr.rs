//! Extended attributes, kept whole in the inode's metadata record (FAT has none). The kernel
//! has already applied the namespace rules (`trusted.*` for root only, `user.*` only on files
//! and directories) before a request reaches here.
//!
//! The `security.*` namespace is declined (EOPNOTSUPP), as on filesystems without it: a home
//! is mounted `nosuid`, so file capabilities (`security.capability`) would never take effect,
//! and LSMs label a FUSE mount as a whole, not from per-file `security.selinux` values. The
//! refusal also saves round trips: coreutils (`ls -l`, `cp -a`) remembers a filesystem that
//! answers ENOTSUP for `security.selinux` and stops asking for each file.

use super::{acl, now, Errno, Fs, Ino, Result};

/// Largest value the kernel lets through (XATTR_SIZE_MAX).
const MAX_VALUE: usize = 65536;
/// Bound on all names and values of one inode, so one file cannot bloat the store.
const MAX_TOTAL: usize = 256 * 1024;

/// What `getxattr`/`listxattr` answer: the size only (the caller asked with size 0) or the data.
#[derive(Debug, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

pub(crate) fn sized(data: Vec<u8>, size: u32) -> Result<XattrReply> {
    if size == 0 {
        Ok(XattrReply::Size(data.len() as u32))
    } else if data.len() > size as usize {
        Err(Errno::ERANGE)
    } else {
        Ok(XattrReply::Data(data))
    }
}

/// The namespace this filesystem does not support (see the module comment).
const DECLINED: &[u8] = b"security.";

fn declined(name: &[u8]) -> bool {
    name.starts_with(DECLINED)
}

impl Fs {
    pub fn getxattr(&self, ino: Ino, name: &[u8], size: u32) -> Result<XattrReply> {
        if declined(name) {
            return Err(Errno::EOPNOTSUPP);
        }
        let st = self.lock();
        let inode = st.inode(ino)?;
        let value = inode
            .meta
            .xattrs()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or(Errno::ENODATA)?;
        sized(value, size)
    }

    pub fn listxattr(&self, ino: Ino, size: u32) -> Result<XattrReply> {
        let st = self.lock();
        let inode = st.inode(ino)?;
        let mut list = Vec::new();
        // A store written before the namespace was declined may still hold such names.
        for (n, _) in inode.meta.xattrs().iter().filter(|(n, _)| !declined(n)) {
            list.extend_from_slice(n);
            list.push(0);
        }
        sized(list, size)
    }

    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if declined(name) {
            return Err(Errno::EOPNOTSUPP);
        }
        self.check_writable()?;
        if name.is_empty() || name.len() > 255 {
            return Err(Errno::ERANGE);
        }
        if value.len() > MAX_VALUE {
            return Err(Errno::E2BIG);
        }
        let mut st = self.lock();
        let inode = st.inode_mut(ino)?;
        if name == acl::ACCESS || name == acl::DEFAULT {
            let entries = acl::parse(value).ok_or(Errno::EINVAL)?;
            if name == acl::DEFAULT && inode.kind != super::Kind::Dir {
                return Err(Errno::EACCES);
            }
            if name == acl::ACCESS {
                // The mode bits and the access ACL are one thing seen twice: keep them in
                // step, and store no ACL that says no more than the mode (as ext4 does).
                inode.meta.mode = (inode.meta.mode & !0o777) | acl::mode_bits(&entries);
                if acl::is_minimal(&entries) {
                    inode
                        .meta
                        .change_xattrs(|x| x.retain(|(n, _)| n != acl::ACCESS));
                    inode.meta.ctime = now();
                    st.mark_dirty(ino);
                    return Ok(());
                }
            }
        }
        let xattrs = inode.meta.xattrs();
        let pos = xattrs.binary_search_by(|(n, _)| n.as_slice().cmp(name));
        match (pos, flags) {
            (Ok(_), f) if f & libc::XATTR_CREATE != 0 => return Err(Errno::EEXIST),
            (Err(_), f) if f & libc::XATTR_REPLACE != 0 => return Err(Errno::ENODATA),
            _ => {}
        }
        let total: usize = xattrs.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
            - pos.map_or(0, |i| xattrs[i].0.len() + xattrs[i].1.len())
            + name.len()
            + value.len();
        if total > MAX_TOTAL {
            return Err(Errno::ENOSPC);
        }
        inode.meta.change_xattrs(|xattrs| match pos {
            Ok(i) => xattrs[i].1 = value.to_vec(),
            Err(i) => xattrs.insert(i, (name.to_vec(), value.to_vec())),
        });
        inode.meta.ctime = now();
        st.mark_dirty(ino);
        Ok(())
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        if declined(name) {
            return Err(Errno::EOPNOTSUPP);
        }
        self.check_writable()?;
        let mut st = self.lock();
        let inode = st.inode_mut(ino)?;
        let pos = inode
            .meta
            .xattrs()
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .map_err(|_| Errno::ENODATA)?;
        inode.meta.change_xattrs(|x| x.remove(pos));
        inode.meta.ctime = now();
        st.mark_dirty(ino);
        Ok(())
    }
}
