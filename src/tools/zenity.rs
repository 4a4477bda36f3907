//! The zenity front end of `pershome prepare` (`--gui`, or no terminal), for people who do not
//! use a terminal: choose the stick, confirm, a progress window, then done or the error. Also
//! the one place that knows zenity's quirks, for the login notice (`session::entry`) too.
//!
//! This module owns the dialogs' wording and zenity's argument lists (built by pure functions,
//! unit-tested; the real dialogs are driven under Xvfb by tests/gui.rs). It never passes text
//! through a shell: zenity gets separate argv items, and every text is shown with
//! `--no-markup`, so a path or a stick label is shown as it is, never read as Pango markup.
//!
//! zenity 3.44 facts this relies on (checked under Xvfb): exit 0 is OK/Yes, exit 1 is
//! Cancel/No, Escape or closing the window, and also "cannot open display" (hence the display
//! check before the first dialog); `--width` is only a minimum, a long line widens the dialog
//! up to the screen, hence [`wrap`]; a `--radiolist` cannot be toggled from the keyboard, hence a
//! plain list whose selected row is the answer.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::stick::discover::{self, Stick};
use crate::stick::mountinfo;
use crate::tools::prepare::{self, exit_code, PrepareOptions, Prepared, Resolved};

/// The window title of every prepare dialog (tests find the windows by it).
pub const TITLE: &str = "Prepare a pershome stick";

/// The icon of the prepare dialogs (from the desktop's icon theme; Adwaita has it).
const ICON: &str = "drive-removable-media";

/// Lines of dialog text are wrapped at this many characters, so a dialog stays a readable
/// width instead of growing to the screen's. GTK's label wraps again at about 70 characters
/// of its own, which would leave a lone word on a line after a longer one: stay below it.
pub const WRAP_COLUMNS: usize = 64;

/// Whether a graphical session is reachable (zenity exits 1, as a cancel does, without one).
pub fn has_display() -> bool {
    std::env::var_os("DISPLAY").is_some_and(|d| !d.is_empty())
        || std::env::var_os("WAYLAND_DISPLAY").is_some_and(|d| !d.is_empty())
}

/// Wraps each line of `text` at `columns` characters on spaces (a word longer than that, such
/// as a path, gets a line of its own), keeping the text's own line breaks. Trailing white
/// space is dropped: a trailing newline would show as an empty line in the dialog.
pub fn wrap(text: &str, columns: usize) -> String {
    let mut out = Vec::new();
    for line in text.trim_end().lines() {
        let mut cur = String::new();
        for word in line.split(' ') {
            let fits = cur.chars().count() + 1 + word.chars().count() <= columns;
            if !cur.is_empty() && !fits {
                out.push(std::mem::take(&mut cur));
            } else if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
        out.push(cur);
    }
    out.join("\n")
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The arguments of the list in which the person picks a stick: one row per stick, the device
/// in a hidden first column that zenity prints for the chosen row.
pub fn choose_args(sticks: &[Stick]) -> Vec<String> {
    let mut a = strings(&[
        "--list",
        "--title",
        TITLE,
        "--text",
        "Several USB sticks are plugged in. Which one should carry your home?",
        "--column",
        "Device",
        "--column",
        "Stick",
        "--hide-column=1",
        "--print-column=1",
        "--width=560",
        "--height=300",
    ]);
    for s in sticks {
        a.push(s.device.display().to_string());
        a.push(s.describe());
    }
    a
}

/// The stick a list answer names (`None`: no row was selected, or zenity printed something
/// that is none of them).
pub fn chosen<'a>(sticks: &'a [Stick], stdout: &[u8]) -> Option<&'a Stick> {
    let answer = String::from_utf8_lossy(stdout);
    let answer = answer.trim_end_matches('\n');
    sticks
        .iter()
        .find(|s| s.device.as_os_str().to_str() == Some(answer))
}

/// How a target is named in the question: the stick's description, or the folder.
pub fn describe_target(stick: Option<&Stick>, resolved: &Resolved) -> String {
    match (stick, &resolved.device) {
        (Some(s), _) => s.describe(),
        (None, Some(dev)) => format!(
            "the stick {} (on {})",
            dev.display(),
            resolved.dir.display()
        ),
        (None, None) => format!("the folder {}", resolved.dir.display()),
    }
}

/// The arguments of the confirmation question about `what` (see [`describe_target`]).
pub fn confirm_args(what: &str) -> Vec<String> {
    let mut a = strings(&[
        "--question",
        "--title",
        TITLE,
        "--icon-name",
        ICON,
        "--no-markup",
        "--ok-label=Prepare",
        "--cancel-label=Cancel",
        "--text",
    ]);
    a.push(wrap(
        &format!(
            "Prepare {what} for pershome?\n\n\
             This creates a folder named \"pershome\" on the stick. Nothing on the stick is \
             erased or changed, and it still works on Windows and Mac."
        ),
        WRAP_COLUMNS,
    ));
    a
}

