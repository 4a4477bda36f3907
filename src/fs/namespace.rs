//! Operations on names: lookup, create, mkdir, mknod, symlink, link, unlink, rmdir, rename,
//! readdir. Each picks or finds the backing name, changes the backing, then the in-memory tree,
//! and queues what the store must learn.

use std::fs::File;
use std::os::fd::AsFd;

use super::acl;
use super::{
    errno_of, leaf, now, Attr, Ctx, Dentry, DirEntry, DirHandle, DirState, Errno, Fs, Ino, Inode,
    InodeExtra, Kind, Result, State, ROOT,
};
use crate::fatrules::fold_key;
use crate::meta::moved::placeholder_body;
use crate::meta::{Meta, Record};
use crate::names::{self, Form, NameMode};

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > 255 {
        return Err(Errno::ENAMETOOLONG);
    }
    if !names::is_valid_posix_name(name) {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// What a new inode is made of.
pub(crate) struct NewNode<'a> {
    pub kind: Kind,
    pub perm: u32,
    pub rdev: u64,
    pub symlink: Option<&'a [u8]>,
}

impl Fs {
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let mut st = self.lock_loaded(&[parent]);
        self.ensure_loaded(&mut st, parent)?;
        let ino = st
            .inode(parent)?
            .children()
            .and_then(|c| c.entries.ino(name))
            .ok_or(Errno::ENOENT)?;
        let inode = st.inode_mut(ino)?;
        inode.lookups += 1;
        Ok(inode.attr(ino))
    }

    /// What a directory with no free name left answers.
    fn no_free_name(&self) -> Errno {
        match self.names {
            NameMode::Long => Errno::EEXIST,
            // Every candidate taken: the directory is as full as an 8.3 directory gets.
            NameMode::Short83 => Errno::ENOSPC,
        }
    }

    /// The backing names for a new POSIX name in a loaded directory, free as far as its
    /// listing shows, best first. `ignore` is a name taken by the entry being renamed.
    ///
    /// Long names: the name itself when FAT takes it, else its escaped form; when that clashes
    /// case-insensitively with another name on the stick, the case-escaped form; as a last
    /// resort the hashed form. 8.3 names: `names::short_candidate` in order (`REPORT.TXT`,
    /// then `REPORT~1.TXT`, …); the commit keeps the POSIX name in the store whenever the
    /// short name does not decode to it. A name free here may still be taken on the stick:
    /// only `with_free_backing_name` claims one.
    fn backing_candidates<'a>(
        &'a self,
        st: &'a State,
        dir: Ino,
        name: &'a [u8],
        ignore: Option<&'a [u8]>,
    ) -> Result<Box<dyn Iterator<Item = Vec<u8>> + 'a>> {
        let children = st.inode(dir)?.children().ok_or(Errno::EIO)?;
        let ignore_fold = ignore.map(fold_key);
        let free = move |candidate: &Vec<u8>| {
            let fold = fold_key(candidate);
            !children.folds.contains(&fold) || ignore_fold.as_ref() == Some(&fold)
        };
        Ok(match self.names {
            NameMode::Long => Box::new(
                [Form::Natural, Form::CaseEscaped, Form::Hashed]
                    .into_iter()
                    .map(move |form| names::encode(name, form, dir == ROOT))
                    .filter(|c| c.len() <= names::MAX_BACKING_BYTES)
                    .filter(free),
            ),
            NameMode::Short83 => Box::new(
                (0..names::SHORT_ATTEMPTS)
                    .filter_map(move |attempt| names::short_candidate(name, attempt))
                    .filter(free),
            ),
        })
    }

    /// Makes a new entry for `name` in `dir` on the stick with `make`, which must create or
    /// rename onto its backing name without ever replacing anything (`O_EXCL`, `mkdir`,
    /// `Backing::rename_noreplace`); returns the backing name it took and what `make` gave.
    ///
    /// A name the listing shows free can still be taken: the kernel's vfat also finds a file
    /// by its 8.3 alias (`QUARTE~1.ODT` is "Quarterly Report.odt"), and another computer may
    /// have added a name since the listing. `EEXIST` from `make` therefore means "clash":
    /// the next candidate is tried, the clash is logged, and the user never sees it.
    pub(crate) fn with_free_backing_name<T>(
        &self,
        st: &State,
        dir: Ino,
        name: &[u8],
        ignore: Option<&[u8]>,
        mut make: impl FnMut(&[u8]) -> std::io::Result<T>,
    ) -> Result<(Vec<u8>, T)> {
        for candidate in self.backing_candidates(st, dir, name, ignore)? {
            match make(&candidate) {
                Ok(made) => return Ok((candidate, made)),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    let dir_path = st.backing_path(dir).unwrap_or_default();
                    tracing::info!(
                        "clash resolved: in {:?} the backing name {:?} for {:?} is taken on \
                         the stick though the folder's listing does not show it (on vfat, \
                         another file's 8.3 alias); trying the next name",
                        String::from_utf8_lossy(&crate::backing::join(
                            &dir_path.iter().map(Vec::as_slice).collect::<Vec<_>>()
                        )),
                        String::from_utf8_lossy(&candidate),
                        String::from_utf8_lossy(name),
                    );
                }
                Err(e) => return Err(errno_of(&e)),
            }
        }
        Err(self.no_free_name())
    }

    /// The POSIX name a record must keep for `name` at `backing_name`: `None` when decoding the
    /// backing name gives it back (most long names; 8.3 names that are their name upper-cased).
    pub(crate) fn name_to_store(
        &self,
        backing_name: &[u8],
        at_root: bool,
        name: &[u8],
    ) -> Option<Vec<u8>> {
        match names::decode_in(self.names, backing_name, at_root) {
            names::Decoded::Name(n) if n == name => None,
            _ => Some(name.to_vec()),
        }
    }

    /// Creates a node of any kind; returns its attributes and, for regular files, the open
    /// backing file.
    pub(crate) fn create_node(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        node: NewNode<'_>,
        open_flags: Option<i32>,
    ) -> Result<(Attr, Option<File>)> {
        self.check_writable()?;
        check_name(name)?;
        let mut st = self.lock_loaded(&[parent]);
        self.ensure_loaded(&mut st, parent)?;
        let pinode = st.inode(parent)?;
        let children = pinode.children().ok_or(Errno::ENOTDIR)?;
        if pinode.parent == 0 && parent != ROOT {
            return Err(Errno::ENOENT);
        }
        if children.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let parent_setgid = pinode.meta.mode & libc::S_ISGID != 0;
        let parent_gid = pinode.meta.gid;
        let parent_default_acl = pinode
            .meta
            .xattrs()
            .iter()
            .find(|(n, _)| n == acl::DEFAULT)
            .and_then(|(_, v)| acl::parse(v));
        let dirfd = self.open_dir_of(&st, parent)?;
        let dirfd = dirfd.as_fd();
        // A directory's size means nothing portable (FAT and exFAT report their cluster
        // allocation); show what ext4 shows for a small directory, the same at every mount.
        let size = match node.kind {
            Kind::Dir => 4096,
            Kind::Symlink => node.symlink.unwrap_or_default().len() as u64,
            _ => 0,
        };
        // Every way below fails with EEXIST on a name that answers (an 8.3 alias included):
        // mkdir, O_EXCL, and a rename that never replaces.
        let (backing_name, file) =
            self.with_free_backing_name(&st, parent, name, None, |candidate| match node.kind {
                Kind::Dir => self.backing.mkdir_at(dirfd, candidate).map(|()| None),
                Kind::File => {
                    let flags = open_flags.map_or(libc::O_RDWR, backing_open_flags);
                    self.backing
                        .open_at(
                            dirfd,
                            candidate,
                            flags | libc::O_CREAT | libc::O_EXCL,
                            0o600,
                        )
                        .map(Some)
                }
                Kind::Symlink => self
                    .write_whole_new_file(
                        dirfd,
                        candidate,
                        &super::reconcile::symlink_body(node.symlink.unwrap_or_default()),
                    )
                    .map(|()| None),
                _ => self
                    .backing
                    .write_new_file(dirfd, candidate, &[])
                    .map(|()| None),
            })?;
        let t = now();
        let mut xattrs = Vec::new();
        let perm = match (&parent_default_acl, node.kind) {
            (_, Kind::Symlink) => 0o777,
            // A default ACL on the parent takes the place of the umask (POSIX.1e, as ext4).
            (Some(default), _) => {
                let (access, bits) = acl::create_masq(default, node.perm & 0o7777);
                if node.kind == Kind::Dir {
                    xattrs.push((acl::DEFAULT.to_vec(), acl::serialize(default)));
                }
                if !acl::is_minimal(&access) {
                    xattrs.push((acl::ACCESS.to_vec(), acl::serialize(&access)));
                }
                bits
            }
            (None, _) => node.perm & 0o7777 & !(ctx.umask & 0o777),
        };
        xattrs.sort();
        let mut mode = node.kind.type_bits() | perm;
        let gid = if parent_setgid { parent_gid } else { ctx.gid };
        if parent_setgid && node.kind == Kind::Dir {
            mode |= libc::S_ISGID;
        }
        let meta = Meta {
            mode,
            uid: ctx.uid,
            gid,
            rdev: node.rdev,
            atime: t,
            mtime: t,
            ctime: t,
            btime: t,
            xattrs,
            ..Meta::default()
        };
        let ino = st.alloc_ino();
        let inode = Inode {
            kind: node.kind,
            meta: meta.into(),
            size,
            blocks: size.div_ceil(512),
            parent,
            name: name.into(),
            extra: InodeExtra::boxed(None, Vec::new(), node.symlink.map(|t| t.to_vec())),
            dir: (node.kind == Kind::Dir).then(|| Box::new(DirState::Loaded(Default::default()))),
            persisted: true,
            lookups: 1,
            opens: 0,
        };
        let mut inode = inode;
        if let Some(stat) = file
            .as_ref()
            .and_then(|f| crate::backing::Backing::fstat(f).ok())
        {
            inode.note_backing(&stat);
        }
        let attr = inode.attr(ino);
        st.inodes.insert(ino, Box::new(inode));
        st.add_entry(
            parent,
            name,
            Dentry {
                ino,
                backing: backing_name,
            },
            node.kind == Kind::Dir,
            t,
        )?;
        st.mark_dirty(ino);
        // Re-read the attributes: a new directory changes its parent's link count only.
        Ok((attr, file))
    }

    pub fn mkdir(&self, ctx: Ctx, parent: Ino, name: &[u8], mode: u32) -> Result<Attr> {
        let node = NewNode {
            kind: Kind::Dir,
            perm: mode,
            rdev: 0,
            symlink: None,
        };
        self.create_node(ctx, parent, name, node, None)
            .map(|(a, _)| a)
    }

    pub fn mknod(&self, ctx: Ctx, parent: Ino, name: &[u8], mode: u32, rdev: u64) -> Result<Attr> {
        let kind = Kind::from_mode(mode).unwrap_or(Kind::File);
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(Errno::EINVAL);
        }
        let rdev = if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
            rdev
        } else {
            0
        };
        let node = NewNode {
            kind,
            perm: mode,
            rdev,
            symlink: None,
        };
        self.create_node(ctx, parent, name, node, None)
            .map(|(a, _)| a)
    }

    pub fn symlink(&self, ctx: Ctx, parent: Ino, name: &[u8], target: &[u8]) -> Result<Attr> {
        if target.is_empty() || target.contains(&0) {
            return Err(Errno::ENOENT);
        }
        if target.len() > 4095 {
            return Err(Errno::ENAMETOOLONG);
        }
        let node = NewNode {
            kind: Kind::Symlink,
            perm: 0o777,
            rdev: 0,
            symlink: Some(target),
        };
        self.create_node(ctx, parent, name, node, None)
            .map(|(a, _)| a)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let st = self.lock();
        let inode = st.inode(ino)?;
        if inode.kind != Kind::Symlink {
            return Err(Errno::EINVAL);
        }
        inode.symlink().map(<[u8]>::to_vec).ok_or(Errno::EIO)
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.remove_name(parent, name, false)
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.remove_name(parent, name, true)
    }

    fn remove_name(&self, parent: Ino, name: &[u8], want_dir: bool) -> Result<()> {
        self.check_writable()?;
        let mut st = self.lock_loaded(&[parent]);
        self.ensure_loaded(&mut st, parent)?;
        if want_dir {
            st = self.relock_with_entry_loaded(st, &[parent], parent, name);
            self.ensure_loaded(&mut st, parent)?;
        }
        let dentry = st
            .inode(parent)?
            .children()
            .and_then(|c| c.entries.get(name))
            .ok_or(Errno::ENOENT)?;
        let kind = st.inode(dentry.ino)?.kind;
        match (want_dir, kind == Kind::Dir) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) => {
                self.ensure_loaded(&mut st, dentry.ino)?;
                let empty = st
                    .inode(dentry.ino)?
                    .children()
                    .is_some_and(|c| c.entries.is_empty());
                if !empty {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            _ => {}
        }
        let dirfd = self.open_dir_of(&st, parent)?;
        self.backing
            .unlink_at(dirfd.as_fd(), &dentry.backing, want_dir)
            .map_err(|e| errno_of(&e))?;
        let mut path = st.backing_path(parent)?;
        path.push(dentry.backing.clone());
        st.pending.push(Record::Remove { path });
        if want_dir {
            self.forget_dir_fd(dentry.ino);
        }
        self.detach_name(&mut st, parent, name, &dentry)?;
        Ok(())
    }

    /// Takes a name out of a loaded directory (the backing entry is already gone or replaced)
    /// and drops the inode's link to it.
    fn detach_name(&self, st: &mut State, parent: Ino, name: &[u8], dentry: &Dentry) -> Result<()> {
        let t = now();
        let ino = dentry.ino;
        let is_dir = st.inode(ino)?.kind == Kind::Dir;
        st.remove_entry(parent, name, &dentry.backing, is_dir, t)?;
        let inode = st.inode_mut(ino)?;
        inode.meta.ctime = t;
        match inode.link_id() {
            Some(id) => {
                inode.meta.set_nlink(inode.meta.nlink().saturating_sub(1));
                inode
                    .extra_mut()
                    .dentries
                    .retain(|(p, n)| !(*p == parent && n == name));
                let nlink = inode.meta.nlink();
                let opens = inode.opens;
                let parts = inode.meta.parts();
                st.mark_dirty(ino);
                if nlink == 0 {
                    if opens == 0 {
                        self.remove_link_content(id);
                        if let Some(p) = parts {
                            self.remove_all_parts(p);
                        }
                    }
                    st.pending.push(Record::RemoveInode { id });
                } else if nlink == 1 {
                    self.undo_link(st, ino)?;
                }
            }
            None => {
                inode.parent = 0;
                // The first part is gone from the backing already; the other parts follow
                // (at the last close if the file is still open). A crash in between leaves
                // orphan parts, which fsck finds: never a name missing its parts.
                if let (Some(p), 0) = (inode.meta.parts(), inode.opens) {
                    self.remove_all_parts(p);
                }
                st.dirty.remove(&ino);
            }
        }
        st.maybe_drop(ino);
        Ok(())
    }

    pub(crate) fn remove_link_content(&self, id: u64) {
        if let Ok(fd) = self.backing.open_dir(&self.paths.inodes) {
            let Ok(name) = self.link_file_in(fd.as_fd(), id) else {
                return;
            };
            if let Err(e) = self.backing.unlink_at(fd.as_fd(), &name, false) {
                tracing::warn!("removing the content of hard link {id}: {e}");
            }
        }
    }

    /// A hard-linked file is down to one name that pershome knows: move its content back to
    /// that name, so the stick shows an ordinary file again.
    fn undo_link(&self, st: &mut State, ino: Ino) -> Result<()> {
        let inode = st.inode(ino)?;
        let (Some(id), [(parent, name)]) = (inode.link_id(), inode.dentries()) else {
            return Ok(());
        };
        let (parent, name) = (*parent, name.clone());
        let Some(dentry) = st
            .inode(parent)?
            .children()
            .and_then(|c| c.entries.get(&name))
        else {
            return Ok(());
        };
        let store_dir = self.backing.open_dir(&self.paths.inodes);
        let dirfd = self.open_dir_of(st, parent);
        let (Ok(store_dir), Ok(dirfd)) = (store_dir, dirfd) else {
            return Ok(());
        };
        let content = self.link_file_in(store_dir.as_fd(), id)?;
        if let Err(e) = self.backing.rename_at(
            store_dir.as_fd(),
            &content,
            dirfd.as_fd(),
            &dentry.backing,
            0,
        ) {
            // Leaving it as a one-name link is correct, only less tidy on the stick.
            tracing::warn!("moving hard link content back: {e}");
            return Ok(());
        }
        st.pending.push(Record::RemoveInode { id });
        st.links.remove(&id);
        let inode = st.inode_mut(ino)?;
        let extra = inode.extra_mut();
        extra.link_id = None;
        extra.dentries = Vec::new();
        if extra.symlink.is_none() {
            inode.extra = None;
        }
        inode.parent = parent;
        inode.name = name.into();
        inode.meta.set_nlink(0);
        st.mark_dirty(ino);
        Ok(())
    }

    pub fn link(&self, ino: Ino, newparent: Ino, newname: &[u8]) -> Result<Attr> {
        self.check_writable()?;
        check_name(newname)?;
        let mut st = self.lock_loaded(&[newparent]);
        self.ensure_loaded(&mut st, newparent)?;
        let inode = st.inode(ino)?;
        if inode.kind == Kind::Dir {
            return Err(Errno::EPERM);
        }
        if inode.link_id().is_none() && inode.parent == 0 {
            return Err(Errno::ENOENT);
        }
        if inode.link_id().is_some() && inode.meta.nlink() == 0 {
            return Err(Errno::ENOENT);
        }
        if inode.meta.nlink() >= 65000 {
            return Err(Errno::EMLINK);
        }
        if st
            .inode(newparent)?
            .children()
            .ok_or(Errno::ENOTDIR)?
            .entries
            .contains_key(newname)
        {
            return Err(Errno::EEXIST);
        }
        let newdir = self.open_dir_of(&st, newparent)?;
        let linked = st.inode(ino)?.link_id();
        // A name that answers on the stick (an 8.3 alias) is a clash: the next candidate is
        // taken. A file already hard-linked only gets a placeholder, made O_EXCL. A file
        // linked for the first time must have its records committed before its content
        // moves and the placeholders appear (a crash in between must leave the content under
        // the old name, see `start_link`), so its new name is probed first, by a lookup (which
        // on vfat finds an alias); the placeholder made later is still O_EXCL.
        let (new_backing, ()) =
            self.with_free_backing_name(&st, newparent, newname, None, |candidate| {
                if let Some(id) = linked {
                    return self.backing.write_new_file(
                        newdir.as_fd(),
                        candidate,
                        &placeholder_body(id),
                    );
                }
                match self.backing.stat_at(newdir.as_fd(), candidate) {
                    Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EEXIST)),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                    Err(e) => Err(e),
                }
            })?;
        let mut new_path = st.backing_path(newparent)?;
        new_path.push(new_backing.clone());
        let t = now();
        let id = match linked {
            Some(id) => id,
            None => self.start_link(
                &mut st,
                ino,
                &new_path,
                newname,
                &new_backing,
                newdir.as_fd(),
            )?,
        };
        let stored_name = self.name_to_store(&new_backing, newparent == ROOT, newname);
        st.pending.push(Record::Put {
            path: new_path,
            meta: link_name_meta(id, stored_name),
        });
        let inode = st.inode_mut(ino)?;
        inode.meta.set_nlink(inode.meta.nlink() + 1);
        inode.meta.ctime = t;
        inode
            .extra_mut()
            .dentries
            .push((newparent, newname.to_vec()));
        inode.lookups += 1;
        let attr = inode.attr(ino);
        st.mark_dirty(ino);
        st.add_entry(
            newparent,
            newname,
            Dentry {
                ino,
                backing: new_backing,
            },
            false,
            t,
        )?;
        Ok(attr)
    }

    /// Turns a one-name file into a hard-linked one: the records go to the stick first, then
    /// the content moves into the store's inode directory and both names become placeholders.
    /// A crash between the steps leaves a name that still holds the content, which the next
    /// mount reads as an ordinary file (see reconcile).
    fn start_link(
        &self,
        st: &mut State,
        ino: Ino,
        new_path: &[Vec<u8>],
        newname: &[u8],
        new_backing: &[u8],
        newdir: std::os::fd::BorrowedFd<'_>,
    ) -> Result<u64> {
        let id = st.next_link_id;
        // Refused before anything is recorded when the id has no name in this layout.
        let content = self.link_file_name(id)?;
        st.next_link_id += 1;
        let old_path = st.backing_path(ino)?;
        let (old_parent, old_name) = {
            let i = st.inode(ino)?;
            (i.parent, i.name.clone())
        };
        let old_backing = old_path.last().cloned().ok_or(Errno::EIO)?;
        let mut link_meta = st.inode(ino)?.meta.to_meta();
        link_meta.nlink = 2;
        let old_stored = self.name_to_store(&old_backing, old_path.len() == 1, &old_name);
        st.pending.push(Record::Put {
            path: old_path.clone(),
            meta: link_name_meta(id, old_stored),
        });
        let new_stored = self.name_to_store(new_backing, new_path.len() == 1, newname);
        st.pending.push(Record::Put {
            path: new_path.to_vec(),
            meta: link_name_meta(id, new_stored),
        });
        st.pending.push(Record::PutInode {
            id,
            meta: self.stored_meta(&link_meta),
        });
        // The inode's own pending metadata is in the PutInode above; a plain Put of it in this
        // commit would come after the link records and undo them.
        st.dirty.remove(&ino);
        st.lazy_dirty.remove(&ino);
        self.commit_locked(st)?;
        let inodes_dir = self
            .store_subdir(&self.paths.inodes)
            .map_err(|e| errno_of(&e))?;
        let old_dir = self.open_dir_of(st, old_parent)?;
        self.backing
            .rename_at(
                old_dir.as_fd(),
                &old_backing,
                inodes_dir.as_fd(),
                &content,
                0,
            )
            .map_err(|e| errno_of(&e))?;
        // The old name was the content's own a moment ago: no alias can take it.
        self.backing
            .write_new_file(old_dir.as_fd(), &old_backing, &placeholder_body(id))
            .map_err(|e| errno_of(&e))?;
        let placed = self
            .backing
            .write_new_file(newdir, new_backing, &placeholder_body(id));
        match &placed {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(errno_of(e)),
            _ => {}
        }
        st.links.insert(id, ino);
        let inode = st.inode_mut(ino)?;
        let extra = inode.extra_mut();
        extra.link_id = Some(id);
        extra.dentries = vec![(old_parent, old_name.to_vec())];
        inode.meta.set_nlink(1); // link() adds the new name
        inode.parent = 0;
        if placed.is_err() {
            // The new name was free when `link` looked it up and is taken now (another
            // computer writing the stick this very moment). The content is in the store and
            // the old name a placeholder, as recorded: the file reads as before, with one
            // name; the new name's record goes.
            st.pending.push(Record::Remove {
                path: new_path.to_vec(),
            });
            st.mark_dirty(ino);
            return Err(Errno::EEXIST);
        }
        Ok(id)
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.check_writable()?;
        check_name(newname)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0 || (exchange && noreplace)
        {
            return Err(Errno::EINVAL);
        }
        let mut st = self.lock_loaded(&[parent, newparent]);
        self.ensure_loaded(&mut st, parent)?;
        self.ensure_loaded(&mut st, newparent)?;
        st = self.relock_with_entry_loaded(st, &[parent, newparent], newparent, newname);
        self.ensure_loaded(&mut st, parent)?;
        self.ensure_loaded(&mut st, newparent)?;
        let src = st
            .inode(parent)?
            .children()
            .and_then(|c| c.entries.get(name))
            .ok_or(Errno::ENOENT)?;
        let dst = st
            .inode(newparent)?
            .children()
            .and_then(|c| c.entries.get(newname));
        let src_kind = st.inode(src.ino)?.kind;
        // Moving a directory below itself.
        if src_kind == Kind::Dir {
            let mut cur = newparent;
            while cur != ROOT && cur != 0 {
                if cur == src.ino {
                    return Err(Errno::EINVAL);
                }
                cur = st.inode(cur)?.parent;
            }
            if newparent == src.ino {
                return Err(Errno::EINVAL);
            }
        }
        if exchange {
            let dst = dst.ok_or(Errno::ENOENT)?;
            return self.exchange(&mut st, parent, name, &src, newparent, newname, &dst);
        }
        if let Some(dst) = &dst {
            if noreplace {
                return Err(Errno::EEXIST);
            }
            if dst.ino == src.ino {
                return Ok(());
            }
            let dst_kind = st.inode(dst.ino)?.kind;
            match (src_kind == Kind::Dir, dst_kind == Kind::Dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) => {
                    self.ensure_loaded(&mut st, dst.ino)?;
                    if st
                        .inode(dst.ino)?
                        .children()
                        .is_some_and(|c| !c.entries.is_empty())
                    {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
                _ => {}
            }
        }
        let from_dir = self.open_dir_of(&st, parent)?;
        let to_dir = self.open_dir_of(&st, newparent)?;
        let new_backing = match &dst {
            // Replacing a name pershome knows is what was asked for.
            Some(d) => {
                if !(parent == newparent && src.backing == d.backing) {
                    self.backing
                        .rename_at(
                            from_dir.as_fd(),
                            &src.backing,
                            to_dir.as_fd(),
                            &d.backing,
                            0,
                        )
                        .map_err(|e| errno_of(&e))?;
                }
                d.backing.clone()
            }
            None => {
                let ignore = (parent == newparent).then_some(src.backing.as_slice());
                let own_fold = fold_key(&src.backing);
                let (name, ()) =
                    self.with_free_backing_name(&st, newparent, newname, ignore, |candidate| {
                        if parent == newparent && candidate == src.backing.as_slice() {
                            Ok(())
                        } else if parent == newparent && fold_key(candidate) == own_fold {
                            // A change of case only: the name that answers is the entry
                            // itself, which a rename that never replaces would refuse.
                            self.backing.rename_at(
                                from_dir.as_fd(),
                                &src.backing,
                                to_dir.as_fd(),
                                candidate,
                                0,
                            )
                        } else {
                            self.backing.rename_noreplace(
                                from_dir.as_fd(),
                                &src.backing,
                                to_dir.as_fd(),
                                candidate,
                            )
                        }
                    })?;
                name
            }
        };
        let mut from = st.backing_path(parent)?;
        from.push(src.backing.clone());
        let mut to = st.backing_path(newparent)?;
        to.push(new_backing.clone());
        if let Some(dst) = &dst {
            self.forget_dir_fd(dst.ino);
            // The replaced name is gone; its inode loses a link (the Rename record below
            // replaces its record on the stick).
            self.detach_name(&mut st, newparent, newname, dst)?;
        }
        st.pending.push(Record::Rename {
            from,
            to: to.clone(),
        });
        // A hard-linked name's record is not rewritten by the inode's own commit (that is its
        // PutInode): state its new POSIX name here, or the record keeps the old one.
        if let Some(id) = st.inode(src.ino)?.link_id() {
            let stored_name = self.name_to_store(&new_backing, newparent == ROOT, newname);
            st.pending.push(Record::Put {
                path: to,
                meta: link_name_meta(id, stored_name),
            });
        }
        let t = now();
        let is_dir = src_kind == Kind::Dir;
        st.remove_entry(parent, name, &src.backing, is_dir, t)?;
        let moved = Dentry {
            ino: src.ino,
            backing: new_backing,
        };
        st.add_entry(newparent, newname, moved, is_dir, t)?;
        let inode = st.inode_mut(src.ino)?;
        inode.meta.ctime = t;
        inode.move_name((parent, name), (newparent, newname));
        st.mark_dirty(src.ino);
        st.mark_dirty(parent);
        st.mark_dirty(newparent);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        st: &mut State,
        parent: Ino,
        name: &[u8],
        src: &Dentry,
        newparent: Ino,
        newname: &[u8],
        dst: &Dentry,
    ) -> Result<()> {
        if src.ino == dst.ino {
            return Ok(());
        }
        // Exchanging a directory with something inside it.
        for (a, b) in [(src.ino, newparent), (dst.ino, parent)] {
            let mut cur = b;
            while cur != 0 {
                if cur == a {
                    return Err(Errno::EINVAL);
                }
                if cur == ROOT {
                    break;
                }
                cur = st.inode(cur)?.parent;
            }
        }
        let a_dir = self.open_dir_of(st, parent)?;
        let b_dir = self.open_dir_of(st, newparent)?;
        let swapped = self.backing.rename_at(
            a_dir.as_fd(),
            &src.backing,
            b_dir.as_fd(),
            &dst.backing,
            libc::RENAME_EXCHANGE,
        );
        if let Err(e) = swapped {
            match e.raw_os_error() {
                // FAT drivers and FUSE backings without RENAME_EXCHANGE: three renames through
                // a temporary name in the store, undone if a step fails.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => self
                    .exchange_by_steps(a_dir.as_fd(), &src.backing, b_dir.as_fd(), &dst.backing)?,
                _ => return Err(errno_of(&e)),
            }
        }
        let mut a = st.backing_path(parent)?;
        a.push(src.backing.clone());
        let mut b = st.backing_path(newparent)?;
        b.push(dst.backing.clone());
        st.pending.push(Record::Exchange {
            a: a.clone(),
            b: b.clone(),
        });
        // As in rename: hard-linked names state their new POSIX names.
        for (ino, path, new_name, dir) in
            [(src.ino, b, newname, newparent), (dst.ino, a, name, parent)]
        {
            if let Some(id) = st.inode(ino)?.link_id() {
                let backing_name = path.last().cloned().unwrap_or_default();
                let stored_name = self.name_to_store(&backing_name, dir == ROOT, new_name);
                st.pending.push(Record::Put {
                    path,
                    meta: link_name_meta(id, stored_name),
                });
            }
        }
        let t = now();
        let a_is_dir = st.inode(src.ino)?.kind == Kind::Dir;
        let b_is_dir = st.inode(dst.ino)?.kind == Kind::Dir;
        for (dir, nm, ino, delta_in, delta_out) in [
            (parent, name, dst.ino, b_is_dir, a_is_dir),
            (newparent, newname, src.ino, a_is_dir, b_is_dir),
        ] {
            let pinode = st.inode_mut(dir)?;
            pinode.meta.mtime = t;
            pinode.meta.ctime = t;
            let c = pinode.children_mut().ok_or(Errno::EIO)?;
            c.entries.set_ino(nm, ino);
            if parent != newparent {
                c.subdirs = (c.subdirs + u32::from(delta_in)).saturating_sub(u32::from(delta_out));
            }
        }
        for (ino, (from_dir, from_name), (to_dir, to_name)) in [
            (src.ino, (parent, name), (newparent, newname)),
            (dst.ino, (newparent, newname), (parent, name)),
        ] {
            let inode = st.inode_mut(ino)?;
            inode.meta.ctime = t;
            inode.move_name((from_dir, from_name), (to_dir, to_name));
            st.mark_dirty(ino);
        }
        st.mark_dirty(parent);
        st.mark_dirty(newparent);
        Ok(())
    }

    fn exchange_by_steps(
        &self,
        a_dir: std::os::fd::BorrowedFd<'_>,
        a: &[u8],
        b_dir: std::os::fd::BorrowedFd<'_>,
        b: &[u8],
    ) -> Result<()> {
        let store = self
            .backing
            .open_dir(&self.paths.store)
            .map_err(|e| errno_of(&e))?;
        let tmp = self.layout.exchange_tmp().as_bytes();
        let err = |e: std::io::Error| errno_of(&e);
        self.backing
            .rename_at(a_dir, a, store.as_fd(), tmp, 0)
            .map_err(err)?;
        if let Err(e) = self.backing.rename_at(b_dir, b, a_dir, a, 0) {
            let _ = self.backing.rename_at(store.as_fd(), tmp, a_dir, a, 0);
            return Err(errno_of(&e));
        }
        if let Err(e) = self.backing.rename_at(store.as_fd(), tmp, b_dir, b, 0) {
            let _ = self.backing.rename_at(a_dir, a, b_dir, b, 0);
            let _ = self.backing.rename_at(store.as_fd(), tmp, a_dir, a, 0);
            return Err(errno_of(&e));
        }
        Ok(())
    }

    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        let mut st = self.lock_loaded(&[ino]);
        self.ensure_loaded(&mut st, ino)?;
        let inode = st.inode(ino)?;
        let parent = if ino == ROOT {
            ROOT
        } else {
            inode.parent.max(ROOT)
        };
        let mut entries = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: parent,
                kind: Kind::Dir,
                name: b"..".to_vec(),
            },
        ];
        let children = inode.children().ok_or(Errno::ENOTDIR)?;
        for (name, d) in children.entries.iter() {
            let kind = st.inode(d.ino).map(|i| i.kind).unwrap_or(Kind::File);
            entries.push(DirEntry {
                ino: d.ino,
                kind,
                name: name.to_vec(),
            });
        }
        let fh = st.alloc_fh();
        st.dir_handles.insert(fh, DirHandle { entries });
        Ok(fh)
    }

    /// Entries of an open directory from `offset` on; the offset of entry i is i + 1.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<(u64, DirEntry)>> {
        let st = self.lock();
        let handle = st.dir_handles.get(&fh).ok_or(Errno::EBADF)?;
        Ok(handle
            .entries
            .iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
            .collect())
    }

    /// The adapter tells how many readdirplus entries the kernel took, so lookups stay exact.
    pub fn count_lookups(&self, inos: &[Ino]) {
        let mut st = self.lock();
        for ino in inos {
            if let Some(i) = st.inodes.get_mut(ino) {
                i.lookups += 1;
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.lock().dir_handles.remove(&fh);
    }

    /// A directory's entries after `offset`, at most `max`, for a kernel that opens
    /// directories without asking the daemon (the adapter declines OPENDIR, so there is no
    /// handle and no listing kept per open). Offsets must stay valid while the directory
    /// changes between two calls, so they name entries, not positions: `.` is 1, `..` is 2,
    /// and an entry's offset is [`entry_offset`] of its inode number and its rank among the
    /// names of that inode in this directory (hard links); entries come in offset order.
    /// An entry added or removed meanwhile is listed or not, as POSIX allows; every other
    /// entry is listed exactly once.
    pub fn list_dir(&self, ino: Ino, offset: u64, max: usize) -> Result<Vec<(u64, DirEntry)>> {
        let mut st = self.lock_loaded(&[ino]);
        self.ensure_loaded(&mut st, ino)?;
        let inode = st.inode(ino)?;
        let parent = if ino == ROOT {
            ROOT
        } else {
            inode.parent.max(ROOT)
        };
        let children = inode.children().ok_or(Errno::ENOTDIR)?;
        let mut out = Vec::new();
        for (off, name, child) in [(1, &b"."[..], ino), (2, &b".."[..], parent)] {
            if offset < off && out.len() < max {
                out.push((
                    off,
                    DirEntry {
                        ino: child,
                        kind: Kind::Dir,
                        name: name.to_vec(),
                    },
                ));
            }
        }
        // The kernel reads a big folder a few dozen entries at a time: each call picks the
        // next `max` offsets in linear time (names come in byte order, so a rank is the
        // number of earlier names of the same inode) and sorts only those.
        let mut ranks: std::collections::HashMap<Ino, u64> = std::collections::HashMap::new();
        let mut entries: Vec<(u64, Ino, &[u8])> = Vec::new();
        for (name, d) in children.entries.iter() {
            let rank = ranks.entry(d.ino).or_insert(0);
            let off = entry_offset(d.ino, *rank);
            *rank += 1;
            if off > offset {
                entries.push((off, d.ino, name));
            }
        }
        let room = max.saturating_sub(out.len());
        if entries.len() > room {
            if room == 0 {
                entries.clear();
            } else {
                entries.select_nth_unstable(room - 1);
                entries.truncate(room);
            }
        }
        entries.sort_unstable();
        for (off, child, name) in entries {
            let kind = st.inode(child).map(|i| i.kind).unwrap_or(Kind::File);
            out.push((
                off,
                DirEntry {
                    ino: child,
                    kind,
                    name: name.to_vec(),
                },
            ));
        }
        Ok(out)
    }

    /// `list_dir` with every entry's attributes (READDIRPLUS).
    pub fn list_dir_plus(
        &self,
        ino: Ino,
        offset: u64,
        max: usize,
    ) -> Result<Vec<(u64, DirEntry, Attr)>> {
        let entries = self.list_dir(ino, offset, max)?;
        let st = self.lock();
        let mut out = Vec::with_capacity(entries.len());
        for (off, e) in entries {
            // An entry removed since `list_dir` let go of the lock is left out.
            let Ok(inode) = st.inode(e.ino) else { continue };
            let attr = inode.attr(e.ino);
            out.push((off, e, attr));
        }
        Ok(out)
    }
}

/// The readdir offset of the `rank`-th name (in byte order) of inode `ino` in a directory:
/// above 2 (`.` and `..`), ordered by inode number, and below 2^63 (the kernel's `loff_t`)
/// for every inode number below 2^47 and up to 65,536 names of one inode in one folder
/// (more share the last offset; inode numbers are allocated from 2 upwards).
pub(crate) fn entry_offset(ino: Ino, rank: u64) -> u64 {
    (ino.min((1 << 47) - 1) << 16) | rank.min(0xffff)
}

/// The record of one name of a hard-linked file; `name` is the POSIX name when the backing
/// name does not decode to it (see `Fs::name_to_store`).
pub(crate) fn link_name_meta(id: u64, name: Option<Vec<u8>>) -> Meta {
    Meta {
        mode: libc::S_IFREG,
        link: Some(id),
        name,
        ..Meta::default()
    }
}

/// Flags for opening a backing file on behalf of an `open`: always readable, because the
/// kernel's writeback cache reads pages of files opened write-only; no `O_APPEND`, because
/// the kernel gives every write its offset.
pub(crate) fn backing_open_flags(flags: i32) -> i32 {
    let acc = flags & libc::O_ACCMODE;
    let mut out = if acc == libc::O_RDONLY {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    if flags & libc::O_TRUNC != 0 && acc != libc::O_RDONLY {
        out |= libc::O_TRUNC;
    }
    out
}

/// Staged files get names unique within this process; leftovers of earlier mounts are removed
/// at the next read-write mount (`Fs::clear_staging`), and the pid keeps them apart meanwhile.
static STAGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Fs {
    /// Creates `name` in `dirfd` holding exactly `content`, or nothing at all if the stick is
    /// pulled or the daemon dies half-way. A file created in place and then written would be
    /// seen, after such a crash, as an empty file under the new name: for a symlink (whose
    /// target is its content, `!<symlink>…`) that is a wrong file invented out of nothing. So
    /// the content is written to a file in `.pershome/staging/` and renamed into place; a
    /// rename to a free name is a single directory-entry change, on FAT as elsewhere. The
    /// staged file is synced before the rename, or a power cut could leave the rename and
    /// lose the content.
    pub(crate) fn write_whole_new_file(
        &self,
        dirfd: std::os::fd::BorrowedFd<'_>,
        name: &[u8],
        content: &[u8],
    ) -> std::io::Result<()> {
        if content.is_empty() {
            return self.backing.write_new_file(dirfd, name, content);
        }
        let staging = self.store_subdir(&self.paths.staging)?;
        let n = STAGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.layout.staged_file(std::process::id(), n).into_bytes();
        // Synced before the rename: a power cut after the rename reached the stick (the next
        // commit syncs the directory) must not find an empty file under the new name.
        let staged = self
            .backing
            .write_new_file_synced(staging.as_fd(), &tmp, content)
            .and_then(|()| {
                // Never over anything: `name` was only free as far as pershome could see.
                self.backing
                    .rename_noreplace(staging.as_fd(), &tmp, dirfd, name)
            });
        if staged.is_err() {
            // Best effort: on a pulled stick this fails too, and the next mount clears it.
            let _ = self.backing.unlink_at(staging.as_fd(), &tmp, false);
        }
        staged
    }

    /// Opens a directory of the store (`inodes/`, `staging/`, `parts/`: `path` is one of
    /// `self.paths`), creating it first if it is not there yet.
    pub(crate) fn store_subdir(&self, path: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
        let store = self.backing.open_dir(&self.paths.store)?;
        match self.backing.mkdir_at(store.as_fd(), leaf(path)) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
            _ => {}
        }
        self.backing.open_dir(path)
    }

    /// Removes what a crash left in `.pershome/staging/`: files whose rename into place never
    /// happened, so nothing refers to them. Called at a read-write mount, before any staging.
    pub(crate) fn clear_staging(&self) {
        let Ok(staging) = self.backing.open_dir(&self.paths.staging) else {
            return;
        };
        let Ok(entries) = self.backing.list(staging.as_fd()) else {
            return;
        };
        for e in entries {
            match self.backing.unlink_at(staging.as_fd(), &e.name, false) {
                Ok(()) => tracing::info!(
                    "removed {}/{}, left by an interrupted write",
                    String::from_utf8_lossy(&self.paths.staging),
                    crate::backing::display(&e.name).to_string_lossy()
                ),
                Err(err) => tracing::warn!(
                    "cannot remove {}/{}: {err}",
                    String::from_utf8_lossy(&self.paths.staging),
                    crate::backing::display(&e.name).to_string_lossy()
                ),
            }
        }
    }
}
