//! One QEMU guest: a Debian thin client booted from the cached image with the USB stick on an
//! xHCI controller, a 9p share for test tools and results, the console on ttyS0 (to a log file),
//! the results channel on ttyS1 and QMP, following `/work/shared/testing.md`.
//!
//! This module owns the QEMU process and its sockets. Architecture Invariant: no QEMU process
//! outlives the `Vm` that started it: dropping a `Vm` kills it, and the process also gets
//! SIGKILL from the kernel if the harness itself dies (PR_SET_PDEATHSIG). It never decides what
//! a scenario checks.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::image::{GuestImage, Kernel};
use crate::protocol::{Request, Response};
use crate::qmp::{Qmp, WriteStats};

/// The stick's qdev id, the id QMP's device_del and query-blockstats use.
pub const STICK_DEV: &str = "stickdev";
/// How long a TCG guest may take from QEMU's start to the agent's greeting (measured: about
/// 12 s on an idle 2-core machine; the machine is shared, hence the margin).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// What to boot.
pub struct VmConfig<'a> {
    pub image: &'a GuestImage,
    pub kernel: Kernel,
    /// The stick image (raw), plugged at boot when present.
    pub stick: Option<&'a Path>,
    /// The directory shared read-write as 9p tag `host` (`/host` in the guest): `tools/` holds
    /// the test tools the agent installs at boot (never the project's own binaries), `results/` what the guest leaves for the host.
    pub share: &'a Path,
    /// Where the sockets and logs go.
    pub run_dir: &'a Path,
    /// A short name for the logs (`console-NAME.log`).
    pub name: &'a str,
}

/// A boot that is not the thin-client image's: the LTSP server (its own kernel, root disk and
/// the LAN socket) or the netbooted LTSP client (no disk; kernel and initrd served by the
/// server). Everything else (agent channel, QMP, console, 9p share, stick) is as for `VmConfig`.
pub struct BootSpec<'a> {
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub append: &'a str,
    /// The root disk (raw, opened with snapshot=on), if any.
    pub root_disk: Option<&'a Path>,
    /// Extra QEMU arguments (the network).
    pub extra: Vec<String>,
    pub memory_mib: u32,
    /// From QEMU's start to the agent's greeting.
    pub boot_timeout: Duration,
    /// The stick's `-blockdev` nodes, protocol node first and the format node named `stick`
    /// last, if one is plugged (see [`stick_file_node`]).
    pub stick: Option<Vec<String>>,
    pub share: &'a Path,
    pub run_dir: &'a Path,
    pub name: &'a str,
}

/// The QEMU child, killed and reaped on drop.
struct QemuProcess {
    child: Child,
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

pub struct Vm {
    // Field order is drop order: the sockets close before the process is killed.
    channel: BufReader<UnixStream>,
    channel_out: UnixStream,
    qmp: Qmp,
    process: QemuProcess,
    console: PathBuf,
    next_id: u64,
    stick_plugged: bool,
}

/// What a guest command did, with its output; `ok()` is a zero exit.
#[derive(Debug)]
pub struct Output {
    pub script: String,
    pub response: Response,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.response.code == Some(0) && !self.response.timed_out && self.response.error.is_none()
    }

    pub fn describe(&self) -> String {
        let r = &self.response;
        let status = if let Some(e) = &r.error {
            format!("could not run: {e}")
        } else if r.timed_out {
            "timed out (killed)".to_owned()
        } else if let Some(code) = r.code {
            format!("exit {code}")
        } else {
            format!("killed by signal {:?}", r.signal)
        };
        format!(
            "guest command {status}:\n--- script\n{}\n--- stdout\n{}--- stderr\n{}",
            self.script.trim_end(),
            r.stdout,
            r.stderr
        )
    }
}

/// Make the kernel SIGKILL the child when the harness dies, so that not even a SIGKILLed
/// harness leaves a QEMU behind.
pub(crate) fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn stick_device_properties() -> serde_json::Value {
    json!({"driver": "usb-storage", "bus": "xhci.0", "drive": "stick", "id": STICK_DEV, "removable": true})
}

/// The stick's `-blockdev` nodes for an image file. The guest's zero writes (FAT has no
/// sparse files: pjdfstest's write at 2 GiB makes the kernel write 2 GiB of zeros) and its
/// discards become holes in the image (`detect-zeroes=unmap`, `discard=unmap`), so a 4 GiB
/// stick does not take 4 GiB of the host's disk. The guest reads the same zeros back; the
/// device's write counters (the wear scenario's) are taken above this layer and still count
/// every byte the guest wrote.
pub fn stick_file_node(stick: &Path) -> Vec<String> {
    vec![
        format!(
            "driver=file,filename={},node-name=stickfile,discard=unmap",
            stick.display()
        ),
        "driver=raw,file=stickfile,node-name=stick,discard=unmap,detect-zeroes=unmap".to_owned(),
    ]
}

