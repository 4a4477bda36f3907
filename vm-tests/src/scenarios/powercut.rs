//! Scenario 10, the power cut: the stick loses everything it was not told to flush.
//!
//! QEMU's own caches do not lose data when QEMU is killed (the host's page cache keeps what it
//! wrote), so the stick image is served to QEMU by `nbdkit --filter=cache cache=writeback`
//! over NBD on a unix socket: writes stay in nbdkit's cache until the guest flushes (an
//! fsync on vfat ends with a cache flush), like the volatile cache of a real stick. A write
//! workload runs in joseph's pershomefs home; at several moments `nbdkit` and QEMU are both
//! killed with SIGKILL: whatever was not flushed is gone, as when a stick is pulled or the
//! power fails. Then the machine boots again from the image as it was left, checks the FAT as
//! pam_mount would (`fsck.vfat -a`), checks (and if needed repairs) the store with
//! `pershome fsck`, mounts the home and checks:
//!
//! - every file whose fsync returned before the kill has exactly its fsync'ed content, in this
//!   round and in every earlier one (never a missing older file);
//! - a copy made without fsync is absent, or its content is the source's (a prefix of it, or
//!   zeros where nothing was written yet: never bytes from elsewhere);
//! - a log appended to line by line, fsync'ed every few lines, holds a prefix of its lines,
//!   at least as many as its last fsync covered.
//!
//! The guest logs what was fsync'ed to the 9p share (written through to the host at once), so
//! the log outlives the kill. This module owns the nbdkit process, which like QEMU never
//! outlives the scenario (killed on drop, and by `PR_SET_PDEATHSIG`/`--exit-with-parent`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest;
use crate::qemu::{die_with_parent, Vm};
use crate::stick::{self, StickFs};
use crate::Ctx;

const HOME: &str = "/home/joseph";

/// The kill moments: after this many files of the round were logged as fsync'ed.
const KILL_AFTER: &[usize] = &[3, 9, 17];

/// The workload of round `$R`, as joseph: each file written with `dd conv=fsync` and then
/// logged with its checksum (so a logged file was fsync'ed); a copy of it made without fsync
/// (logged when made); a line appended to a log, fsync'ed every third line (the count logged
/// after each fsync). Stops at the first error, saying where.
const WORKLOAD: &str = r#"R=$1
cd /home/joseph || exit 2
mkdir -p pc || exit 2
i=0
while :; do
    i=$((i + 1))
    n=pc/r${R}n$i
    if ! dd if=/dev/urandom of=$n bs=1k count=$(( (i * 37) % 190 + 10 )) conv=fsync status=none 2>>/host/results/err-r$R; then
        echo "write $i failed" >> /host/results/err-r$R
        exit 1
    fi
    sha256sum $n >> /host/results/fsynced-r$R
    cp $n pc/r${R}u$i && echo $i >> /host/results/copied-r$R
    echo "r$R line $i" >> pc/log-r$R.txt
    if [ $((i % 3)) -eq 0 ]; then
        sync pc/log-r$R.txt && echo $i >> /host/results/logsync-r$R
    fi
done
"#;

/// The nbdkit process serving the stick, killed (SIGKILL) and reaped on drop. Scenario
/// `vfat` cuts the power the same way.
pub(super) struct Nbdkit {
    child: Child,
    pub(super) socket: PathBuf,
}

