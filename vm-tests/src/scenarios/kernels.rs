//! Scenario 7, the kernel matrix: Debian 12's 6.1 kernel and bookworm-backports' 6.12 boot
//! the same image with the same vfat stick, and the same checks pass on both: a home with
//! every kind of object FAT cannot hold by itself (names with `:` and `?`, `Makefile` beside
//! `makefile`, a symlink, a hard link, a fifo, an executable, xattrs, nanosecond times)
//! survives an unmount and a remount, fsx passes, the store and the stick are clean.
//!
//! It also proves which data path each kernel takes. FUSE passthrough (6.9+) lets the kernel
//! read file data from the backing itself, so the daemon's own I/O counters (/proc/PID/io)
//! stay flat while 32 MiB are read: on 6.12 they must (passthrough on), on 6.1 the daemon
//! must carry the 32 MiB itself. Writing the 32 MiB is the daemon's on both: on FAT a writer
//! never gets passthrough, since the file may have to be split into parts.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::guest;
use crate::image::Kernel;
use crate::stick::{self, StickFs};
use crate::Ctx;

const HOME: &str = "/home/joseph";
const BIG_MIB: u64 = 32;

/// Written as joseph through pershomefs; every line must read back the same after a remount.
const MAKE_TREE: &str = r#"set -e
cd /home/joseph
mkdir -p project
printf 'report of the day\n' > report.txt
printf 'colon\n' > 'project/a:b'
printf 'question\n' > 'project/why?'
printf 'all:\n\techo upper\n' > project/Makefile
printf 'all:\n\techo lower\n' > project/makefile
ln -s ../report.txt project/link
ln report.txt report-hardlink.txt
mkfifo project/fifo
printf '#!/bin/sh\necho run\n' > project/run.sh
chmod 750 project/run.sh
setfattr -n user.colour -v blue report.txt
# Fixed times (without following the symlink or opening the fifo), so that the description
# compares equal across the two kernels' runs.
touch -h -d '2023-01-02 03:04:05.987654321' project/* project
touch -d '2024-02-29 12:34:56.123456789' report.txt
sync
"#;

/// A description of the tree that must not change across the remount (and the kernels).
const DESCRIBE_TREE: &str = r#"set -e
cd /home/joseph
stat -c '%n %F %a %U %h %s %y' report.txt report-hardlink.txt project project/* | LC_ALL=C sort
readlink project/link
cat 'project/a:b' 'project/why?' project/Makefile project/makefile report.txt
getfattr --only-values -n user.colour report.txt; echo
project/run.sh
"#;

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let mut descriptions = Vec::new();
    for kernel in Kernel::ALL {
        let description =
            one(ctx, kernel).with_context(|| format!("on kernel {}", kernel.name()))?;
        descriptions.push((kernel, description));
    }
    // Same tree, same answers, whichever kernel served it.
    if let [(k1, d1), (k2, d2)] = &descriptions[..] {
        if d1 != d2 {
            bail!(
                "the tree reads differently on {} and {}:\n--- {}\n{d1}\n--- {}\n{d2}",
                k1.name(),
                k2.name(),
                k1.name(),
                k2.name()
            );
        }
    }
    Ok(())
}

fn one(ctx: &mut Ctx, kernel: Kernel) -> Result<String> {
    let image = ctx.run_dir.join(format!("stick-{}.img", kernel.name()));
    stick::create(&ctx.sh, &image, StickFs::Fat32, 256)?;
    let mut vm = ctx.boot(&format!("kernel-{}", kernel.name()), kernel, Some(&image))?;
    let release = vm.ok("uname -r", guest::SHORT)?.trim().to_owned();
    if !release.starts_with(kernel.release_prefix()) {
        bail!(
            "expected a {} kernel, the guest runs {release}",
            kernel.name()
        );
    }
    let device = guest::wait_for_stick(&mut vm)?;
    guest::mount_stick(&mut vm, &device, StickFs::Fat32)?;
    let home_options = "uid=joseph,gid=joseph,allow_other";
    guest::mount_home(&mut vm, HOME, home_options)?;
    vm.ok(
        &format!(
            "chown joseph:joseph {HOME} && runuser -u joseph -- sh -c {}",
            crate::util::shq(MAKE_TREE)
        ),
        Duration::from_secs(120),
    )
    .context("making the tree as joseph")?;
    let before = vm.ok(
        &format!(
            "runuser -u joseph -- sh -c {}",
            crate::util::shq(DESCRIBE_TREE)
        ),
        guest::SHORT,
    )?;

    // Who carries the file data: the daemon (no passthrough) or the kernel (passthrough).
    // Writers on a FAT stick are always the daemon's (parts=auto: the kernel would write past
    // the part size by itself, docs/architecture.md "Files in parts"), so the path is judged
    // on the read, with every cache dropped first so that the read reaches a filesystem.
    let io_script = format!(
        "set -e; pid=$(pgrep -x pershomefs); \
         io() {{ awk '/^(rchar|wchar):/ {{ s += $2 }} END {{ print s }}' /proc/$pid/io; }}; \
         a=$(io); runuser -u joseph -- dd if=/dev/zero of={HOME}/big bs=1M count={BIG_MIB} conv=fsync status=none; \
         b=$(io); sync; echo 3 > /proc/sys/vm/drop_caches; \
         c=$(io); runuser -u joseph -- cat {HOME}/big > /dev/null; d=$(io); rm {HOME}/big; \
         echo $(( b - a )) $(( d - c ))"
    );
    let counted = vm.ok(&io_script, Duration::from_secs(300))?;
    let deltas: Vec<u64> = counted
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("parsing the daemon's I/O counter deltas {counted:?}"))?;
    let [written, read] = deltas[..] else {
        bail!("expected two I/O counter deltas (write, read), got {counted:?}");
    };
    let big = BIG_MIB << 20;
    let passthrough = read < big / 8;
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    ctx.note(format!(
        "kernel {release}: the daemon moved {:.1} MiB while {BIG_MIB} MiB were written (FAT: writers are the daemon's), {:.1} MiB while they were read: read passthrough {}",
        mib(written),
        mib(read),
        if passthrough { "on" } else { "off" }
    ));
    match kernel {
        Kernel::Backports if !passthrough => bail!(
            "expected FUSE passthrough for the read on {release} (daemon I/O well under {BIG_MIB} MiB), got {read} bytes through the daemon"
        ),
        Kernel::Bookworm if read < big => bail!(
            "expected the daemon to carry all {big} bytes of the read on {release} (no passthrough before 6.9), got {read}"
        ),
        _ => {}
    }
    if written < big {
        bail!(
            "expected the daemon to carry all {big} bytes of the write on {release} (no writer passthrough on a FAT mount that splits files), got {written}"
        );
    }

    guest::unmount_home(&mut vm, HOME)?;
    guest::pershome_fsck_clean(&mut vm).context("after the tree")?;
    guest::mount_home(&mut vm, HOME, home_options)?;
    let after = vm.ok(
        &format!(
            "runuser -u joseph -- sh -c {}",
            crate::util::shq(DESCRIBE_TREE)
        ),
        guest::SHORT,
    )?;
    if before != after {
        bail!("the tree changed across unmount/remount:\n--- expected\n{before}\n--- got\n{after}");
    }
    guest::fsx(&mut vm, &format!("{HOME}/fsx.bin"), 2_000, 7_007)?;
    guest::unmount_home(&mut vm, HOME)?;
    guest::pershome_fsck_clean(&mut vm).context("after fsx")?;
    guest::unmount_and_check_stick(&mut vm, &device, StickFs::Fat32)?;
    vm.shutdown()?;
    Ok(after)
}
