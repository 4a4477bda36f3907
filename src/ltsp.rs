//! LTSP 23 (Debian's `ltsp` package): where this machine stands in an LTSP set-up, pershome's
//! block in `/etc/ltsp/pamltsp.conf`, and what an LTSP server needs after a change.
//!
//! This module owns three things. The detection: a *client* is a machine `ltsp init` booted
//! (it makes `/run/ltsp/client` before systemd starts); a *server* has the `ltsp` program and
//! is not a client. The per-user `SSHFS=0` decision: pamltsp sources `/etc/ltsp/pamltsp.conf`
//! as shell with `PAM_USER` set before it mounts the server home over SSHFS in the auth phase,
//! so pershome keeps a marked block there that asks `pershome-config ltsp skip-sshfs` and sets
//! `SSHFS=0` for a user whose stick home will be mounted. `ltsp init` rewrites that file at
//! every client boot when ltsp.conf sets `PAM_AUTH_TYPE`, `SSH_SERVER` or `SSH_OPTIONS`; the
//! package's `pershome-ltsp-client.service` puts the block back after that, before logins are
//! allowed. And the follow-up: `/etc/ltsp` reaches clients only through `ltsp initrd` and a
//! client reboot, the installed package and `/etc/pershome` only through `ltsp image`.
//!
//! It never runs LTSP's own commands, never edits anything in pamltsp.conf but its own block,
//! and the block never passes the user name anywhere but as one quoted argument.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Made by `ltsp init` on a client before it starts the real init.
pub const CLIENT_MARK: &str = "run/ltsp/client";
/// The `ltsp` command (a symlink to /usr/share/ltsp/ltsp), present where the package is.
pub const LTSP_PROGRAM: &str = "usr/sbin/ltsp";
/// pamltsp's configuration, sourced as shell by pamltsp with `PAM_USER` set.
pub const PAMLTSP_CONF: &str = "etc/ltsp/pamltsp.conf";
/// `ltsp initrd`'s output (TFTP_DIR=/srv/tftp): `/etc/ltsp`, passwd and group for the clients.
pub const LTSP_IMG: &str = "srv/tftp/ltsp/ltsp.img";
/// Where `ltsp image` puts the squashfs images (BASE_DIR=/srv/ltsp).
pub const IMAGES_DIR: &str = "srv/ltsp/images";
/// The package's file list: its mtime is when the package was last installed or upgraded.
pub const PACKAGE_LIST: &str = "var/lib/dpkg/info/pershome.list";

/// The first and last lines of pershome's block in pamltsp.conf.
pub const BLOCK_BEGIN: &str =
    "# >>> pershome: users whose stick home will be mounted get no SSHFS home (kept by pershome-config)";
pub const BLOCK_END: &str = "# <<< pershome";

/// Where this machine stands in an LTSP set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Booted by `ltsp init`: sessions run here, pamltsp is in the PAM stack.
    Client,
    /// The `ltsp` package is installed and this is not a client: it serves images, and its
    /// sshd answers the clients' pamltsp logins.
    Server,
    /// No LTSP.
    None,
}

/// The role of the system under `root`.
pub fn role(root: &Path) -> Role {
    if root.join(CLIENT_MARK).is_dir() {
        Role::Client
    } else if std::fs::symlink_metadata(root.join(LTSP_PROGRAM)).is_ok() {
        Role::Server
    } else {
        Role::None
    }
}

/// pershome's block for pamltsp.conf. The user name reaches pershome-config only as one
/// double-quoted argument (pamltsp has already looked it up with getent); pershome-config
/// answers with its exit status, and only a "yes" changes anything (`SSHFS=0`), so a missing
/// or failing pershome-config leaves pamltsp as configured. It asks only when pamltsp is about
/// to mount (auth, or open_session for a login without auth): pamltsp also sources the file at
/// session close, after pershome released the stick, and a probe then would mount the stick
/// again just as the person was told to pull it.
pub fn block() -> String {
    format!(
        "{BLOCK_BEGIN}\n\
         # pershome mounts their stick home on $HOME in the session; see pershome-config(8).\n\
         if [ -n \"${{PAM_USER:-}}\" ] && [ -x /usr/bin/pershome-config ] &&\n    \
         {{ [ \"${{PAM_TYPE:-}}\" = auth ] || [ \"${{PAM_TYPE:-}}\" = open_session ]; }} &&\n    \
         /usr/bin/pershome-config ltsp skip-sshfs --user \"$PAM_USER\" </dev/null >/dev/null 2>&1; then\n    \
         SSHFS=0\n\
         fi\n\
         {BLOCK_END}\n"
    )
}

/// Whether `text` holds the current block, exactly.
pub fn has_block(text: &str) -> bool {
    text.contains(&block())
}

/// `text` with pershome's block (an old one replaced, else appended at the end, where it
/// overrides an `SSHFS=` set above it for the users it answers for).
pub fn with_block(text: &str) -> String {
    let mut out = without_block(text);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&block());
    out
}

/// `text` without pershome's block (every copy of it, also a damaged one that lost its end
/// line: from the begin line to the end of the file).
pub fn without_block(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if bare == BLOCK_BEGIN {
            inside = true;
            continue;
        }
        if inside {
            if bare == BLOCK_END {
                inside = false;
            }
            continue;
        }
        out.push_str(line);
    }
    out
}

