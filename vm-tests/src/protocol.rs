//! The results channel between the harness (host) and the guest agent: one JSON object per
//! line over the guest's second serial port (ttyS1), which QEMU connects to a unix socket on
//! the host.
//!
//! This module owns the message types only; it never does I/O. The host sends [`Request`]s one
//! at a time and waits for the [`Response`] with the same id; the agent sends one
//! [`Response`] with id 0 and `ready: true` when it starts, so the host knows the guest booted.

use serde::{Deserialize, Serialize};

/// Run `argv` (no shell unless argv names one) with a time limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub argv: Vec<String>,
    /// Seconds before the agent kills the command's whole process group.
    pub timeout_s: u64,
}

/// What a command did. `code` is None when it was killed by a signal (or by the timeout).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub ready: bool,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// The tail of each stream (the agent's OUTPUT_LIMIT), lossily decoded.
    pub stdout: String,
    pub stderr: String,
    /// The agent could not run the command at all (not found, fork failed).
    pub error: Option<String>,
}
