//! Choosing the stick for a user and making its `pershome/` directory reachable: a directory
//! given by the administrator (the thin-client case, and tests), or a removable device found
//! by `crate::stick::discover` and mounted at `/run/pershome/USER/raw/stick`.
//!
//! This module owns the choice among several sticks by their claims (`session::claim`). A
//! stick is only ever the home of the user whose claim it carries; the one implicit claim is
//! a `pershome/` that is still fresh (nothing in it but an empty store): the user who logs in
//! with it gets an empty home, so nothing there can run as them. A stick with content and no
//! claim for this user, or another user's stick, is refused even when it is the only one: a
//! stick left in (or planted on) a workstation must not become the next person's home (its
//! `.bashrc` would run as them). Every look at a stick is made through the root-controlled
//! path it is bound or mounted on, never through the path a user could redirect.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::claim::{self, Look, SiteKey};
use super::mounts;
use crate::stick::discover::{self, Candidate};
use crate::stick::layout::find_pershome_dir;
use crate::stick::mount::{mount_stick, unmount_within};
use crate::sysconfig::SystemConfig;

/// Where to look for the stick.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory standing for the stick (an sshfs mount of a thin client's stick, a test
    /// directory): its `pershome/` is used as it is, nothing is mounted.
    Directory(PathBuf),
    /// Removable block devices.
    Devices {
        /// `/sys/block` (another directory in tests).
        sys_block: PathBuf,
        /// Which filesystems count as a stick, and how they are mounted.
        config: SystemConfig,
    },
}

/// A stick ready for pershomefs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The `pershome/` directory (the backing).
    pub backing: PathBuf,
    /// What the hook mounted at `/run/pershome/USER/raw/stick`: the device, or (as root) the
    /// stick directory bound there; `None` when nothing was mounted (a user's own mount).
    pub mounted: Option<PathBuf>,
}

/// Why there is no usable stick; each is told to the user with the way to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// No removable FAT/exFAT device (or the configured directory does not exist).
    NoStick,
    /// A stick (or the directory) without a `pershome` directory at its top.
    NoPershomeDir(String),
    /// Only sticks claimed as (or naming) another user's home.
    OtherUsers(Vec<String>),
    /// Several fresh unclaimed sticks: the hook cannot know which is the user's.
    Ambiguous(usize),
    /// A stick with content and no claim for this user on this machine (planted, prepared
    /// elsewhere, or from before claims): where it is.
    Unclaimed(String),
}

/// How one stick compares for `user`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// Claimed for this user with this machine's key.
    Mine,
    /// Still fresh and not validly claimed by anybody: the implicit claim may take it.
    Fresh,
    /// Content, and no claim for this user.
    Unclaimed,
    /// Claimed for, or naming, somebody else.
    Other(String),
}

fn verdict(look: &Look, key: &SiteKey, user: &str) -> Verdict {
    match &look.mark {
        Some(mark) if mark.claimed_for(key, user) => Verdict::Mine,
        Some(mark) if !mark.name.is_empty() && mark.claimed_for(key, &mark.name) => {
            Verdict::Other(mark.name.clone())
        }
        _ if look.fresh => Verdict::Fresh,
        Some(mark) if mark.name != user => Verdict::Other(mark.name.clone()),
        _ => Verdict::Unclaimed,
    }
}

/// The claim of a fresh stick by the user who logs in with it (the implicit claim). A claim
/// that cannot be written means the stick is not used: it would be unclaimed with content
/// after this session.
fn claim_fresh(backing: &Path, user: &str, key: &SiteKey) -> Result<()> {
    claim::write_claim(backing, user, key).with_context(|| {
        format!(
            "claiming the new stick home {} for {user}",
            backing.display()
        )
    })
}

/// Finds `user`'s stick and makes its `pershome/` reachable. For devices, a chosen stick stays
/// mounted at `mountpoint` (with owner `uid`/`gid`); every other one is unmounted again.
/// `key` is this machine's claim key (`None` only when the hook does not run as root: a user
/// mounting their own stick, where nothing can be verified or gained).
pub fn find(
    source: &Source,
    user: &str,
    uid: u32,
    gid: u32,
    mountpoint: &Path,
    key: Option<&SiteKey>,
) -> Result<std::result::Result<Found, Missing>> {
    find_impl(source, user, uid, gid, mountpoint, key, true)
}

