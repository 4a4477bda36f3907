//! Claims: which user a stick is the home of, in a form nobody can forge by writing a file on
//! the stick (docs/security.md, "Nobody gets someone else's stick as their home"; the bytes
//! are in docs/format.md, "The owner mark and claims").
//!
//! A claim is a line `claim1 <stick id> <mac>` in the stick's owner mark, below the owner's
//! name. The MAC is HMAC-SHA256, keyed by the site secret `/etc/pershome/claim.key` (root's,
//! mode 0600), over the user name and the stick's random id. Only root on a machine holding
//! the key can make one, so a claim is made only where root acts for the user: the login hook
//! (the one implicit claim: a `pershome/` that is still empty), `pershome-config claim` (an
//! administrator), and `pershome prepare`/`migrate` run as root for a named user.
//!
//! This module owns the key, the MAC, reading and writing claims, and the test for "still
//! empty". It never follows a symlink on the stick (every file is opened relative to a
//! directory descriptor with `O_NOFOLLOW`), reads at most [`MARK_MAX`] bytes of a mark, and
//! never decides what to mount (`session::stick` does).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use sha2::{Digest, Sha256};

use crate::meta::layout::StoreLayout;

/// The site secret, under the root (`/`).
pub const KEY_PATH: &str = "etc/pershome/claim.key";

/// The most of an owner mark that is read: a name and a few claims (one per site).
pub const MARK_MAX: u64 = 4096;

/// At most this many claims are kept in a mark (one per site the stick is used at).
const MAX_CLAIMS: usize = 16;

/// A file in a fresh store holds at most its 24-byte header: no record.
const HEADER_ONLY: u64 = 24;

const CLAIM_TAG: &str = "claim1";
const MAC_DOMAIN: &[u8] = b"pershome claim v1\0";

/// The site secret.
pub struct SiteKey(Vec<u8>);

impl std::fmt::Debug for SiteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SiteKey(..)")
    }
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let r = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), n - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("getrandom");
        }
        got += r as usize;
    }
    Ok(buf)
}

impl SiteKey {
    /// The key at `root/etc/pershome/claim.key`; `create` makes one (32 random bytes, root's,
    /// 0600) when there is none. A key that is not a regular file of root's, that group or
    /// others may read, or that is shorter than 16 bytes is refused: a key others can read
    /// lets them forge claims.
    pub fn load(root: &Path, create: bool) -> Result<SiteKey> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = root.join(KEY_PATH);
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)
        };
        let file = match open() {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let key = random_bytes(32)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                crate::atomic_file::replace(&path, &key, 0o600)
                    .with_context(|| format!("creating the site key {}", path.display()))?;
                tracing::info!("created the claim key {}", path.display());
                open().with_context(|| format!("opening {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "there is no claim key {} on this machine (`pershome-config claim-key` makes one)",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let meta = file.metadata()?;
        if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            bail!(
                "the claim key {} must be a file of root's that nobody else can read (owner \
                 uid {}, mode {:o}): chown root:root and chmod 600 it, then rotate it if others \
                 may have read it (docs/security.md)",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            );
        }
        let mut key = Vec::new();
        file.take(4096).read_to_end(&mut key)?;
        if key.len() < 16 {
            bail!(
                "the claim key {} is too short ({} bytes)",
                path.display(),
                key.len()
            );
        }
        Ok(SiteKey(key))
    }

    /// A key from bytes (tests).
    pub fn from_bytes(bytes: &[u8]) -> SiteKey {
        SiteKey(bytes.to_vec())
    }

    /// HMAC-SHA256 (RFC 2104) of `user` and `stick_id` under this key.
    pub fn mac(&self, user: &str, stick_id: &[u8]) -> [u8; 32] {
        let mut k = [0u8; 64];
        if self.0.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(&self.0));
        } else {
            k[..self.0.len()].copy_from_slice(&self.0);
        }
        let mut inner = Sha256::new();
        inner.update(k.map(|b| b ^ 0x36));
        inner.update(MAC_DOMAIN);
        inner.update((user.len() as u32).to_le_bytes());
        inner.update(user.as_bytes());
        inner.update(stick_id);
        let inner = inner.finalize();
        let mut outer = Sha256::new();
        outer.update(k.map(|b| b ^ 0x5c));
        outer.update(inner);
        outer.finalize().into()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A compare whose time does not depend on where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An owner mark as read from a stick.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mark {
    /// The owner's name (first line; control characters removed). Empty when unreadable.
    pub name: String,
    /// The claims: (stick id, mac).
    pub claims: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Mark {
    /// Parses the text of a mark. Lines that are not claims are ignored.
    pub fn parse(text: &str) -> Mark {
        let mut lines = text.lines();
        let name = lines
            .next()
            .unwrap_or("")
            .trim()
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        let claims = lines
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                match w.as_slice() {
                    [tag, id, mac] if *tag == CLAIM_TAG => Some((unhex(id)?, unhex(mac)?)),
                    _ => None,
                }
            })
            .take(MAX_CLAIMS)
            .collect();
        Mark { name, claims }
    }

    /// Whether a claim in this mark, made with `key`, names `user`.
    pub fn claimed_for(&self, key: &SiteKey, user: &str) -> bool {
        self.name == user
            && self
                .claims
                .iter()
                .any(|(id, mac)| same(&key.mac(user, id), mac))
    }

    fn text(&self) -> String {
        let mut t = format!("{}\n", self.name);
        for (id, mac) in &self.claims {
            t.push_str(&format!("{CLAIM_TAG} {} {}\n", hex(id), hex(mac)));
        }
        t
    }
}

