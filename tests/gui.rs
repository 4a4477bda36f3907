//! The zenity dialogs for real: `pershome prepare --gui` and `pershome notice` run against a
//! real zenity on a private Xvfb display, driven with xdotool as a person would (Return,
//! Escape). Proves: confirming prepares the stick, cancelling writes nothing and exits 1, the
//! notice dialog appears with its title and the hook's text and closes on Return, and no
//! notice means no window.
//!
//! Windows are found by title (`xdotool search --name`), then told apart by the zenity process
//! behind them (`getwindowpid`, its `/proc/PID/cmdline`: which dialog, which text). Every test
//! owns its Xvfb (`-displayfd`: the server picks a free display and says when it is ready) and
//! runs pershome in its own process group; guards kill both, and the zenity children with
//! them, even when an assertion fails. Skipped loudly when Xvfb, xdotool or zenity is missing,
//! and failed instead when `PERSHOME_REQUIRE_GUI` is set (CI sets it).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const PREPARE_TITLE: &str = "Prepare a pershome stick";
const NOTICE_TITLE: &str = "Your stick home is not open";
/// How long a dialog may take to appear or a program to end (zenity under Xvfb starts in well
/// under a second; two shared cores under load are slower).
const PATIENCE: Duration = Duration::from_secs(30);

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// Whether the GUI tools are here; if not, a loud skip (or a failure under CI).
fn gui_tools(test: &str) -> bool {
    let missing: Vec<&str> = ["Xvfb", "xdotool", "zenity"]
        .into_iter()
        .filter(|p| !on_path(p))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: {} not installed (apt install xvfb xdotool zenity, or cargo xtask deps)",
        missing.join(", ")
    );
    if std::env::var_os("PERSHOME_REQUIRE_GUI").is_some() {
        panic!("{msg}; PERSHOME_REQUIRE_GUI is set, so this is a failure");
    }
    eprintln!("\n*** SKIPPED {msg} ***\n");
    false
}

