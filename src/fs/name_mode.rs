//! Which naming mode a mount uses (`names=long` or `names=8.3`), and recording it on the stick.
//!
//! This module owns the rule that a stick keeps the mode it was first written in: the mode of
//! a store is an empty marker file `NAMES.83` in the store directory (present: 8.3; absent:
//! long). A mount without the option adopts the stick's mode; a mount whose option disagrees
//! with the stick is refused, because reading 8.3 names as long names (or the reverse) would
//! show `REPORT.TXT` where the user wrote `report.txt`, and new names would mix both styles.
//! It never writes anything but the marker, and only into a store that was empty until now.

use std::io;

use super::OpenError;
use crate::backing::Backing;
use crate::meta::STORE_DIR;
use crate::names::NameMode;

/// The marker of an 8.3 store, inside the store directory. An 8.3 name itself.
pub const SHORT_NAMES_MARKER: &str = "NAMES.83";

/// The mode recorded in the store of `backing`: `None` when there is no store directory yet.
fn recorded(backing: &Backing) -> io::Result<Option<NameMode>> {
    let dir = match backing.open_dir(STORE_DIR.as_bytes()) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    use std::os::fd::AsFd;
    match backing.stat_at(dir.as_fd(), SHORT_NAMES_MARKER.as_bytes()) {
        Ok(st) if st.is_file => Ok(Some(NameMode::Short83)),
        Ok(_) => Err(io::Error::other(format!(
            "{STORE_DIR}/{SHORT_NAMES_MARKER} is not a regular file"
        ))),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Some(NameMode::Long)),
        Err(e) => Err(e),
    }
}

/// Writes the 8.3 marker durably: the file, then the directory entry.
fn write_marker(backing: &Backing) -> io::Result<()> {
    use std::os::fd::AsFd;
    let dir = backing.open_dir(STORE_DIR.as_bytes())?;
    match backing.open_at(
        dir.as_fd(),
        SHORT_NAMES_MARKER.as_bytes(),
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        0o600,
    ) {
        Ok(file) => file.sync_all()?,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    backing.fsync_dir(dir.as_fd())
}

/// The mode this mount uses. `asked` is the `names=` option (`None`: not given), `fresh` says
/// the store held nothing before this mount (so its mode is still to be chosen).
pub(crate) fn resolve(
    backing: &Backing,
    backing_path: &str,
    asked: Option<NameMode>,
    fresh: bool,
    read_only: bool,
) -> Result<NameMode, OpenError> {
    let io_error = |source: io::Error| OpenError::Backing {
        path: format!("{backing_path}/{STORE_DIR}"),
        source,
    };
    match (recorded(backing).map_err(io_error)?, asked) {
        // An 8.3 marker is only ever written into an empty store, so it is the stick's mode
        // even when the store's files were lost since.
        (Some(NameMode::Short83), Some(NameMode::Long)) => Err(OpenError::NameMode {
            stick: NameMode::Short83,
            asked: NameMode::Long,
        }),
        (Some(NameMode::Short83), _) => Ok(NameMode::Short83),
        // No store at all (a read-only mount of a new stick): nothing is recorded or written.
        (None, asked) => Ok(asked.unwrap_or_default()),
        (Some(NameMode::Long), asked) if fresh => {
            let mode = asked.unwrap_or_default();
            if mode == NameMode::Short83 && !read_only {
                write_marker(backing).map_err(io_error)?;
            }
            Ok(mode)
        }
        (Some(NameMode::Long), Some(NameMode::Short83)) => Err(OpenError::NameMode {
            stick: NameMode::Long,
            asked: NameMode::Short83,
        }),
        (Some(NameMode::Long), _) => Ok(NameMode::Long),
    }
}
