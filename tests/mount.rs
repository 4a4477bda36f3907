//! Real mounts: start the `pershomefs` binary, work through the kernel, unmount, mount again.
//! Each mount is owned by a guard that unmounts it (and waits for the daemon to go) even when
//! the test fails, so no mount outlives a test.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pershome::audit::assert_fat_clean;

mod common;
use common::{can_mount, daemons_serving, mounted, wait_until, Mount, Scratch};

fn scratch() -> Scratch {
    common::scratch("pershome-mount")
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer for the duration of the call.
    let r = unsafe {
        libc::lsetxattr(
            c(p).as_ptr(),
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

fn get_xattr(p: &Path, name: &str) -> Vec<u8> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: as above.
    let r = unsafe {
        libc::lgetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(
        r >= 0,
        "getxattr {name} on {p:?}: {}",
        std::io::Error::last_os_error()
    );
    buf.truncate(r as usize);
    buf
}

fn set_times_ns(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid path and array of two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {p:?}: {}", std::io::Error::last_os_error());
}

/// Everything `lstat`, `readlink` and the content say about a tree.
fn describe(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let extra = if m.file_type().is_symlink() {
                format!("-> {:?}", std::fs::read_link(&p).unwrap())
            } else if m.is_file() {
                format!("content {:?}", std::fs::read(&p).unwrap())
            } else {
                String::new()
            };
            out.push(format!(
                "{:?} mode {:o} uid {} gid {} nlink {} size {} mtime {}.{:09} rdev {} {extra}",
                String::from_utf8_lossy(&rel),
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.rdev()
            ));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn a_home_survives_unmount_and_remount_through_the_kernel() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "");
    let home = &s.mnt;
    let project = home.join("project: draft?");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(home.join("report.odt"), b"the report").unwrap();
    std::fs::write(project.join("Makefile"), b"all:\n").unwrap();
    std::fs::write(project.join("makefile"), b"# lower\n").unwrap();
    std::fs::write(project.join("a."), b"dot").unwrap();
    std::fs::write(project.join("a"), b"plain").unwrap();
    std::fs::write(project.join("CON"), b"device name").unwrap();
    std::fs::write(home.join(OsStr::from_bytes(&[b'x'; 255])), b"long").unwrap();
    std::fs::write(home.join(OsStr::from_bytes(&[0xff, b'z'])), b"not utf-8").unwrap();
    let script = project.join("run.sh");
    std::fs::write(&script, b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("../report.odt", project.join("link")).unwrap();
    std::fs::hard_link(home.join("report.odt"), project.join("hard")).unwrap();
    nix::unistd::mkfifo(
        &project.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    set_xattr(&home.join("report.odt"), "user.author", b"joseph");
    set_times_ns(
        &project.join("Makefile"),
        (1_000_000_000, 5),
        (1_600_000_000, 123_456_789),
    );
    std::os::unix::fs::chown(project.join("a"), Some(4321), Some(8765)).unwrap();
    let hostile = home.join("hostile");
    std::fs::create_dir(&hostile).unwrap();
    for (i, name) in pershome::names::hostile_examples().into_iter().enumerate() {
        std::fs::write(hostile.join(OsStr::from_bytes(&name)), format!("file {i}")).unwrap();
    }
    let before = describe(home);
    m.unmount();
    assert_fat_clean(&s.backing);
    let placeholder = std::fs::read(s.backing.join("report.odt")).unwrap();
    assert!(
        pershome::meta::moved::parse_placeholder(&placeholder).is_some(),
        "a hard-linked file's names are placeholders naming the link (docs/format.md \
         § Hard-link placeholders), its content is in the store; got {:?}",
        String::from_utf8_lossy(&placeholder)
    );
    let m = Mount::new(&s.backing, &s.mnt, "");
    let after = describe(home);
    assert_eq!(after, before, "the tree after a remount");
    assert_eq!(
        get_xattr(&home.join("report.odt"), "user.author"),
        b"joseph"
    );
    // Undo the hard link: the report is a plain file on the stick again, readable on Windows.
    std::fs::remove_file(project.join("hard")).unwrap();
    m.unmount();
    assert_eq!(
        std::fs::read(s.backing.join("report.odt")).unwrap(),
        b"the report"
    );
    assert_fat_clean(&s.backing);
}

#[test]
fn mount_shows_type_and_options() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "fsname=stick");
    let line = mounted(&s.mnt).unwrap();
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields[0], "stick", "source in {line}");
    assert_eq!(fields[2], "fuse.pershomefs", "type in {line}");
    for opt in ["nosuid", "nodev", "default_permissions"] {
        assert!(
            fields[3].split(',').any(|o| o == opt),
            "{opt} missing in {line}"
        );
    }
    let vfs = nix::sys::statvfs::statvfs(&s.mnt).unwrap();
    assert!(vfs.name_max() >= 255);
    m.unmount();
}

#[test]
fn fsync_makes_metadata_durable_before_unmount() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "commit=3600");
    let f = s.mnt.join("secret");
    std::fs::write(&f, b"x").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::File::open(&f).unwrap().sync_all().unwrap();
    // The daemon dies without unmounting cleanly: only what was committed survives.
    // (Regression: this test first looked the daemon up with a pattern that matched nothing,
    // so it unmounted cleanly and could not fail.)
    let pids = daemons_serving(&s.mnt);
    assert_eq!(pids.len(), 1, "one daemon serves the mount: {pids:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::SIGKILL,
    )
    .expect("kill -9 the daemon");
    drop(m);
    let m = Mount::new(&s.backing, &s.mnt, "");
    let mode = std::fs::metadata(&f).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o600, "the mode set before fsync");
    m.unmount();
}

