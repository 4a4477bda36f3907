//! `pershome prepare`, `status` and `migrate`, run as the real binary. The migrate tests mount
//! pershomefs for real (root and /dev/fuse) and read the result back through a fresh mount.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{can_mount, mounted, wait_until, Mount};

fn pershome(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pershome"))
        .args(args)
        .env("PATH", path_with_bins())
        .output()
        .expect("run pershome")
}

fn path_with_bins() -> std::ffi::OsString {
    let bin = Path::new(env!("CARGO_BIN_EXE_pershomefs"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let mut p = bin.into_os_string();
    p.push(":");
    p.push(std::env::var_os("PATH").unwrap_or_default());
    p
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// Every file under `root` with its content and mtime, for "nothing else was touched".
fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>, i64)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(root).expect("read_dir") {
        let e = e.expect("entry");
        let md = e.metadata().expect("md");
        if md.is_dir() {
            v.push((e.path(), Vec::new(), md.mtime()));
            v.extend(snapshot(&e.path()));
        } else {
            v.push((
                e.path(),
                std::fs::read(e.path()).unwrap_or_default(),
                md.mtime(),
            ));
        }
    }
    v.sort();
    v
}

#[test]
fn prepare_a_directory_is_idempotent_and_touches_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stick = dir.path();
    std::fs::write(stick.join("notes.txt"), b"mine").expect("write");
    std::fs::create_dir(stick.join("Photos")).expect("mkdir");
    std::fs::write(stick.join("Photos/a.jpg"), b"jpg").expect("write");
    let before = snapshot(stick);

    // A plain directory is refused without --any-fs, and nothing is created.
    let o = pershome(&[os("prepare"), os("--no-gui"), stick.as_os_str()]);
    assert_eq!(
        code(&o),
        Some(2),
        "expected exit 2 (not FAT) got {}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--any-fs"),
        "{}",
        text(&o)
    );
    assert!(
        !stick.join("pershome").exists(),
        "refused prepare created pershome/"
    );

    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        stick.as_os_str(),
    ]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("prepared"),
        "{}",
        text(&o)
    );
    assert!(stick
        .join("pershome/.pershome/journal.0000000000000001")
        .is_file());
    let after: Vec<_> = snapshot(stick)
        .into_iter()
        .filter(|(p, _, _)| !p.starts_with(stick.join("pershome")))
        .collect();
    assert_eq!(after, before, "prepare touched other files");

    // Again: already prepared, nothing written.
    let store_before = snapshot(&stick.join("pershome"));
    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        stick.as_os_str(),
    ]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already prepared"),
        "expected 'already prepared', got {}",
        text(&o)
    );
    assert_eq!(
        snapshot(&stick.join("pershome")),
        store_before,
        "second prepare wrote"
    );

    // Naming the pershome/ directory itself works too, and finds it prepared.
    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        stick.join("pershome").as_os_str(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already prepared"),
        "{}",
        text(&o)
    );
}

#[test]
fn prepare_with_names_8_3_makes_an_8_3_store_that_mounts_keep() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stick = dir.path();
    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        os("--names"),
        os("8.3"),
        stick.as_os_str(),
    ]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    let backing = stick.join("pershome");
    let names: Vec<String> = std::fs::read_dir(&backing)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["PERSHOME.DB"], "expected only the 8.3 store");
    assert!(backing.join("PERSHOME.DB/00000001.JNL").is_file());
    pershome::audit::assert_fat_clean_in(&backing, pershome::names::NameMode::Short83);
    // A mount without the option adopts it; prepare again finds it prepared.
    let fs = pershome::fs::Fs::open_backing(&backing, common::opts()).expect("open");
    assert_eq!(fs.name_mode(), pershome::names::NameMode::Short83);
    drop(fs);
    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        stick.as_os_str(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already prepared"),
        "expected 'already prepared', got {}",
        text(&o)
    );
    let o = pershome(&[os("prepare"), os("--names"), os("9.3"), stick.as_os_str()]);
    assert_eq!(
        code(&o),
        Some(16),
        "a bad --names is a usage error: {}",
        text(&o)
    );
}

#[test]
fn prepare_keeps_an_existing_pershome_folder_in_any_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("PersHome")).expect("mkdir");
    std::fs::write(dir.path().join("PersHome/essay.odt"), b"x").expect("write");
    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        dir.path().as_os_str(),
    ]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    assert!(
        dir.path().join("PersHome/.pershome").is_dir(),
        "{}",
        text(&o)
    );
    assert!(
        !dir.path().join("pershome").exists(),
        "made a second pershome/"
    );
    assert_eq!(
        std::fs::read(dir.path().join("PersHome/essay.odt")).ok(),
        Some(b"x".to_vec())
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("1 entries"),
        "{}",
        text(&o)
    );
}