/// As [`find`], but a fresh stick is never claimed: whether `find` would give `user` a stick
/// now. pamltsp asks this before the password is checked (`session::ltsp`), and a claim must
/// only ever follow a login. What it mounted stays mounted on `mountpoint` for the caller to
/// release.
pub fn look_for(
    source: &Source,
    user: &str,
    uid: u32,
    gid: u32,
    mountpoint: &Path,
    key: &SiteKey,
) -> Result<std::result::Result<Found, Missing>> {
    find_impl(source, user, uid, gid, mountpoint, Some(key), false)
}

fn find_impl(
    source: &Source,
    user: &str,
    uid: u32,
    gid: u32,
    mountpoint: &Path,
    key: Option<&SiteKey>,
    claim: bool,
) -> Result<std::result::Result<Found, Missing>> {
    match source {
        Source::Directory(dir) => {
            let Some(key) = key.filter(|_| nix::unistd::geteuid().is_root()) else {
                // A user mounting their own home (pam_mount as the user): the daemon runs as
                // them and has no more rights than they do; claims cannot be checked without
                // root's key, so only a stick naming somebody else is refused.
                if !dir.is_dir() {
                    return Ok(Err(Missing::NoStick));
                }
                let Some(backing) = find_pershome_dir(dir)? else {
                    return Ok(Err(Missing::NoPershomeDir(dir.display().to_string())));
                };
                let look = claim::look(&backing);
                return Ok(match look.mark {
                    Some(m) if m.name != user && !look.fresh => {
                        Err(Missing::OtherUsers(vec![m.name]))
                    }
                    _ => Ok(Found {
                        backing,
                        mounted: None,
                    }),
                });
            };
            // As root: the stick directory is opened component by component (no symlink, every
            // directory above it root's) and its `pershome/` bound under the root-only
            // /run/pershome/USER/raw/stick; everything after that looks only there, so nothing
            // on the far side of an sshfs can redirect the root daemon or the claim check.
            let Some(pershome) = mounts::open_stick_dir(dir)? else {
                return Ok(Err(if dir.exists() {
                    Missing::NoPershomeDir(dir.display().to_string())
                } else {
                    Missing::NoStick
                }));
            };
            mounts::bind_stick_dir(&pershome, &dir.join("pershome"), mountpoint)?;
            let unbind = || {
                if let Err(e) = unmount_within(mountpoint, std::time::Duration::from_secs(5)) {
                    tracing::warn!("unbinding a stick that is not {user}'s: {e:#}");
                }
            };
            let found = Found {
                backing: mountpoint.to_path_buf(),
                mounted: Some(dir.join("pershome")),
            };
            match verdict(&claim::look(mountpoint), key, user) {
                Verdict::Mine => Ok(Ok(found)),
                Verdict::Fresh if !claim => Ok(Ok(found)),
                Verdict::Fresh => match claim_fresh(mountpoint, user, key) {
                    Ok(()) => Ok(Ok(found)),
                    Err(e) => {
                        unbind();
                        Err(e)
                    }
                },
                Verdict::Unclaimed => {
                    unbind();
                    Ok(Err(Missing::Unclaimed(dir.display().to_string())))
                }
                Verdict::Other(name) => {
                    unbind();
                    Ok(Err(Missing::OtherUsers(vec![name])))
                }
            }
        }
        Source::Devices { sys_block, config } => {
            let candidates = discover::candidates(sys_block, &config.stick.filesystems)?;
            let Some(key) = key else {
                anyhow::bail!("the login hook must run as root to use stick devices");
            };
            find_on_devices(
                &candidates,
                config,
                user,
                (uid, gid),
                mountpoint,
                key,
                claim,
            )
        }
    }
}