impl Vm {
    pub fn boot(config: &VmConfig) -> Result<Vm> {
        Vm::boot_with(config, config.stick.map(stick_file_node))
    }

    /// As `boot`, with the stick served by an NBD server on the unix socket `socket` (the
    /// power-loss scenario's write-back cache) instead of an image file; `config.stick` must
    /// be None.
    pub fn boot_nbd(config: &VmConfig, socket: &Path) -> Result<Vm> {
        if config.stick.is_some() {
            bail!("boot_nbd: the stick comes from the NBD server, not from an image file");
        }
        // No zero detection here: the write-back cache must see the guest's writes as the
        // guest made them, or a power cut would not lose what a real stick loses.
        let nodes = vec![
            format!(
                "driver=nbd,server.type=unix,server.path={},node-name=stickfile",
                socket.display()
            ),
            "driver=raw,file=stickfile,node-name=stick".to_owned(),
        ];
        Vm::boot_with(config, Some(nodes))
    }

    /// `stick`: the stick's `-blockdev` nodes (see [`BootSpec::stick`]), if one is plugged.
    fn boot_with(config: &VmConfig, stick: Option<Vec<String>>) -> Result<Vm> {
        let (vmlinuz, initrd) = config.image.kernel_files(config.kernel);
        let rootfs = config.image.rootfs();
        Vm::boot_spec(
            &BootSpec {
                vmlinuz: &vmlinuz,
                initrd: &initrd,
                append: "console=ttyS0 root=/dev/vda rw panic=-1 usb-storage.delay_use=0 quiet systemd.show_status=0",
                root_disk: Some(&rootfs),
                extra: Vec::new(),
                memory_mib: 1024,
                boot_timeout: BOOT_TIMEOUT,
                stick,
                share: config.share,
                run_dir: config.run_dir,
                name: config.name,
            },
            config.kernel.name(),
        )
    }

