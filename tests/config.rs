//! Integration tests of `pershome-config` on temporary roots (`--root`): the user list, the
//! config file's errors, `wants` against symlink and ownership tricks, the PAM files, the
//! pam_mount merge validated by xmllint against libpam-mount's DTD, and `doctor`.
//!
//! Nothing here touches the machine's own /etc: every command gets `--root` on a temp dir.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pershome::pam_setup;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pershome-config")
}

/// Runs `pershome-config --root ROOT ARGS...`.
fn run(root: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("running pershome-config")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit code, printing both streams when it differs.
fn expect_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}, got {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn list_path(root: &Path) -> PathBuf {
    root.join("etc/ltsp/persistent_homes")
}

#[test]
fn add_remove_list_round_trip_keeps_comments() {
    let root = tempfile::tempdir().expect("tempdir");
    let path = list_path(root.path());
    fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
    fs::write(&path, "# class 3B\njoseph  # stick #12\n\n# staff\nanna\n").expect("write");

    expect_code(
        &run(root.path(), &["add-user", "zoe", "anna"]),
        0,
        "add-user",
    );
    expect_code(
        &run(root.path(), &["remove-user", "joseph"]),
        0,
        "remove-user",
    );
    let got = fs::read_to_string(&path).expect("read");
    let expected = "# class 3B\n\n# staff\nanna\nzoe\n";
    assert_eq!(got, expected, "expected:\n{expected}\ngot:\n{got}");

    let out = run(root.path(), &["list"]);
    expect_code(&out, 0, "list");
    assert_eq!(text(&out.stdout), "anna\nzoe\n");
}

#[test]
fn malformed_list_names_the_line_and_is_not_rewritten() {
    let root = tempfile::tempdir().expect("tempdir");
    let path = list_path(root.path());
    fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
    let original = "anna\n# ok\njoe smith\n";
    fs::write(&path, original).expect("write");
    for args in [
        &["list"][..],
        &["add-user", "zoe"],
        &["remove-user", "anna"],
    ] {
        let out = run(root.path(), args);
        expect_code(&out, 3, &format!("{args:?} on a malformed list"));
        let err = text(&out.stderr);
        assert!(
            err.contains("line 3") && err.contains("one user name per line"),
            "{args:?}: expected the error to name line 3, got: {err}"
        );
    }
    assert_eq!(fs::read_to_string(&path).expect("read"), original);
}

#[test]
fn invalid_names_are_refused_before_any_change() {
    let root = tempfile::tempdir().expect("tempdir");
    for bad in [
        "-rf",
        "a b",
        "a/b",
        "..",
        "1234",
        "x$",
        "é",
        &"a".repeat(33),
    ] {
        let out = run(root.path(), &["add-user", "good", "--", bad]);
        expect_code(&out, 2, &format!("add-user {bad:?}"));
        assert!(
            text(&out.stderr).contains("invalid user name"),
            "add-user {bad:?}: got stderr {}",
            text(&out.stderr)
        );
        assert!(
            !list_path(root.path()).exists(),
            "add-user {bad:?}: the list must not be created when one name is invalid"
        );
    }
}

#[test]
fn concurrent_add_user_runs_lose_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let names: Vec<String> = (0..40).map(|i| format!("user{i:02}")).collect();
    // Every name is added by two processes at once, and all 80 start before any is waited on.
    let children: Vec<_> = names
        .iter()
        .chain(names.iter())
        .map(|name| {
            Command::new(bin())
                .arg("--root")
                .arg(root.path())
                .args(["add-user", name])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for mut child in children {
        let status = child.wait().expect("wait");
        assert!(status.success(), "an add-user run failed: {status}");
    }
    let got = fs::read_to_string(list_path(root.path())).expect("read");
    let mut lines: Vec<&str> = got.lines().collect();
    lines.sort_unstable();
    let expected: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        lines, expected,
        "expected each of 40 users exactly once, got:\n{got}"
    );
}

/// A root with /etc/passwd naming `anna` (uid 4242) whose home is ROOT/home/anna, mode 0700.
fn root_with_user() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(root.path().join("etc")).expect("mkdir etc");
    fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\nanna:x:4242:4242:Anna:/home/anna:/bin/bash\n",
    )
    .expect("passwd");
    let home = root.path().join("home/anna");
    fs::create_dir_all(&home).expect("mkdir home");
    chown(&home, 4242);
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).expect("chmod");
    (root, home)
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {path:?}: {e}"));
}