#[test]
fn prepare_refuses_sensible_things() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").expect("write");
    let cases: Vec<(Vec<&std::ffi::OsStr>, i32, &str)> = vec![
        (
            vec![
                os("prepare"),
                os("--no-gui"),
                os("--any-fs"),
                file.as_os_str(),
            ],
            2,
            "neither a directory",
        ),
        (
            vec![
                os("prepare"),
                os("--no-gui"),
                os("--any-fs"),
                os("/nonexistent/x"),
            ],
            2,
            "No such file",
        ),
        (
            vec![os("prepare"), os("--bogus")],
            16,
            "unexpected argument",
        ),
    ];
    for (args, want, msg) in cases {
        let o = pershome(&args);
        assert_eq!(code(&o), Some(want), "for {args:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(msg),
            "for {args:?}: expected {msg:?} in {}",
            text(&o)
        );
    }
    // A pershome that is a symlink is not followed.
    let stick = dir.path().join("stick");
    std::fs::create_dir(&stick).expect("mkdir");
    std::fs::create_dir(dir.path().join("elsewhere")).expect("mkdir");
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), stick.join("pershome"))
        .expect("symlink");
    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        stick.as_os_str(),
    ]);
    assert_ne!(code(&o), Some(0), "followed a symlink: {}", text(&o));
    assert!(
        !dir.path().join("elsewhere/.pershome").exists(),
        "store created through a symlink"
    );

    // A read-only directory (a read-only bind mount) is refused, unchanged.
    if can_mount() {
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).expect("mkdir");
        let ok = Command::new("mount")
            .args(["--bind", "-o", "ro"])
            .arg(&ro)
            .arg(&ro)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "bind mount");
        struct Umount(PathBuf);
        impl Drop for Umount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
        let _g = Umount(ro.clone());
        let o = pershome(&[
            os("prepare"),
            os("--no-gui"),
            os("--any-fs"),
            ro.as_os_str(),
        ]);
        assert_eq!(code(&o), Some(2), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("read-only"),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn status_of_a_mounted_and_an_unmounted_backing() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let stick = dir.path().join("stick");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&stick).expect("mkdir");
    std::fs::create_dir_all(&home).expect("mkdir");
    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        stick.as_os_str(),
    ]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    let backing = stick.join("pershome").canonicalize().expect("canon");

    let m = Mount::new(&backing, &home, "");
    std::fs::write(home.join("a"), b"x").expect("write");
    let o = pershome(&[os("status"), home.as_os_str()]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        code(&o),
        Some(1),
        "mounted: expected exit 1 (in use) got {}",
        text(&o)
    );
    assert!(
        out.contains(&format!(
            "mounted on {}",
            home.canonicalize().expect("c").display()
        )),
        "{}",
        text(&o)
    );
    assert!(out.contains("safe to remove: NO"), "{}", text(&o));
    // migrate into a stick whose home is mounted is refused at once, pointing at the home.
    std::fs::create_dir(dir.path().join("src")).expect("mkdir");
    let o = pershome(&[
        os("migrate"),
        dir.path().join("src").as_os_str(),
        stick.as_os_str(),
    ]);
    assert_eq!(code(&o), Some(4), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use"),
        "{}",
        text(&o)
    );
    let o = pershome(&[os("status"), os("--json")]);
    let json = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        json.contains(&format!("\"backing\":\"{}\"", backing.display())),
        "{}",
        text(&o)
    );
    assert!(json.contains("\"state\":\"dirty\""), "{}", text(&o));
    assert!(json.contains("\"safe_to_remove\":false"), "{}", text(&o));
    m.unmount();

    let o = pershome(&[os("status"), backing.as_os_str()]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        code(&o),
        Some(0),
        "unmounted: expected exit 0 got {}",
        text(&o)
    );
    assert!(out.contains("home:         not mounted"), "{}", text(&o));
    assert!(out.contains("state:        clean"), "{}", text(&o));
    assert!(out.contains("last commit:  "), "{}", text(&o));
    let o = pershome(&[os("status"), os("--json"), backing.as_os_str()]);
    let json = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        json.contains("\"safe_to_remove\":true") && json.contains("\"homes\":[]"),
        "{}",
        text(&o)
    );

    let o = pershome(&[os("status"), dir.path().as_os_str()]);
    assert_eq!(code(&o), Some(2), "not a stick: {}", text(&o));
}