/// Makes sure `root/etc/ltsp/pamltsp.conf` holds the block (creating the file when missing:
/// pamltsp reads it only if it exists, and its defaults stay in force). Returns whether the
/// file changed. The file is replaced atomically, with its mode kept (0644 when new).
pub fn ensure_block(root: &Path) -> anyhow::Result<bool> {
    use anyhow::Context;
    let path = root.join(PAMLTSP_CONF);
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = with_block(old.as_deref().unwrap_or(""));
    if old.as_deref() == Some(new.as_str()) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::atomic_file::replace(&path, new.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// What an LTSP server must do before a change reaches the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowUp {
    /// `/etc/ltsp` changed: `ltsp initrd`, then reboot the clients.
    Initrd,
    /// The package or `/etc/pershome` changed: `ltsp image`, then reboot the clients.
    Image,
}

impl FollowUp {
    /// What to tell the administrator.
    pub fn advice(self) -> &'static str {
        match self {
            FollowUp::Initrd => {
                "this is an LTSP server: run `ltsp initrd` and reboot the clients, so that they \
                 get the new /etc/ltsp (the list of stick homes and pamltsp.conf)"
            }
            FollowUp::Image => {
                "this is an LTSP server: run `ltsp image /` (or `ltsp image NAME` for a chroot or \
                 VM image), then `ltsp initrd`, and reboot the clients, so that they run the \
                 installed pershome package and /etc/pershome"
            }
        }
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest of the files that must be older than what the clients got.
fn newest(paths: &[PathBuf]) -> Option<(PathBuf, SystemTime)> {
    paths
        .iter()
        .filter_map(|p| mtime(p).map(|t| (p.clone(), t)))
        .max_by_key(|(_, t)| *t)
}

/// What is out of date on the server under `root`: `Err(text)` says what and which command
/// brings it to the clients, `Ok(text)` says what is current.
pub fn initrd_current(root: &Path) -> Result<String, String> {
    let img = root.join(LTSP_IMG);
    let Some(built) = mtime(&img) else {
        return Err(format!(
            "{} does not exist: run `ltsp initrd`, then reboot the clients",
            img.display()
        ));
    };
    let inputs = [
        root.join(crate::homes_list::LIST_PATH),
        root.join(PAMLTSP_CONF),
    ];
    match newest(&inputs) {
        Some((changed, t)) if t > built => Err(format!(
            "{} changed after {} was built: run `ltsp initrd`, then reboot the clients",
            changed.display(),
            img.display()
        )),
        _ => Ok(format!(
            "{} is newer than the list and pamltsp.conf",
            img.display()
        )),
    }
}

/// Whether an image in /srv/ltsp/images is newer than the installed package,
/// `/etc/pershome/config.toml` and the claim key (see `initrd_current`): the clients get all
/// three only through the image.
pub fn image_current(root: &Path) -> Result<String, String> {
    let dir = root.join(IMAGES_DIR);
    let images: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "img"))
                .collect()
        })
        .unwrap_or_default();
    let Some((image, built)) = newest(&images) else {
        return Err(format!(
            "there is no client image in {}: run `ltsp image /` (or `ltsp image NAME`), then \
             `ltsp initrd`",
            dir.display()
        ));
    };
    let inputs = [
        root.join(PACKAGE_LIST),
        root.join(crate::sysconfig::CONFIG_PATH),
        root.join(crate::session::claim::KEY_PATH),
    ];
    match newest(&inputs) {
        Some((changed, t)) if t > built => Err(format!(
            "{} changed after the image {} was built: run `ltsp image` for it (`ltsp image /` \
             for a chrootless image), then reboot the clients",
            changed.display(),
            image.display()
        )),
        _ => Ok(format!(
            "{} is newer than the pershome package and config.toml",
            image.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_from_marks() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(role(t.path()), Role::None);
        std::fs::create_dir_all(t.path().join("usr/sbin")).unwrap();
        std::os::unix::fs::symlink("../share/ltsp/ltsp", t.path().join(LTSP_PROGRAM)).unwrap();
        assert_eq!(
            role(t.path()),
            Role::Server,
            "a dangling ltsp symlink is enough"
        );
        std::fs::create_dir_all(t.path().join(CLIENT_MARK)).unwrap();
        assert_eq!(role(t.path()), Role::Client);
    }

    /// What `ltsp init` writes (54-pam.sh), then the block added, then the file rewritten again
    /// and the block put back: the block appears once, after LTSP's lines, which stay.
    #[test]
    fn block_survives_ltsp_rewrite() {
        let ltsp = "# Generated by `ltsp init`, see man:ltsp(8)\nPAM_AUTH_TYPE='Primary'\n\
                    SSH_SERVER='192.168.67.1'\nSSH_OPTIONS=''\n";
        let once = with_block(ltsp);
        assert!(
            once.starts_with(ltsp),
            "LTSP's lines must stay first:\n{once}"
        );
        assert!(has_block(&once));
        assert_eq!(with_block(&once), once, "adding twice must not duplicate");
        assert_eq!(without_block(&once), ltsp);
        // A damaged block (no end line) is dropped entirely before the new one goes in.
        let damaged = format!("{ltsp}{BLOCK_BEGIN}\nSSHFS=0\n");
        assert_eq!(with_block(&damaged), once);
        assert_eq!(with_block("SSHFS=1"), format!("SSHFS=1\n{}", block()));
    }
}
