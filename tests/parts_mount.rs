//! Files in parts through the kernel: pershomefs mounted with 4 KiB parts
//! (`-o parts=always,part_size=4096`), random writes, truncates, hole punches, reads and
//! SEEK_DATA/SEEK_HOLE on one file checked against an in-memory model (fsx-like), with
//! remounts in between; then the FAT audit and `pershome fsck` on the backing. The operation
//! count grows with `PERSHOME_LONG_TESTS=1` (set by `cargo xtask ci`).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use pershome::audit::assert_fat_clean;

mod common;
use common::{can_mount, Mount};

const P: u64 = 4096;
const OPTS: &str = "parts=always,part_size=4096";

fn long() -> bool {
    std::env::var("PERSHOME_LONG_TESTS").is_ok_and(|v| v == "1")
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn lseek(f: &File, off: u64, whence: i32) -> Option<u64> {
    // SAFETY: valid fd; result checked.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

fn check_all(f: &File, model: &[u8], what: &str) {
    let size = f.metadata().unwrap().len();
    assert_eq!(
        size,
        model.len() as u64,
        "{what}: size: expected {}, got {size}",
        model.len()
    );
    let mut got = vec![0u8; model.len()];
    f.read_exact_at(&mut got, 0)
        .unwrap_or_else(|e| panic!("{what}: reading {} bytes: {e}", model.len()));
    if got != model {
        let at = got.iter().zip(model).position(|(a, b)| a != b);
        panic!("{what}: content differs from the model, first at byte {at:?}");
    }
}

fn parts_dirs(backing: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(backing.join(".pershome/parts"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

#[test]
fn random_operations_on_a_parted_file_through_the_kernel_match_a_model() {
    if !can_mount() {
        return;
    }
    let common::Scratch { _dir, backing, mnt } = common::scratch("pershome-parts-mount");
    let path = mnt.join("data.bin");
    let ops = if long() { 3000 } else { 400 };
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut model: Vec<u8> = (0..3 * P + 123).map(|i| (i % 253) as u8).collect();

    let mut m = Mount::new(&backing, &mnt, OPTS);
    std::fs::write(&path, &model).unwrap();
    let mut f = open_rw(&path);
    for step in 0..ops {
        match rng.below(12) {
            0..=4 => {
                let off = rng.below(12 * P);
                let len = rng.below(3 * P) as usize + 1;
                let data: Vec<u8> = (0..len).map(|i| ((i as u64 + step) % 251) as u8).collect();
                f.write_all_at(&data, off).unwrap();
                if model.len() < off as usize + len {
                    model.resize(off as usize + len, 0);
                }
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            5 | 6 => {
                let size = rng.below(13 * P);
                f.set_len(size).unwrap();
                model.resize(size as usize, 0);
            }
            7 => {
                let off = rng.below(12 * P);
                let len = rng.below(3 * P) + 1;
                // SAFETY: valid fd; result checked.
                let r = unsafe {
                    libc::fallocate(
                        f.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as libc::off_t,
                        len as libc::off_t,
                    )
                };
                assert_eq!(
                    r,
                    0,
                    "step {step}: punching {len} at {off}: {}",
                    std::io::Error::last_os_error()
                );
                let end = ((off + len) as usize).min(model.len());
                if (off as usize) < end {
                    model[off as usize..end].fill(0);
                }
            }
            8 | 9 => {
                let off = rng.below(model.len() as u64 + 1);
                let mut buf = vec![0u8; (rng.below(2 * P) + 1) as usize];
                let n = f.read_at(&mut buf, off).unwrap();
                let want = &model[off as usize..(off as usize + buf.len()).min(model.len())];
                assert_eq!(
                    &buf[..n],
                    want,
                    "step {step}: read {} at {off} (expected {} bytes, got {n})",
                    buf.len(),
                    want.len()
                );
            }
            10 => {
                // Whatever SEEK_DATA skips and wherever SEEK_HOLE lands must be zeros.
                let off = rng.below(model.len() as u64 + 1);
                if let Some(d) = lseek(&f, off, libc::SEEK_DATA) {
                    assert!(
                        d >= off && model[off as usize..d as usize].iter().all(|&b| b == 0),
                        "step {step}: SEEK_DATA from {off} gave {d}, skipping non-zero bytes"
                    );
                } else {
                    assert!(
                        model[(off as usize).min(model.len())..]
                            .iter()
                            .all(|&b| b == 0),
                        "step {step}: SEEK_DATA from {off} found no data, but there is"
                    );
                }
                if (off as usize) < model.len() {
                    let h = lseek(&f, off, libc::SEEK_HOLE).expect("SEEK_HOLE within the file");
                    assert!(
                        h >= off && h <= model.len() as u64,
                        "step {step}: SEEK_HOLE from {off} gave {h}, size {}",
                        model.len()
                    );
                    if (h as usize) < model.len() {
                        assert_eq!(model[h as usize], 0, "step {step}: SEEK_HOLE at data");
                    }
                }
            }
            _ => {
                drop(f);
                m.unmount();
                m = Mount::new(&backing, &mnt, OPTS);
                f = open_rw(&path);
                check_all(&f, &model, &format!("step {step}: after a remount"));
            }
        }
    }
    check_all(&f, &model, "at the end");
    drop(f);
    // Renaming and hard-linking through the kernel keep the content.
    std::fs::rename(&path, mnt.join("moved.bin")).unwrap();
    std::fs::hard_link(mnt.join("moved.bin"), mnt.join("link.bin")).unwrap();
    m.unmount();
    let m = Mount::new(&backing, &mnt, OPTS);
    check_all(
        &open_rw(&mnt.join("link.bin")),
        &model,
        "through a hard link",
    );
    assert!(
        model.len() as u64 <= P || parts_dirs(&backing).len() == 1,
        "a {}-byte file over 4 KiB parts is stored in parts: {:?}",
        model.len(),
        parts_dirs(&backing)
    );
    std::fs::remove_file(mnt.join("moved.bin")).unwrap();
    std::fs::remove_file(mnt.join("link.bin")).unwrap();
    m.unmount();
    assert!(
        parts_dirs(&backing).is_empty(),
        "parts left after deleting the file: {:?}",
        parts_dirs(&backing)
    );
    assert_fat_clean(&backing);
    let report = pershome::fsck::fsck(&backing, &pershome::fsck::FsckOptions::default()).unwrap();
    let problems: Vec<_> = report.problems_left().collect();
    assert!(problems.is_empty(), "fsck finds: {problems:#?}");
}