fn pershomefs_fails(backing: &Path, mnt: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pershomefs"))
        .arg(backing)
        .arg(mnt)
        .output()
        .unwrap();
    assert!(
        mounted(mnt).is_none(),
        "a refused mount must leave nothing mounted"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_stick_written_by_a_newer_pershome_is_refused_untouched() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    Mount::new(&s.backing, &s.mnt, "").unmount();
    let store = s.backing.join(".pershome");
    let journal = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("journal.")
        })
        .expect("a journal file");
    let mut bytes = std::fs::read(&journal).unwrap();
    // One past the newest format this pershome reads.
    let newer = pershome::meta::FORMAT_VERSION + 1;
    bytes[8..12].copy_from_slice(&newer.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..20]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&journal, &bytes).unwrap();
    let listing = |dir: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing(&store);
    let (code, err) = pershomefs_fails(&s.backing, &s.mnt);
    assert_eq!(code, 3, "exit code for a newer format; stderr: {err}");
    assert!(
        err.contains("newer"),
        "the message should say the stick is newer: {err}"
    );
    assert_eq!(listing(&store), before);
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        bytes,
        "the store must not be touched"
    );
}

#[test]
fn a_missing_or_wrong_backing_is_refused() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    let (code, err) = pershomefs_fails(&s.backing.join("nope"), &s.mnt);
    assert_eq!(code, 2, "missing backing; stderr: {err}");
    assert!(err.contains("does not exist"), "{err}");
    let file = s.backing.join("file");
    std::fs::write(&file, b"x").unwrap();
    let (code, err) = pershomefs_fails(&file, &s.mnt);
    assert_eq!(code, 2, "backing is a file; stderr: {err}");
}

