//! What scenarios do in the guest again and again: find the stick, mount it the way the
//! login hook does (docs/design: uid, umask, utf8, shortname=mixed, flush, noatime, nosuid,
//! nodev, noexec), mount pershomefs on a home, unmount and wait for the daemon to finish its
//! last commit, check the stick.
//!
//! This module owns those guest-side shell snippets. Only the harness's own constants reach
//! the guest shell; no scenario passes stick content through here.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::qemu::Vm;
use crate::stick::{StickFs, LABEL};
use crate::util::shq;

pub const STICK_MNT: &str = "/media/stick";
pub const BACKING: &str = "/media/stick/pershome";
pub const SHORT: Duration = Duration::from_secs(60);

/// Wait (without sleeping a fixed time) until udev shows the stick's partition; returns the
/// device path. After a re-plug the stick may come back under another name (sdb).
pub fn wait_for_stick(vm: &mut Vm) -> Result<String> {
    let script = format!(
        "for i in $(seq 1200); do \
           d=$(readlink -f /dev/disk/by-label/{LABEL} 2>/dev/null) && [ -b \"$d\" ] && {{ echo \"$d\"; exit 0; }}; \
           sleep 0.1; \
         done; echo 'no stick after 120 s' >&2; lsblk >&2; exit 1"
    );
    let out = vm
        .ok(&script, Duration::from_secs(150))
        .context("waiting for the USB stick in the guest")?;
    Ok(out.trim().to_owned())
}

/// The stick mount options of the login hook (issue 4), for `fs`.
pub fn stick_options(fs: StickFs) -> &'static str {
    match fs {
        StickFs::Fat32 => {
            "uid=1000,gid=1000,umask=077,utf8=1,shortname=mixed,flush,noatime,nosuid,nodev,noexec"
        }
        StickFs::Exfat => "uid=1000,gid=1000,umask=077,noatime,nosuid,nodev,noexec",
    }
}

/// Mount the stick's partition at [`STICK_MNT`] and make sure `pershome/` exists.
pub fn mount_stick(vm: &mut Vm, device: &str, fs: StickFs) -> Result<()> {
    let script = format!(
        "set -e; mkdir -p {STICK_MNT}; mount -t {} -o {} {} {STICK_MNT}; mkdir -p {BACKING}",
        fs.name(),
        stick_options(fs),
        shq(device)
    );
    vm.ok(&script, SHORT)
        .with_context(|| format!("mounting the {} stick", fs.name()))
        .map(drop)
}

/// Mount pershomefs over [`BACKING`] on `mountpoint` with `options`.
pub fn mount_home(vm: &mut Vm, mountpoint: &str, options: &str) -> Result<()> {
    let script = format!(
        "set -e; mkdir -p {mp}; pershomefs {BACKING} {mp} -o {opts}; grep -q ' {mp} fuse.pershomefs ' /proc/mounts",
        mp = shq(mountpoint),
        opts = shq(options)
    );
    vm.ok(&script, SHORT)
        .with_context(|| format!("mounting pershomefs on {mountpoint}"))
        .map(drop)
}

/// Unmount pershomefs and wait for its daemon to exit (it commits metadata on the way out).
pub fn unmount_home(vm: &mut Vm, mountpoint: &str) -> Result<()> {
    let script = format!(
        "set -e; umount {mp}; \
         for i in $(seq 600); do pgrep -x pershomefs >/dev/null || exit 0; sleep 0.1; done; \
         echo 'pershomefs still running 60 s after unmount' >&2; exit 1",
        mp = shq(mountpoint)
    );
    vm.ok(&script, Duration::from_secs(90))
        .with_context(|| format!("unmounting pershomefs from {mountpoint}"))
        .map(drop)
}

/// `pershome fsck` on the (unmounted) backing: must be clean. Returns its output.
pub fn pershome_fsck_clean(vm: &mut Vm) -> Result<String> {
    let out = vm.run(
        &format!("pershome fsck {BACKING} 2>&1"),
        Duration::from_secs(300),
    )?;
    if !out.ok() {
        bail!("pershome fsck is not clean: {}", out.describe());
    }
    Ok(out.response.stdout)
}

/// Unmount the stick and run the filesystem's own checker read-only on it: must be clean.
pub fn unmount_and_check_stick(vm: &mut Vm, device: &str, fs: StickFs) -> Result<()> {
    let checker = match fs {
        StickFs::Fat32 => "fsck.vfat -n",
        StickFs::Exfat => "fsck.exfat -n",
    };
    let script = format!("set -e; umount {STICK_MNT}; {checker} {} 2>&1", shq(device));
    vm.ok(&script, Duration::from_secs(300))
        .with_context(|| format!("{checker} on the stick after unmounting it"))
        .map(drop)
}

/// `fsx -N ops -S seed` on `file`; fails unless fsx reports A-OK.
pub fn fsx(vm: &mut Vm, file: &str, ops: u64, seed: u64) -> Result<()> {
    let script = format!(
        "mkdir -p /tmp/fsx-artifacts && fsx -N {ops} -S {seed} -P /tmp/fsx-artifacts {} 2>&1 | tail -n 40",
        shq(file)
    );
    let out = vm.run(&script, Duration::from_secs(1200))?;
    if !out.ok()
        || !out
            .response
            .stdout
            .contains("All operations completed A-OK!")
    {
        bail!(
            "fsx -N {ops} -S {seed} on {file} failed: {}",
            out.describe()
        );
    }
    Ok(())
}