fn find_on_devices(
    candidates: &[Candidate],
    config: &SystemConfig,
    user: &str,
    (uid, gid): (u32, u32),
    mountpoint: &Path,
    key: &SiteKey,
    claim: bool,
) -> Result<std::result::Result<Found, Missing>> {
    if candidates.is_empty() {
        return Ok(Err(Missing::NoStick));
    }
    let mount = |c: &Candidate| -> Result<()> {
        mount_stick(&c.devnode, mountpoint, &config.stick_mount(c.fs, uid, gid))
    };
    let release = || {
        if let Err(e) = unmount_within(mountpoint, std::time::Duration::from_secs(5)) {
            tracing::warn!("unmounting a stick that is not {user}'s: {e:#}");
        }
    };
    let mut fresh: Vec<&Candidate> = Vec::new();
    let mut unclaimed: Vec<String> = Vec::new();
    let mut others: Vec<String> = Vec::new();
    let mut without_dir: Vec<String> = Vec::new();
    for c in candidates {
        if let Err(e) = mount(c) {
            tracing::warn!("skipping {}: {e:#}", c.devnode.display());
            continue;
        }
        let backing = match find_pershome_dir(mountpoint) {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => {
                without_dir.push(c.devnode.display().to_string());
                release();
                continue;
            }
        };
        match verdict(&claim::look(&backing), key, user) {
            Verdict::Mine => {
                return Ok(Ok(Found {
                    backing,
                    mounted: Some(c.devnode.clone()),
                }))
            }
            Verdict::Fresh => fresh.push(c),
            Verdict::Unclaimed => unclaimed.push(c.devnode.display().to_string()),
            Verdict::Other(name) => others.push(name),
        }
        release();
    }
    match fresh.as_slice() {
        [only] => {
            mount(only)?;
            // Looked at again once mounted for good: the stick may have changed meanwhile.
            let backing = match find_pershome_dir(mountpoint)? {
                Some(b) if verdict(&claim::look(&b), key, user) == Verdict::Fresh => b,
                _ => {
                    release();
                    return Ok(Err(Missing::Unclaimed(only.devnode.display().to_string())));
                }
            };
            if claim {
                if let Err(e) = claim_fresh(&backing, user, key) {
                    release();
                    return Err(e);
                }
            }
            Ok(Ok(Found {
                backing,
                mounted: Some(only.devnode.clone()),
            }))
        }
        [] if !unclaimed.is_empty() => Ok(Err(Missing::Unclaimed(unclaimed.join(", ")))),
        [] if !others.is_empty() => Ok(Err(Missing::OtherUsers(others))),
        [] if !without_dir.is_empty() => Ok(Err(Missing::NoPershomeDir(without_dir.join(", ")))),
        [] => Ok(Err(Missing::NoStick)),
        many => Ok(Err(Missing::Ambiguous(many.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stick directory under a root-only tree (/run): the hook refuses stick directories
    /// below a directory others can write, such as /tmp.
    fn root_only_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("phstick")
            .tempdir_in("/run")
            .expect("a temporary directory under /run")
    }

    /// As root, the stick directory is bound on `mp`: undo that after every find, also when
    /// an assertion fails.
    struct Unbind<'a>(&'a Path);
    impl Drop for Unbind<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Security (issue 10, hole 2): a fresh `pershome/` is claimed by the first user who logs
    /// in with it; a claimed stick is that user's only; a stick with content and no claim (a
    /// planted `.bashrc`, a mark written by hand) is nobody's.
    #[test]
    fn only_a_fresh_stick_is_claimed_implicitly() -> Result<()> {
        if crate::testing::skip_without_root("only_a_fresh_stick_is_claimed_implicitly") {
            return Ok(());
        }
        let t = root_only_dir();
        let top = t.path().join("stick");
        std::fs::create_dir(&top)?;
        let src = Source::Directory(top.clone());
        let mp = t.path().join("mp");
        std::fs::create_dir(&mp)?;
        let key = SiteKey::from_bytes(&[3u8; 32]);
        let find_once = |user: &str| {
            let _unbind = Unbind(&mp);
            find(&src, user, 1, 1, &mp, Some(&key))
        };
        assert_eq!(
            find_once("alice")?,
            Err(Missing::NoPershomeDir(top.display().to_string()))
        );
        let backing = top.join("pershome");
        std::fs::create_dir(&backing)?;
        let expected = Ok(Found {
            backing: mp.clone(),
            mounted: Some(backing.clone()),
        });
        {
            let _unbind = Unbind(&mp);
            assert_eq!(
                find(&src, "alice", 1, 1, &mp, Some(&key))?,
                expected,
                "fresh: claimed by alice"
            );
            // The bind's real flags, read back from mountinfo.
            let m = crate::stick::mountinfo::mount_at(&mp)?.context("expected the bind")?;
            for want in ["nosuid", "nodev", "noexec", "noatime"] {
                assert!(
                    m.mount_options.split(',').any(|o| o == want),
                    "expected {want} on the bind, got {:?}",
                    m.mount_options
                );
            }
        }
        let mark = claim::look(&backing).mark.expect("alice's claim");
        assert!(mark.claimed_for(&key, "alice"), "expected a valid claim");
        std::fs::write(backing.join("notes.txt"), "alice's work\n")?;
        assert_eq!(find_once("alice")?, expected, "claimed for alice");
        assert_eq!(
            find_once("bob")?,
            Err(Missing::OtherUsers(vec!["alice".into()])),
            "bob gets alice's stick?"
        );

        // A planted stick: content, no mark.
        let planted = t.path().join("planted");
        std::fs::create_dir_all(planted.join("pershome"))?;
        std::fs::write(planted.join("pershome/.bashrc"), "echo planted\n")?;
        let src = Source::Directory(planted.clone());
        let find_planted = |user: &str| {
            let _unbind = Unbind(&mp);
            find(&src, user, 1, 1, &mp, Some(&key))
        };
        assert_eq!(
            find_planted("bob")?,
            Err(Missing::Unclaimed(planted.display().to_string())),
            "a planted stick must not become bob's home"
        );
        assert_eq!(
            claim::look(&planted.join("pershome")).mark,
            None,
            "nothing written on a refused stick"
        );
        // The same with bob's name written by hand (the old owner mark), and with a claim line
        // copied from alice's stick.
        std::fs::create_dir(planted.join("pershome/.pershome"))?;
        let alice_claim = std::fs::read_to_string(backing.join(".pershome/owner-name"))?;
        let copied = alice_claim.lines().nth(1).unwrap_or_default().to_owned();
        std::fs::write(
            planted.join("pershome/.pershome/owner-name"),
            format!("bob\n{copied}\n"),
        )?;
        assert_eq!(
            find_planted("bob")?,
            Err(Missing::Unclaimed(planted.display().to_string())),
            "a forged mark must not make it bob's"
        );
        // An administrator's claim makes it bob's.
        claim::write_claim(&planted.join("pershome"), "bob", &key)?;
        assert_eq!(
            find_planted("bob")?,
            Ok(Found {
                backing: mp.clone(),
                mounted: Some(planted.join("pershome")),
            }),
            "claimed for bob by the administrator"
        );
        Ok(())
    }

    /// Security (issue 10, hole 6): a stick directory reached through a symlinked component,
    /// or below a directory others can write, is refused before anything is bound.
    #[test]
    fn stick_dir_paths_a_user_could_redirect_are_refused() -> Result<()> {
        if crate::testing::skip_without_root("stick_dir_paths_a_user_could_redirect_are_refused") {
            return Ok(());
        }
        let t = root_only_dir();
        let real = t.path().join("real");
        std::fs::create_dir_all(real.join("stick/pershome"))?;
        std::os::unix::fs::symlink(&real, t.path().join("link"))?;
        let mp = t.path().join("mp");
        std::fs::create_dir(&mp)?;
        let key = SiteKey::from_bytes(&[3u8; 32]);
        let via_link = Source::Directory(t.path().join("link/stick"));
        let got = {
            let _unbind = Unbind(&mp);
            find(&via_link, "alice", 1, 1, &mp, Some(&key))
        };
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("symlink")),
            "expected a symlinked component to be refused, got {got:?}"
        );
        // Below a directory everybody may write (as /tmp): refused.
        let open = t.path().join("open");
        std::fs::create_dir_all(open.join("stick/pershome"))?;
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
        let got = {
            let _unbind = Unbind(&mp);
            find(
                &Source::Directory(open.join("stick")),
                "alice",
                1,
                1,
                &mp,
                Some(&key),
            )
        };
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("only root can change")),
            "expected a world-writable parent to be refused, got {got:?}"
        );
        assert!(
            crate::stick::mountinfo::mount_at(&mp)?.is_none(),
            "expected nothing bound"
        );
        Ok(())
    }

    /// A mark that is a symlink (to a file naming the victim), or a store directory that is
    /// one, is not followed: it counts as somebody else's stick, and nothing is written
    /// through it.
    #[test]
    fn symlinked_marks_and_stores_are_never_followed() -> Result<()> {
        let t = tempfile::tempdir()?;
        let backing = t.path().join("pershome");
        std::fs::create_dir_all(backing.join(".pershome"))?;
        std::fs::write(t.path().join("name"), "alice\n")?;
        std::os::unix::fs::symlink(
            t.path().join("name"),
            backing.join(".pershome").join("owner-name"),
        )?;
        let got = claim::look(&backing);
        assert_eq!(
            got.mark,
            Some(claim::Mark::default()),
            "expected a refused mark"
        );
        let backing2 = t.path().join("pershome2");
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir_all(&backing2)?;
        std::fs::create_dir_all(&elsewhere)?;
        std::os::unix::fs::symlink(&elsewhere, backing2.join(".pershome"))?;
        let got = claim::look(&backing2);
        assert!(!got.fresh, "a symlinked store is not fresh: {got:?}");
        let key = SiteKey::from_bytes(&[3u8; 32]);
        let wrote = claim::write_claim(&backing2, "alice", &key);
        assert!(wrote.is_err(), "expected no claim through a symlink");
        assert!(
            std::fs::read_dir(&elsewhere)?.next().is_none(),
            "expected nothing written through the symlink"
        );
        Ok(())
    }
}
