//! Round trips through a real mount, counted by the daemon itself (`-o counters`): how many
//! FUSE requests the kernel sends for common operations. The counts are exact for a given
//! kernel and coreutils (they are what the kernel sends, not a timing), so they are asserted
//! exactly: a change in the kernel caching policy of `src/fuse.rs` shows here as a changed
//! map. Timings are never asserted (the bench reports them).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};

use pershome::requests::{difference, read_report, total, Report};

mod common;
use common::{can_mount, Mount, Scratch};

fn scratch() -> Scratch {
    common::scratch("pershome-requests")
}

/// The requests the daemon served while `work` ran.
///
/// The kernel sends RELEASE and RELEASEDIR in the background after the last close
/// (`fuse_file_put` does not wait for the reply), so they may reach the daemon after `work`
/// has returned. The count is read again until every open that `work` made has its release;
/// this waits for events that are certain to come, it does not judge a time (after 10 s the
/// count is compared as it stands, and a missing release then fails the caller's assertion).
fn during(mnt: &Path, work: impl FnOnce()) -> Report {
    let before = read_report(mnt).expect("read the request report before");
    work();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let after = read_report(mnt).expect("read the request report after");
        let diff = difference(&before, &after);
        let count = |names: &[&str]| -> u64 {
            names
                .iter()
                .map(|n| diff.get(*n).copied().unwrap_or(0))
                .sum()
        };
        let opens = count(&["OPEN", "OPENDIR", "CREATE"]);
        let releases = count(&["RELEASE", "RELEASEDIR"]);
        if releases >= opens || std::time::Instant::now() >= deadline {
            return diff;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn report(pairs: &[(&str, u64)]) -> Report {
    pairs.iter().map(|&(n, c)| (n.to_owned(), c)).collect()
}

fn run(program: &str, args: &[&std::ffi::OsStr]) {
    let status = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

/// `DIRS` directories of `FILES` empty files each, under `mnt/tree`, made through the mount
/// (100 per directory, as in the bench: costs per directory spread over its entries).
const DIRS: usize = 4;
const FILES: usize = 100;

fn make_tree(mnt: &Path) {
    for d in 0..DIRS {
        let dir = mnt.join(format!("tree/d{d}"));
        std::fs::create_dir_all(&dir).expect("mkdir through the mount");
        for f in 0..FILES {
            std::fs::File::create_new(dir.join(format!("f{f:03}")))
                .expect("create through the mount");
        }
    }
}

#[test]
fn counters_are_off_unless_asked_for() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "");
    let got = read_report(&m.mountpoint);
    assert!(
        got.is_err(),
        "without -o counters the report must not be served, got {got:?}"
    );
}

#[test]
fn creating_an_empty_file_costs_three_requests_and_no_flush() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "counters");
    std::fs::create_dir(m.mountpoint.join("d")).expect("mkdir");
    let n = 20;
    let got = during(&m.mountpoint, || {
        for i in 0..n {
            // create_new is open(O_CREAT|O_EXCL): a LOOKUP of the new name, then CREATE; the
            // close is a RELEASE. FOPEN_NOFLUSH spares the FLUSH a close would send.
            std::fs::File::create_new(m.mountpoint.join(format!("d/f{i}"))).expect("create");
        }
    });
    // The GETATTR is the parent's: each create invalidates the directory's attributes in the
    // kernel (fuse_dir_changed), and the permission check of the next create
    // (default_permissions) fetches them again.
    let expected = report(&[("LOOKUP", n), ("CREATE", n), ("RELEASE", n), ("GETATTR", n)]);
    assert_eq!(
        got, expected,
        "requests for {n} empty files: expected {expected:?}, got {got:?}"
    );
}

#[test]
fn a_warm_listing_is_served_from_the_kernel_caches() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "counters");
    make_tree(&m.mountpoint);
    let tree = m.mountpoint.join("tree");
    let dirs = (DIRS + 1) as u64;
    let entries = (DIRS * FILES + DIRS) as u64;

    // The first listing fills the kernel's caches (names, attributes, listings, ACLs).
    let cold = during(&m.mountpoint, || run("ls", &[tree.as_os_str()]));
    assert!(
        cold.get("READDIRPLUS").copied().unwrap_or(0) > 0,
        "the first listing must read the directories, got {cold:?}"
    );
    let _ = during(&m.mountpoint, || {
        run("ls", &["-lR".as_ref(), tree.as_os_str()])
    });
    // The second listing already costs at most 0.1 requests per entry. A few GETATTRs of
    // directories remain, because the kernel marks a directory's atime stale after it read
    // the listing from the daemon (fuse_readdir_uncached), which makes the next stat ask.
    let second = during(&m.mountpoint, || {
        run("ls", &["-lR".as_ref(), tree.as_os_str()])
    });
    assert!(
        total(&second) * 10 <= entries,
        "the second ls -lR must cost at most 0.1 requests per entry: {second:?} for {entries}"
    );
    // Warm: the kernel lists every directory from its page cache (FOPEN_CACHE_DIR), keeps
    // names and attributes, and keeps each file's ACL because no READDIRPLUS forgets it;
    // ls asks security.selinux once, is told the namespace is not supported, and stops.
    // What is left is one OPENDIR and RELEASEDIR per directory, and the access and default
    // ACLs of each listed subdirectory, which reach the daemon on every listing (measured on
    // Linux 6.18).
    let warm = during(&m.mountpoint, || {
        run("ls", &["-lR".as_ref(), tree.as_os_str()])
    });
    let expected = report(&[
        ("OPENDIR", dirs),
        ("RELEASEDIR", dirs),
        ("GETXATTR", 1 + 2 * DIRS as u64),
    ]);
    assert_eq!(
        warm, expected,
        "warm ls -lR of {entries} entries: expected {expected:?}, got {warm:?}"
    );
    assert!(
        total(&warm) * 10 <= entries,
        "warm ls -lR must cost at most 0.1 requests per entry: {} for {entries}",
        total(&warm)
    );
    let warm_find = during(&m.mountpoint, || run("find", &[tree.as_os_str()]));
    // find asks statfs once (to learn the filesystem type) and opens every directory.
    let expected = report(&[("OPENDIR", dirs), ("RELEASEDIR", dirs), ("STATFS", 1)]);
    assert_eq!(
        warm_find, expected,
        "warm find: expected {expected:?}, got {warm_find:?}"
    );
}

