//! Scenario 9 `ltsp` (issue 13): a stock LTSP 23 server on Debian 13 and a diskless client it
//! netboots, on one L2 link (QEMU `-netdev stream` over a unix socket), the client with a USB
//! stick on qemu-xhci. The server VM runs `ltsp initrd`, `ltsp ipxe`, `ltsp nfs` and
//! `ltsp dnsmasq` (the image was made on the host, `ltsp_image.rs`); the client boots its
//! kernel directly with ltsp.img and the image's initrd concatenated and the command line
//! `ltsp ipxe` would give, saving iPXE's TFTP time under TCG.
//!
//! Then, with pamltsp checking passwords against the server: alice (listed) gets her stick home
//! and no SSHFS home, her file lands on the stick; bob (not listed) gets his SSHFS home and
//! pershome does nothing; alice without her stick gets the SSHFS server home and is told;
//! with `on_missing_stick = "deny"` on the server alice still logs in (the server-side hook
//! stays quiet); logout leaves nothing mounted and a screen unlock (re-authentication as the
//! user) works; carol is added on the server (`pershome-config add-user`, `ltsp initrd`, a
//! client reboot) and then gets her stick home.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ltsp_image::{self, LtspServer, SERVER_IP};
use crate::qemu::{BootSpec, Output, Vm};
use crate::stick::{self, StickFs};
use crate::util::shq;
use crate::Ctx;

const LONG: Duration = Duration::from_secs(600);
const SHORT: Duration = Duration::from_secs(120);

fn step(ctx: &mut Ctx, started: &mut Instant, what: &str) {
    let secs = started.elapsed().as_secs_f64();
    ctx.note(format!("{what}: {secs:.0} s"));
    *started = Instant::now();
}

fn boot_server(ctx: &mut Ctx, server: &LtspServer, lan: &Path) -> Result<Vm> {
    let (vmlinuz, initrd) = server.server_kernel();
    let rootfs = server.rootfs();
    ctx.consoles.push(ctx.run_dir.join("console-server.log"));
    Vm::boot_spec(
        &BootSpec {
            vmlinuz: &vmlinuz,
            initrd: &initrd,
            append:
                "console=ttyS0 root=/dev/vda rw net.ifnames=0 panic=-1 quiet systemd.show_status=0",
            root_disk: Some(&rootfs),
            extra: vec![
                "-netdev".into(),
                format!(
                    "stream,id=lan,server=on,addr.type=unix,addr.path={}",
                    lan.display()
                ),
                "-device".into(),
                "virtio-net-pci,netdev=lan,mac=52:54:00:67:00:01".into(),
            ],
            memory_mib: 1024,
            boot_timeout: LONG,
            stick: None,
            share: &ctx.share,
            run_dir: &ctx.run_dir,
            name: "server",
        },
        "LTSP server",
    )
}

fn boot_client(
    ctx: &mut Ctx,
    server: &LtspServer,
    ltsp_img: &Path,
    lan: &Path,
    stick: Option<&Path>,
    name: &str,
) -> Result<Vm> {
    let (vmlinuz, image_initrd) = server.client_kernel();
    // ltsp.img first, then the image's initrd, as ltsp.ipxe loads them.
    let initrd = ctx.run_dir.join(format!("{name}-initrd"));
    let mut bytes =
        std::fs::read(ltsp_img).with_context(|| format!("reading {}", ltsp_img.display()))?;
    bytes.extend(std::fs::read(&image_initrd).context("reading the client initrd")?);
    std::fs::write(&initrd, bytes).context("writing the concatenated initrd")?;
    let append = format!(
        "console=ttyS0 net.ifnames=0 root=/dev/nfs nfsroot={SERVER_IP}:/srv/ltsp \
         ltsp.image=images/x86_64.img loop.max_part=9 panic=-1 usb-storage.delay_use=0"
    );
    ctx.consoles
        .push(ctx.run_dir.join(format!("console-{name}.log")));
    Vm::boot_spec(
        &BootSpec {
            vmlinuz: &vmlinuz,
            initrd: &initrd,
            append: &append,
            root_disk: None,
            extra: vec![
                "-netdev".into(),
                format!(
                    "stream,id=lan,server=off,addr.type=unix,addr.path={}",
                    lan.display()
                ),
                "-device".into(),
                "virtio-net-pci,netdev=lan,mac=52:54:00:67:00:20".into(),
            ],
            memory_mib: 1536,
            boot_timeout: LONG,
            stick: stick.map(crate::qemu::stick_file_node),
            share: &ctx.share,
            run_dir: &ctx.run_dir,
            name,
        },
        "LTSP client",
    )
}

