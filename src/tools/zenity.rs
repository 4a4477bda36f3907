//! The zenity front end of `pershome prepare` (`--gui`, or no terminal), for people who do not
//! use a terminal: choose the stick, confirm, a progress window, then done or the error.
//!
//! This module owns the dialogs' wording and zenity's argument lists (built by pure functions,
//! unit-tested). It never passes text through a shell: zenity gets separate argv items, and
//! text shown is escaped for Pango markup.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::stick::discover::{self, Stick};
use crate::stick::mountinfo;
use crate::tools::prepare::{self, exit_code, PrepareOptions};

const TITLE: &str = "Prepare a pershome stick";

/// Escapes text for zenity's Pango markup (`--text` interprets `<`, `&`).
pub fn markup_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The arguments of the list in which the person picks a stick.
pub fn choose_args(sticks: &[Stick]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--list",
        "--radiolist",
        "--title",
        TITLE,
        "--text",
        "Which USB stick should carry your home?",
        "--column",
        "",
        "--column",
        "Device",
        "--column",
        "Stick",
        "--print-column=2",
        "--width=560",
        "--height=300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (i, s) in sticks.iter().enumerate() {
        a.push(if i == 0 { "TRUE" } else { "FALSE" }.into());
        a.push(s.device.display().to_string());
        a.push(s.describe());
    }
    a
}

/// The arguments of the confirmation question.
pub fn confirm_args(s: &Stick) -> Vec<String> {
    vec![
        "--question".into(),
        "--title".into(),
        TITLE.into(),
        "--width=460".into(),
        "--text".into(),
        markup_escape(&format!(
            "Prepare {} for pershome?\n\nThis creates a folder named \"pershome\" on the stick. \
             Nothing on the stick is erased or changed, and it still works on Windows and Mac.",
            s.describe()
        )),
    ]
}

/// The arguments of the final message (`ok`: info, else error).
pub fn result_args(ok: bool, text: &str) -> Vec<String> {
    vec![
        if ok { "--info" } else { "--error" }.into(),
        "--title".into(),
        TITLE.into(),
        "--width=460".into(),
        "--text".into(),
        markup_escape(text),
    ]
}

fn zenity(args: &[String]) -> std::io::Result<std::process::Output> {
    Command::new("zenity")
        .args(args)
        .stderr(Stdio::null())
        .output()
}

fn show(ok: bool, text: &str) {
    // The dialog is the only way to reach the person; if zenity itself is gone, stderr is.
    if zenity(&result_args(ok, text)).is_err() {
        eprintln!("pershome prepare: {text}");
    }
}

/// Runs the whole dialog flow; returns the exit code.
pub fn run(target: Option<PathBuf>, opts: PrepareOptions) -> u8 {
    if Command::new("zenity").arg("--version").output().is_err() {
        eprintln!(
            "pershome prepare: the graphical front end needs zenity (apt install zenity); in a \
             terminal, run: pershome prepare"
        );
        return exit_code::FAILED;
    }
    let resolved = match target {
        Some(t) => prepare::resolve(&t),
        None => {
            let sticks = match mountinfo::mounts() {
                Ok(m) => discover::find_sticks(&m),
                Err(e) => {
                    show(false, &format!("{e:#}"));
                    return exit_code::FAILED;
                }
            };
            let chosen = match sticks.len() {
                0 => {
                    show(
                        false,
                        "No USB stick was found.\n\nPlug in your stick (formatted FAT32 or exFAT, \
                         as sticks come from the shop) and try again.",
                    );
                    return exit_code::TARGET;
                }
                1 => sticks[0].clone(),
                _ => match zenity(&choose_args(&sticks)) {
                    Ok(o) if o.status.success() => {
                        let dev = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                        match sticks
                            .iter()
                            .find(|s| s.device.display().to_string() == dev)
                        {
                            Some(s) => s.clone(),
                            None => return exit_code::CANCELLED,
                        }
                    }
                    _ => return exit_code::CANCELLED,
                },
            };
            match zenity(&confirm_args(&chosen)) {
                Ok(o) if o.status.success() => {}
                _ => return exit_code::CANCELLED,
            }
            prepare::resolve_stick(&chosen)
        }
    };
    // A pulsating progress window while the work runs; closing its stdin ends it.
    let progress = Command::new("zenity")
        .args([
            "--progress",
            "--pulsate",
            "--auto-close",
            "--no-cancel",
            "--title",
            TITLE,
            "--text",
            "Preparing the stick…",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let result = resolved.and_then(|r| prepare::prepare_dir(&r.dir, opts));
    if let Ok(mut child) = progress {
        if let Some(mut stdin) = child.stdin.take() {
            // zenity may already be gone; the result dialog follows regardless.
            let _ = stdin.write_all(b"100\n");
        }
        let _ = child.wait();
    }
    match result {
        Ok(p) => {
            show(
                true,
                &format!(
                    "{}\n\nLeave the stick plugged in when you log in: your home is then on it. \
                     Remove it only after logging out.",
                    p.message()
                ),
            );
            exit_code::READY
        }
        Err(e) => {
            show(false, &e.to_string());
            e.exit_code()
        }
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
    fn list_has_one_row_per_stick_first_selected() {
        let a = choose_args(&[
            stick("/dev/sdb1", Some("/media/x")),
            stick("/dev/sdc1", None),
        ]);
        let rows = &a[a.len() - 6..];
        assert_eq!(
            rows,
            [
                "TRUE",
                "/dev/sdb1",
                "/dev/sdb1 (FAT, label \"A<B\", mounted on /media/x)",
                "FALSE",
                "/dev/sdc1",
                "/dev/sdc1 (FAT, label \"A<B\", not mounted)"
            ],
            "got {a:?}"
        );
    }

    #[test]
    fn texts_are_markup_escaped() {
        let a = confirm_args(&stick("/dev/sdb1", None));
        let text = a.last().expect("text");
        assert!(text.contains("A&lt;B"), "got {text}");
        let r = result_args(false, "x & <y>");
        assert_eq!(r[0], "--error");
        assert_eq!(r.last().map(String::as_str), Some("x &amp; &lt;y&gt;"));
    }
}