/// As root, file data goes through FUSE passthrough: the kernel writes the backing file
/// itself, and pershomefs must still report the size and a new mtime, and keep them.
#[test]
fn sizes_and_mtimes_follow_writes_the_kernel_makes_directly() {
    if !can_mount() {
        return;
    }
    use std::io::Write;
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "");
    let f = s.mnt.join("log.txt");
    std::fs::write(&f, vec![b'a'; 100_000]).unwrap();
    let before = std::fs::metadata(&f).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let mut out = std::fs::OpenOptions::new().append(true).open(&f).unwrap();
    out.write_all(b"appended\n").unwrap();
    let during = std::fs::metadata(&f).unwrap();
    assert_eq!(during.len(), 100_009, "size seen while the file is open");
    drop(out);
    let after = std::fs::metadata(&f).unwrap();
    assert_eq!(after.len(), 100_009);
    assert!(
        (after.mtime(), after.mtime_nsec()) > (before.mtime(), before.mtime_nsec()),
        "mtime must move on a write"
    );
    m.unmount();
    let m = Mount::new(&s.backing, &s.mnt, "");
    let again = std::fs::metadata(&f).unwrap();
    assert_eq!(
        (again.len(), again.mtime(), again.mtime_nsec()),
        (after.len(), after.mtime(), after.mtime_nsec())
    );
    assert!(std::fs::read(&f).unwrap().ends_with(b"aaappended\n"));
    m.unmount();
}

/// `mount -t fuse` (what fstab and `mount -t fuse.pershomefs` use, through mount.fuse3, which
/// adds `dev,suid` for root): the mount comes up nosuid,nodev anyway, and `umount` ends it.
#[test]
fn mount_8_and_mount_fuse3_work() {
    if !can_mount() {
        return;
    }
    let s = scratch();
    // The helper is named by absolute path, since mount(8) runs it with a fixed PATH.
    let source = format!(
        "{}#{}",
        env!("CARGO_BIN_EXE_pershomefs"),
        s.backing.display()
    );
    let out = Command::new("mount")
        .args(["-t", "fuse", "-o", "commit=3,noatime"])
        .arg(&source)
        .arg(&s.mnt)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let guard = Mount {
        mountpoint: s.mnt.clone(),
    };
    let line = mounted(&s.mnt).expect("mounted");
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields[2], "fuse.pershomefs", "{line}");
    for opt in ["nosuid", "nodev", "noatime"] {
        assert!(
            fields[3].split(',').any(|o| o == opt),
            "{opt} missing in {line}"
        );
    }
    std::fs::write(s.mnt.join("f"), b"x").unwrap();
    let status = Command::new("umount").arg(&s.mnt).status().unwrap();
    assert!(status.success());
    std::mem::forget(guard);
    wait_until("umount finished", || mounted(&s.mnt).is_none());
    assert_eq!(std::fs::read(s.backing.join("f")).unwrap(), b"x");
}

/// Writing, truncating or chowning a setuid/setgid file clears those bits exactly as on ext4,
/// also when the kernel writes the file directly (passthrough). The kernel does it, sending
/// the mode change, because pershome does not claim FUSE_HANDLE_KILLPRIV.
#[test]
fn setuid_bits_are_cleared_as_on_ext4() {
    if !can_mount() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let s = scratch();
    let m = Mount::new(&s.backing, &s.mnt, "allow_other");
    std::fs::set_permissions(&s.mnt, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The scratch directory's parents must let `nobody` through to the mount.
    let mut p = s.mnt.parent();
    while let Some(dir) = p.filter(|d| d.starts_with("/var/tmp/") && *d != Path::new("/var/tmp")) {
        let mode = std::fs::metadata(dir).unwrap().mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711)).unwrap();
        p = dir.parent();
    }
    for name in ["written", "truncated", "chowned"] {
        let f = s.mnt.join(name);
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o6777)).unwrap();
    }
    let as_nobody = |script: &str| {
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&s.mnt)
            .uid(65534)
            .gid(65534)
            .status()
            .unwrap();
        assert!(status.success(), "as nobody: {script}");
    };
    as_nobody("echo more >> written");
    as_nobody("truncate -s 1 truncated");
    std::os::unix::fs::chown(s.mnt.join("chowned"), Some(65534), None).unwrap();
    let mode = |n: &str| std::fs::metadata(s.mnt.join(n)).unwrap().mode() & 0o7777;
    assert_eq!(
        mode("written"),
        0o777,
        "a write by another user clears setuid and setgid"
    );
    assert_eq!(mode("truncated"), 0o777, "so does a truncate");
    assert_eq!(mode("chowned"), 0o777, "and a chown");
    m.unmount();
}