// ---------------------------------------------------------------------------------------------
// migrate
// ---------------------------------------------------------------------------------------------

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).expect("c");
    let n = CString::new(name).expect("n");
    // SAFETY: valid C strings and buffer for the duration of the call.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {p:?}: {}",
        std::io::Error::last_os_error()
    );
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).ok()?;
    let n = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: as above.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| {
        buf.truncate(r as usize);
        buf
    })
}

fn set_times(p: &Path, s: i64, ns: i64) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(s, ns);
    utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink).expect("utimensat");
}

/// A home with what pershome must keep.
fn varied_home(src: &Path) {
    std::fs::create_dir_all(src.join("Docs/sub")).expect("mkdir");
    std::fs::write(src.join("Docs/report: v2?.txt"), b"colon and question").expect("w");
    std::fs::write(src.join("Makefile"), b"upper").expect("w");
    std::fs::write(src.join("makefile"), b"lower").expect("w");
    std::fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("w");
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::write(src.join("Docs/sub/big.bin"), vec![7u8; 3 << 20]).expect("w");
    std::os::unix::fs::symlink("Docs/report: v2?.txt", src.join("link")).expect("symlink");
    std::fs::write(src.join("hard1"), b"shared").expect("w");
    std::fs::hard_link(src.join("hard1"), src.join("Docs/hard2")).expect("link");
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .expect("mkfifo");
    set_xattr(&src.join("Makefile"), "user.color", b"blue");
    // A socket node (the listener closes; the node stays, as a dead session's socket does).
    drop(std::os::unix::net::UnixListener::bind(src.join("sock")).expect("bind"));
    std::fs::write(src.join("shared.txt"), b"acl").expect("w");
    let ok = Command::new("setfacl")
        .args(["-m", "u:nobody:r,g:nogroup:rw"])
        .arg(src.join("shared.txt"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "setfacl");
    std::fs::write(src.join("trailing dot."), b"dot").expect("w");
    std::fs::write(src.join("CON"), b"reserved").expect("w");
    std::fs::set_permissions(src.join("Docs/sub"), std::fs::Permissions::from_mode(0o750))
        .expect("chmod");
    set_times(
        &src.join("Docs/report: v2?.txt"),
        1_600_000_000,
        123_456_789,
    );
    set_times(&src.join("link"), 1_500_000_000, 987_654_321);
    set_times(&src.join("Docs/sub"), 1_400_000_000, 5);
}

/// Compares SRC and the home through a fresh mount; returns the differences.
fn compare(src: &Path, home: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(src.join(&rel)).expect("read_dir") {
            let e = e.expect("e");
            let r = rel.join(e.file_name());
            let a = std::fs::symlink_metadata(src.join(&r)).expect("md");
            let b = match std::fs::symlink_metadata(home.join(&r)) {
                Ok(b) => b,
                Err(err) => {
                    diffs.push(format!("{r:?}: missing ({err})"));
                    continue;
                }
            };
            let fa = (
                a.mode(),
                a.uid(),
                a.gid(),
                a.mtime(),
                a.mtime_nsec(),
                a.nlink(),
            );
            let fb = (
                b.mode(),
                b.uid(),
                b.gid(),
                b.mtime(),
                b.mtime_nsec(),
                b.nlink(),
            );
            if fa != fb {
                diffs.push(format!(
                    "{r:?}: (mode uid gid mtime ns nlink) expected {fa:?} got {fb:?}"
                ));
            }
            if a.is_file() && std::fs::read(src.join(&r)).ok() != std::fs::read(home.join(&r)).ok()
            {
                diffs.push(format!("{r:?}: content differs"));
            }
            if a.file_type().is_symlink()
                && std::fs::read_link(src.join(&r)).ok() != std::fs::read_link(home.join(&r)).ok()
            {
                diffs.push(format!("{r:?}: link target differs"));
            }
            if !a.file_type().is_symlink() {
                for x in ["user.color", "system.posix_acl_access"] {
                    let (xa, xb) = (get_xattr(&src.join(&r), x), get_xattr(&home.join(&r), x));
                    if xa != xb {
                        diffs.push(format!("{r:?}: xattr {x} expected {xa:?} got {xb:?}"));
                    }
                }
            }

            if a.is_dir() {
                stack.push(r);
            }
        }
    }
    diffs
}

struct Scratch {
    _dir: tempfile::TempDir,
    src: PathBuf,
    stick: PathBuf,
    backing: PathBuf,
    home: PathBuf,
}

