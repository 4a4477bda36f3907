//! Scenario 3, the yanked stick: joseph's home is on the stick and a writer is busy in it
//! (each file written, fsync'ed, and only then logged as safe) when the stick is pulled
//! (QMP device_del). Proved, each with a time limit so that a hang is a failure, not a stuck
//! suite: the writer gets errors and stops; listing and writing the home return; unmounting
//! the home (what logout does) and the stick completes and the daemon exits; the rest of the
//! machine works (root filesystem, no hung-task reports). Then the stick is plugged back
//! (device_add): the FAT is checked as pam_mount would (`fsck.vfat -a`), `pershome fsck` is
//! clean or repairs only what was in flight, the home mounts again, and every file fsync'ed
//! before the yank has its content.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest;
use crate::stick::{self, StickFs};
use crate::Ctx;

const HOME: &str = "/home/joseph";

/// Before the workload: files fsync'ed long before the yank.
const PRECIOUS: &str = r#"set -e
cd /home/joseph
mkdir precious
for i in $(seq 1 10); do
    dd if=/dev/urandom of=precious/p$i bs=16k count=4 conv=fsync status=none
done
sha256sum precious/* > /tmp/precious.sha
"#;

/// The workload: write, fsync (dd conv=fsync exits non-zero if fsync fails), then log the
/// file as safe. Stops at the first error, saying where.
const WRITER: &str = r#"cd /home/joseph || exit 2
mkdir -p w || exit 2
i=0
while :; do
    i=$((i + 1))
    if ! dd if=/dev/urandom of=w/f$i bs=16k count=4 conv=fsync status=none 2>>/tmp/writer.err; then
        echo "write $i failed" >> /tmp/writer.err
        exit 1
    fi
    (cd w && sha256sum f$i) >> /tmp/writer.sha
done
"#;

/// Time limits that turn a hang into a failure.
const NO_HANG: Duration = Duration::from_secs(60);

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let image = ctx.run_dir.join("stick-vfat.img");
    stick::create(&ctx.sh, &image, StickFs::Fat32, 256)?;
    let mut vm = ctx.boot("yank", ctx.kernel, Some(&image))?;
    let device = guest::wait_for_stick(&mut vm)?;
    guest::mount_stick(&mut vm, &device, StickFs::Fat32)?;
    guest::mount_home(&mut vm, HOME, "uid=joseph,gid=joseph,allow_other")?;
    vm.ok(
        &format!(
            "chown joseph:joseph {HOME} && runuser -u joseph -- sh -c {}",
            crate::util::shq(PRECIOUS)
        ),
        Duration::from_secs(120),
    )
    .context("writing the files fsync'ed before the workload")?;

    let pid = vm
        .ok(
            &format!(
                "touch /tmp/writer.sha /tmp/writer.err; chmod 666 /tmp/writer.sha /tmp/writer.err; \
                 setsid runuser -u joseph -- sh -c {} </dev/null >/dev/null 2>&1 & echo $!",
                crate::util::shq(WRITER)
            ),
            guest::SHORT,
        )?
        .trim()
        .to_owned();
    // Wait until the writer has made real progress, then pull the stick mid-stream.
    vm.ok(
        "for i in $(seq 1200); do [ $(wc -l < /tmp/writer.sha) -ge 15 ] && exit 0; sleep 0.1; done; \
         echo 'the writer made no progress' >&2; cat /tmp/writer.err >&2; exit 1",
        Duration::from_secs(150),
    )?;
    vm.unplug_stick()?;
    let yanked = Instant::now();
    ctx.note("stick pulled (QMP device_del) while the writer was busy".to_owned());

    // The writer must notice and stop, not hang.
    let out = vm.run(
        &format!("while kill -0 {pid} 2>/dev/null; do sleep 0.1; done; cat /tmp/writer.err; wc -l < /tmp/writer.sha"),
        NO_HANG,
    )?;
    if out.response.timed_out {
        bail!(
            "the writer was still running {NO_HANG:?} after the yank (hung?): {}",
            out.describe()
        );
    }
    ctx.note(format!(
        "writer stopped {:.1} s after the yank; it said: {}",
        yanked.elapsed().as_secs_f64(),
        out.response.stdout.trim().replace('\n', " | ")
    ));
    // The home answers (with errors), it does not hang.
    let ls = vm.run(&format!("ls {HOME}/w > /dev/null"), NO_HANG)?;
    let write = vm.run(
        &format!(
            "runuser -u joseph -- sh -c 'echo x > {HOME}/after-yank && sync {HOME}/after-yank'"
        ),
        NO_HANG,
    )?;
    for (what, out) in [("ls of the home", &ls), ("a write to the home", &write)] {
        if out.response.timed_out {
            bail!("{what} hung after the yank: {}", out.describe());
        }
    }
    if write.ok() {
        bail!("expected a write to the home to fail once the stick is gone, but it succeeded");
    }
    ctx.note(format!(
        "after the yank: ls exit {:?}, a write exit {:?} (errors, no hang)",
        ls.response.code, write.response.code
    ));
    // Logout: the home and the stick unmount, the daemon exits.
    let t = Instant::now();
    guest::unmount_home(&mut vm, HOME).context("unmounting the home after the yank (logout)")?;
    vm.ok(&format!("umount {}", guest::STICK_MNT), NO_HANG)
        .context("unmounting the vanished stick")?;
    ctx.note(format!(
        "unmount of home and stick after the yank: {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    // The rest of the machine is fine.
    vm.ok(
        "set -e; echo alive > /root/alive; sync; grep -q alive /root/alive; \
         if dmesg | grep -E 'blocked for more than|hung_task|BUG:|Oops'; then exit 1; fi",
        NO_HANG,
    )
    .context("the machine after the yank")?;

    // Plug it back: the stick is checked, mounted, and the fsync'ed data is there.
    vm.replug_stick()?;
    let device = guest::wait_for_stick(&mut vm)?;
    let fsck = vm.run(
        &format!("fsck.vfat -a {device} 2>&1"),
        Duration::from_secs(300),
    )?;
    match fsck.response.code {
        Some(0) | Some(1) => ctx.note(format!(
            "fsck.vfat -a after re-plug: exit {:?} ({})",
            fsck.response.code,
            fsck.response.stdout.lines().last().unwrap_or("").trim()
        )),
        _ => bail!(
            "fsck.vfat -a could not repair the stick: {}",
            fsck.describe()
        ),
    }
    guest::mount_stick(&mut vm, &device, StickFs::Fat32)?;
    let check = vm.run(
        &format!("pershome fsck {} 2>&1", guest::BACKING),
        Duration::from_secs(300),
    )?;
    match check.response.code {
        Some(0) => ctx.note("pershome fsck after re-plug: clean".to_owned()),
        Some(4) => {
            let repair = vm.run(
                &format!("pershome fsck --repair {} 2>&1", guest::BACKING),
                Duration::from_secs(300),
            )?;
            if repair.response.code != Some(1) {
                bail!(
                    "pershome fsck --repair did not repair (expected exit 1): {}",
                    repair.describe()
                );
            }
            ctx.note(format!(
                "pershome fsck after re-plug repaired: {}",
                check.response.stdout.trim().replace('\n', " | ")
            ));
            guest::pershome_fsck_clean(&mut vm).context("after the repair")?;
        }
        _ => bail!("pershome fsck after re-plug: {}", check.describe()),
    }
    guest::mount_home(&mut vm, HOME, "uid=joseph,gid=joseph,allow_other")?;
    let verify = vm.run(
        &format!(
            "set -e; cd {HOME}; sha256sum --quiet -c /tmp/precious.sha; cd w; sha256sum --quiet -c /tmp/writer.sha; wc -l < /tmp/writer.sha"
        ),
        Duration::from_secs(300),
    )?;
    if !verify.ok() {
        bail!(
            "data fsync'ed before the yank is not intact: {}",
            verify.describe()
        );
    }
    ctx.note(format!(
        "after re-plug: 10 precious files and all {} fsync'ed workload files intact",
        verify.response.stdout.trim()
    ));
    guest::unmount_home(&mut vm, HOME)?;
    guest::pershome_fsck_clean(&mut vm).context("after the re-mount")?;
    guest::unmount_and_check_stick(&mut vm, &device, StickFs::Fat32)?;
    vm.shutdown()
}
