//! The LTSP server's disk for the `ltsp` scenario: Debian 13 (trixie) with LTSP 23, dnsmasq,
//! the NFS server, squashfs-tools, iPXE, sshd and sshfs, a static address through ifupdown,
//! and the project's `.deb` installed with apt as an LTSP administrator does
//! (docs/admin-guide.md): `pershome-config pam --install`, `pershome-config add-user alice`.
//! The client image (`ltsp image /`, a squashfs of the server's root) is built here on the host
//! in a private mount namespace rather than under TCG; `ltsp initrd`, `ltsp ipxe`, `ltsp nfs`
//! and `ltsp dnsmasq` run in the server VM (the scenario).
//!
//! Two caches. The base root (packages only) is a tarball keyed by its package list, hooks and
//! apt sources, kept outside the clone (`PERSHOME_VM_CACHE`, default `/var/cache/pershome-vm`)
//! so that a fresh CI clone does not download it again. The server disk (the base plus the
//! `.deb`, the users and the client image) lives in `target/vm/ltsp-server-HASH/`, HASH also
//! covering the `.deb`'s SHA-256.
//!
//! This module owns the recipe and both caches. It never writes outside them, and its mounts
//! (proc, sysfs, /dev for the chroot; LTSP's overlay) live in a mount namespace that ends with
//! the build.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::util;

/// Bump to force a rebuild when something the hashes cannot see changes.
const RECIPE_VERSION: &str = "1";

/// The release the LTSP labs of issue 13 run (Debian 13).
pub const SUITE: &str = "trixie";

/// The server's address on the lab's link; LTSP's dnsmasq hands out 192.168.67.20-250.
pub const SERVER_IP: &str = "192.168.67.1";

/// Beyond minbase. fuse3 and the PAM pieces come in again as the project's Depends.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "kmod",
    "dbus",
    "libpam-systemd",
    "initramfs-tools",
    "busybox",
    "linux-image-amd64",
    "ltsp",
    "dnsmasq",
    "nfs-kernel-server",
    "squashfs-tools",
    "ipxe",
    "openssh-server",
    "sshfs",
    "ifupdown",
    "iproute2",
    "procps",
    "util-linux",
    "dosfstools",
    "pamtester",
    "fuse3",
    "libpam-modules",
    "libpam-runtime",
];