/// Waits until the client's boot has finished: the agent starts early, and until
/// systemd-user-sessions.service removes /run/nologin, pam_nologin refuses every login.
fn wait_booted(vm: &mut Vm) -> Result<()> {
    vm.ok(
        "systemctl is-system-running --wait >/dev/null || true; \
         end=$(( $(date +%s) + 300 )); while [ -e /run/nologin ] && [ \"$(date +%s)\" -lt \"$end\" ]; do sleep 1; done; \
         [ ! -e /run/nologin ]",
        Duration::from_secs(700),
    )
    .context("waiting for the client to finish booting (/run/nologin)")
    .map(drop)
}

/// `user` logs in on the client through the `login` PAM service with their server password,
/// runs `script` in the session, logs out.
fn login(vm: &mut Vm, user: &str, script: &str) -> Result<Output> {
    vm.run(
        &format!(
            "VM_PAM_PASSWORD={} vm-pam-login {user} -- /bin/sh -c {}",
            shq(&format!("pw-{user}")),
            shq(script)
        ),
        LONG,
    )
}

fn hook_log(vm: &mut Vm) -> String {
    vm.run(
        "journalctl -b --no-pager -o cat -t pershome-config -t pershomefs | tail -n 30; tail -n 20 /etc/ltsp/pamltsp.conf",
        SHORT,
    )
    .map(|o| o.response.stdout)
    .unwrap_or_default()
}

fn expect(vm: &mut Vm, what: &str, out: &Output, needles: &[&str]) -> Result<()> {
    let all = format!("{}\n{}", out.response.stdout, out.response.stderr);
    if !out.ok() {
        bail!(
            "{what}: {}\n--- hook log:\n{}",
            out.describe(),
            hook_log(vm)
        );
    }
    for needle in needles {
        if !all.contains(needle) {
            bail!(
                "{what}: expected {needle:?}; got:\n{all}\n--- hook log:\n{}",
                hook_log(vm)
            );
        }
    }
    Ok(())
}

/// Nothing of the user's stays mounted after logout. pamltsp's SSHFS unmount waits (in its own
/// scope, polling every second, up to 120 polls) until the user's processes are gone, so this
/// waits up to 150 s by the clock (a count of short sleeps runs long under TCG).
fn expect_logged_out(vm: &mut Vm, user: &str) -> Result<()> {
    vm.ok(
        &format!(
            "end=$(( $(date +%s) + 150 )); while [ \"$(date +%s)\" -lt \"$end\" ]; do \
             grep -qE ' /home/{user} | /run/pershome/{user}/' /proc/mounts || exit 0; sleep 1; done; \
             echo 'still mounted 150 s after logout:' >&2; grep -E '/home/{user}|/run/pershome' /proc/mounts >&2; \
             ps -u {user} -o pid,etime,cmd >&2; exit 1"
        ),
        Duration::from_secs(300),
    )
    .with_context(|| format!("after {user}'s logout"))
    .map(drop)
}

/// Runs `ltsp initrd` on the server and copies ltsp.img to the host.
fn ltsp_initrd(ctx: &mut Ctx, server: &mut Vm, name: &str) -> Result<PathBuf> {
    server.ok(
        &format!("ltsp initrd >/dev/null && cp /srv/tftp/ltsp/ltsp.img /host/results/{name}"),
        LONG,
    )?;
    Ok(ctx.share.join("results").join(name))
}

