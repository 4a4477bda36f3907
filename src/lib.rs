//! pershome: a POSIX home directory layered on the `pershome/` directory of a FAT or exFAT
//! USB stick. See `docs/architecture.md` for the bird's-eye view and the module map.

pub mod atomic_file;
pub mod audit;
pub mod backing;
pub mod cli;
pub mod daemon;
pub mod exec;
pub mod fatrules;
pub mod faults;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod homes_list;
pub mod logging;
pub mod ltsp;
pub mod meta;
pub mod mount_opts;
pub mod names;
pub mod pam_setup;
pub mod requests;
pub mod session;
pub mod stick;
pub mod sysconfig;
#[doc(hidden)]
pub mod testing;
pub mod tools;
pub mod wants;