fn wants(root: &Path) -> (Option<i32>, String) {
    let out = run(root, &["wants", "anna"]);
    (out.status.code(), text(&out.stdout) + &text(&out.stderr))
}

#[test]
fn wants_honours_only_a_safe_user_file() {
    if pershome::testing::skip_without_root("wants_honours_only_a_safe_user_file (chown)") {
        return;
    }
    let (root, home) = root_with_user();
    let file = home.join(".persistent_home");
    let (code, msg) = wants(root.path());
    assert_eq!(
        code,
        Some(1),
        "no request: expected exit 1, got {code:?}: {msg}"
    );

    // A regular file owned by the user: yes.
    fs::write(&file, "").expect("write");
    chown(&file, 4242);
    let (code, msg) = wants(root.path());
    assert!(
        code == Some(0) && msg.contains(".persistent_home exists"),
        "valid file: got {code:?}: {msg}"
    );

    // Attacks, each must be a refusal (exit 1) with the reason.
    let target = root.path().join("owned-by-anna");
    fs::write(&target, "").expect("write target");
    chown(&target, 4242);
    type MakeFile<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, MakeFile, &str)> = vec![
        (
            "symlink to a file the user owns",
            Box::new(|| symlink(&target, &file).expect("symlink")),
            "symlink",
        ),
        (
            "file owned by root",
            Box::new(|| fs::write(&file, "").expect("write")),
            "owned by uid 0",
        ),
        (
            "fifo",
            Box::new(|| {
                nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o644))
                    .expect("mkfifo");
                chown(&file, 4242);
            }),
            "not a regular file",
        ),
        (
            "hard link planted to the user's file",
            Box::new(|| fs::hard_link(&target, &file).expect("link")),
            "hard links",
        ),
        (
            "directory",
            Box::new(|| {
                fs::create_dir(&file).expect("mkdir");
                chown(&file, 4242);
            }),
            "not a regular file",
        ),
    ];
    for (what, make, reason) in cases {
        let _ = fs::remove_file(&file);
        let _ = fs::remove_dir(&file);
        make();
        let (code, msg) = wants(root.path());
        assert!(
            code == Some(1) && msg.contains(reason),
            "{what}: expected exit 1 and {reason:?}, got {code:?}: {msg}"
        );
    }

    // A home others can write: refused even with a valid file.
    let _ = fs::remove_dir(&file);
    fs::write(&file, "").expect("write");
    chown(&file, 4242);
    fs::set_permissions(&home, fs::Permissions::from_mode(0o777)).expect("chmod");
    let (code, msg) = wants(root.path());
    assert!(
        code == Some(1) && msg.contains("writable by group or others"),
        "world-writable home: got {code:?}: {msg}"
    );
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).expect("chmod");

    // honour_user_file = false turns the file off; the list still counts.
    fs::create_dir_all(root.path().join("etc/pershome")).expect("mkdir");
    fs::write(
        root.path().join("etc/pershome/config.toml"),
        "honour_user_file = false\n",
    )
    .expect("config");
    let (code, msg) = wants(root.path());
    assert!(
        code == Some(1) && msg.contains("honour_user_file = false"),
        "disabled: got {code:?}: {msg}"
    );
    expect_code(&run(root.path(), &["add-user", "anna"]), 0, "add-user");
    let (code, msg) = wants(root.path());
    assert!(
        code == Some(0) && msg.contains("listed"),
        "listed: got {code:?}: {msg}"
    );
}