fn scratch() -> Scratch {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let stick = dir.path().join("stick");
    let home = dir.path().join("home");
    for d in [&src, &stick, &home] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        stick.as_os_str(),
    ]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    Scratch {
        backing: stick.join("pershome"),
        _dir: dir,
        src,
        stick,
        home,
    }
}

#[test]
fn migrate_a_varied_home_and_read_it_back_through_a_fresh_mount() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    varied_home(&s.src);
    let o = pershome(&[os("migrate"), s.src.as_os_str(), s.stick.as_os_str()]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("verified"),
        "{}",
        text(&o)
    );
    assert!(
        !s.backing.join(".pershome-migrate").exists(),
        "journal left after a complete run"
    );
    assert!(mounted(&s.home).is_none());

    pershome::audit::assert_fat_clean(&s.backing);
    let m = Mount::new(&s.backing, &s.home, "");
    let diffs = compare(&s.src, &s.home);
    assert!(
        diffs.is_empty(),
        "differences after migrate:\n{}",
        diffs.join("\n")
    );
    assert!(std::fs::symlink_metadata(s.home.join("sock"))
        .expect("sock")
        .file_type()
        .is_socket());
    assert!(std::fs::symlink_metadata(s.home.join("fifo"))
        .expect("fifo")
        .file_type()
        .is_fifo());
    let a = std::fs::metadata(s.home.join("hard1")).expect("h1");
    let b = std::fs::metadata(s.home.join("Docs/hard2")).expect("h2");
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "hard link not kept");
    drop(m);

    // A second run has nothing to copy.
    let o = pershome(&[os("migrate"), s.src.as_os_str(), s.stick.as_os_str()]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(" 0 files copied")
            || String::from_utf8_lossy(&o.stdout).contains(": 0 files copied"),
        "expected nothing copied, got {}",
        text(&o)
    );
}

#[test]
fn migrate_resumes_after_being_killed() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    std::fs::create_dir(s.src.join("d")).expect("mkdir");
    for i in 0..40 {
        std::fs::write(s.src.join(format!("d/f{i:02}")), vec![i as u8; 2 << 20]).expect("w");
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_pershome"))
        .args([os("migrate"), s.src.as_os_str(), s.stick.as_os_str()])
        .env("PATH", path_with_bins())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Kill it once some files are on the stick.
    let d = s.backing.join("d");
    wait_until("a few files are copied", || {
        std::fs::read_dir(&d)
            .map(|r| r.count() >= 5)
            .unwrap_or(false)
    });
    child.kill().expect("kill");
    let _ = child.wait();
    // The daemon it started dies with it (a clean unmount); nothing stays mounted.
    let backing_shown = s.backing.display().to_string();
    wait_until("the migrate mount is gone", || {
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(&backing_shown)
    });
    let copied_before = std::fs::read_dir(&d).map(|r| r.count()).unwrap_or(0);
    assert!(
        copied_before < 40,
        "the kill came too late to test resuming ({copied_before} of 40)"
    );

    let o = pershome(&[os("migrate"), s.src.as_os_str(), s.stick.as_os_str()]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let copied: u64 = out
        .split(" files copied")
        .next()
        .and_then(|p| p.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("files copied figure");
    assert!(copied < 40, "resume re-copied everything: {out}");
    let m = Mount::new(&s.backing, &s.home, "");
    let diffs = compare(&s.src, &s.home);
    assert!(
        diffs.is_empty(),
        "differences after resume:\n{}",
        diffs.join("\n")
    );
    drop(m);
}

#[test]
fn migrate_to_a_full_stick_stops_and_says_how_much_more() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    // A small tmpfs as the stick.
    let small = s.stick.parent().expect("p").join("small");
    std::fs::create_dir(&small).expect("mkdir");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|st| st.success());
    assert!(ok, "mount tmpfs");
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _g = Umount(small.clone());
    let o = pershome(&[
        os("prepare"),
        os("--no-gui"),
        os("--any-fs"),
        small.as_os_str(),
    ]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    for i in 0..4 {
        std::fs::write(s.src.join(format!("f{i}")), vec![1u8; 2 << 20]).expect("w");
    }
    // The check before copying.
    let o = pershome(&[os("migrate"), s.src.as_os_str(), small.as_os_str()]);
    assert_eq!(code(&o), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("more is needed"),
        "{}",
        text(&o)
    );
    // And the real ENOSPC in the middle of the copy.
    let o = pershome(&[
        os("migrate"),
        os("--no-space-check"),
        s.src.as_os_str(),
        small.as_os_str(),
    ]);
    assert_eq!(code(&o), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains("the stick is full") && err.contains("more is needed"),
        "{}",
        text(&o)
    );
    let small_backing = small.join("pershome").display().to_string();
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(&small_backing),
        "mount of {small_backing} left behind"
    );
    // Nothing lost: the source is whole.
    for i in 0..4 {
        assert_eq!(
            std::fs::metadata(s.src.join(format!("f{i}")))
                .map(|m| m.len())
                .ok(),
            Some(2 << 20)
        );
    }
}

