//! Which naming mode a mount uses (`names=long` or `names=8.3`), read from the stick.
//!
//! This module owns the rule that a stick keeps the mode it was first written in. The mode is
//! the store's layout (`meta::layout`): a `.pershome` store is a long-name stick, a
//! `PERSHOME.DB` store (in any letter case, as a `msdos` mount lists it) an 8.3 stick, and a
//! stick with neither takes the `names=` option (long by default). A mount whose option
//! disagrees with the stick is refused, because reading 8.3 names as long names (or the
//! reverse) would show `REPORT.TXT` where the user wrote `report.txt`, and new names would mix
//! both styles. It never writes, except to remove a long store that holds nothing at all (as
//! an interrupted first open can leave one) when a first mount asks for 8.3 names. A stick
//! prepared by `pershome prepare` without `--names 8.3` holds a long store, so it stays long.

use std::io;
use std::os::fd::AsFd;

use super::OpenError;
use crate::backing::Backing;
use crate::meta::layout::{detect, StoreLayout, LONG_STORE_DIR, OLD_SHORT_NAMES_MARKER};
use crate::names::NameMode;

/// The layout this mount uses. `asked` is the `names=` option (`None`: not given).
pub(crate) fn resolve(
    backing: &Backing,
    backing_path: &str,
    asked: Option<NameMode>,
    read_only: bool,
) -> Result<StoreLayout, OpenError> {
    let io_error = |source: io::Error| OpenError::Backing {
        path: backing_path.to_string(),
        source,
    };
    let found = detect(backing.root()).map_err(io_error)?;
    match (found.layout(), asked) {
        (None, asked) => Ok(StoreLayout::for_names(asked.unwrap_or_default())),
        (Some(StoreLayout::Short83), Some(NameMode::Long)) => Err(OpenError::NameMode {
            stick: NameMode::Short83,
            asked: NameMode::Long,
        }),
        (Some(StoreLayout::Short83), _) => Ok(StoreLayout::Short83),
        (Some(StoreLayout::Long), asked) => {
            let dir = match backing.open_dir(LONG_STORE_DIR.as_bytes()) {
                Ok(dir) => dir,
                // Not a directory: the store refuses it with its own message.
                Err(_) => return Ok(StoreLayout::Long),
            };
            // A stat rather than a listing: a long-name mount lists nothing at open.
            match backing.stat_at(dir.as_fd(), OLD_SHORT_NAMES_MARKER.as_bytes()) {
                Ok(_) => return Err(OpenError::OldShortStore),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(io_error(e)),
            }
            if asked != Some(NameMode::Short83) {
                return Ok(StoreLayout::Long);
            }
            if !backing.list(dir.as_fd()).map_err(io_error)?.is_empty() {
                return Err(OpenError::NameMode {
                    stick: NameMode::Long,
                    asked: NameMode::Short83,
                });
            }
            // An empty long store directory (an interrupted first open): nothing is
            // recorded in it, so the first mount still chooses. A read-only mount only reads.
            if !read_only {
                backing
                    .unlink_at(backing.root(), LONG_STORE_DIR.as_bytes(), true)
                    .map_err(io_error)?;
            }
            Ok(StoreLayout::Short83)
        }
    }
}