#[test]
fn wants_exit_codes_for_unknown_user_and_bad_config() {
    let (root, _home) = root_with_user();
    let out = run(root.path(), &["wants", "nobody-here"]);
    expect_code(&out, 4, "unknown user");

    fs::create_dir_all(root.path().join("etc/pershome")).expect("mkdir");
    let cases = [
        (
            "commit_interval = 5\n\n[stick]\nfilesytems = []\n",
            "line 4",
            "filesytems",
        ),
        (
            "commit_interval = 5\nlogout_timeout = -1\n",
            "line 2",
            "out of range",
        ),
        ("on_missing_stick = \"maybe\"\n", "line 1", "fallback"),
    ];
    for (config, line, word) in cases {
        fs::write(root.path().join("etc/pershome/config.toml"), config).expect("config");
        let out = run(root.path(), &["wants", "anna"]);
        expect_code(&out, 3, &format!("config {config:?}"));
        let err = text(&out.stderr);
        assert!(
            err.contains(line) && err.contains(word),
            "config {config:?}: expected {line:?} and {word:?} in the error, got: {err}"
        );
    }
}

#[test]
fn pam_print_exec_and_install_under_root() {
    let root = tempfile::tempdir().expect("tempdir");
    let out = run(root.path(), &["pam", "--print"]);
    expect_code(&out, 0, "pam --print");
    let expected = "Name: pershome: home directory on a USB stick (session hook)\n\
                    Default: no\n\
                    Priority: 128\n\
                    Session-Type: Additional\n\
                    Session-Interactive-Only: yes\n\
                    Session:\n\
                    \toptional\tpam_exec.so quiet stdout /usr/bin/pershome-config session\n";
    assert_eq!(text(&out.stdout), expected);
    assert!(
        !root.path().join(pam_setup::PROFILE_PATH).exists(),
        "--print must not write"
    );

    // --install under --root writes the same bytes and does not run pam-auth-update.
    let out = run(root.path(), &["pam", "--install"]);
    expect_code(&out, 0, "pam --install");
    assert!(text(&out.stdout).contains("not running pam-auth-update"));
    let written = fs::read_to_string(root.path().join(pam_setup::PROFILE_PATH)).expect("read");
    assert_eq!(written, expected);

    // on_missing_stick = "deny" makes the hook required.
    fs::create_dir_all(root.path().join("etc/pershome")).expect("mkdir");
    fs::write(
        root.path().join("etc/pershome/config.toml"),
        "on_missing_stick = \"deny\"\n",
    )
    .expect("config");
    let out = run(root.path(), &["pam", "--print"]);
    assert!(
        text(&out.stdout).contains("\trequired\tpam_exec.so"),
        "deny: got {}",
        text(&out.stdout)
    );
    expect_code(
        &run(root.path(), &["pam"]),
        2,
        "neither --install nor --print",
    );
}

#[test]
fn pam_script_hooks_are_session_only_and_executable() {
    let root = tempfile::tempdir().expect("tempdir");
    expect_code(
        &run(root.path(), &["pam", "--mode", "script", "--install"]),
        0,
        "script install",
    );
    let dir = root.path().join(pam_setup::PAM_SCRIPT_DIR);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["pam_script_ses_close", "pam_script_ses_open"]);
    for name in names {
        let path = dir.join(&name);
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{name}: expected mode 755, got {mode:o}");
        let body = fs::read_to_string(&path).expect("read");
        assert!(
            body.contains("--user=\"$PAM_USER\"\n"),
            "{name}: got:\n{body}"
        );
    }
}

/// Validates with `xmllint --valid` against libpam-mount's DTD. Returns false (after saying
/// so loudly) when xmllint or the DTD is missing.
fn xmllint_valid(path: &Path) -> Option<Output> {
    let dtd = Path::new(pam_setup::PAM_MOUNT_DTD_DIR).join("pam_mount.conf.xml.dtd");
    if !dtd.exists() {
        eprintln!(
            "SKIPPED xmllint validation: {} missing (apt-get install libpam-mount)",
            dtd.display()
        );
        return None;
    }
    match Command::new("xmllint")
        .args(["--valid", "--noout", "--path", pam_setup::PAM_MOUNT_DTD_DIR])
        .arg(path)
        .output()
    {
        Ok(out) => Some(out),
        Err(e) => {
            eprintln!("SKIPPED xmllint validation: cannot run xmllint ({e}); apt-get install libxml2-utils");
            None
        }
    }
}