/// A stick whose metadata claims a setuid-root program and a device node gains nothing: the
/// mount is nosuid,nodev, so the device cannot be opened and the setuid bit is not honoured.
/// The program is a real one (a copy of `id`: the kernel never honours setuid on a script),
/// run through the mount by an unprivileged user, who stays unprivileged.
#[test]
fn a_stick_claiming_setuid_root_and_devices_gains_nothing() {
    if !can_mount() {
        return;
    }
    use pershome::meta::journal::{Journal, OpenMode};
    use pershome::meta::{Meta, Record};
    use std::os::fd::AsFd;
    let s = scratch();
    std::fs::write(s.backing.join("rootshell"), b"#!/bin/sh\nid -u\n").unwrap();
    std::fs::write(s.backing.join("mem"), b"").unwrap();
    std::fs::copy("/usr/bin/id", s.backing.join("rootid")).unwrap();
    // The unprivileged user must reach the mount point: the scratch directory is root's 0700.
    std::fs::set_permissions(
        s.mnt.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    {
        let root = std::fs::File::open(&s.backing).unwrap();
        let (mut journal, _) = Journal::open(root.as_fd(), OpenMode::ReadWrite).unwrap();
        let p = |n: &str| vec![n.as_bytes().to_vec()];
        journal
            .append(&[
                Record::Put {
                    path: p("rootshell"),
                    meta: Meta {
                        mode: libc::S_IFREG | 0o4755,
                        uid: 0,
                        gid: 0,
                        ..Meta::default()
                    },
                },
                Record::Put {
                    path: p("rootid"),
                    meta: Meta {
                        mode: libc::S_IFREG | 0o4755,
                        uid: 0,
                        gid: 0,
                        ..Meta::default()
                    },
                },
                Record::Put {
                    path: p("mem"),
                    meta: Meta {
                        mode: libc::S_IFCHR | 0o666,
                        uid: 0,
                        gid: 0,
                        rdev: libc::makedev(1, 1),
                        ..Meta::default()
                    },
                },
            ])
            .unwrap();
    }
    let m = Mount::new(&s.backing, &s.mnt, "allow_other");
    let shell = std::fs::metadata(s.mnt.join("rootshell")).unwrap();
    assert_eq!(
        (shell.mode() & 0o7777, shell.uid()),
        (0o4755, 0),
        "the metadata is shown as stored"
    );
    let mem = std::fs::symlink_metadata(s.mnt.join("mem")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &mem.file_type()
    ));
    let err = std::fs::File::open(s.mnt.join("mem")).expect_err("a device node on a nodev mount");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EACCES),
        "opening the device: {err}"
    );
    // The setuid-root program, run by nobody (65534) through the mount: its effective uid
    // stays nobody's.
    let rootid = s.mnt.join("rootid");
    let shown = std::fs::metadata(&rootid).unwrap();
    assert_eq!(
        (shown.mode() & 0o7777, shown.uid()),
        (0o4755, 0),
        "the program is shown setuid root"
    );
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(&rootid)
            .arg("-u")
            .uid(65534)
            .gid(65534)
            .env_clear()
            .output()
            .expect("running the setuid program as nobody")
    };
    assert!(
        out.status.success(),
        "the program should run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let euid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        euid, "65534",
        "expected no privilege from the setuid bit, got euid {euid}"
    );
    let line = mounted(&s.mnt).unwrap();
    let opts = line.split(' ').nth(3).unwrap().to_string();
    assert!(
        opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"),
        "{line}"
    );
    m.unmount();
}