impl Nbdkit {
    /// Serves `image` on a unix socket in `run_dir` through a write-back cache that keeps
    /// writes in memory until the client flushes.
    pub(super) fn start(image: &Path, run_dir: &Path, round: usize) -> Result<Nbdkit> {
        let socket = run_dir.join(format!("nbd-{round}.sock"));
        if socket.exists() {
            std::fs::remove_file(&socket)
                .with_context(|| format!("removing {}", socket.display()))?;
        }
        let log = run_dir.join(format!("nbdkit-{round}.log"));
        let log =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new("nbdkit");
        command
            .args(["--foreground", "--exit-with-parent", "--unix"])
            .arg(&socket)
            .args(["--filter=cache", "file"])
            .arg(format!("file={}", image.display()))
            .arg("cache=writeback")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the nbdkit log")?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .context("starting nbdkit (install it: cargo vm-test --install-deps)")?;
        let mut nbd = Nbdkit { child, socket };
        let started = Instant::now();
        while !nbd.socket.exists() {
            if let Some(status) = nbd.child.try_wait().context("waiting for nbdkit")? {
                bail!(
                    "nbdkit exited at start ({status}); see {}",
                    run_dir.display()
                );
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("nbdkit did not create {} within 30 s", nbd.socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(nbd)
    }

    /// The power cut for the cache: SIGKILL, no flush of what it holds.
    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Complete lines of a log the guest wrote over 9p (a line cut by the kill is dropped).
fn complete_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_owned).collect();
    if lines.last().is_some_and(|l| !l.ends_with('\n')) {
        lines.pop();
    }
    lines.into_iter().map(|l| l.trim_end().to_owned()).collect()
}

/// After a boot: the FAT checked as pam_mount does, the stick mounted, the store checked (and
/// repaired if it must be), the home mounted.
fn mount_after_cut(ctx: &mut Ctx, vm: &mut Vm, round: usize) -> Result<()> {
    let device = guest::wait_for_stick(vm)?;
    let fsck = vm.run(
        &format!("fsck.vfat -a {device} 2>&1"),
        Duration::from_secs(300),
    )?;
    match fsck.response.code {
        Some(0) => {}
        Some(1) => ctx.note(format!(
            "after cut {round}: fsck.vfat -a repaired the FAT ({})",
            fsck.response.stdout.lines().last().unwrap_or("").trim()
        )),
        _ => bail!("fsck.vfat -a after cut {round}: {}", fsck.describe()),
    }
    guest::mount_stick(vm, &device, StickFs::Fat32)?;
    let check = vm.run(
        &format!("pershome fsck {} 2>&1", guest::BACKING),
        Duration::from_secs(300),
    )?;
    match check.response.code {
        Some(0) => {}
        Some(4) => {
            let repair = vm.run(
                &format!("pershome fsck --repair {} 2>&1", guest::BACKING),
                Duration::from_secs(300),
            )?;
            if repair.response.code != Some(1) {
                bail!(
                    "after cut {round}: pershome fsck --repair did not repair (expected exit 1): {}",
                    repair.describe()
                );
            }
            ctx.note(format!(
                "after cut {round}: pershome fsck repaired: {}",
                check.response.stdout.trim().replace('\n', " | ")
            ));
            guest::pershome_fsck_clean(vm).context("after the repair")?;
        }
        _ => bail!("pershome fsck after cut {round}: {}", check.describe()),
    }
    guest::mount_home(vm, HOME, "uid=joseph,gid=joseph,allow_other")
}

/// The control file written without fsync just before cut `round` must be gone (absent, or
/// without its bytes): proof that the cut lost what was not flushed.
fn check_control(
    ctx: &mut Ctx,
    vm: &mut Vm,
    round: usize,
    controls: &[(usize, String)],
) -> Result<()> {
    let Some((_, written)) = controls.iter().find(|(r, _)| *r == round) else {
        bail!("no control file was written before cut {round}");
    };
    let path = format!("{}/control-r{round}", guest::STICK_MNT);
    let found = vm.ok(
        &format!("if [ -e {path} ]; then sha256sum < {path}; else echo absent; fi"),
        guest::SHORT,
    )?;
    let found = found.split_whitespace().next().unwrap_or("").to_owned();
    if found == *written {
        bail!(
            "after cut {round}: the control file written without fsync just before the cut \
             survived it: the write-back cache did not lose unflushed writes, so this scenario \
             proves nothing"
        );
    }
    ctx.note(format!(
        "cut {round}: the control file written without fsync was lost ({})",
        if found == "absent" {
            "absent"
        } else {
            "present without its bytes"
        }
    ));
    Ok(())
}

/// The checks after cut `round` (1-based), on the mounted home. `all_fsynced` gathers the
/// fsync'ed files of every round so far, which must all be intact.
fn check_after_cut(
    ctx: &mut Ctx,
    vm: &mut Vm,
    round: usize,
    all_fsynced: &mut Vec<String>,
) -> Result<()> {
    let results = ctx.share.join("results");
    let fsynced = complete_lines(&results.join(format!("fsynced-r{round}")));
    let copied: Vec<usize> = complete_lines(&results.join(format!("copied-r{round}")))
        .iter()
        .filter_map(|l| l.parse().ok())
        .collect();
    let log_synced: usize = complete_lines(&results.join(format!("logsync-r{round}")))
        .last()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    all_fsynced.extend(fsynced.iter().cloned());
    let list = results.join("check.sha");
    std::fs::write(&list, all_fsynced.join("\n") + "\n")
        .with_context(|| format!("writing {}", list.display()))?;
    let verify = vm.run(
        &format!("cd {HOME} && sha256sum --quiet -c /host/results/check.sha 2>&1"),
        Duration::from_secs(300),
    )?;
    if !verify.ok() {
        bail!(
            "after cut {round}: a file fsync'ed before a cut is missing or changed ({} files \
             checked): {}",
            all_fsynced.len(),
            verify.describe()
        );
    }
    // Copies made without fsync: absent, or the source's bytes (zeros where the copy was not
    // written yet). `cmp -l` lists the differing bytes as "offset ours theirs" in octal. One
    // line per copy the workload reported made: "whole", "short" or "absent".
    let made: Vec<String> = copied.iter().map(|i| i.to_string()).collect();
    let copies = vm.ok(
        &format!(
            r#"cd {HOME}/pc
for i in {made}; do
    u=r{round}u$i; n=r{round}n$i
    [ -e $u ] || {{ echo absent; continue; }}
    bad=$(cmp -l $u $n 2>/dev/null | awk '$2 != 0' | head -n 3)
    if [ -n "$bad" ]; then echo "$u has bytes its source never had: $bad" >&2; exit 1; fi
    if [ $(stat -c %s $u) -gt $(stat -c %s $n) ]; then echo "$u is longer than its source" >&2; exit 1; fi
    if cmp -s $u $n; then echo whole; else echo short; fi
done"#,
            made = made.join(" ")
        ),
        Duration::from_secs(300),
    )
    .with_context(|| format!("after cut {round}: the copies made without fsync"))?;
    let count = |what: &str| copies.lines().filter(|l| l.trim() == what).count();
    // The log: a prefix of its lines, at least as long as its last fsync.
    let log = vm.ok(
        &format!("cat {HOME}/pc/log-r{round}.txt 2>/dev/null || true"),
        guest::SHORT,
    )?;
    let lines: Vec<&str> = log.lines().collect();
    for (k, line) in lines.iter().enumerate() {
        if *line != format!("r{round} line {}", k + 1) {
            bail!(
                "after cut {round}: line {} of the appended log is {line:?}, expected \"r{round} \
                 line {}\" (the log must be a prefix of what was appended)",
                k + 1,
                k + 1
            );
        }
    }
    if lines.len() < log_synced {
        bail!(
            "after cut {round}: the appended log has {} lines, but {log_synced} were fsync'ed",
            lines.len()
        );
    }
    ctx.note(format!(
        "cut {round}: {} files fsync'ed in this round, {} in all, intact; of {} copies without \
         fsync: {} whole, {} shorter, {} lost (absent); log: {} lines kept, {log_synced} \
         fsync'ed",
        fsynced.len(),
        all_fsynced.len(),
        copied.len(),
        count("whole"),
        count("short"),
        count("absent"),
        lines.len()
    ));
    Ok(())
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let image = ctx.run_dir.join("stick-vfat.img");
    stick::create(&ctx.sh, &image, StickFs::Fat32, 256)?;
    let results = ctx.share.join("results");
    // The workload runs as joseph and logs to the share.
    std::fs::set_permissions(
        &results,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .context("opening the results directory to joseph")?;
    let mut all_fsynced = Vec::new();
    let mut controls: Vec<(usize, String)> = Vec::new();
    for round in 0..=KILL_AFTER.len() {
        let mut nbd = Nbdkit::start(&image, &ctx.run_dir, round)?;
        let socket = nbd.socket.clone();
        let mut vm = ctx.boot_nbd(&format!("powercut-{round}"), ctx.kernel, &socket)?;
        if round == 0 {
            let device = guest::wait_for_stick(&mut vm)?;
            guest::mount_stick(&mut vm, &device, StickFs::Fat32)?;
            guest::mount_home(&mut vm, HOME, "uid=joseph,gid=joseph,allow_other")?;
            vm.ok(&format!("chown joseph:joseph {HOME}"), guest::SHORT)?;
        } else {
            mount_after_cut(ctx, &mut vm, round)?;
            check_control(ctx, &mut vm, round, &controls)?;
            check_after_cut(ctx, &mut vm, round, &mut all_fsynced)?;
        }
        let Some(&kill_after) = KILL_AFTER.get(round) else {
            guest::unmount_home(&mut vm, HOME)?;
            guest::pershome_fsck_clean(&mut vm).context("at the end")?;
            let device = guest::wait_for_stick(&mut vm)?;
            guest::unmount_and_check_stick(&mut vm, &device, StickFs::Fat32)?;
            vm.shutdown()?;
            // A clean shutdown flushed everything: the image on the host is a sound FAT.
            drop(nbd);
            stick::fsck_fat_host(&ctx.sh, &image).context("fsck.fat on the host at the end")?;
            return Ok(());
        };
        let r = round + 1;
        // The logs exist before joseph appends to them: a file the guest creates on the share
        // belongs to the host's root (security_model=none), and joseph could not append to it.
        for log in ["fsynced", "copied", "logsync", "err"] {
            let path = results.join(format!("{log}-r{r}"));
            std::fs::write(&path, "").with_context(|| format!("creating {}", path.display()))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .with_context(|| format!("opening {} to joseph", path.display()))?;
        }
        vm.ok(
            &format!(
                "setsid runuser -u joseph -- sh -c {} sh {r} </dev/null >/dev/null 2>&1 &",
                crate::util::shq(WORKLOAD)
            ),
            guest::SHORT,
        )?;
        let log = results.join(format!("fsynced-r{r}"));
        let started = Instant::now();
        while complete_lines(&log).len() < kill_after {
            if started.elapsed() > Duration::from_secs(180) {
                let err =
                    std::fs::read_to_string(results.join(format!("err-r{r}"))).unwrap_or_default();
                bail!(
                    "round {r}: the workload fsync'ed {} files in 180 s, expected {kill_after}: {err}",
                    complete_lines(&log).len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The control: the workload and the daemon are stopped (so nothing flushes the
        // stick any more), and a file is written straight onto the vfat mount without fsync.
        // The cut must lose it; if it survived, this scenario would not be cutting power.
        let control = vm.ok(
            &format!(
                "pkill -STOP -u joseph; pkill -STOP -x pershomefs; \
                 dd if=/dev/urandom of={}/control-r{r} bs=64k count=1 status=none && \
                 sha256sum < {}/control-r{r}",
                guest::STICK_MNT,
                guest::STICK_MNT
            ),
            guest::SHORT,
        )?;
        controls.push((
            r,
            control.split_whitespace().next().unwrap_or("").to_owned(),
        ));
        // The power cut: the cache first (nothing more reaches the image), then the machine.
        nbd.kill();
        drop(vm);
        ctx.note(format!(
            "cut {r}: nbdkit and QEMU killed (SIGKILL) {:.1} s into the workload, after {} \
             fsync'ed files",
            started.elapsed().as_secs_f64(),
            complete_lines(&log).len()
        ));
    }
    unreachable!("the last round returns")
}