const ADMIN_CONF: &str = r#"<?xml version="1.0" encoding="utf-8" ?>
<!DOCTYPE pam_mount SYSTEM "pam_mount.conf.xml.dtd">
<!-- The administrator's own comment. -->
<pam_mount>
<debug enable="0" />
<!-- NFS scratch space -->
<volume user="teacher" fstype="nfs" server="fs1" path="/export/scratch" mountpoint="/scratch" options="nosuid,nodev" />
<volume fstype="tmpfs" path="tmpfs" mountpoint="/tmp/%(USER)" options="size=10M"><not><user>root</user></not></volume>
<mntoptions allow="nosuid,nodev,loop" />
<mntoptions require="nosuid,nodev" />
<logout wait="0" hup="no" term="no" kill="no" />
<mkmountpoint enable="1" remove="true" />
</pam_mount>
"#;

#[test]
fn pam_mount_merge_keeps_foreign_volumes_and_validates() {
    let root = tempfile::tempdir().expect("tempdir");
    let conf = root.path().join(pam_setup::PAM_MOUNT_CONF);
    fs::create_dir_all(conf.parent().expect("dir")).expect("mkdir");
    fs::write(&conf, ADMIN_CONF).expect("write");
    expect_code(
        &run(root.path(), &["add-user", "anna", "bob"]),
        0,
        "add-user",
    );

    let printed = run(root.path(), &["pam", "--mode", "mount", "--print"]);
    expect_code(&printed, 0, "mount --print");
    assert_eq!(
        fs::read_to_string(&conf).expect("read"),
        ADMIN_CONF,
        "--print wrote"
    );
    expect_code(
        &run(root.path(), &["pam", "--mode", "mount", "--install"]),
        0,
        "mount --install",
    );
    let once = fs::read_to_string(&conf).expect("read");
    assert_eq!(
        text(&printed.stdout),
        once,
        "--print shows what --install writes"
    );

    // Every line of the administrator's file is still there, in order.
    let kept: Vec<&str> = once
        .lines()
        .filter(|l| ADMIN_CONF.lines().any(|a| a == *l))
        .collect();
    let admin: Vec<&str> = ADMIN_CONF.lines().collect();
    assert_eq!(kept, admin, "foreign lines lost or reordered in:\n{once}");
    assert_eq!(
        pam_setup::pam_mount_users(&once).expect("parses"),
        vec!["anna", "bob"]
    );

    // Idempotent, and follows the list.
    expect_code(
        &run(root.path(), &["pam", "--mode", "mount", "--install"]),
        0,
        "again",
    );
    assert_eq!(
        fs::read_to_string(&conf).expect("read"),
        once,
        "second run changed the file"
    );
    expect_code(
        &run(root.path(), &["remove-user", "anna"]),
        0,
        "remove-user",
    );
    expect_code(
        &run(root.path(), &["pam", "--mode", "mount", "--install"]),
        0,
        "after remove",
    );
    let after = fs::read_to_string(&conf).expect("read");
    assert_eq!(
        pam_setup::pam_mount_users(&after).expect("parses"),
        vec!["bob"]
    );

    if let Some(out) = xmllint_valid(&conf) {
        assert!(
            out.status.success(),
            "xmllint --valid failed on:\n{after}\n{}",
            text(&out.stderr)
        );
        // The check can fail: a volume after <mntoptions> breaks the DTD's order.
        let bad = root.path().join("bad.xml");
        fs::write(
            &bad,
            after
                .replace("<mntoptions require=\"nosuid,nodev\" />\n", "")
                .replace(
                    "</pam_mount>",
                    "<volume path=\"x\" mountpoint=\"y\" />\n</pam_mount>",
                ),
        )
        .expect("write");
        let out = xmllint_valid(&bad).expect("xmllint ran before");
        assert!(!out.status.success(), "xmllint accepted a misordered file");
    }
}

