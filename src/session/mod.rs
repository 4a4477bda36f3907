//! The login integration: what runs at PAM session open and close (`pershome-config session`,
//! and `pershome-config mount-home` for pam_mount), and the desktop notice.
//!
//! - `discover`: removable block devices and their filesystem types (sysfs, `blkid -p`)
//! - `stick`: choosing the user's stick and reaching its `pershome/`
//! - `mounts`: the stick and pershomefs mounts, home path checks, bounded unmounting
//! - `rundir`: `/run/pershome/USER/` (mount point, session count, state, notice)
//! - `hook`: open and close, and the messages a person sees
//!
//! Everything here runs as root on input users control (the user name from PAM, the home
//! path's directories, the stick's contents). The rules, and the tests that hold them, are in
//! `docs/security.md`: no user string reaches a shell, nothing user-controlled is followed
//! through a symlink, the stick is always mounted `nosuid,nodev,noexec`.

pub mod discover;
pub mod entry;
pub mod hook;
pub mod mounts;
pub mod rundir;
pub mod stick;
