//! USB stick images like real ones: an MBR partition table with one FAT32 (type 0x0c) or
//! exFAT (type 0x07) partition at 1 MiB, made without loop devices or mounts (the host kernel
//! has no FAT driver anyway): sfdisk on the image file, mkfs.vfat with --offset, mtools for
//! the `pershome/` directory; exFAT is formatted as a separate file and copied in, since
//! mkfs.exfat has no offset option.
//!
//! This module owns the layout of a stick image. It never touches a real block device.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use xshell::{cmd, Shell};

/// Where the partition starts: 1 MiB, as partitioning tools align it.
pub const PART_OFFSET: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickFs {
    Fat32,
    Exfat,
}

impl StickFs {
    pub fn name(self) -> &'static str {
        match self {
            StickFs::Fat32 => "vfat",
            StickFs::Exfat => "exfat",
        }
    }
}

/// The volume label every test stick carries; the guest finds the stick by it.
pub const LABEL: &str = "PERSHOME";

/// Create `path` (replacing it): `size_mib` MiB, one partition of `fs` labelled [`LABEL`].
/// A FAT32 stick gets an empty `pershome/` (mtools); an exFAT one gets it in the guest.
pub fn create(sh: &Shell, path: &Path, fs: StickFs, size_mib: u64) -> Result<()> {
    create_with(sh, path, fs, size_mib, true)
}

/// As [`create`]; `prepared: false` leaves out `pershome/` (a stick never prepared).
pub fn create_with(
    sh: &Shell,
    path: &Path,
    fs: StickFs,
    size_mib: u64,
    prepared: bool,
) -> Result<()> {
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(size_mib << 20)
        .with_context(|| format!("sizing {}", path.display()))?;
    drop(file);
    let part_type = match fs {
        StickFs::Fat32 => "c",
        StickFs::Exfat => "7",
    };
    let table = format!("start=2048, type={part_type}\n");
    cmd!(sh, "sfdisk --quiet {path}")
        .stdin(table)
        .quiet()
        .run()
        .with_context(|| format!("partitioning {}", path.display()))?;
    let part_bytes = (size_mib << 20) - PART_OFFSET;
    match fs {
        StickFs::Fat32 => {
            let blocks = (part_bytes / 1024).to_string();
            cmd!(
                sh,
                "mkfs.vfat -F 32 -n {LABEL} --offset 2048 {path} {blocks}"
            )
            .quiet()
            .ignore_stdout()
            .run()
            .with_context(|| format!("formatting {} as FAT32", path.display()))?;
            if prepared {
                let image = mtools_image(path);
                cmd!(sh, "mmd -i {image} ::/pershome")
                    .quiet()
                    .run()
                    .context("creating pershome/ with mtools")?;
            }
        }
        StickFs::Exfat => {
            let part = PathBuf::from(format!("{}.part", path.display()));
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&part)
                .with_context(|| format!("creating {}", part.display()))?;
            file.set_len(part_bytes)
                .with_context(|| format!("sizing {}", part.display()))?;
            drop(file);
            cmd!(sh, "mkfs.exfat -L {LABEL} {part}")
                .quiet()
                .ignore_stdout()
                .run()
                .with_context(|| format!("formatting {} as exFAT", part.display()))?;
            copy_into(&part, path, PART_OFFSET)?;
            std::fs::remove_file(&part).with_context(|| format!("removing {}", part.display()))?;
        }
    }
    Ok(())
}

/// The `-i` argument that makes mtools work on the partition inside a stick image.
pub fn mtools_image(path: &Path) -> String {
    format!("{}@@{PART_OFFSET}", path.display())
}

/// Copy all of `from` into `to` at byte `offset`, leaving holes where `from` is zero.
fn copy_into(from: &Path, to: &Path, offset: u64) -> Result<()> {
    let mut src =
        std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .open(to)
        .with_context(|| format!("opening {}", to.display()))?;
    copy_sparse(&mut src, &mut dst, offset)
        .with_context(|| format!("copying {} into {}", from.display(), to.display()))
}

/// Copy the rest of `src` to `dst` from byte `at` of `dst` on, seeking over blocks of zeros
/// instead of writing them: a 4 GiB stick that holds a few MiB of data must not take 4 GiB
/// of the host's disk when it is copied (CI once ran out of space this way). `dst` ends at
/// `at` plus the bytes copied, holes included.
fn copy_sparse(src: &mut std::fs::File, dst: &mut std::fs::File, at: u64) -> std::io::Result<()> {
    const BLOCK: usize = 1 << 20;
    let mut buf = vec![0u8; BLOCK];
    let mut pos = at;
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            match src.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(pos))?;
            dst.write_all(&buf[..filled])?;
        }
        pos += filled as u64;
        if filled < BLOCK {
            break;
        }
    }
    if dst.metadata()?.len() < pos {
        dst.set_len(pos)?;
    }
    Ok(())
}

/// `fsck.fat -n` on the FAT32 partition of a stick image, from the host, without a loop
/// device: the partition is copied out to a sparse file first (fsck.fat has no offset option).
/// Returns fsck's output; fails if it found anything.
pub fn fsck_fat_host(sh: &Shell, image: &Path) -> Result<String> {
    let part = PathBuf::from(format!("{}.fsck", image.display()));
    let mut src =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    src.seek(SeekFrom::Start(PART_OFFSET))
        .with_context(|| format!("seeking in {}", image.display()))?;
    let mut dst =
        std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    copy_sparse(&mut src, &mut dst, 0)
        .with_context(|| format!("copying out {}", part.display()))?;
    drop(dst);
    let out = cmd!(sh, "fsck.fat -n {part}")
        .quiet()
        .ignore_status()
        .output();
    let _ = std::fs::remove_file(&part);
    let out = out.context("running fsck.fat")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        anyhow::bail!("fsck.fat -n found problems ({}):\n{text}", out.status);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// A 64 MiB source with 3 bytes of data in its middle copies to the same bytes at the
    /// offset, in a file that takes a few blocks of disk, not 64 MiB.
    #[test]
    fn copy_sparse_keeps_the_bytes_and_leaves_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        let mut src = std::fs::File::create(&from).unwrap();
        src.set_len(64 << 20).unwrap();
        src.seek(SeekFrom::Start(32 << 20)).unwrap();
        src.write_all(b"FAT").unwrap();
        std::fs::write(&to, b"head").unwrap();
        copy_into(&from, &to, 4).unwrap();
        let copied = std::fs::read(&to).unwrap();
        assert_eq!(copied.len(), 4 + (64 << 20));
        assert_eq!(&copied[..4], b"head");
        let data = 4 + (32 << 20);
        assert_eq!(&copied[data..data + 3], b"FAT");
        assert!(copied[4..data].iter().all(|&b| b == 0));
        assert!(copied[data + 3..].iter().all(|&b| b == 0));
        let allocated = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(
            allocated <= 2 << 20,
            "the copy took {allocated} bytes of disk for 7 bytes of data"
        );
    }
}