#[test]
fn pam_mount_creates_a_valid_file_when_there_is_none() {
    let root = tempfile::tempdir().expect("tempdir");
    expect_code(&run(root.path(), &["add-user", "anna"]), 0, "add-user");
    expect_code(
        &run(root.path(), &["pam", "--mode", "mount", "--install"]),
        0,
        "install",
    );
    let conf = root.path().join(pam_setup::PAM_MOUNT_CONF);
    if let Some(out) = xmllint_valid(&conf) {
        assert!(out.status.success(), "xmllint: {}", text(&out.stderr));
    }
    let malformed = "<pam_mount>\n<volume path='a' mountpoint='b'>\n</pam_mount>\n";
    fs::write(&conf, malformed).expect("write");
    let out = run(root.path(), &["pam", "--mode", "mount", "--install"]);
    expect_code(&out, 3, "malformed pam_mount.conf.xml");
    assert!(
        text(&out.stderr).contains("line 3"),
        "got: {}",
        text(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(&conf).expect("read"),
        malformed,
        "rewritten"
    );
}

#[test]
fn doctor_finds_problems_and_passes_a_complete_root() {
    let root = tempfile::tempdir().expect("tempdir");
    let out = run(root.path(), &["doctor"]);
    expect_code(&out, 1, "doctor on an empty root");
    let report = text(&out.stdout);
    for expected in [
        "PROBLEM  /dev/fuse",
        "PROBLEM  fuse3",
        "PROBLEM  PAM",
        "fix: ",
    ] {
        assert!(
            report.contains(expected),
            "expected {expected:?} in:\n{report}"
        );
    }
    if pershome::testing::skip_without_root("the complete-root half of doctor (mknod)") {
        return;
    }
    // Everything in place: /dev/fuse, fusermount3, an enabled profile, a listed user.
    let r = root.path();
    fs::create_dir_all(r.join("dev")).expect("mkdir");
    nix::sys::stat::mknod(
        &r.join("dev/fuse"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(10, 229),
    )
    .expect("mknod");
    fs::create_dir_all(r.join("usr/bin")).expect("mkdir");
    fs::write(r.join("usr/bin/fusermount3"), "").expect("write");
    fs::create_dir_all(r.join("etc/pam.d")).expect("mkdir");
    fs::write(
        r.join("etc/pam.d/common-session"),
        "session required pam_unix.so\nsession optional pam_exec.so quiet stdout /usr/bin/pershome-config session\n",
    )
    .expect("write");
    fs::write(
        r.join("etc/passwd"),
        "anna:x:4242:4242::/home/anna:/bin/sh\n",
    )
    .expect("passwd");
    expect_code(&run(r, &["pam", "--install"]), 0, "pam --install");
    expect_code(&run(r, &["add-user", "anna"]), 0, "add-user");
    let out = run(r, &["doctor"]);
    expect_code(&out, 1, "doctor without a claim key");
    assert!(
        text(&out.stdout).contains("pershome-config claim-key"),
        "expected the fix for a missing claim key:\n{}",
        text(&out.stdout)
    );
    expect_code(&run(r, &["claim-key"]), 0, "claim-key");
    let out = run(r, &["doctor"]);
    expect_code(&out, 0, "doctor on a complete root");

    // An unknown listed user and a bad config are each a problem with a fix.
    fs::write(r.join("etc/passwd"), "").expect("passwd");
    fs::create_dir_all(r.join("etc/pershome")).expect("mkdir");
    fs::write(r.join("etc/pershome/config.toml"), "bogus = 1\n").expect("config");
    let out = run(r, &["doctor"]);
    expect_code(&out, 1, "doctor with problems");
    let report = text(&out.stdout);
    for expected in [
        "PROBLEM  listed users: no such user: anna",
        "line 1: unknown field `bogus`",
    ] {
        assert!(
            report.contains(expected),
            "expected {expected:?} in:\n{report}"
        );
    }
}

#[test]
fn help_lists_exit_codes_and_commands() {
    let out = Command::new(bin()).arg("--help").output().expect("run");
    expect_code(&out, 0, "--help");
    let help = text(&out.stdout);
    for expected in [
        "Exit codes:",
        "add-user",
        "remove-user",
        "wants",
        "pam",
        "doctor",
        "--root",
    ] {
        assert!(
            help.contains(expected),
            "expected {expected:?} in --help:\n{help}"
        );
    }
}
