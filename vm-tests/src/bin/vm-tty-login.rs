//! `vm-tty-login USER -- SCRIPT`: a person at a text console, for the test guest. It starts
//! Debian's own `/bin/login USER` on a fresh pseudo-terminal (as getty would: a new session
//! with the pty as its controlling terminal), types the password from the environment variable
//! VM_PAM_PASSWORD when login asks for it, waits for the shell's prompt, types one line that
//! runs SCRIPT with `sh -c` and prints its exit status behind a marker, then `exit`. login(1)
//! closes the PAM session itself when the shell ends. Everything the terminal showed (login's
//! prompts, the PAM modules' messages, SCRIPT's output, the logout messages) is printed on
//! stdout; the exit status is SCRIPT's, or 100 when the terminal never got that far.
//!
//! It owns nothing but that conversation; it never changes the PAM configuration. The password
//! comes from the environment so that it does not show in `ps`, and reaches login only through
//! the terminal.

use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::pty::openpty;

/// The whole conversation, login to logout (the agent's own limit is longer).
const DEADLINE: Duration = Duration::from_secs(240);
/// What the line we type prints before SCRIPT's exit status. The echo of the line itself shows
/// `MARKER$?`, never `MARKER` followed by a digit, so it cannot be mistaken for the status.
const MARKER: &str = "__VM_TTY_STATUS=";

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vm-tty-login: {e:#}");
            ExitCode::from(100)
        }
    }
}

/// The terminal's master side and everything read from it so far.
struct Terminal {
    master: OwnedFd,
    seen: Vec<u8>,
    started: Instant,
}

impl Terminal {
    /// Read what is there, waiting at most until the deadline. Returns false at end of file
    /// (login exited and the slave side is closed: the kernel answers EIO).
    fn read_some(&mut self) -> Result<bool> {
        let left = DEADLINE.saturating_sub(self.started.elapsed());
        if left.is_zero() {
            bail!("no end after {} s", DEADLINE.as_secs());
        }
        let wait = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) | Err(Errno::EINTR) => return Ok(true),
            Ok(_) => {}
            Err(e) => return Err(e).context("poll on the terminal"),
        }
        let mut buf = [0u8; 4096];
        match nix::unistd::read(self.master.as_raw_fd(), &mut buf) {
            Ok(0) | Err(Errno::EIO) => Ok(false),
            Ok(n) => {
                self.seen.extend_from_slice(&buf[..n]);
                Ok(true)
            }
            Err(Errno::EINTR) | Err(Errno::EAGAIN) => Ok(true),
            Err(e) => Err(e).context("reading the terminal"),
        }
    }

    /// Read until `needle` shows up after byte `from`; returns the offset just past it. Fails
    /// at once when `refusal` shows up instead (login would only ask again).
    fn expect(&mut self, needle: &str, refusal: &str, from: usize) -> Result<usize> {
        loop {
            let fresh = &self.seen[from.min(self.seen.len())..];
            if let Some(at) = find(fresh, needle.as_bytes()) {
                return Ok(from + at + needle.len());
            }
            if find(fresh, refusal.as_bytes()).is_some() {
                bail!("login said {refusal:?} (see the terminal above)");
            }
            if !self.read_some()? {
                bail!("the terminal closed before it showed {needle:?} (see above)");
            }
        }
    }

    fn type_line(&mut self, line: &str) -> Result<()> {
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        let mut written = 0;
        while written < bytes.len() {
            match nix::unistd::write(self.master.as_fd(), &bytes[written..]) {
                Ok(n) => written += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e).context("typing on the terminal"),
            }
        }
        Ok(())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).replace("\r\n", "\n")
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// SCRIPT's exit status from the marker line, if the terminal showed one.
fn status_of(text: &str) -> Option<u8> {
    text.match_indices(MARKER).find_map(|(at, _)| {
        let digits: String = text[at + MARKER.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

/// A base64 encoding (standard alphabet, padded) of SCRIPT, so that the typed line holds no
/// character the shell or the terminal would interpret.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn run() -> Result<u8> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [user, dashes, script] = args.as_slice() else {
        bail!("usage: VM_PAM_PASSWORD=... vm-tty-login USER -- SCRIPT");
    };
    if dashes != "--" || user.starts_with('-') || user.is_empty() {
        bail!("usage: VM_PAM_PASSWORD=... vm-tty-login USER -- SCRIPT");
    }
    let password = std::env::var("VM_PAM_PASSWORD").context("VM_PAM_PASSWORD is not set")?;

    let pty = openpty(None, None).context("openpty")?;
    let slave = pty.slave;
    let mut login = Command::new("/bin/login");
    login
        .arg(user)
        .env_clear()
        .env("TERM", "dumb")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::from(slave.try_clone().context("dup of the pty")?))
        .stdout(Stdio::from(slave.try_clone().context("dup of the pty")?))
        .stderr(Stdio::from(slave));
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (setsid, ioctl) on the child's own descriptors.
    unsafe {
        login.pre_exec(|| {
            // A new session whose controlling terminal is the pty, as getty gives login.
            nix::unistd::setsid()?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = login.spawn().context("starting /bin/login")?;
    // The Command keeps its copies of the slave until dropped; after that only login and its
    // children hold the terminal.
    drop(login);
    let mut term = Terminal {
        master: pty.master,
        seen: Vec::new(),
        started: Instant::now(),
    };
    let result = converse(&mut term, &mut child, &password, script);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for login")?;
    let text = term.text();
    print!("{text}");
    let _ = std::io::stdout().flush();
    result?;
    match status_of(&text) {
        Some(code) => Ok(code),
        None => bail!("the terminal never showed the script's exit status (login {status})"),
    }
}

fn converse(
    term: &mut Terminal,
    child: &mut std::process::Child,
    password: &str,
    script: &str,
) -> Result<()> {
    let after_prompt = term.expect("Password:", "Login incorrect", 0)?;
    term.type_line(password)?;
    // The login shell's prompt (Debian's /etc/profile: `\u@\h:\w\$ `).
    term.expect("$ ", "Login incorrect", after_prompt)?;
    // No history file: the home may be the stick, and the test must leave only its own files.
    term.type_line(&format!(
        "unset HISTFILE; sh -c \"$(echo {} | base64 -d)\"; echo {MARKER}$?; exit",
        base64(script.as_bytes())
    ))?;
    // Until login has closed the session and exited. A process login left behind may still
    // hold the terminal, so login's exit ends the wait too, once what it wrote is read.
    while term.read_some()? {
        if child.try_wait().context("waiting for login")?.is_some() {
            let mut before = usize::MAX;
            while before != term.seen.len() && term.read_some()? {
                before = term.seen.len();
            }
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_encoding() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            let got = base64(input.as_bytes());
            assert_eq!(
                got, want,
                "base64({input:?}): expected {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn the_echoed_line_is_not_a_status() {
        let text = format!("$ sh -c x; echo {MARKER}$?; exit\r\nhello\r\n{MARKER}3\r\n");
        assert_eq!(status_of(&text), Some(3), "expected status 3 in {text:?}");
        let echoed_only = format!("$ sh -c x; echo {MARKER}$?; exit\r\n");
        assert_eq!(
            status_of(&echoed_only),
            None,
            "expected no status in {echoed_only:?}"
        );
    }
}
