//! Logging set-up for the pershome binaries: `tracing` events go to stderr when a program runs
//! in the foreground, and to syslog (which journald collects) when `pershomefs` runs as a
//! daemon with its stdio on /dev/null.
//!
//! This module owns the global tracing subscriber and the syslog connection. It must never
//! panic or fail the program over logging: a missing /dev/log just loses messages, and the
//! filter in `PERSHOME_LOG` falls back to the default with a warning when it does not parse.
//! It also forwards the `log` crate's records (fuser logs through `log`) into tracing.

use std::ffi::CString;
use std::io;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The environment variable that overrides the log filter, in `tracing_subscriber::EnvFilter`
/// syntax, e.g. `PERSHOME_LOG=debug` or `PERSHOME_LOG=pershome::meta=trace,info`.
pub const LOG_ENV: &str = "PERSHOME_LOG";

/// The syslog identity of the daemon: journald shows messages as `pershomefs[PID]: ...`.
const SYSLOG_IDENT: &std::ffi::CStr = c"pershomefs";

/// Where log events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// Human-readable lines on stderr (foreground runs and the command-line tools).
    Stderr,
    /// syslog(3) with facility LOG_DAEMON (the background daemon).
    Syslog,
}

/// Installs the global subscriber. `debug` lowers the default level from info to debug;
/// `PERSHOME_LOG` overrides both. Calling it twice in one process is harmless: the second
/// call leaves the first subscriber in place and returns an error the caller may ignore.
pub fn init(target: LogTarget, debug: bool) -> anyhow::Result<()> {
    init_with_ident(target, debug, SYSLOG_IDENT)
}

/// As [`init`], with another syslog identity (`journalctl -t IDENT`), for the other programs
/// (`pershome-config` logs as `pershome-config`).
pub fn init_with_ident(
    target: LogTarget,
    debug: bool,
    ident: &'static std::ffi::CStr,
) -> anyhow::Result<()> {
    let default_level = if debug { "debug" } else { "info" };
    let (filter, bad_filter) = match std::env::var(LOG_ENV) {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new(default_level),
                Some(format!("{spec:?}: {e}")),
            ),
        },
        _ => (EnvFilter::new(default_level), None),
    };
    let result = match target {
        LogTarget::Stderr => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(io::stderr)
            // Colour codes only for a terminal, not for a log file or a pipe.
            .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
            .try_init(),
        LogTarget::Syslog => {
            // SAFETY: openlog keeps the ident pointer; `ident` is a 'static C string.
            unsafe {
                libc::openlog(
                    ident.as_ptr(),
                    libc::LOG_PID | libc::LOG_NDELAY,
                    libc::LOG_DAEMON,
                )
            };
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(SyslogMakeWriter)
                // syslog stamps the time and carries the level as the priority.
                .without_time()
                .with_level(false)
                .with_ansi(false)
                .try_init()
        }
    };
    result.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))?;
    if let Some(why) = bad_filter {
        tracing::warn!("ignoring {LOG_ENV}={why}; logging at the default level");
    }
    Ok(())
}

/// Makes one [`SyslogWriter`] per event, carrying the event's priority.
#[derive(Debug, Clone, Copy)]
struct SyslogMakeWriter;

impl<'a> MakeWriter<'a> for SyslogMakeWriter {
    type Writer = SyslogWriter;

    fn make_writer(&'a self) -> SyslogWriter {
        SyslogWriter::new(libc::LOG_INFO)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> SyslogWriter {
        SyslogWriter::new(priority(meta.level()))
    }
}

/// Maps a tracing level to a syslog priority.
fn priority(level: &Level) -> libc::c_int {
    match *level {
        Level::ERROR => libc::LOG_ERR,
        Level::WARN => libc::LOG_WARNING,
        Level::INFO => libc::LOG_INFO,
        Level::DEBUG | Level::TRACE => libc::LOG_DEBUG,
    }
}

/// Collects one formatted event and hands it to syslog(3) when dropped. The fmt layer writes
/// an event in several pieces, so sending on each `write` would split one message in many.
struct SyslogWriter {
    priority: libc::c_int,
    buf: Vec<u8>,
}

impl SyslogWriter {
    fn new(priority: libc::c_int) -> Self {
        SyslogWriter {
            priority,
            buf: Vec::new(),
        }
    }
}

impl io::Write for SyslogWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogWriter {
    fn drop(&mut self) {
        let Some(message) = syslog_message(&self.buf) else {
            return;
        };
        // SAFETY: the format is a constant "%s" and `message` is a valid NUL-terminated string,
        // so syslog reads exactly one string argument.
        unsafe { libc::syslog(self.priority, c"%s".as_ptr(), message.as_ptr()) };
    }
}

/// The text syslog receives for one formatted event: without the trailing newline, with NUL
/// bytes (which would cut the C string short) shown as `\0`; `None` for an empty event.
fn syslog_message(buf: &[u8]) -> Option<CString> {
    let text = String::from_utf8_lossy(buf);
    let text = text.trim_end_matches(['\n', '\r']);
    if text.is_empty() {
        return None;
    }
    CString::new(text.replace('\0', "\\0")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_priorities() {
        let got: Vec<_> = [
            Level::ERROR,
            Level::WARN,
            Level::INFO,
            Level::DEBUG,
            Level::TRACE,
        ]
        .iter()
        .map(priority)
        .collect();
        let expected = vec![
            libc::LOG_ERR,
            libc::LOG_WARNING,
            libc::LOG_INFO,
            libc::LOG_DEBUG,
            libc::LOG_DEBUG,
        ];
        assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
    }

    #[test]
    fn message_drops_newline_and_escapes_nul() {
        assert_eq!(
            syslog_message(b"mounted /home/a\n"),
            Some(CString::from(c"mounted /home/a"))
        );
        assert_eq!(syslog_message(b"a\0b\r\n"), Some(CString::from(c"a\\0b")));
        assert_eq!(syslog_message(b"\n"), None);
        assert_eq!(syslog_message(b""), None);
        // Invalid UTF-8 from a stick name must not lose the message.
        assert_eq!(
            syslog_message(b"name \xff\n"),
            Some(CString::from(c"name \xef\xbf\xbd"))
        );
    }
}
