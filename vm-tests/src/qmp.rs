//! A small QMP (QEMU Machine Protocol) client over the unix socket QEMU listens on: enough
//! to unplug and re-plug the USB stick and to read its block statistics.
//!
//! This module owns the QMP handshake and the request/response pairing (events that arrive
//! in between are skipped). It never starts or stops QEMU; `qemu::Vm` does.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// The stick's write counters, as `query-blockstats` reports them for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteStats {
    pub wr_bytes: u64,
    pub wr_operations: u64,
}

impl Qmp {
    /// Connect, read the greeting and leave capabilities negotiation mode.
    pub fn connect(socket: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to QMP at {}", socket.display()))?;
        // A QMP command answers in milliseconds; a minute means QEMU is wedged.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .context("setting the QMP read timeout")?;
        let writer = stream.try_clone().context("duplicating the QMP socket")?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("QMP greeting expected, got {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?;
        if n == 0 {
            bail!("QMP closed the connection (QEMU exited?)");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent invalid JSON: {line:?}"))
    }

    /// Run one command; returns its `return` value, or its `error` as an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut request =
            serde_json::to_string(&json!({"execute": command, "arguments": arguments}))
                .context("encoding a QMP command")?;
        request.push('\n');
        self.writer
            .write_all(request.as_bytes())
            .with_context(|| format!("sending QMP {command}"))?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = message.get("error") {
                bail!("QMP {command} failed: {err}");
            }
            bail!("unexpected QMP message after {command}: {message}");
        }
    }

    /// Unplug a device (`device_del`); QEMU acts on a USB device at once.
    pub fn device_del(&mut self, id: &str) -> Result<()> {
        self.execute("device_del", json!({"id": id})).map(drop)
    }

    /// Plug a device back (`device_add` with the given properties).
    pub fn device_add(&mut self, properties: Value) -> Result<()> {
        self.execute("device_add", properties).map(drop)
    }

    /// The write counters of the block device whose qdev id is `qdev`, from
    /// `query-blockstats`. They restart from zero when the device is plugged again.
    pub fn write_stats(&mut self, qdev: &str) -> Result<WriteStats> {
        let ret = self.execute("query-blockstats", json!({}))?;
        let entries = ret
            .as_array()
            .ok_or_else(|| anyhow!("query-blockstats returned no list: {ret}"))?;
        for entry in entries {
            let name = entry.get("qdev").and_then(Value::as_str).unwrap_or("");
            if qdev_matches(name, qdev) {
                let stats = &entry["stats"];
                let get = |key: &str| {
                    stats
                        .get(key)
                        .and_then(Value::as_u64)
                        .ok_or_else(|| anyhow!("query-blockstats: no {key} for {qdev}: {entry}"))
                };
                return Ok(WriteStats {
                    wr_bytes: get("wr_bytes")?,
                    wr_operations: get("wr_operations")?,
                });
            }
        }
        let names: Vec<&str> = entries
            .iter()
            .filter_map(|e| e.get("qdev").and_then(Value::as_str))
            .collect();
        bail!("query-blockstats has no device {qdev:?} (unplugged?); it has {names:?}")
    }
}

/// Whether a `query-blockstats` entry's `qdev` belongs to the device with id `id`. The field
/// is the device's id or a QOM path; usb-storage puts the statistics on an inner SCSI disk,
/// `/machine/peripheral/ID/ID.0/legacy[0]`.
pub fn qdev_matches(qdev: &str, id: &str) -> bool {
    qdev == id || qdev.ends_with(&format!("/{id}")) || qdev.contains(&format!("/{id}/"))
}

#[cfg(test)]
mod tests {
    use super::qdev_matches;

    #[test]
    fn finds_the_usb_stick_by_its_inner_disk() {
        for (qdev, want) in [
            ("/machine/peripheral/stickdev/stickdev.0/legacy[0]", true),
            ("stickdev", true),
            ("/machine/peripheral/stickdev", true),
            ("/machine/peripheral-anon/device[0]/virtio-backend", false),
            ("/machine/peripheral/stickdev2/stickdev2.0/legacy[0]", false),
        ] {
            let got = qdev_matches(qdev, "stickdev");
            assert_eq!(got, want, "qdev {qdev:?}: expected {want}, got {got}");
        }
    }
}
