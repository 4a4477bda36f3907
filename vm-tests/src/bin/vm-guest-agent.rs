//! `vm-guest-agent DEVICE`: runs inside the test guest, started by a systemd unit at boot. It
//! reads [`Request`]s line by line from DEVICE (the guest's ttyS1, the results channel), runs
//! each command and writes back a [`Response`].
//!
//! It owns the guest end of the channel and nothing else: it never interprets a command, and
//! it never lets one outlive its time limit (the command runs in its own process group, which
//! is killed on timeout). Output goes to files, not pipes, so a command that leaves a
//! background process holding its stdout cannot block the agent.

#[path = "../protocol.rs"]
mod protocol;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::termios::{self, SetArg};

use protocol::{Request, Response};

/// How much of each output stream travels back: the serial line is slow under TCG, and long
/// logs go to the 9p results directory instead.
const OUTPUT_LIMIT: usize = 64 * 1024;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vm-guest-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let Some(device) = std::env::args().nth(1) else {
        bail!("usage: vm-guest-agent DEVICE (the results channel, e.g. /dev/ttyS1)");
    };
    let port = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .with_context(|| format!("opening {device}"))?;
    // Raw mode: no echo, no line editing, no CR/LF translation, no signals from bytes. The
    // JSON lines must arrive exactly as sent, in both directions.
    let mut tio = termios::tcgetattr(&port).with_context(|| format!("tcgetattr {device}"))?;
    termios::cfmakeraw(&mut tio);
    termios::tcsetattr(&port, SetArg::TCSANOW, &tio)
        .with_context(|| format!("tcsetattr {device}"))?;
    let mut out = port.try_clone().context("duplicating the port")?;
    send(
        &mut out,
        &Response {
            ready: true,
            ..Response::default()
        },
    )?;
    let scratch = std::path::Path::new("/run/vm-guest-agent");
    std::fs::create_dir_all(scratch).context("creating /run/vm-guest-agent")?;
    for line in BufReader::new(port).lines() {
        let line = line.context("reading the results channel")?;
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => execute(&request, scratch),
            Err(e) => Response {
                error: Some(format!("bad request ({e}): {line:?}")),
                ..Response::default()
            },
        };
        send(&mut out, &response)?;
    }
    Ok(())
}

fn send(out: &mut File, response: &Response) -> Result<()> {
    let mut line = serde_json::to_string(response).context("encoding a response")?;
    line.push('\n');
    out.write_all(line.as_bytes())
        .context("writing the results channel")?;
    out.flush().context("flushing the results channel")
}

/// The last [`OUTPUT_LIMIT`] bytes of a file, lossily decoded.
fn tail(mut file: File) -> String {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(OUTPUT_LIMIT as u64);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_ok() {
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn execute(request: &Request, scratch: &std::path::Path) -> Response {
    let mut response = Response {
        id: request.id,
        ..Response::default()
    };
    match execute_inner(request, scratch, &mut response) {
        Ok(()) => response,
        Err(e) => {
            response.error = Some(format!("{e:#}"));
            response
        }
    }
}

fn execute_inner(
    request: &Request,
    scratch: &std::path::Path,
    response: &mut Response,
) -> Result<()> {
    let Some((program, args)) = request.argv.split_first() else {
        bail!("empty argv");
    };
    let out_path = scratch.join(format!("{}.out", request.id));
    let err_path = scratch.join(format!("{}.err", request.id));
    let stdout = File::create(&out_path).with_context(|| format!("creating {out_path:?}"))?;
    let stderr = File::create(&err_path).with_context(|| format!("creating {err_path:?}"))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", request.argv))?;
    let pgid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).context("pid")?);
    let deadline = Instant::now() + Duration::from_secs(request.timeout_s.max(1));
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the command")? {
            break status;
        }
        if Instant::now() >= deadline {
            response.timed_out = true;
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            break child.wait().context("reaping the timed-out command")?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    response.code = status.code();
    response.signal = status.signal();
    for (path, slot) in [
        (&out_path, &mut response.stdout),
        (&err_path, &mut response.stderr),
    ] {
        if let Ok(file) = File::open(path) {
            *slot = tail(file);
        }
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