const EXCLUDES: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/usr/lib/firmware/*",
];

/// Before any package: the initramfs keeps `MODULES=most`, so that it has the NFS, loop,
/// squashfs, overlay and virtio-net modules a netbooted client needs (a narrow `MODULES=list`
/// boots the server but the client then fails with "kernel lacks NFS v3 support").
const SETUP: &str = r#"set -eu
R="$1"
mkdir -p "$R/etc/initramfs-tools/conf.d"
echo MODULES=most > "$R/etc/initramfs-tools/conf.d/pershome-vm"
"#;

/// The server as its administrator sets it up, run in the chroot with proc, sysfs and /dev
/// mounted ($1 the root, $2 the agent unit, $3 the `.deb`). Ends with `ltsp image /`, which
/// snapshots this very root for the clients.
const CUSTOMIZE: &str = r#"set -eu
R="$1"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
cp /etc/resolv.conf "$R/etc/resolv.conf"
deb="$(basename "$3")"
cp "$3" "$R/tmp/$deb"
chroot "$R" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "/tmp/$deb"
rm "$R/tmp/$deb"
chroot "$R" pershome-config pam --install
for u in alice:1001 bob:1002 carol:1003; do
    chroot "$R" useradd --create-home --uid "${u#*:}" --user-group --shell /bin/bash "${u%%:*}"
    echo "${u%%:*}:pw-${u%%:*}" | chroot "$R" chpasswd
done
chroot "$R" pershome-config add-user alice
echo ltsp-server > "$R/etc/hostname"
printf '127.0.0.1 localhost\n192.168.67.1 ltsp-server\n' > "$R/etc/hosts"
cat > "$R/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback
auto eth0
iface eth0 inet static
    address 192.168.67.1/24
EOF
mkdir -p "$R/etc/ltsp"
cat > "$R/etc/ltsp/ltsp.conf" <<'EOF'
[server]
KERNEL_PARAMETERS="console=ttyS0 net.ifnames=0"
MENU_TIMEOUT=0

[clients]
# The default, said explicitly: any of PAM_AUTH_TYPE, SSH_SERVER, SSH_OPTIONS makes `ltsp init`
# rewrite pamltsp.conf on the client, which pershome's block must survive.
SSH_SERVER=server
EOF
mkdir -p "$R/host"
# A mount unit, not fstab: `ltsp init` rewrites a client's /etc/fstab.
cat > "$R/etc/systemd/system/host.mount" <<'EOF'
[Unit]
Description=the test host's 9p share
[Mount]
What=host
Where=/host
Type=9p
Options=trans=virtio,version=9p2000.L,msize=524288
EOF
cp "$2" "$R/etc/systemd/system/pershome-vm-agent.service"
ln -s ../pershome-vm-agent.service "$R/etc/systemd/system/multi-user.target.wants/pershome-vm-agent.service"
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer e2scrub_reap.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
rm -f "$R/etc/resolv.conf"
chroot "$R" ltsp image / --mksquashfs-params='-comp lz4'
ls -l "$R/srv/ltsp/images/x86_64.img" "$R/srv/tftp/ltsp/x86_64/vmlinuz" "$R/srv/tftp/ltsp/x86_64/initrd.img"
"#;

/// The agent unit, as in the thin-client image (`image.rs`).
const AGENT_UNIT: &str = "\
[Unit]
Description=pershome VM test agent (results channel on ttyS1)
RequiresMountsFor=/host
After=systemd-udevd.service

[Service]
Type=simple
ExecStartPre=/bin/sh -c 'install -m 0755 /host/tools/* /usr/local/bin/'
ExecStart=/usr/local/bin/vm-guest-agent /dev/ttyS1
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

/// The built server disk and the kernels.
#[derive(Debug, Clone)]
pub struct LtspServer {
    dir: PathBuf,
}

impl LtspServer {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.raw")
    }
    /// The server's own kernel and initrd.
    pub fn server_kernel(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("vmlinuz"), self.dir.join("initrd.img"))
    }
    /// The client's kernel and initrd, as `ltsp image` extracted them to /srv/tftp/ltsp/x86_64.
    pub fn client_kernel(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("client-vmlinuz"),
            self.dir.join("client-initrd.img"),
        )
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("PERSHOME_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pershome-vm"))
}

fn hex(bytes: &[u8], n: usize) -> String {
    bytes.iter().take(n).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn sources() -> String {
    let host =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    host.replace("bookworm", SUITE)
}

/// The base tarball (packages only), built if missing.
fn base_tarball() -> Result<(PathBuf, String)> {
    let sources = sources();
    let key = format!("{RECIPE_VERSION}\n{SUITE}\n{PACKAGES:?}\n{EXCLUDES:?}\n{SETUP}\n{sources}");
    let hash = hex(&Sha256::digest(key.as_bytes()), 8);
    let dir = cache_dir();
    let tarball = dir.join(format!("ltsp-base-{hash}.tar"));
    if tarball.is_file() {
        eprintln!("LTSP base root: cached {}", tarball.display());
        return Ok((tarball, hash));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    util::banner(&format!(
        "building the LTSP base root {}",
        tarball.display()
    ));
    let started = std::time::Instant::now();
    let work = dir.join(format!("ltsp-base-{hash}.building"));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let sources_file = work.join("debian.sources");
    std::fs::write(&sources_file, &sources).context("writing the apt sources")?;
    let partial = work.join("base.tar");
    let mut command = Command::new("mmdebstrap");
    command
        .args(["--variant=minbase", "--mode=root", "--format=tar"])
        .arg(format!("--include={}", PACKAGES.join(",")));
    for pattern in EXCLUDES {
        command.arg(format!("--dpkgopt=path-exclude={pattern}"));
    }
    command
        .arg(format!("--setup-hook={SETUP}"))
        .arg(SUITE)
        .arg(&partial)
        .arg(&sources_file);
    util::run_logged(
        command,
        "mmdebstrap (LTSP base)",
        &work.join("mmdebstrap.log"),
    )?;
    std::fs::rename(&partial, &tarball)
        .with_context(|| format!("renaming {} to {}", partial.display(), tarball.display()))?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "LTSP base root built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok((tarball, hash))
}

fn file_digest(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes), 32))
}

/// The server disk for `deb`, built if missing.
pub fn ensure(deb: &Path) -> Result<LtspServer> {
    let (tarball, base_hash) = base_tarball()?;
    let key = format!(
        "{RECIPE_VERSION}\n{base_hash}\n{CUSTOMIZE}\n{AGENT_UNIT}\n{}",
        file_digest(deb)?
    );
    let hash = hex(&Sha256::digest(key.as_bytes()), 8);
    let vm_dir = util::vm_dir();
    let dir = vm_dir.join(format!("ltsp-server-{hash}"));
    let server = LtspServer { dir: dir.clone() };
    if dir.join("complete").exists() {
        eprintln!("LTSP server disk: cached {}", dir.display());
        return Ok(server);
    }
    util::banner(&format!("building the LTSP server disk {}", dir.display()));
    let started = std::time::Instant::now();
    let work = vm_dir.join(format!("ltsp-server-{hash}.building"));
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    let root = work.join("root");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let mut untar = Command::new("tar");
    untar.arg("-C").arg(&root).arg("-xf").arg(&tarball);
    util::run_logged(untar, "unpacking the LTSP base", &work.join("tar.log"))?;
    let unit = work.join("pershome-vm-agent.service");
    std::fs::write(&unit, AGENT_UNIT).context("writing the agent unit")?;
    let deb_copy = work.join(deb.file_name().context("the .deb has no file name")?);
    std::fs::copy(deb, &deb_copy).context("copying the .deb")?;
    let script = work.join("customize.sh");
    std::fs::write(&script, CUSTOMIZE).context("writing the customize script")?;
    // A private mount namespace: the chroot's proc/sys/dev and LTSP's overlay go with it.
    let mut customize = Command::new("unshare");
    customize
        .args(["--mount", "--propagation", "private", "sh"])
        .arg(&script)
        .arg(&root)
        .arg(&unit)
        .arg(&deb_copy);
    util::run_logged(
        customize,
        "setting up the LTSP server and `ltsp image /`",
        &work.join("customize.log"),
    )?;
    let copy = |from: &Path, to: &str| -> Result<()> {
        std::fs::copy(from, work.join(to))
            .with_context(|| format!("copying {}", from.display()))
            .map(drop)
    };
    let tftp = root.join("srv/tftp/ltsp/x86_64");
    copy(&tftp.join("vmlinuz"), "client-vmlinuz")?;
    copy(&tftp.join("initrd.img"), "client-initrd.img")?;
    copy(&root.join("vmlinuz"), "vmlinuz")
        .or_else(|_| copy(&root.join("boot/vmlinuz"), "vmlinuz"))
        .or_else(|_| copy(&tftp.join("vmlinuz"), "vmlinuz"))?;
    copy(&root.join("initrd.img"), "initrd.img")
        .or_else(|_| copy(&tftp.join("initrd.img"), "initrd.img"))?;
    let rootfs = work.join("rootfs.raw");
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-L", "root", "-d"])
        .arg(&root)
        .arg(&rootfs)
        .arg("4G");
    util::run_logged(mkfs, "mkfs.ext4 -d", &work.join("mkfs.log"))?;
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    let _ = std::fs::remove_file(&deb_copy);
    if let Ok(entries) = std::fs::read_dir(&vm_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("ltsp-server-") && entry.path() != work {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    std::fs::rename(&work, &dir)
        .with_context(|| format!("renaming {} to {}", work.display(), dir.display()))?;
    std::fs::write(dir.join("complete"), b"").context("marking the disk complete")?;
    eprintln!(
        "LTSP server disk built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !dir.join("vmlinuz").is_file() {
        bail!("no server kernel in {}", dir.display());
    }
    Ok(server)
}