/// The arguments of the pulsating progress window shown while the work runs.
pub fn progress_args() -> Vec<String> {
    strings(&[
        "--progress",
        "--pulsate",
        "--auto-close",
        "--no-cancel",
        "--title",
        TITLE,
        "--text",
        "Preparing the stick…",
    ])
}

/// The arguments of the final message (`ok`: info, else error).
pub fn result_args(ok: bool, text: &str) -> Vec<String> {
    let mut a = strings(&[
        if ok { "--info" } else { "--error" },
        "--title",
        TITLE,
        "--no-markup",
    ]);
    if ok {
        a.extend(strings(&["--icon-name", ICON]));
    }
    a.push("--text".into());
    a.push(wrap(text, WRAP_COLUMNS));
    a
}

/// What the person reads when the stick is ready.
pub fn done_text(p: &Prepared) -> String {
    const USE: &str = "To use it, plug the stick in before you log in: your home is then on \
                       the stick. Remove it only after logging out.";
    match p {
        Prepared::Created {
            backing,
            made_dir: true,
            ..
        } => format!(
            "Your stick is ready.\n\nThe folder {} was created on it. Nothing else on the \
             stick was changed.\n\n{USE}",
            backing.display()
        ),
        Prepared::Created {
            backing, entries, ..
        } => format!(
            "Your stick is ready.\n\nThe folder {} was already there: its {entries} files and \
             folders become the content of your home.\n\n{USE}",
            backing.display()
        ),
        Prepared::Already {
            backing, warnings, ..
        } if !warnings.is_empty() => format!(
            "This stick was already prepared ({}); nothing was changed.\n\nBut its records \
             need a check ({}). In a terminal, run: pershome fsck {}",
            backing.display(),
            warnings.join("; "),
            backing.display()
        ),
        Prepared::Already { backing, .. } => format!(
            "This stick was already prepared ({}); nothing was changed.\n\n{USE}",
            backing.display()
        ),
    }
}

/// The answer to a question or a list.
#[derive(Debug)]
enum Answer {
    /// OK (with what zenity printed).
    Ok(Vec<u8>),
    /// Cancel, No, Escape or the window closed.
    Cancelled,
    /// zenity did not run, or failed.
    Failed(String),
}