/// A private X server, killed on drop.
struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    fn start() -> Xvfb {
        let (rd, wr) = nix::unistd::pipe().expect("pipe");
        // Only the write end goes to Xvfb.
        nix::fcntl::fcntl(
            rd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .expect("cloexec");
        let child = Command::new("Xvfb")
            .args(["-displayfd", &wr.as_raw_fd().to_string()])
            .args([
                "-screen",
                "0",
                "1024x768x24",
                "-nolisten",
                "tcp",
                "-noreset",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting Xvfb");
        drop(wr);
        let mut x = Xvfb {
            child,
            display: String::new(),
        };
        // Xvfb writes the display number once it accepts connections; EOF means it died.
        let mut number = String::new();
        std::fs::File::from(rd)
            .read_to_string(&mut number)
            .expect("reading Xvfb's display number");
        let n = number.trim();
        assert!(
            !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()),
            "Xvfb did not report a display number: got {number:?}"
        );
        x.display = format!(":{n}");
        x
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// pershome in a process group of its own; the group (zenity included) is killed on drop.
struct Group(Child);

impl Group {
    fn spawn(x: &Xvfb, args: &[&str]) -> Group {
        let child = Command::new(env!("CARGO_BIN_EXE_pershome"))
            .args(args)
            .env("DISPLAY", &x.display)
            .env_remove("WAYLAND_DISPLAY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("starting pershome");
        Group(child)
    }

    /// Waits for the end; returns the status and stdout.
    fn wait(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.0.try_wait().expect("waiting for pershome") {
                let mut out = String::new();
                if let Some(mut o) = self.0.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                return (st, out);
            }
            assert!(
                Instant::now() < deadline,
                "pershome did not end within {PATIENCE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn xdotool(x: &Xvfb, args: &[&str]) -> (bool, String) {
    let o = Command::new("xdotool")
        .args(args)
        .env("DISPLAY", &x.display)
        .output()
        .expect("running xdotool");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).trim().to_owned(),
    )
}

/// A dialog on screen: its window and the zenity command line behind it.
struct Dialog {
    window: String,
    args: Vec<String>,
}

impl Dialog {
    fn has(&self, arg: &str) -> bool {
        self.args.iter().any(|a| a == arg)
    }
    fn text(&self) -> &str {
        self.args
            .iter()
            .position(|a| a == "--text")
            .and_then(|i| self.args.get(i + 1))
            .map_or("", String::as_str)
    }
}

/// The windows titled `title` whose zenity runs with `kind` (`--question`, `--info`, …).
fn dialogs(x: &Xvfb, title: &str, kind: &str) -> Vec<Dialog> {
    // Visible windows only: GTK names a window before it maps it, and focusing an unmapped
    // window fails (seen under load, once the machine was busy enough to land in between).
    let (_, ids) = xdotool(
        x,
        &["search", "--onlyvisible", "--name", &format!("^{title}$")],
    );
    let mut found = Vec::new();
    for id in ids.lines() {
        let (ok, pid) = xdotool(x, &["getwindowpid", id]);
        if !ok {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == kind) {
            found.push(Dialog {
                window: id.to_owned(),
                args,
            });
        }
    }
    found
}

fn wait_dialog(x: &Xvfb, title: &str, kind: &str) -> Dialog {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(d) = dialogs(x, title, kind).pop() {
            let (_, name) = xdotool(x, &["getwindowname", &d.window]);
            assert_eq!(
                name, title,
                "window title: expected {title:?}, got {name:?}"
            );
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} dialog titled {title:?} appeared within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keeps a picture of the dialog for a person to look at (when ImageMagick is there).
fn screenshot(x: &Xvfb, d: &Dialog, name: &str) {
    if !on_path("import") {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gui-shots");
    let _ = std::fs::create_dir_all(&dir);
    let _ = Command::new("import")
        .args(["-window", &d.window])
        .arg(dir.join(format!("{name}.png")))
        .env("DISPLAY", &x.display)
        .status();
}

/// Focuses the dialog (there is no window manager to do it) and types `key`. Focusing is
/// retried until PATIENCE runs out: a window that has just been mapped may not take the focus
/// yet on a loaded machine.
fn press(x: &Xvfb, d: &Dialog, key: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !xdotool(x, &["windowfocus", "--sync", &d.window]).0 {
        assert!(
            Instant::now() < deadline,
            "focusing window {} failed for {PATIENCE:?}",
            d.window
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _) = xdotool(x, &["key", key]);
    assert!(ok, "typing {key}");
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("listing the stick")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn stick() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("STICK");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("notes.txt"), "mine\n").expect("write");
    (t, dir)
}

#[test]
fn gui_prepare_confirmed_prepares_the_stick() {
    if !gui_tools("gui_prepare_confirmed_prepares_the_stick") {
        return;
    }
    let x = Xvfb::start();
    let (_t, dir) = stick();
    let dir_s = dir.to_str().expect("utf-8 path");
    let mut p = Group::spawn(&x, &["prepare", "--gui", "--any-fs", dir_s]);

    let q = wait_dialog(&x, PREPARE_TITLE, "--question");
    screenshot(&x, &q, "prepare-question");
    assert!(
        q.text().contains(dir_s) && q.text().contains("erased or changed"),
        "question text: expected the folder and the promise, got {:?}",
        q.text()
    );
    assert!(q.has("--no-markup"), "question args: {:?}", q.args);
    assert_eq!(entries(&dir), ["notes.txt"], "written before the answer");
    press(&x, &q, "Return");

    let done = wait_dialog(&x, PREPARE_TITLE, "--info");
    screenshot(&x, &done, "prepare-done");
    assert!(
        done.text().starts_with("Your stick is ready."),
        "result text: got {:?}",
        done.text()
    );
    assert!(
        dir.join("pershome/.pershome").is_dir(),
        "expected pershome/.pershome on the stick, got {:?}",
        entries(&dir)
    );
    press(&x, &done, "Return");
    let (st, _) = p.wait();
    assert_eq!(st.code(), Some(0), "exit status: expected 0, got {st}");
    assert_eq!(entries(&dir), ["notes.txt", "pershome"], "stick entries");
    let notes = std::fs::read_to_string(dir.join("notes.txt")).expect("read");
    assert_eq!(notes, "mine\n", "an existing file changed");
}

#[test]
fn gui_prepare_cancelled_writes_nothing() {
    if !gui_tools("gui_prepare_cancelled_writes_nothing") {
        return;
    }
    let x = Xvfb::start();
    let (_t, dir) = stick();
    let mut p = Group::spawn(
        &x,
        &["prepare", "--gui", "--any-fs", dir.to_str().expect("utf-8")],
    );
    let q = wait_dialog(&x, PREPARE_TITLE, "--question");
    press(&x, &q, "Escape");
    let (st, _) = p.wait();
    assert_eq!(
        st.code(),
        Some(1),
        "exit status: expected 1 (cancelled), got {st}"
    );
    assert_eq!(entries(&dir), ["notes.txt"], "the stick after a cancel");
    let left = dialogs(&x, PREPARE_TITLE, "zenity");
    assert!(
        left.is_empty(),
        "{} dialogs left after the cancel",
        left.len()
    );
}

/// A root with the hook's notice for the user running the test, as the hook leaves it
/// (`run/pershome/USER/`, root-owned 0711, `notice` in it).
fn notice_root(text: Option<&str>) -> Option<tempfile::TempDir> {
    if pershome::testing::skip_without_root(
        "the notice test (the notice's directory must be root's)",
    ) {
        return None;
    }
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .expect("looking up the user")
        .expect("the current user");
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("run/pershome").join(&user.name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))
        .expect("chmod");
    if let Some(text) = text {
        std::fs::write(dir.join("notice"), text).expect("write notice");
    }
    Some(t)
}

const NOTICE: &str = "pershome: no USB stick with a pershome folder was found.\n\
    You are working in this computer's normal home folder (/home/a<b&c) for this session.\n\
    To use your stick home: log out, plug in your stick, and log in again. A new stick must \
    be prepared once: run `pershome prepare`.\n";

#[test]
fn gui_notice_is_shown_and_closes_on_return() {
    if !gui_tools("gui_notice_is_shown_and_closes_on_return") {
        return;
    }
    let Some(root) = notice_root(Some(NOTICE)) else {
        return;
    };
    let x = Xvfb::start();
    let mut p = Group::spawn(
        &x,
        &["notice", "--root", root.path().to_str().expect("utf-8")],
    );
    let d = wait_dialog(&x, NOTICE_TITLE, "--warning");
    screenshot(&x, &d, "notice");
    // The dialog's text is the notice, wrapped: compare word for word.
    let shown: Vec<&str> = d.text().split_whitespace().collect();
    let expected: Vec<&str> = NOTICE.split_whitespace().collect();
    assert_eq!(
        shown,
        expected,
        "notice text: expected {NOTICE:?}, got {:?}",
        d.text()
    );
    assert!(d.has("--no-markup"), "notice args: {:?}", d.args);
    press(&x, &d, "Return");
    let (st, out) = p.wait();
    assert_eq!(st.code(), Some(0), "exit status: expected 0, got {st}");
    assert_eq!(out, "", "stdout while the dialog showed the notice");
    let left = dialogs(&x, NOTICE_TITLE, "--warning");
    assert!(
        left.is_empty(),
        "the notice is still on screen after Return"
    );
}

#[test]
fn gui_no_notice_no_window() {
    if !gui_tools("gui_no_notice_no_window") {
        return;
    }
    let Some(root) = notice_root(None) else {
        return;
    };
    let x = Xvfb::start();
    let mut p = Group::spawn(
        &x,
        &["notice", "--root", root.path().to_str().expect("utf-8")],
    );
    let (st, out) = p.wait();
    assert_eq!(st.code(), Some(0), "exit status: expected 0, got {st}");
    assert_eq!(out, "", "stdout without a notice");
    let (_, windows) = xdotool(&x, &["search", "--name", "."]);
    let named: Vec<String> = windows
        .lines()
        .map(|w| xdotool(&x, &["getwindowname", w]).1)
        .filter(|n| !n.is_empty())
        .collect();
    assert!(named.is_empty(), "expected no window, got {named:?}");
}

#[test]
fn notice_without_display_goes_to_stdout() {
    let Some(root) = notice_root(Some(NOTICE)) else {
        return;
    };
    let o = Command::new(env!("CARGO_BIN_EXE_pershome"))
        .args(["notice", "--root"])
        .arg(root.path())
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .expect("running pershome notice");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "exit status: {}", o.status);
    assert_eq!(out, NOTICE, "stdout: expected the notice as it is");
}

#[test]
fn desktop_entries_are_valid() {
    if !on_path("desktop-file-validate") {
        let msg = "desktop_entries_are_valid: desktop-file-validate not installed \
                   (apt install desktop-file-utils)";
        assert!(
            std::env::var_os("PERSHOME_REQUIRE_GUI").is_none(),
            "{msg}; PERSHOME_REQUIRE_GUI is set, so this is a failure"
        );
        eprintln!("\n*** SKIPPED {msg} ***\n");
        return;
    }
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    for (file, exec) in [
        ("pershome-notice.desktop", "Exec=/usr/bin/pershome notice"),
        (
            "pershome-prepare.desktop",
            "Exec=/usr/bin/pershome prepare --gui",
        ),
    ] {
        let path = data.join(file);
        let o = Command::new("desktop-file-validate")
            .arg(&path)
            .output()
            .expect("running desktop-file-validate");
        // It exits 0 on hints too; a clean file prints nothing at all.
        let said =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && said.trim().is_empty(),
            "{file}: expected no complaint, got {}: {said}",
            o.status
        );
        let text = std::fs::read_to_string(&path).expect("reading the entry");
        let got: Vec<&str> = text.lines().filter(|l| l.starts_with("Exec=")).collect();
        assert_eq!(got, [exec], "{file}: Exec line");
    }
}
