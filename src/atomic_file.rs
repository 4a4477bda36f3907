//! Replacing a small system file atomically: a temporary file in the same directory, written
//! and fsync'ed, renamed over the target, then the directory fsync'ed. A crash leaves the old
//! file or the new one, never a mix, and a reader never sees a half-written file.
//!
//! This module owns only that sequence. It never locks (callers that read-modify-write hold
//! their own lock) and never follows a symlink at the temporary name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `contents` to `path` atomically. The file keeps its mode when it exists, else gets
/// `new_mode`. Parent directories are created (mode 0755) when missing.
pub fn replace(path: &Path, contents: &[u8], new_mode: u32) -> io::Result<()> {
    let context = |what: &str, p: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(|e| context("creating", dir, e))?;
    let mode = match fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(_) => new_mode,
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.pershome-tmp.{}",
        name.as_deref().unwrap_or("file"),
        std::process::id()
    ));
    // A leftover of a crashed run with the same pid; the name is ours alone.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| context("creating", &tmp, e))?;
    let written = (|| {
        file.write_all(contents)?;
        // create_new's mode went through the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()
    })();
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(context("writing", &tmp, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(context("replacing", path, e));
    }
    // The rename is durable only once the directory is on disk.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| context("syncing", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_keeping_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/f");
        replace(&path, b"one", 0o600).expect("create");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "expected mode 600, got {mode:o}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        replace(&path, b"two", 0o600).expect("replace");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640, "expected the old mode 640 kept, got {mode:o}");
        let names: Vec<_> = fs::read_dir(dir.path().join("sub"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec!["f"], "no temporary file left");
    }
}
