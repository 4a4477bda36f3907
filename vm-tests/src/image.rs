//! The guest image: a Debian 12 thin client built with mmdebstrap (no loop devices, no host
//! mounts), with Debian 12's 6.1 kernel and bookworm-backports' 6.12 kernel side by side, so
//! one root filesystem serves the kernel matrix. Cached under `target/vm/image-HASH/`, where
//! HASH covers every input of the build (package list, hooks, apt sources, and the SHA-256 of
//! the project's `.deb`): a changed input builds a new image, an unchanged one is reused.
//!
//! The project is in the image the way an LTSP administrator puts it into a thin-client image:
//! `apt-get install ./pershome_*.deb` (so its Depends resolve from the mirror), then
//! `pershome-config add-user joseph` and `pershome-config pam --install` in the chroot. Only
//! test tools (the agent, the login driver, pjdfstest, fsx, xtask) come over 9p at boot.
//!
//! This module owns the recipe and the cache. It never writes outside `target/vm/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::util;

/// Bump to force a rebuild when something the hash cannot see changes.
const RECIPE_VERSION: &str = "3";

/// The kernels in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// Debian 12's own kernel (6.1): no FUSE passthrough.
    #[value(name = "6.1")]
    Bookworm,
    /// bookworm-backports' 6.12: FUSE passthrough available.
    #[value(name = "6.12")]
    Backports,
}

impl Kernel {
    pub const ALL: [Kernel; 2] = [Kernel::Bookworm, Kernel::Backports];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Bookworm => "6.1",
            Kernel::Backports => "6.12",
        }
    }

    /// The prefix of `uname -r` for this kernel.
    pub fn release_prefix(self) -> &'static str {
        match self {
            Kernel::Bookworm => "6.1.",
            Kernel::Backports => "6.12.",
        }
    }
}

/// Packages beyond minbase: systemd and udev (stick discovery, logind), the PAM pieces the
/// login scenarios use, and the FAT/exFAT tools (pam_mount and our checks run fsck). fuse3 is
/// not listed: it comes in as a dependency of the project's package.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "kmod",
    "dbus",
    "libpam-systemd",
    "initramfs-tools",
    "linux-image-amd64",
    "libpam-mount",
    "libpam-mount-bin",
    "pamtester",
    "dosfstools",
    "exfatprogs",
    "util-linux",
    "procps",
    "attr",
    "acl",
];

/// What a VM never needs: docs, locales, and kernel modules for hardware QEMU does not
/// emulate (Debian 12's kernel ships them under /lib, the backports one under /usr/lib).
const EXCLUDES: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
    "/usr/lib/firmware/*",
    "/lib/firmware/*",
];
const MODULE_EXCLUDES: &[&str] = &[
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "drivers/infiniband",
    "drivers/bluetooth",
    "drivers/iio",
    "drivers/isdn",
    "drivers/staging",
    "drivers/hid",
    "drivers/input",
    "net/wireless",
    "net/bluetooth",
    "net/mac80211",
];

/// The systemd unit that starts the agent: it installs the test tools from the share into
/// `/usr/local/bin` (never the project's binaries: those are the package's, in `/usr/bin`)
/// and serves the results channel on ttyS1.
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