/// What a backing (`pershome/`) holds, for choosing: its mark, and whether it is still
/// fresh (nothing in it but an empty store, as `pershome prepare` leaves it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Look {
    /// `None`: no mark. A mark that cannot be read is `Some` with an empty name.
    pub mark: Option<Mark>,
    pub fresh: bool,
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<OwnedFd> {
    let fd = openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The names in a directory (without `.` and `..`), listed through a descriptor of its own.
fn names_in(dir: BorrowedFd<'_>) -> Result<Vec<Vec<u8>>> {
    let mut listing = nix::dir::Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
        if out.len() > 100_000 {
            bail!("too many entries");
        }
    }
    Ok(out)
}

fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<nix::sys::stat::FileStat> {
    nix::sys::stat::fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

/// The store directory in `backing` (either layout, any letter case), if there is one.
fn store_in(backing: BorrowedFd<'_>) -> Result<Option<(Vec<u8>, StoreLayout)>> {
    let found = crate::meta::layout::detect(backing)?;
    let Some(layout) = found.layout() else {
        return Ok(None);
    };
    let name = match (layout, found.short) {
        (StoreLayout::Short83, Some(listed)) => listed,
        _ => layout.store_dir().as_bytes().to_vec(),
    };
    Ok(Some((name, layout)))
}

fn is_mark_name(layout: StoreLayout, name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(layout.owner_mark().as_bytes())
}

/// Whether the store directory holds no record: only header-only files, empty directories,
/// and the mark.
fn store_is_fresh(store: BorrowedFd<'_>, layout: StoreLayout) -> Result<bool> {
    for name in names_in(store)? {
        if is_mark_name(layout, &name) {
            continue;
        }
        let st = stat_at(store, &name)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG if (st.st_size as u64) <= HEADER_ONLY => {}
            libc::S_IFDIR => {
                let sub = open_dir_at(store, &name)?;
                if !names_in(sub.as_fd())?.is_empty() {
                    return Ok(false);
                }
            }
            _ => return Ok(false),
        }
    }
    Ok(true)
}