    /// Boots `config`; `what` names the boot in messages.
    pub fn boot_spec(config: &BootSpec, what: &str) -> Result<Vm> {
        std::fs::create_dir_all(config.run_dir)
            .with_context(|| format!("creating {}", config.run_dir.display()))?;
        let res_sock = config.run_dir.join(format!("{}-res.sock", config.name));
        let qmp_sock = config.run_dir.join(format!("{}-qmp.sock", config.name));
        let console = config.run_dir.join(format!("console-{}.log", config.name));
        for path in [&res_sock, &qmp_sock, &console] {
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        if res_sock.as_os_str().len() > 100 {
            bail!(
                "socket path {} is too long for a unix socket (108 bytes): move the checkout or set CARGO_TARGET_DIR shorter",
                res_sock.display()
            );
        }
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-nodefaults", "-accel", "tcg", "-cpu", "max", "-smp", "1"])
            .arg("-m")
            .arg(config.memory_mib.to_string())
            .args(["-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(config.vmlinuz)
            .arg("-initrd")
            .arg(config.initrd)
            .arg("-append")
            .arg(config.append);
        if let Some(disk) = config.root_disk {
            // Snapshot on the root disk only: the global -snapshot would also throw away the
            // stick's writes, which are what the tests look at.
            command
                .arg("-drive")
                .arg(format!(
                    "if=none,id=root,format=raw,file={},snapshot=on",
                    disk.display()
                ))
                .args(["-device", "virtio-blk-pci,drive=root"]);
        }
        command
            .args(&config.extra)
            .args(["-device", "qemu-xhci,id=xhci"])
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=host,security_model=none",
                config.share.display()
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=res,path={},server=on,wait=on",
                res_sock.display()
            ))
            .args(["-serial", "chardev:res"]);
        let plugged = config.stick.is_some();
        if let Some(stick) = &config.stick {
            // -blockdev, not -drive: a -drive disappears with its device on device_del and
            // could not be plugged back.
            for node in stick {
                command.arg("-blockdev").arg(node);
            }
            command.args([
                "-device",
                &format!("usb-storage,bus=xhci.0,drive=stick,id={STICK_DEV},removable=on"),
            ]);
        }
        let qemu_log = config.run_dir.join(format!("qemu-{}.log", config.name));
        let log =
            File::create(&qemu_log).with_context(|| format!("creating {}", qemu_log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log")?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .context("starting qemu-system-x86_64 (install it: cargo vm-test --install-deps)")?;
        let mut process = QemuProcess { child };

        let started = Instant::now();
        // QEMU creates the results socket and then waits for us before it runs the guest.
        let channel = loop {
            if let Some(status) = process.child.try_wait().context("waiting for QEMU")? {
                let log = std::fs::read_to_string(&qemu_log).unwrap_or_default();
                bail!("QEMU exited at start ({status}):\n{log}");
            }
            if let Ok(stream) = UnixStream::connect(&res_sock) {
                break stream;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("QEMU did not create {} within 30 s", res_sock.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let qmp = loop {
            match Qmp::connect(&qmp_sock) {
                Ok(qmp) => break qmp,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    return Err(e.context("QEMU's QMP socket did not answer within 30 s"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let channel_out = channel
            .try_clone()
            .context("duplicating the results channel")?;
        let mut vm = Vm {
            channel: BufReader::new(channel),
            channel_out,
            qmp,
            process,
            console,
            next_id: 1,
            stick_plugged: plugged,
        };
        let ready = vm
            .read_response(config.boot_timeout)
            .with_context(|| format!("waiting for the guest agent (booting {what})"))?;
        if !ready.ready {
            bail!("the guest agent's first message was not its greeting: {ready:?}");
        }
        eprintln!(
            "  guest booted ({what}) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(vm)
    }

    /// The serial console log (kernel and systemd messages).
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    fn read_response(&mut self, timeout: Duration) -> Result<Response> {
        self.channel
            .get_ref()
            .set_read_timeout(Some(timeout))
            .context("setting the channel timeout")?;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.channel.read_line(&mut line).map_err(|e| {
                anyhow::anyhow!(
                    "no answer from the guest within {timeout:?} ({e}); console log: {}",
                    self.console.display()
                )
            })?;
            if n == 0 {
                bail!(
                    "the guest closed the results channel (QEMU exited or the guest crashed); console log: {}",
                    self.console.display()
                );
            }
            // Anything that is not one of our JSON objects (line noise from the boot) is skipped.
            if let Ok(response) = serde_json::from_str::<Response>(line.trim()) {
                return Ok(response);
            }
        }
    }

    /// Run a shell script in the guest as root, with a time limit; returns what it did.
    pub fn run(&mut self, script: &str, timeout: Duration) -> Result<Output> {
        let id = self.next_id;
        self.next_id += 1;
        let request = Request {
            id,
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout_s: timeout.as_secs().max(1),
        };
        let mut line = serde_json::to_string(&request).context("encoding a request")?;
        line.push('\n');
        self.channel_out
            .write_all(line.as_bytes())
            .context("writing to the results channel")?;
        // The agent kills the command at the limit; give it time to answer after that.
        let response = loop {
            let response = self.read_response(timeout + Duration::from_secs(60))?;
            if response.id == id {
                break response;
            }
        };
        Ok(Output {
            script: script.to_owned(),
            response,
        })
    }

    /// Run a script that must succeed; returns its stdout, or an error with everything it said.
    pub fn ok(&mut self, script: &str, timeout: Duration) -> Result<String> {
        let out = self.run(script, timeout)?;
        if out.ok() {
            Ok(out.response.stdout)
        } else {
            bail!("{}", out.describe())
        }
    }

    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Pull the stick out (QMP device_del): the guest sees it vanish at once.
    pub fn unplug_stick(&mut self) -> Result<()> {
        self.qmp.device_del(STICK_DEV)?;
        self.stick_plugged = false;
        Ok(())
    }

    /// Plug the same stick image back in (QMP device_add).
    pub fn replug_stick(&mut self) -> Result<()> {
        if self.stick_plugged {
            bail!("the stick is already plugged in");
        }
        self.qmp.device_add(stick_device_properties())?;
        self.stick_plugged = true;
        Ok(())
    }

    /// The stick's write counters since it was (last) plugged in.
    pub fn stick_writes(&mut self) -> Result<WriteStats> {
        self.qmp.write_stats(STICK_DEV)
    }

    /// Flush the guest's caches and stop QEMU. The stick image then holds everything the
    /// guest wrote (QEMU writes through to the image file; it keeps no cache of its own).
    pub fn shutdown(mut self) -> Result<()> {
        let _ = self.run("sync", Duration::from_secs(60));
        let _ = self.qmp.execute("quit", json!({}));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self
                .process
                .child
                .try_wait()
                .context("waiting for QEMU")?
                .is_some()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: QEMU did not quit within 30 s; killing it");
        Ok(())
    }
}