/// A loop device over an exFAT image; dropping it unmounts whatever is mounted from it and
/// detaches it.
struct ExfatLoop {
    _dir: tempfile::TempDir,
    device: PathBuf,
    mnt: PathBuf,
}

impl ExfatLoop {
    fn new() -> ExfatLoop {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("stick.img");
        let f = std::fs::File::create(&img).expect("image");
        f.set_len(64 << 20).expect("size");
        drop(f);
        let ok = Command::new("mkfs.exfat")
            .arg("-L")
            .arg("STICK")
            .arg(&img)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "mkfs.exfat");
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        ExfatLoop {
            _dir: dir,
            device,
            mnt,
        }
    }

    fn mount(&self) {
        let ok = Command::new("mount.exfat-fuse")
            .arg(&self.device)
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount.exfat-fuse");
    }

    fn unmount(&self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

impl Drop for ExfatLoop {
    fn drop(&mut self) {
        // Every mount of the device (ours, or one prepare forgot) goes before the detach.
        let dev = self.device.display().to_string();
        for _ in 0..10 {
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let Some(mp) = info
                .lines()
                .find(|l| {
                    l.split(" - ")
                        .nth(1)
                        .is_some_and(|r| r.split(' ').nth(1) == Some(&*dev))
                })
                .and_then(|l| l.split(' ').nth(4).map(str::to_owned))
            else {
                break;
            };
            let _ = Command::new("umount").arg("-l").arg(&mp).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

#[test]
fn prepare_an_exfat_device_mounted_or_not() {
    if !can_mount() {
        return;
    }
    let lo = ExfatLoop::new();
    // Not mounted: prepare mounts it for the moment, and unmounts it again.
    let o = pershome(&[os("prepare"), os("--no-gui"), lo.device.as_os_str()]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("prepared: created"),
        "{}",
        text(&o)
    );
    let dev = lo.device.display().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !info.contains(&format!(" {dev} ")),
        "prepare left {dev} mounted:\n{info}"
    );

    // Mounted: prepare uses the mount, finds the stick prepared, and writes nothing.
    lo.mount();
    assert!(
        lo.mnt
            .join("pershome/.pershome/journal.0000000000000001")
            .is_file(),
        "no store on the stick"
    );
    let o = pershome(&[os("prepare"), os("--no-gui"), lo.device.as_os_str()]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already prepared"),
        "{}",
        text(&o)
    );
    // exFAT counts as a stick filesystem: the mount point needs no --any-fs.
    let o = pershome(&[os("prepare"), os("--no-gui"), lo.mnt.as_os_str()]);
    assert_eq!(code(&o), Some(0), "{}", text(&o));
    lo.unmount();
}

/// Security (issue 10, hole 8): a stick the tools mount as root (here an exFAT loop device,
/// through exfat-fuse) sits in root's 0700 `/run/pershome/tools`, its files the caller's and
/// closed to others (umask 077), never world-readable under `$TMPDIR`.
#[test]
fn tools_mount_sticks_where_only_root_can_look() {
    use std::os::unix::fs::MetadataExt;
    if !can_mount() {
        return;
    }
    let lo = ExfatLoop::new();
    let mount =
        pershome::stick::mount::TempMount::mount(&lo.device, pershome::stick::StickFs::Exfat)
            .expect("mounting the exFAT stick");
    let mp = mount.mountpoint.clone();
    let parent = mp.parent().expect("a parent");
    assert_eq!(
        parent,
        Path::new(pershome::stick::mount::TOOLS_DIR),
        "expected the mount under the tools directory, got {mp:?}"
    );
    let p = std::fs::symlink_metadata(parent).unwrap();
    assert_eq!(
        (p.uid(), p.mode() & 0o7777),
        (0, 0o700),
        "expected {parent:?} root's, 0700"
    );
    let m = std::fs::metadata(&mp).unwrap();
    assert_eq!(
        m.mode() & 0o077,
        0,
        "expected the stick's root closed to others, got mode {:o}",
        m.mode() & 0o7777
    );
    drop(mount);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !info.contains(&format!(" {} ", mp.display())),
        "expected {mp:?} unmounted"
    );
}