#[test]
fn cached_listings_follow_every_change_made_through_the_mount() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "counters");
    make_tree(&m.mountpoint);
    let d0 = m.mountpoint.join("tree/d0");
    let d1 = m.mountpoint.join("tree/d1");
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    // Twice, so the second listing comes from the kernel's cache.
    let _ = names(&d0);
    let before = names(&d0);
    assert_eq!(before.len(), FILES);
    std::fs::File::create_new(d0.join("new")).expect("create");
    std::fs::remove_file(d0.join("f000")).expect("unlink");
    std::fs::rename(d0.join("f001"), d1.join("moved")).expect("rename");
    std::fs::hard_link(d0.join("f002"), d0.join("link")).expect("link");
    std::fs::create_dir(d0.join("sub")).expect("mkdir");
    std::os::unix::fs::symlink("target", d0.join("sym")).expect("symlink");
    let mut expected: Vec<String> = before
        .iter()
        .filter(|n| *n != "f000" && *n != "f001")
        .cloned()
        .chain(["new", "link", "sub", "sym"].map(String::from))
        .collect();
    expected.sort();
    assert_eq!(names(&d0), expected, "listing of d0 after changes");
    assert!(
        names(&d1).contains(&"moved".to_owned()),
        "the rename target's listing must show the moved file: {:?}",
        names(&d1)
    );
    // The same after a remount: nothing cached survives, and the store agrees.
    m.unmount();
    let m = Mount::new(&s.backing, &s.mnt, "");
    assert_eq!(
        names(&m.mountpoint.join("tree/d0")),
        expected,
        "after a remount"
    );
}

#[test]
fn removing_a_tree_costs_its_unlinks_and_a_parent_refresh_each() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "counters");
    make_tree(&m.mountpoint);
    let tree = m.mountpoint.join("tree");
    run("ls", &["-lR".as_ref(), tree.as_os_str()]);
    let files = (DIRS * FILES) as u64;
    let dirs = (DIRS + 1) as u64;
    let mut got = during(&m.mountpoint, || {
        run("rm", &["-rf".as_ref(), tree.as_os_str()])
    });
    // Forgets are sent when the kernel drops inodes, in batches of its choosing, and are
    // never answered: they are no round trip of rm's, and not counted here.
    got.remove("FORGET");
    // Each unlink invalidates the parent's attributes in the kernel (fuse_dir_changed), so
    // the permission check of the next one (default_permissions) fetches them again: one
    // GETATTR per entry that no reply of the daemon can spare.
    let expected = report(&[
        ("UNLINK", files),
        ("RMDIR", dirs),
        ("GETATTR", files + dirs - 1),
        ("OPENDIR", 2 * dirs),
        ("RELEASEDIR", 2 * dirs),
        ("STATFS", 1),
    ]);
    assert_eq!(
        got, expected,
        "rm -rf of {files} files in {dirs} directories: expected {expected:?}, got {got:?}"
    );
}

#[test]
fn the_security_namespace_is_declined_and_others_are_kept() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "");
    let f = m.mountpoint.join("f");
    std::fs::write(&f, b"x").expect("write");
    let path = CString::new(f.as_os_str().as_bytes()).expect("path");
    let set = |name: &str| -> std::io::Result<()> {
        let n = CString::new(name).expect("name");
        // SAFETY: valid NUL-terminated strings and a 1-byte value for the call's duration.
        let r = unsafe { libc::setxattr(path.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // (security.capability is checked by the kernel for its format before it gets here.)
    for name in ["security.selinux", "security.x"] {
        let e = set(name).expect_err("security.* must be declined");
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP),
            "setxattr {name}: expected EOPNOTSUPP, got {e}"
        );
    }
    set("user.kept").expect("user.* stays supported");
    set("trusted.kept").expect("trusted.* stays supported (root)");
    let n = CString::new("security.selinux").expect("name");
    let mut buf = [0u8; 64];
    // SAFETY: as above, with the buffer's real length.
    let r = unsafe {
        libc::getxattr(
            path.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let e = std::io::Error::last_os_error();
    assert!(
        r < 0 && e.raw_os_error() == Some(libc::EOPNOTSUPP),
        "getxattr security.selinux: expected EOPNOTSUPP, got {r} ({e})"
    );
}
