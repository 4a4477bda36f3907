//! `cargo xtask many-mounts` as CI uses it: a healthy run passes and prints its table; a run
//! in which one home's daemon is killed fails, naming that home, the daemon's death and the
//! operation that then failed. Both must leave nothing behind: no mount, loop device,
//! directory or process of their uids. Real mounts (root, /dev/fuse); the harness is the
//! real binary, started as CI starts it.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The xtask binary, with the debug pershome binaries beside it when cargo built them (as
/// `cargo test --workspace` does); otherwise the xtask builds the release ones itself.
fn xtask() -> Command {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_xtask"));
    let mut command = Command::new(&exe);
    if let Some(dir) = exe.parent() {
        let (fs, tools) = (dir.join("pershomefs"), dir.join("pershome"));
        if fs.is_file() && tools.is_file() {
            command.env("PERSHOMEFS", fs).env("PERSHOME", tools);
        }
    }
    command
}

/// Run a many-mounts command; returns its output and the pid its scratch paths carry.
fn run(args: &[&str]) -> (Output, u32) {
    let child = xtask()
        .arg("many-mounts")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting cargo xtask many-mounts");
    let pid = child.id();
    let output = child.wait_with_output().expect("waiting for many-mounts");
    (output, pid)
}

/// Nothing of the run of `pid` may be left: mounts, loop devices, its scratch directories,
/// processes running as its uids.
fn assert_nothing_left(pid: u32, first_uid: u32, count: u32) {
    let prefix = format!("/var/tmp/phx/{pid}-");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&prefix)))
        .collect();
    assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    let losetup = Command::new("losetup")
        .args(["-n", "-O", "NAME,BACK-FILE", "-l"])
        .output()
        .expect("losetup -l");
    let loops: Vec<String> = String::from_utf8_lossy(&losetup.stdout)
        .lines()
        .filter(|l| l.contains(&prefix))
        .map(str::to_owned)
        .collect();
    assert!(loops.is_empty(), "loop devices left behind: {loops:?}");
    let dirs: Vec<PathBuf> = std::fs::read_dir("/var/tmp/phx")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(dirs.is_empty(), "scratch directories left behind: {dirs:?}");
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let uid: Option<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        if uid.is_some_and(|u| (first_uid..first_uid + count).contains(&u)) {
            procs.push(entry.path());
        }
    }
    assert!(
        procs.is_empty(),
        "processes of the run's uids left: {procs:?}"
    );
}

#[test]
fn many_mounts_passes_and_reports_every_home_when_nothing_fails() {
    if pershome::testing::skip_without_root("many_mounts_passes_and_reports_every_home") {
        return;
    }
    let (out, pid) = run(&[
        "--mounts",
        "3",
        "--seconds",
        "3",
        "--first-uid",
        "700100000",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "expected a clean run to pass, got {}:\n{stdout}\n{stderr}",
        out.status
    );
    for row in ["u00 ", "u01 ", "u02 ", "all "] {
        assert!(
            stdout.lines().any(|l| l.starts_with(row)),
            "expected a table row {row:?}, got:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("errors: 0"),
        "expected the errors line, got:\n{stdout}"
    );
    assert_nothing_left(pid, 700_100_000, 3);
}

#[test]
fn many_mounts_fails_naming_the_home_whose_daemon_was_killed() {
    if pershome::testing::skip_without_root("many_mounts_fails_naming_the_home_whose_daemon") {
        return;
    }
    let (out, pid) = run(&[
        "--mounts",
        "3",
        "--seconds",
        "4",
        "--first-uid",
        "700200000",
        "--kill-daemon",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected the run to fail when a daemon is killed, it passed:\n{stdout}\n{stderr}"
    );
    let home = "home u01 (uid 700200001,";
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(home) && l.contains("daemon") && l.contains("died")),
        "expected an error naming {home:?} and its daemon's death, got:\n{stderr}"
    );
    // The worker of that home saw the daemon go in the operation it was doing: ENOTCONN for
    // a request sent after the death, ECONNABORTED for one the kernel had in flight.
    assert!(
        stderr.lines().any(|l| l.contains(home)
            && (l.contains("Transport endpoint is not connected")
                || l.contains("Software caused connection abort"))),
        "expected u01's failed operation with ENOTCONN or ECONNABORTED, got:\n{stderr}"
    );
    assert!(
        !stdout.contains("errors: 0"),
        "a failed run must not print a passing table:\n{stdout}"
    );
    assert_nothing_left(pid, 700_200_000, 3);
}
