//! A full stick (issue 11, defect 4): store errors reach applications as `ENOSPC`, nothing
//! that did not land is reported as saved, a failed batch lands once there is room, and the
//! daemon's exit status says whether its last commit landed.
//!
//! The stick is a tiny tmpfs mounted for the test (root only, like every mount test here) and
//! unmounted when the test ends, even when it fails.

use std::io::Write;
use std::path::{Path, PathBuf};

use pershome::fs::{Ctx, Errno, Fs, ROOT};

mod common;
use common::{open, Mount};

const USER: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 1,
    umask: 0,
};

/// A tmpfs of `size` mounted on a fresh directory under /var/tmp; unmounted (lazily, so a
/// failing test cannot leave it behind) and removed when dropped.
struct TinyStick {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl TinyStick {
    fn new(size: &str) -> TinyStick {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a tmpfs as a full stick: run it as root (CI does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("pershome-full")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let root = dir.path().join("stick");
        std::fs::create_dir(&root).expect("mkdir stick");
        nix::mount::mount(
            Some("tmpfs"),
            &root,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0755").as_str()),
        )
        .expect("mount a tmpfs");
        TinyStick { _dir: dir, root }
    }

    fn backing(&self) -> PathBuf {
        let b = self.root.join("pershome");
        std::fs::create_dir_all(&b).expect("mkdir backing");
        b
    }

    /// Fills the stick until a write fails with ENOSPC; returns the filler to delete.
    fn fill(&self) -> PathBuf {
        let path = self.root.join("filler");
        let mut f = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0xA5u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the stick: {e}"),
            }
        }
        path
    }
}

impl Drop for TinyStick {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Names long enough that their records need more than the page the journal has room in.
fn name(i: usize) -> String {
    format!("a directory with a long name, made while the stick was full {i:03}")
}

#[test]
fn fsync_on_a_full_stick_is_enospc_and_the_batch_lands_once_there_is_room() {
    let stick = TinyStick::new("2m");
    let backing = stick.backing();
    let fs = open(&backing);
    fs.commit().expect("first commit");
    let filler = stick.fill();
    for i in 0..60 {
        fs.mkdir(USER, ROOT, name(i).as_bytes(), 0o700)
            .expect("mkdir on a full tmpfs (a directory takes no data block)");
    }
    let got = fs.fsyncdir(ROOT);
    assert_eq!(
        got,
        Err(Errno::ENOSPC),
        "fsync of a directory on a full stick: expected ENOSPC, got {got:?}"
    );
    assert!(
        fs.final_commit().is_err(),
        "a commit that did not land must not be reported as saved"
    );
    std::fs::remove_file(&filler).expect("free the stick");
    fs.fsyncdir(ROOT).expect("fsync once there is room");
    assert!(fs.final_commit().is_ok(), "everything landed now");
    drop(fs);
    let fs: Fs = open(&backing);
    for i in 0..60 {
        let attr = fs.lookup(ROOT, name(i).as_bytes()).expect("lookup");
        assert_eq!(
            attr.perm,
            0o700,
            "{} after remount: the failed batch was written later",
            name(i)
        );
    }
}

fn status(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the daemon's status {}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn the_daemon_exit_status_says_whether_its_last_commit_landed() {
    let stick = TinyStick::new("2m");
    let backing = stick.backing();
    let mnt = stick._dir.path().join("home");
    std::fs::create_dir(&mnt).expect("mkdir mount point");
    let status_file = stick._dir.path().join("status");
    let opts = format!("commit=3600,status={}", status_file.display());

    // A session on a full stick: its changes cannot be committed at unmount.
    let mount = Mount::new(&backing, &mnt, &opts);
    let filler = stick.fill();
    for i in 0..60 {
        std::fs::create_dir(mnt.join(name(i))).expect("mkdir through the mount");
    }
    mount.unmount();
    assert_eq!(
        status(&status_file),
        "6",
        "exit status of a daemon whose last commit failed (expected 6, NOT_SAVED)"
    );

    // With room again, a session's last commit lands and the status says so.
    std::fs::remove_file(&filler).expect("free the stick");
    let mount = Mount::new(&backing, &mnt, &opts);
    std::fs::create_dir(mnt.join("after")).expect("mkdir");
    mount.unmount();
    assert_eq!(
        status(&status_file),
        "0",
        "exit status after a clean unmount"
    );
}