fn read_mark_in(store: BorrowedFd<'_>, layout: StoreLayout) -> Option<Mark> {
    let mark = layout.owner_mark();
    let open = |name: &str| {
        openat(
            Some(store.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
    };
    let opened = match open(mark) {
        // A `msdos` stick copied to a case-sensitive file system keeps its listing's case.
        Err(nix::errno::Errno::ENOENT) if layout == StoreLayout::Short83 => {
            open(&mark.to_ascii_lowercase())
        }
        other => other,
    };
    let fd = match opened {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return None,
        Err(_) => return Some(Mark::default()),
    };
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Some(Mark::default());
    }
    let mut buf = Vec::new();
    if file.take(MARK_MAX).read_to_end(&mut buf).is_err() {
        return Some(Mark::default());
    }
    Some(Mark::parse(&String::from_utf8_lossy(&buf)))
}

fn open_backing(backing: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(backing)
}

/// Looks at `backing` (a root-controlled path: the bound or mounted stick). Anything that
/// cannot be read counts as a mark naming nobody (refused, never guessed) and as not fresh.
pub fn look(backing: &Path) -> Look {
    let unreadable = Look {
        mark: Some(Mark::default()),
        fresh: false,
    };
    let Ok(dir) = open_backing(backing) else {
        return unreadable;
    };
    let store = match store_in(dir.as_fd()) {
        Ok(s) => s,
        Err(_) => return unreadable,
    };
    let mut others = false;
    let Ok(names) = names_in(dir.as_fd()) else {
        return unreadable;
    };
    for name in &names {
        let is_store = store
            .as_ref()
            .is_some_and(|(s, _)| s.eq_ignore_ascii_case(name));
        if !is_store {
            others = true;
        }
    }
    let Some((store_name, layout)) = store else {
        return Look {
            mark: None,
            fresh: !others,
        };
    };
    let store_fd = match open_dir_at(dir.as_fd(), &store_name) {
        Ok(fd) => fd,
        Err(_) => return unreadable,
    };
    let mark = read_mark_in(store_fd.as_fd(), layout);
    let fresh = !others && store_is_fresh(store_fd.as_fd(), layout).unwrap_or(false);
    Look { mark, fresh }
}

/// Writes a claim of `backing` for `user` with `key`: the mark names `user` and holds a new
/// claim (claims of other sites for the same name are kept; a mark naming somebody else is
/// replaced). The store directory is created (long layout) when there is none. The mark is
/// written under a new name, synced, and renamed over the old one.
pub fn write_claim(backing: &Path, user: &str, key: &SiteKey) -> Result<()> {
    let dir = open_backing(backing).with_context(|| format!("opening {}", backing.display()))?;
    let (store_name, layout) = match store_in(dir.as_fd())? {
        Some(found) => found,
        None => {
            let layout = StoreLayout::Long;
            nix::sys::stat::mkdirat(
                Some(dir.as_raw_fd()),
                layout.store_dir(),
                Mode::from_bits_truncate(0o700),
            )
            .with_context(|| format!("creating the store of {}", backing.display()))?;
            (layout.store_dir().as_bytes().to_vec(), layout)
        }
    };
    let store = open_dir_at(dir.as_fd(), &store_name)
        .with_context(|| format!("opening the store of {}", backing.display()))?;
    let old = read_mark_in(store.as_fd(), layout).filter(|m| m.name == user);
    let mut mark = old.unwrap_or_default();
    mark.name = user.to_owned();
    // The stick's id: kept from an earlier claim, else new.
    let id = match mark.claims.first() {
        Some((id, _)) if id.len() == 16 => id.clone(),
        _ => random_bytes(16)?,
    };
    let mac = key.mac(user, &id);
    mark.claims.retain(|(_, m)| !same(m, &mac));
    mark.claims.insert(0, (id, mac.to_vec()));
    mark.claims.truncate(MAX_CLAIMS);
    let tmp = match layout {
        StoreLayout::Long => "owner-name.new",
        StoreLayout::Short83 => "OWNER.NEW",
    };
    let _ = nix::unistd::unlinkat(
        Some(store.as_raw_fd()),
        tmp,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    let fd = openat(
        Some(store.as_raw_fd()),
        tmp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .context("creating the new owner mark")?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(mark.text().as_bytes())
        .and_then(|()| file.sync_all())
        .context("writing the owner mark")?;
    nix::fcntl::renameat(
        Some(store.as_raw_fd()),
        tmp,
        Some(store.as_raw_fd()),
        layout.owner_mark(),
    )
    .context("renaming the owner mark into place")?;
    nix::unistd::fsync(store.as_raw_fd()).context("syncing the store directory")?;
    tracing::info!("claimed {} as the home of {user}", backing.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2: the MAC is HMAC-SHA256 (checked against the published vector by
    /// feeding the same bytes through the inner function).
    #[test]
    fn hmac_matches_rfc_4231() {
        // With the domain, length and fields the message differs from the RFC's, so check
        // the construction on the RFC's own vector through a key and message split.
        let key = SiteKey::from_bytes(b"Jefe");
        let mut k = [0u8; 64];
        k[..4].copy_from_slice(b"Jefe");
        let msg = b"what do ya want for nothing?";
        let mut inner = Sha256::new();
        inner.update(k.map(|b| b ^ 0x36));
        inner.update(msg);
        let mut outer = Sha256::new();
        outer.update(k.map(|b| b ^ 0x5c));
        outer.update(inner.finalize());
        let got: [u8; 32] = outer.finalize().into();
        assert_eq!(
            hex(&got),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // And the claim MAC depends on every input.
        let a = key.mac("alice", b"0123456789abcdef");
        assert_ne!(a, key.mac("alicf", b"0123456789abcdef"));
        assert_ne!(a, key.mac("alice", b"0123456789abcdeg"));
        assert_ne!(
            a,
            SiteKey::from_bytes(b"Jefe!").mac("alice", b"0123456789abcdef")
        );
    }

    #[test]
    fn claims_verify_only_for_their_user_and_key() -> Result<()> {
        let t = tempfile::tempdir()?;
        let backing = t.path().join("pershome");
        std::fs::create_dir(&backing)?;
        let key = SiteKey::from_bytes(&[7u8; 32]);
        let other_site = SiteKey::from_bytes(&[8u8; 32]);
        let got = look(&backing);
        assert_eq!(
            got,
            Look {
                mark: None,
                fresh: true
            },
            "an empty pershome/"
        );
        write_claim(&backing, "alice", &key)?;
        let got = look(&backing);
        let mark = got.mark.clone().expect("a mark");
        assert!(got.fresh, "a claim alone leaves the stick fresh");
        assert!(mark.claimed_for(&key, "alice"), "alice's own claim");
        assert!(!mark.claimed_for(&key, "bob"), "not bob's");
        assert!(
            !mark.claimed_for(&other_site, "alice"),
            "not another site's"
        );
        // A forged mark: the name written by hand, and a claim line copied with it.
        let forged = Mark::parse(&format!(
            "bob\n{}",
            mark.text().lines().nth(1).unwrap_or_default()
        ));
        assert!(
            !forged.claimed_for(&key, "bob"),
            "a copied claim for another name"
        );
        // A second site adds its claim; both verify.
        write_claim(&backing, "alice", &other_site)?;
        let mark = look(&backing).mark.expect("a mark");
        assert!(mark.claimed_for(&key, "alice") && mark.claimed_for(&other_site, "alice"));
        // Content makes it not fresh.
        std::fs::write(backing.join(".bashrc"), "echo planted\n")?;
        assert!(!look(&backing).fresh, "a planted file");
        Ok(())
    }

    #[test]
    fn a_store_with_records_is_not_fresh() -> Result<()> {
        let t = tempfile::tempdir()?;
        let backing = t.path().join("pershome");
        std::fs::create_dir_all(backing.join(".pershome/staging"))?;
        std::fs::write(
            backing.join(".pershome/journal.0000000000000001"),
            [0u8; 24],
        )?;
        assert!(
            look(&backing).fresh,
            "a header-only journal and an empty staging/"
        );
        std::fs::write(
            backing.join(".pershome/journal.0000000000000001"),
            [0u8; 200],
        )?;
        assert!(!look(&backing).fresh, "a journal with records");
        std::fs::write(
            backing.join(".pershome/journal.0000000000000001"),
            [0u8; 24],
        )?;
        std::fs::write(backing.join(".pershome/staging/x"), b"")?;
        assert!(!look(&backing).fresh, "something staged");
        Ok(())
    }

    #[test]
    fn keys_others_can_read_are_refused() -> Result<()> {
        let t = tempfile::tempdir()?;
        let key = SiteKey::load(t.path(), true);
        if !nix::unistd::geteuid().is_root() {
            // Made, but owned by the test user: refused as not root's.
            assert!(key.is_err(), "a key not owned by root: {key:?}");
            return Ok(());
        }
        let key = key?;
        let again = SiteKey::load(t.path(), false)?;
        assert_eq!(
            key.mac("a", b"b"),
            again.mac("a", b"b"),
            "the same key is read back"
        );
        let path = t.path().join(KEY_PATH);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        let got = SiteKey::load(t.path(), false);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("chmod 600")),
            "a world-readable key: {got:?}"
        );
        Ok(())
    }
}