fn ask(args: &[String]) -> Answer {
    match crate::exec::user_command(crate::exec::system_program_or_missing("zenity"))
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => Answer::Ok(o.stdout),
        Ok(o) if o.status.code() == Some(1) => Answer::Cancelled,
        Ok(o) => Answer::Failed(format!(
            "zenity failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Answer::Failed(format!("running zenity: {e}")),
    }
}

fn show(ok: bool, text: &str) {
    // The dialog is the only way to reach the person; if zenity fails, stderr is the rest.
    match ask(&result_args(ok, text)) {
        Answer::Ok(_) | Answer::Cancelled => {}
        Answer::Failed(e) => eprintln!("pershome prepare: {text}\n({e})"),
    }
}

/// Ends the progress window: EOF on its stdin makes an `--auto-close` progress close; one
/// that is still there after a few seconds is killed, so prepare never hangs on it.
fn finish_progress(mut child: Child) {
    if let Some(mut stdin) = child.stdin.take() {
        // zenity may already be gone (EPIPE); the result dialog follows regardless.
        let _ = stdin.write_all(b"100\n");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs the whole dialog flow; returns `pershome prepare`'s exit code (1 when the person
/// cancels, 0 when the stick is ready, the error's code after showing it).
pub fn run(target: Option<PathBuf>, opts: PrepareOptions) -> u8 {
    if !has_display() {
        eprintln!(
            "pershome prepare: --gui needs a graphical session (DISPLAY or WAYLAND_DISPLAY); in \
             a terminal, run: pershome prepare"
        );
        return exit_code::FAILED;
    }
    if let Err(e) = crate::exec::user_command(crate::exec::system_program_or_missing("zenity"))
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        eprintln!(
            "pershome prepare: the graphical front end needs zenity (apt install zenity): {e}; \
             in a terminal, run: pershome prepare"
        );
        return exit_code::FAILED;
    }
    let stick = match target {
        Some(_) => None,
        None => match pick_stick() {
            Ok(s) => Some(s),
            Err(code) => return code,
        },
    };
    let resolved = match (&target, &stick) {
        (Some(t), _) => prepare::resolve(t),
        (None, Some(s)) => prepare::resolve_stick(s),
        (None, None) => return exit_code::FAILED,
    };
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => {
            show(false, &e.to_string());
            return e.exit_code();
        }
    };
    match ask(&confirm_args(&describe_target(stick.as_ref(), &resolved))) {
        Answer::Ok(_) => {}
        Answer::Cancelled => return exit_code::CANCELLED,
        Answer::Failed(e) => {
            eprintln!("pershome prepare: {e}");
            return exit_code::FAILED;
        }
    }
    let progress = crate::exec::user_command(crate::exec::system_program_or_missing("zenity"))
        .args(progress_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let result = prepare::prepare_dir(&resolved.dir, opts);
    if let Ok(child) = progress {
        finish_progress(child);
    }
    drop(resolved);
    match result {
        Ok(p) => {
            show(true, &done_text(&p));
            exit_code::READY
        }
        Err(e) => {
            show(false, &e.to_string());
            e.exit_code()
        }
    }
}

/// The stick to prepare when none was named: the only one, or the one chosen in a list.
fn pick_stick() -> Result<Stick, u8> {
    let sticks = match mountinfo::mounts() {
        Ok(m) => discover::find_sticks(&m),
        Err(e) => {
            show(false, &format!("{e:#}"));
            return Err(exit_code::FAILED);
        }
    };
    match sticks.len() {
        0 => {
            show(
                false,
                "No USB stick was found.\n\nPlug in your stick (formatted FAT32 or exFAT, as \
                 sticks come from the shop) and try again.",
            );
            Err(exit_code::TARGET)
        }
        1 => Ok(sticks[0].clone()),
        _ => match ask(&choose_args(&sticks)) {
            Answer::Ok(out) => chosen(&sticks, &out).cloned().ok_or(exit_code::CANCELLED),
            Answer::Cancelled => Err(exit_code::CANCELLED),
            Answer::Failed(e) => {
                eprintln!("pershome prepare: {e}");
                Err(exit_code::FAILED)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stick::StickFs;

    fn stick(dev: &str, mp: Option<&str>) -> Stick {
        Stick {
            device: dev.into(),
            fs: StickFs::Vfat,
            mountpoint: mp.map(Into::into),
            read_only: false,
            label: Some("A<B".into()),
        }
    }

    #[test]
    fn list_has_one_row_per_stick_device_hidden_and_printed() {
        let sticks = [
            stick("/dev/sdb1", Some("/media/x")),
            stick("/dev/sdc1", None),
        ];
        let a = choose_args(&sticks);
        let rows = &a[a.len() - 4..];
        let expected = [
            "/dev/sdb1",
            "/dev/sdb1 (FAT, label \"A<B\", mounted on /media/x)",
            "/dev/sdc1",
            "/dev/sdc1 (FAT, label \"A<B\", not mounted)",
        ];
        assert_eq!(rows, expected, "expected rows {expected:?}, got {a:?}");
        for flag in ["--hide-column=1", "--print-column=1"] {
            assert!(a.iter().any(|x| x == flag), "no {flag} in {a:?}");
        }
        assert!(!a.iter().any(|x| x == "--radiolist"), "radiolist: {a:?}");
    }

    #[test]
    fn list_answer_parsing() {
        let sticks = [stick("/dev/sdb1", None), stick("/dev/sdc1", None)];
        let got = chosen(&sticks, b"/dev/sdc1\n").map(|s| s.device.clone());
        assert_eq!(got, Some("/dev/sdc1".into()), "got {got:?}");
        for bad in [&b""[..], b"\n", b"/dev/sdc", b"/dev/sdc1\n/dev/sdb1\n"] {
            let got = chosen(&sticks, bad);
            assert!(got.is_none(), "{bad:?} should choose nothing, got {got:?}");
        }
    }

    #[test]
    fn texts_are_plain_and_wrapped() {
        let a = confirm_args("/dev/sdb1 (FAT, label \"A<B\", not mounted)");
        assert!(a.iter().any(|x| x == "--no-markup"), "got {a:?}");
        let text = a.last().expect("text");
        assert!(text.contains("A<B"), "label changed: {text}");
        assert!(
            text.lines().all(|l| l.chars().count() <= WRAP_COLUMNS),
            "a line is longer than {WRAP_COLUMNS}: {text}"
        );
        let r = result_args(false, "x & <y>\n");
        assert_eq!(r[0], "--error");
        assert!(r.iter().any(|x| x == "--no-markup"), "got {r:?}");
        assert_eq!(r.last().map(String::as_str), Some("x & <y>"));
    }

    #[test]
    fn wrap_keeps_breaks_and_long_words() {
        let long = "/a/very/long/path/that/does/not/fit";
        let got = wrap(&format!("one two three\n\nfour {long} five\n"), 10);
        let expected = format!("one two\nthree\n\nfour\n{long}\nfive");
        assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
    }

    #[test]
    fn done_text_names_the_folder_and_what_to_do() {
        let p = Prepared::Created {
            backing: "/media/x/pershome".into(),
            made_dir: true,
            entries: 0,
        };
        let t = done_text(&p);
        for want in ["ready", "/media/x/pershome", "before you log in"] {
            assert!(t.contains(want), "{want:?} missing from {t:?}");
        }
    }
}