const SESSION: &str = "findmnt -no FSTYPE --target \"$HOME\"; \
    grep -c \" $HOME fuse.sshfs \" /proc/mounts || true; \
    echo written-on-the-client > \"$HOME/from-client.txt\"; cat \"$HOME/from-client.txt\"";

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let mut t = Instant::now();
    let deb = ctx.deb.clone();
    let server_disk = ltsp_image::ensure(&deb)?;
    step(
        ctx,
        &mut t,
        "LTSP server disk ready (host: mmdebstrap + ltsp image /)",
    );
    let lan = ctx.run_dir.join("lan.sock");
    let mut server = boot_server(ctx, &server_disk, &lan)?;
    step(ctx, &mut t, "server booted");
    server.ok(
        "ltsp ipxe >/dev/null && ltsp nfs >/dev/null && \
         ltsp dnsmasq --proxy-dhcp=0 --real-dhcp=1 >/dev/null && \
         systemctl is-active dnsmasq nfs-kernel-server ssh",
        LONG,
    )?;
    let ltsp_img = ltsp_initrd(ctx, &mut server, "ltsp-1.img")?;
    let doctor = server.run("pershome-config doctor", SHORT)?;
    if !doctor.ok() {
        bail!(
            "pershome-config doctor on the server: {}",
            doctor.describe()
        );
    }
    step(
        ctx,
        &mut t,
        "ltsp initrd/ipxe/nfs/dnsmasq, doctor OK on the server",
    );

    let alice_stick = ctx.run_dir.join("stick-alice.img");
    stick::create(&ctx.sh, &alice_stick, StickFs::Fat32, 256)?;
    let mut client = boot_client(
        ctx,
        &server_disk,
        &ltsp_img,
        &lan,
        Some(&alice_stick),
        "client",
    )?;
    wait_booted(&mut client)?;
    step(
        ctx,
        &mut t,
        "client netbooted (NFS, squashfs image), boot finished",
    );
    client.ok(
        "for i in $(seq 300); do [ -e /dev/disk/by-label/PERSHOME ] && exit 0; sleep 0.1; done; exit 1",
        SHORT,
    )
    .context("waiting for the stick on the client")?;
    let conf = client.ok(
        "cat /etc/ltsp/pamltsp.conf; grep -c pamltsp /etc/pam.d/common-auth",
        SHORT,
    )?;
    if !conf.contains("SSH_SERVER='server'") || !conf.contains("pershome-config ltsp skip-sshfs") {
        bail!(
            "pamltsp.conf on the client should have LTSP's rewrite and pershome's block:\n{conf}"
        );
    }
    let doctor = client.run("pershome-config doctor", SHORT)?;
    ctx.note(format!(
        "client doctor: {}",
        doctor
            .response
            .stdout
            .lines()
            .filter(|l| l.contains("LTSP") || l.contains("pamltsp") || l.contains("PAM order"))
            .collect::<Vec<_>>()
            .join(" | ")
    ));

    // alice with her stick: the stick home, no SSHFS.
    let out = login(&mut client, "alice", SESSION)?;
    expect(
        &mut client,
        "alice with her stick",
        &out,
        &[
            "fuse.pershomefs",
            "written-on-the-client",
            "your home folder is on your stick",
        ],
    )?;
    if out.response.stdout.lines().nth(1) != Some("0") {
        bail!(
            "alice has an SSHFS mount on her home:\n{}",
            out.response.stdout
        );
    }
    expect_logged_out(&mut client, "alice")?;
    step(
        ctx,
        &mut t,
        "alice: stick home, no fuse.sshfs, logout clean",
    );

    // bob: his SSHFS home; pershome does nothing.
    let out = login(&mut client, "bob", "findmnt -no FSTYPE --target \"$HOME\"")?;
    expect(&mut client, "bob", &out, &["fuse.sshfs"])?;
    if out.response.stderr.contains("pershome:") {
        bail!("pershome spoke to bob: {}", out.response.stderr);
    }
    expect_logged_out(&mut client, "bob")?;
    step(ctx, &mut t, "bob: SSHFS home, pershome silent");

    // Screen unlock: alice re-authenticates as herself inside her session.
    let out = login(
        &mut client,
        "alice",
        "printf '%s\\n' pw-alice | pamtester login alice authenticate 2>&1 && echo reauth-ok",
    )?;
    expect(
        &mut client,
        "alice's re-authentication",
        &out,
        &["reauth-ok"],
    )?;
    expect_logged_out(&mut client, "alice")?;
    step(ctx, &mut t, "re-authentication as the user works");

    // alice without her stick: the SSHFS server home, and she is told.
    client.unplug_stick()?;
    client.ok(
        "for i in $(seq 300); do [ -e /dev/disk/by-label/PERSHOME ] || exit 0; sleep 0.1; done; exit 1",
        SHORT,
    )?;
    let out = login(
        &mut client,
        "alice",
        "findmnt -no FSTYPE --target \"$HOME\"",
    )?;
    expect(
        &mut client,
        "alice without her stick",
        &out,
        &["fuse.sshfs", "home folder on the server", "no USB stick"],
    )?;
    expect_logged_out(&mut client, "alice")?;
    step(ctx, &mut t, "alice without stick: SSHFS server home, told");

    // deny on the server: the server-side hook (pamltsp's ssh session) stays quiet.
    server.ok(
        "printf 'on_missing_stick = \"deny\"\\n' > /etc/pershome/config.toml && pershome-config pam --install >/dev/null && grep -q 'required.*pershome-config' /etc/pam.d/common-session",
        SHORT,
    )?;
    client.replug_stick()?;
    client.ok(
        "for i in $(seq 300); do [ -e /dev/disk/by-label/PERSHOME ] && exit 0; sleep 0.1; done; exit 1",
        SHORT,
    )?;
    let out = login(
        &mut client,
        "alice",
        "findmnt -no FSTYPE --target \"$HOME\"",
    )?;
    expect(
        &mut client,
        "alice with deny on the server",
        &out,
        &["fuse.pershomefs"],
    )?;
    expect_logged_out(&mut client, "alice")?;
    step(ctx, &mut t, "deny on the server: alice still logs in");
    drop(client);

    // carol, added on the server.
    let added = server.ok("pershome-config add-user carol", SHORT)?;
    if !added.contains("ltsp initrd") {
        bail!("add-user on the LTSP server should name `ltsp initrd`:\n{added}");
    }
    let ltsp_img = ltsp_initrd(ctx, &mut server, "ltsp-2.img")?;
    let carol_stick = ctx.run_dir.join("stick-carol.img");
    stick::create(&ctx.sh, &carol_stick, StickFs::Fat32, 256)?;
    let mut client = boot_client(
        ctx,
        &server_disk,
        &ltsp_img,
        &lan,
        Some(&carol_stick),
        "client-2",
    )?;
    wait_booted(&mut client)?;
    client.ok(
        "for i in $(seq 300); do [ -e /dev/disk/by-label/PERSHOME ] && exit 0; sleep 0.1; done; exit 1",
        SHORT,
    )?;
    let out = login(&mut client, "carol", SESSION)?;
    expect(
        &mut client,
        "carol after add-user + ltsp initrd + reboot",
        &out,
        &["fuse.pershomefs", "your home folder is on your stick"],
    )?;
    expect_logged_out(&mut client, "carol")?;
    step(
        ctx,
        &mut t,
        "carol: added on the server, client rebooted, stick home",
    );
    client.shutdown()?;
    server.shutdown()?;

    // The host reads alice's file from her stick.
    let got = ctx
        .sh
        .cmd("mtype")
        .arg("-i")
        .arg(stick::mtools_image(&alice_stick))
        .arg("::pershome/from-client.txt")
        .quiet()
        .read()
        .context("mtype of alice's file on her stick")?;
    if got.trim() != "written-on-the-client" {
        bail!("alice's file on her stick holds {got:?}");
    }
    ctx.note("alice's file is on her stick (mtype on the host)".to_owned());
    Ok(())
}
