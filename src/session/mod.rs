//! The login integration: what runs at PAM session open and close (`pershome-config session`,
//! and `pershome-config mount-home` for pam_mount), and the desktop notice.
//!
//! - `stick`: choosing the user's stick and reaching its `pershome/`
//! - `claim`: the site key and the claims that say whose home a stick is
//! - `mounts`: binding a stick directory, the pershomefs mount, home path checks, waiting for
//!   the daemon's last commit
//! - `rundir`: `/run/pershome/USER/` (mount point, session count, state, notice)
//! - `hook`: open and close, and the messages a person sees
//! - `ltsp`: remote sessions skipped, the SSHFS decision asked by pamltsp, the client side of
//!   an LTSP login
//! - `entry`: the command-line entry points (`session`, `mount-home`, `pershome notice`)
//!
//! Finding, probing and mounting stick devices, the mount table and the `pershome/` look-up
//! are shared with the tools in `crate::stick`.
//!
//! Everything here runs as root on input users control (the user name from PAM, the home
//! path's directories, the stick's contents). The rules, and the tests that hold them, are in
//! `docs/security.md`: no user string reaches a shell, nothing user-controlled is followed
//! through a symlink, the stick is always mounted `nosuid,nodev,noexec`.

pub mod claim;
pub mod entry;
pub mod hook;
pub mod ltsp;
pub mod mounts;
pub mod rundir;
pub mod stick;
