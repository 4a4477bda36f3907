//! Where a home lives on a stick: the `pershome/` directory at its top, matched in any letter
//! case (FAT is case-insensitive, and a Windows user may have made `PersHome`).
//!
//! This module owns that look-up for the tools and the login hook alike. It never follows a
//! symlink (the login hook runs it as root on an sshfs or test directory whose far side can
//! plant one), never guesses between several candidates, and never creates anything.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The name of the directory a stick must have at its top level (any case).
pub const PERSHOME_DIR: &str = "pershome";

/// Whether `name` is [`PERSHOME_DIR`] in some letter case.
pub fn is_pershome_name(name: &OsStr) -> bool {
    name.as_bytes()
        .eq_ignore_ascii_case(PERSHOME_DIR.as_bytes())
}

/// The `pershome` directory at the top of `top`: any case, a real directory (a symlink named
/// so is not one: `file_type()` does not follow it). `Ok(None)` when there is none; an error
/// when `top` cannot be listed, and when a case-sensitive directory (sshfs, ext4) holds
/// several (`pershome` and `PERSHOME`): which one is the home is then the person's choice,
/// not ours.
pub fn find_pershome_dir(top: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(top).with_context(|| format!("listing {}", top.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", top.display()))?;
        if !is_pershome_name(&entry.file_name()) {
            continue;
        }
        let file_type = entry
            .file_type()
            .with_context(|| format!("examining {}", entry.path().display()))?;
        if file_type.is_dir() {
            found.push(entry.path());
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => bail!(
            "{} holds several directories named pershome in different case ({}); keep one",
            top.display(),
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pershome_dir_any_case_never_a_symlink() -> Result<()> {
        let t = tempfile::tempdir()?;
        let got = find_pershome_dir(t.path())?;
        assert_eq!(got, None, "empty stick: expected None, got {got:?}");
        std::os::unix::fs::symlink("/etc", t.path().join("pershome"))?;
        let got = find_pershome_dir(t.path())?;
        assert_eq!(got, None, "a symlink is not the directory: got {got:?}");
        std::fs::write(t.path().join("PERSHOME"), "a file")?;
        let got = find_pershome_dir(t.path())?;
        assert_eq!(got, None, "a file is not the directory: got {got:?}");
        std::fs::create_dir(t.path().join("PerSHome"))?;
        let expected = Some(t.path().join("PerSHome"));
        let got = find_pershome_dir(t.path())?;
        assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
        Ok(())
    }

    #[test]
    fn several_pershome_dirs_are_refused() -> Result<()> {
        let t = tempfile::tempdir()?;
        std::fs::create_dir(t.path().join("pershome"))?;
        std::fs::create_dir(t.path().join("PERSHOME"))?;
        let got = find_pershome_dir(t.path());
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("keep one")),
            "expected a refusal naming both, got {got:?}"
        );
        Ok(())
    }

    #[test]
    fn a_missing_top_is_an_error() {
        let got = find_pershome_dir(Path::new("/nonexistent/pershome-test"));
        assert!(got.is_err(), "expected an error, got {got:?}");
    }

    #[test]
    fn names_in_any_case() {
        for (name, expected) in [
            ("pershome", true),
            ("PersHome", true),
            ("pershome ", false),
            ("pershom", false),
        ] {
            let got = is_pershome_name(OsStr::new(name));
            assert_eq!(got, expected, "{name:?}: expected {expected}, got {got}");
        }
    }
}