/// Runs on the host as root after the packages are in (`mmdebstrap --customize-hook`), with
/// the root directory as $1, the agent unit as $2 and the project's `.deb` as $3. Nothing here
/// comes from a user.
const CUSTOMIZE: &str = r#"set -eu
R="$1"
# The second kernel, for the matrix; the first (6.1) stays installed beside it.
chroot "$R" apt-get install -y --no-install-recommends -t bookworm-backports linux-image-amd64
# Test users: joseph owns the stick home; tests/tests is what pjdfstest switches to.
chroot "$R" useradd --create-home --uid 1000 --user-group --shell /bin/bash joseph
chroot "$R" groupadd tests
chroot "$R" useradd --gid tests --no-create-home --shell /usr/sbin/nologin tests
# The project, as an administrator installs it (docs/install.md): apt resolves its Depends
# (fuse3, libpam-modules) from the mirror; recommends (zenity, hence GTK) stay out of a VM
# without a desktop. Then the admin guide's steps: choose the user, enable the PAM hook.
deb="$(basename "$3")"
cp "$3" "$R/tmp/$deb"
chroot "$R" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "/tmp/$deb"
rm "$R/tmp/$deb"
chroot "$R" pershome-config add-user joseph
chroot "$R" pershome-config pam --install
grep -q 'pam_exec.so.*pershome-config session' "$R/etc/pam.d/common-session"
echo user_allow_other >> "$R/etc/fuse.conf"
echo pershome-vm > "$R/etc/hostname"
mkdir -p "$R/host" "$R/media/stick"
printf 'host /host 9p trans=virtio,version=9p2000.L,msize=524288,nofail 0 0\n' >> "$R/etc/fstab"
cp "$2" "$R/etc/systemd/system/pershome-vm-agent.service"
ln -s ../pershome-vm-agent.service "$R/etc/systemd/system/multi-user.target.wants/pershome-vm-agent.service"
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer e2scrub_reap.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
chroot "$R" apt-get clean
rm -rf "$R"/var/lib/apt/lists/*
"#;

/// Before any package: a small initramfs (the root disk is virtio, the filesystem ext4).
const SETUP: &str = r#"set -eu
R="$1"
mkdir -p "$R/etc/initramfs-tools/conf.d" "$R/usr/share/initramfs-tools/modules.d"
echo MODULES=list > "$R/etc/initramfs-tools/conf.d/pershome-vm"
printf 'virtio_pci\nvirtio_blk\next4\n' > "$R/usr/share/initramfs-tools/modules.d/pershome-vm"
"#;

/// A built, cached image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    dir: PathBuf,
}

impl GuestImage {
    /// No image: for runs whose scenarios boot other machines (`ltsp`); booting it fails.
    pub fn not_built() -> GuestImage {
        GuestImage {
            dir: util::vm_dir().join("image-not-built"),
        }
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.raw")
    }

    /// (vmlinuz, initrd) of a kernel.
    pub fn kernel_files(&self, kernel: Kernel) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("vmlinuz-{}", kernel.name())),
            self.dir.join(format!("initrd-{}", kernel.name())),
        )
    }
}

/// apt sources for the build: the host's Debian mirror (the only network these machines
/// have), for bookworm, its updates and security, and bookworm-backports.
fn apt_sources() -> String {
    let host =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let mut mirror = "http://deb.debian.org/debian".to_owned();
    let mut security = "http://deb.debian.org/debian-security".to_owned();
    for stanza in host.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
            let uri = uris
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            if suites.contains("-security") {
                security = uri;
            } else if suites.split_whitespace().any(|s| s == "bookworm") {
                mirror = uri;
            }
        }
    }
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    format!(
        "Types: deb\nURIs: {mirror}\nSuites: bookworm bookworm-updates bookworm-backports\nComponents: main\nSigned-By: {keyring}\n\n\
         Types: deb\nURIs: {security}\nSuites: bookworm-security\nComponents: main\nSigned-By: {keyring}\n"
    )
}

fn mmdebstrap_args(
    sources_file: &Path,
    customize: &Path,
    unit_file: &Path,
    deb: &Path,
    root: &Path,
) -> Vec<String> {
    let mut args = vec![
        "--variant=minbase".to_owned(),
        "--mode=root".to_owned(),
        format!("--include={}", PACKAGES.join(",")),
    ];
    for pattern in EXCLUDES {
        args.push(format!("--dpkgopt=path-exclude={pattern}"));
    }
    for dir in MODULE_EXCLUDES {
        for base in ["/lib/modules", "/usr/lib/modules"] {
            args.push(format!("--dpkgopt=path-exclude={base}/*/kernel/{dir}/*"));
        }
    }
    args.push(format!("--setup-hook={SETUP}"));
    args.push(format!(
        "--customize-hook=sh {} \"$1\" {} {}",
        customize.display(),
        unit_file.display(),
        deb.display()
    ));
    args.push("bookworm".to_owned());
    args.push(root.display().to_string());
    args.push(sources_file.display().to_string());
    args
}

/// The hash of everything the build reads; `deb_digest` is the package's own SHA-256 (cargo-deb
/// builds it reproducibly, so an unchanged project keeps its image).
fn recipe_hash(sources: &str, deb_digest: &str) -> String {
    let mut text = String::new();
    let _ = write!(
        text,
        "{RECIPE_VERSION}\n{PACKAGES:?}\n{EXCLUDES:?}\n{MODULE_EXCLUDES:?}\n{AGENT_UNIT}\n{CUSTOMIZE}\n{SETUP}\n{sources}\n{deb_digest}"
    );
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(8).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 of a file, in hex.
fn file_digest(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        }))
}

/// The cached image for the current recipe and package `deb`, built first if needed (about
/// 2 minutes).
pub fn ensure(deb: &Path) -> Result<GuestImage> {
    let vm_dir = util::vm_dir();
    let sources = apt_sources();
    let deb_digest = file_digest(deb)?;
    let hash = recipe_hash(&sources, &deb_digest);
    let dir = vm_dir.join(format!("image-{hash}"));
    let image = GuestImage { dir: dir.clone() };
    if dir.join("complete").exists() {
        eprintln!("guest image: cached {}", dir.display());
        return Ok(image);
    }
    util::banner(&format!("building the guest image {}", dir.display()));
    let started = std::time::Instant::now();
    let work = vm_dir.join(format!("image-{hash}.building"));
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let sources_file = work.join("debian.sources");
    std::fs::write(&sources_file, &sources).context("writing the apt sources")?;
    let unit_file = work.join("pershome-vm-agent.service");
    std::fs::write(&unit_file, AGENT_UNIT).context("writing the agent unit")?;
    let deb_name = deb.file_name().context("the .deb path has no file name")?;
    let deb_copy = work.join(deb_name);
    std::fs::copy(deb, &deb_copy)
        .with_context(|| format!("copying {} to {}", deb.display(), deb_copy.display()))?;
    let customize = work.join("customize.sh");
    std::fs::write(&customize, CUSTOMIZE).context("writing the customize hook")?;
    let root = work.join("root");
    let log = work.join("mmdebstrap.log");
    let mut command = Command::new("mmdebstrap");
    command.args(mmdebstrap_args(
        &sources_file,
        &customize,
        &unit_file,
        &deb_copy,
        &root,
    ));
    util::run_logged(command, "mmdebstrap", &log)?;

    for kernel in Kernel::ALL {
        let (vmlinuz, initrd) = image.kernel_files(kernel);
        let (found_vmlinuz, found_initrd) = find_kernel(&root, kernel)?;
        for (from, to) in [(found_vmlinuz, vmlinuz), (found_initrd, initrd)] {
            let to = work.join(to.file_name().context("kernel file name")?);
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    // ext4 from the directory: no loop device, no mount.
    let rootfs = work.join("rootfs.raw");
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-L", "root", "-d"])
        .arg(&root)
        .arg(&rootfs)
        .arg("2G");
    util::run_logged(mkfs, "mkfs.ext4 -d", &work.join("mkfs.log"))?;
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    std::fs::remove_file(&deb_copy).with_context(|| format!("removing {}", deb_copy.display()))?;
    // Older images are dead weight (about 1 GB each).
    if let Ok(entries) = std::fs::read_dir(&vm_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("image-") && entry.path() != work {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    std::fs::rename(&work, &dir)
        .with_context(|| format!("renaming {} to {}", work.display(), dir.display()))?;
    std::fs::write(dir.join("complete"), b"").context("marking the image complete")?;
    eprintln!(
        "guest image built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}

fn find_kernel(root: &Path, kernel: Kernel) -> Result<(PathBuf, PathBuf)> {
    let boot = root.join("boot");
    let entries =
        std::fs::read_dir(&boot).with_context(|| format!("listing {}", boot.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            if release.starts_with(kernel.release_prefix()) {
                let initrd = boot.join(format!("initrd.img-{release}"));
                if !initrd.exists() {
                    bail!("{} has no initrd {}", name, initrd.display());
                }
                return Ok((entry.path(), initrd));
            }
        }
    }
    bail!(
        "no {} kernel in {} (did bookworm-backports install?)",
        kernel.name(),
        boot.display()
    )
}
