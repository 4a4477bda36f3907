//! `cargo xtask deb` and `cargo xtask deb-check`: build the Debian package with cargo-deb from
//! the files `install` stages, then check it the way an administrator would meet it: lintian,
//! and a real `apt-get install ./pershome_*.deb` into a clean root of each Debian release LTSP
//! labs run (12 bookworm, 13 trixie) made by mmdebstrap, every program pershome runs found
//! there, `pershome-config doctor` there, and a purge that must leave `/etc/pam.d`
//! byte-identical to what it was before.
//!
//! This module owns the package build and its acceptance checks. It never touches the host's
//! own `/etc` or package database: everything happens in a throw-away root below
//! `guards::RUN_BASE`, whose mounts (proc, sysfs, a tmpfs /dev, /dev/fuse) are guards that
//! unmount on every exit path before the root is removed.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::guards::{Mount, TempDir};
use crate::install::{self, Binaries};
use crate::{deps, util};

/// Lintian tags we accept, with the reason; anything else lintian reports as a warning or an
/// error fails `deb-check`. docs/install.md lists the same tags (a test keeps them in step).
pub const ACCEPTED_LINTIAN_TAGS: &[(&str, &str)] = &[(
    "initial-upload-closes-no-bugs",
    "the package is built from this repository for LTSP servers, not uploaded to the Debian \
     archive, so there is no ITP bug to close",
)];

/// The staging tree `cargo xtask install --destdir` fills for cargo-deb. It is named in the
/// `[package.metadata.deb]` assets of Cargo.toml, relative to the crate, so it is fixed below
/// the project root whatever `CARGO_TARGET_DIR` says.
fn stage_dir() -> PathBuf {
    util::project_root().join("target/deb-root")
}

fn ensure_cargo_deb(sh: &Shell) -> Result<()> {
    let ok = Command::new(deps::tool("cargo-deb"))
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("installing cargo-deb from crates.io");
        cmd!(sh, "cargo install cargo-deb --locked")
            .run()
            .context("cargo install cargo-deb --locked")?;
    }
    Ok(())
}

/// `cargo xtask deb`: stage the files, build the package, return the .deb's path.
pub fn build(sh: &Shell) -> Result<PathBuf> {
    ensure_cargo_deb(sh)?;
    let stage = stage_dir();
    if stage.exists() {
        std::fs::remove_dir_all(&stage)
            .with_context(|| format!("removing the old staging tree {}", stage.display()))?;
    }
    install::install(
        sh,
        &install::Options {
            destdir: Some(stage.clone()),
            prefix: PathBuf::from("/usr"),
            sysconfdir: PathBuf::from("/etc"),
            zsh_dir: PathBuf::from("share/zsh/vendor-completions"),
            binaries: Binaries::Build,
        },
    )?;
    util::banner("cargo deb");
    let out_dir = util::target_dir().join("debian");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // --no-build: `install` has just built the release binaries cargo-deb packages.
    let printed = cmd!(sh, "cargo deb -p pershome --no-build --output {out_dir}")
        .read()
        .context("cargo deb failed")?;
    let deb = printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb printed no .deb path; it printed {printed:?}"))?;
    if !deb.is_file() {
        bail!("cargo deb reported {} but it does not exist", deb.display());
    }
    eprintln!("built {}", deb.display());
    Ok(deb)
}

/// The tags of lintian's `W:` and `E:` lines (`E: pkg: tag detail...`).
fn lintian_findings(output: &str) -> Vec<(char, String, String)> {
    output
        .lines()
        .filter_map(|line| {
            let (level, rest) = line.split_once(": ")?;
            let level = match level {
                "E" => 'E',
                "W" => 'W',
                _ => return None,
            };
            let (_pkg, rest) = rest.split_once(": ")?;
            let tag = rest.split_whitespace().next()?.to_owned();
            Some((level, tag, line.to_owned()))
        })
        .collect()
}

/// Run lintian on the package; fail on any error, and on any warning not accepted above.
pub fn lintian(deb: &Path) -> Result<String> {
    util::banner("lintian");
    let output = Command::new("lintian")
        .args(["--display-info", "--tag-display-limit", "0"])
        .arg(deb)
        .output()
        .context("running lintian (apt-get install lintian)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{text}{stderr}");
    if text.trim().is_empty() {
        eprintln!("lintian: no findings");
    }
    let log = util::target_dir().join("debian/lintian.txt");
    std::fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
    let unaccepted: Vec<String> = lintian_findings(&text)
        .into_iter()
        .filter(|(level, tag, _)| {
            *level == 'E' || !ACCEPTED_LINTIAN_TAGS.iter().any(|(t, _)| t == tag)
        })
        .map(|(_, _, line)| line)
        .collect();
    if !unaccepted.is_empty() {
        bail!(
            "lintian reported {} finding(s) that are not accepted (fix them, or for a warning \
             add the tag with its reason to ACCEPTED_LINTIAN_TAGS in xtask/src/deb.rs and to \
             docs/install.md):\n{}",
            unaccepted.len(),
            unaccepted.join("\n")
        );
    }
    Ok(text)
}

/// The Debian releases `deb-check` installs the package on: the ones LTSP labs run.
pub const SUITES: &[&str] = &["bookworm", "trixie"];

/// The host's deb822 mirror list with its release names replaced by `suite` (the same
/// mirror serves every release; `bookworm-security` becomes `trixie-security`, and so on).
fn sources_for(host: &str, suite: &str) -> String {
    host.replace("bookworm", suite)
}

/// A minbase root of `suite` as a tarball, made once by mmdebstrap and kept under target/ so
/// CI does not bootstrap again on every run (delete it to refresh; `apt-get update` in the
/// root brings its package lists up to date anyway).
fn base_tarball(sh: &Shell, suite: &str) -> Result<PathBuf> {
    let dir = util::target_dir().join("mmdebstrap");
    let tarball = dir.join(format!("{suite}-minbase.tar"));
    if tarball.is_file() {
        eprintln!("using the cached base root {}", tarball.display());
        return Ok(tarball);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = dir.join(format!("{suite}-minbase.tar.partial"));
    let host = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .context("reading the host's mirror list /etc/apt/sources.list.d/debian.sources")?;
    let sources = sources_for(&host, suite);
    util::banner(&format!(
        "mmdebstrap: a clean {suite} root (cached for later runs)"
    ));
    // `-` as the mirror: mmdebstrap reads the deb822 sources from stdin, so the root uses the
    // same mirror as the host.
    cmd!(
        sh,
        "mmdebstrap --mode=root --format=tar --variant=minbase {suite} {partial} -"
    )
    .stdin(sources)
    .run()
    .context("mmdebstrap failed (apt-get install mmdebstrap; it needs the Debian mirror)")?;
    std::fs::rename(&partial, &tarball)
        .with_context(|| format!("renaming {} to {}", partial.display(), tarball.display()))?;
    Ok(tarball)
}

/// What a file under /etc/pam.d is, byte for byte: contents, or a symlink's target, and the
/// mode and owner.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    File { mode: u32, uid: u32, bytes: Vec<u8> },
    Symlink(PathBuf),
    Dir { mode: u32 },
    Other { mode: u32 },
}

fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in
            std::fs::read_dir(&current).with_context(|| format!("listing {}", current.display()))?
        {
            let path = entry
                .with_context(|| format!("listing {}", current.display()))?
                .path();
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("lstat {}", path.display()))?;
            let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
            let ft = meta.file_type();
            let item = if ft.is_symlink() {
                Entry::Symlink(
                    std::fs::read_link(&path)
                        .with_context(|| format!("readlink {}", path.display()))?,
                )
            } else if ft.is_dir() {
                stack.push(path.clone());
                Entry::Dir { mode: meta.mode() }
            } else if ft.is_file() {
                Entry::File {
                    mode: meta.mode(),
                    uid: meta.uid(),
                    bytes: std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?,
                }
            } else {
                Entry::Other { mode: meta.mode() }
            };
            out.insert(rel, item);
        }
    }
    Ok(out)
}

/// Differences between two snapshots, one line each, for the error message.
fn diff(before: &BTreeMap<PathBuf, Entry>, after: &BTreeMap<PathBuf, Entry>) -> Vec<String> {
    let mut lines = Vec::new();
    for (path, entry) in before {
        match after.get(path) {
            None => lines.push(format!("removed: {}", path.display())),
            Some(now) if now != entry => lines.push(format!(
                "changed: {} (expected {}, got {})",
                path.display(),
                describe(entry),
                describe(now)
            )),
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        lines.push(format!("added: {}", path.display()));
    }
    lines
}

fn describe(entry: &Entry) -> String {
    match entry {
        Entry::File { mode, uid, bytes } => {
            format!("file mode {mode:o} uid {uid}, {} bytes", bytes.len())
        }
        Entry::Symlink(target) => format!("symlink to {}", target.display()),
        Entry::Dir { mode } => format!("directory mode {mode:o}"),
        Entry::Other { mode } => format!("special file mode {mode:o}"),
    }
}

/// A command run inside the root with chroot(8); its output goes to our terminal.
fn in_root(root: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("chroot");
    command
        .arg(root)
        .args([
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
        ])
        .args(["LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"])
        .args(args);
    command
}

fn run_in_root(root: &Path, args: &[&str]) -> Result<()> {
    eprintln!("(chroot) $ {}", args.join(" "));
    util::run_checked(
        in_root(root, args),
        &format!("`{}` in the root", args.join(" ")),
    )
    .map(|_| ())
}

fn read_in_root(root: &Path, args: &[&str]) -> Result<String> {
    eprintln!("(chroot) $ {}", args.join(" "));
    let output = in_root(root, args)
        .output()
        .with_context(|| format!("running `{}` in the root", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprint!("{text}");
    if !output.status.success() {
        bail!(
            "`{}` in the root failed ({})",
            args.join(" "),
            output.status
        );
    }
    Ok(text)
}

fn mount_kernel(what: &str, args: &[&str], target: &Path) -> Result<Mount> {
    let mut command = Command::new("mount");
    command.args(args).arg(target);
    Mount::start_kernel(what, command, target)
}

/// The device nodes apt and dpkg need, made in a tmpfs /dev (mmdebstrap's own list).
fn make_dev_nodes(dev: &Path) -> Result<()> {
    for (name, major, minor) in [
        ("null", 1u32, 3u32),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = dev.join(name);
        let mut command = Command::new("mknod");
        command
            .args(["-m", "666"])
            .arg(&path)
            .args(["c", &major.to_string(), &minor.to_string()]);
        util::run_checked(command, &format!("mknod {}", path.display()))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .with_context(|| format!("symlink {}", dev.join(link).display()))?;
    }
    std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"))
        .with_context(|| format!("symlink {}", dev.join("ptmx").display()))?;
    std::fs::create_dir(dev.join("pts")).context("creating the /dev/pts mountpoint")?;
    std::fs::write(dev.join("fuse"), b"").context("creating the /dev/fuse mountpoint")?;
    Ok(())
}

/// `cargo xtask deb-check`: lintian, then in a clean Debian 12 root: install (which must not
/// touch /etc/pam.d: the profile is `Default: no`), `pershome-config pam --install` (which
/// must put the hook into common-session), `pershome-config doctor` (which must pass), purge
/// (after which /etc/pam.d must be byte-identical to before the installation).
pub fn check(sh: &Shell, deb: &Path) -> Result<()> {
    util::require_root("deb-check")?;
    deps::ensure_apt(sh, &["lintian", "mmdebstrap"])?;
    let lintian_text = lintian(deb)?;
    for suite in SUITES {
        let started = std::time::Instant::now();
        check_on(sh, deb, suite).with_context(|| format!("deb-check on {suite}"))?;
        eprintln!(
            "deb-check on {suite} passed in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "deb-check passed on {}: lintian {} finding(s)",
        SUITES.join(" and "),
        lintian_findings(&lintian_text).len()
    );
    Ok(())
}

/// Programs pershome runs that its Depends must bring (Recommends and Suggests are left out:
/// the root is installed with --no-install-recommends).
const DEPENDS_PROGRAMS: &[&str] = &[
    "usr/bin/fusermount3",
    "usr/sbin/blkid",
    "usr/bin/lsblk",
    "usr/sbin/pam-auth-update",
];

/// Install, doctor and purge in a clean `suite` root.
fn check_on(sh: &Shell, deb: &Path, suite: &str) -> Result<()> {
    crate::guards::sweep_stale()?;
    let tarball = base_tarball(sh, suite)?;
    let deb_name = deb
        .file_name()
        .and_then(|n| n.to_str())
        .context("the .deb path has no UTF-8 file name")?
        .to_owned();

    // Declared before the mounts so that it is dropped after them: the guards unmount first,
    // then the root is removed (TempDir refuses while anything is still mounted below it).
    let tmp = TempDir::new("deb-check root")?;
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
    util::banner(&format!("deb-check: unpacking the clean {suite} root"));
    cmd!(sh, "tar -C {root} -xf {tarball}")
        .run()
        .context("unpacking the base root")?;
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"))
        .context("copying /etc/resolv.conf into the root (apt needs the mirror's address)")?;
    std::fs::copy(deb, root.join("tmp").join(&deb_name))
        .with_context(|| format!("copying {} into the root", deb.display()))?;

    let _proc = mount_kernel("proc", &["-t", "proc", "proc"], &root.join("proc"))?;
    let _sys = mount_kernel("sysfs", &["-t", "sysfs", "sysfs"], &root.join("sys"))?;
    let dev = root.join("dev");
    let _dev = mount_kernel(
        "tmpfs /dev",
        &["-t", "tmpfs", "-o", "mode=755", "tmpfs"],
        &dev,
    )?;
    make_dev_nodes(&dev)?;
    let _fuse = mount_kernel("/dev/fuse", &["--bind", "/dev/fuse"], &dev.join("fuse"))?;
    // A private devpts instance: apt logs through a pty, and the host's ptys stay out of reach.
    let _pts = mount_kernel(
        "devpts",
        &[
            "-t",
            "devpts",
            "-o",
            "newinstance,ptmxmode=0666,mode=620",
            "devpts",
        ],
        &dev.join("pts"),
    )?;

    let pam_dir = root.join("etc/pam.d");
    let before = snapshot(&pam_dir)?;
    eprintln!("snapshot of /etc/pam.d: {} entries", before.len());

    util::banner("deb-check: apt-get install ./pershome_*.deb");
    run_in_root(&root, &["apt-get", "update", "-q"])?;
    let deb_in_root = format!("/tmp/{deb_name}");
    // --no-install-recommends: zenity (recommended, for the desktop notice) pulls in GTK,
    // which a root without a desktop does not need for these checks.
    run_in_root(
        &root,
        &[
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            &deb_in_root,
        ],
    )?;
    let installed = snapshot(&pam_dir)?;
    let profile = root.join("usr/share/pam-configs/pershome");
    if !profile.is_file() {
        bail!("the package did not install /usr/share/pam-configs/pershome");
    }
    // The profile says `Default: no`: registering it (postinst) must not change the PAM stack
    // until the administrator enables it.
    let registered = diff(&before, &installed);
    if !registered.is_empty() {
        bail!(
            "installing the package changed /etc/pam.d although its profile is `Default: no`:\n{}",
            registered.join("\n")
        );
    }
    for program in install::programs() {
        read_in_root(&root, &[program.name, "--version"])?;
    }
    for program in DEPENDS_PROGRAMS {
        // merged /usr: /usr/sbin/blkid may be shipped as /sbin/blkid; both reach the file.
        if !root.join(program).exists() {
            bail!("after installing the package on {suite}, /{program} is missing: a Depends is lacking");
        }
    }
    let unit = root.join("lib/systemd/system/pershome-ltsp-client.service");
    if !unit.is_file() {
        bail!("the package did not install {}", unit.display());
    }
    // Enabled as dh_installsystemd would (postinst, deb-systemd-helper), so that the block in
    // pamltsp.conf comes back on every LTSP client boot.
    let wants =
        root.join("etc/systemd/system/multi-user.target.wants/pershome-ltsp-client.service");
    if std::fs::symlink_metadata(&wants).is_err() {
        bail!(
            "postinst did not enable pershome-ltsp-client.service ({} missing)",
            wants.display()
        );
    }

    util::banner("deb-check: pershome-config pam --install, then doctor");
    read_in_root(&root, &["pershome-config", "pam", "--install"])?;
    let session = root.join("etc/pam.d/common-session");
    let session_text = std::fs::read_to_string(&session)
        .with_context(|| format!("reading {}", session.display()))?;
    // pam-auth-update writes the profile's line behind the stack's type.
    let hook = format!("session\t{}", pershome::pam_setup::session_line("optional"));
    if !session_text.lines().any(|l| l.trim_end() == hook) {
        bail!(
            "after `pershome-config pam --install`, /etc/pam.d/common-session should contain \
             {hook:?}; got:\n{session_text}"
        );
    }
    eprintln!("common-session now has: {hook}");
    read_in_root(&root, &["pershome-config", "doctor"])?;

    util::banner("deb-check: apt-get purge pershome");
    run_in_root(&root, &["apt-get", "purge", "-y", "-q", "pershome"])?;
    let after = snapshot(&pam_dir)?;
    let changes = diff(&before, &after);
    if !changes.is_empty() {
        bail!(
            "after purging pershome, /etc/pam.d differs from before the installation:\n{}",
            changes.join("\n")
        );
    }
    for leftover in [
        "usr/share/pam-configs/pershome",
        "etc/ltsp/persistent_homes",
        "etc/xdg/autostart/pershome-notice.desktop",
        "usr/bin/pershomefs",
        "usr/bin/pershome-config",
        "lib/systemd/system/pershome-ltsp-client.service",
        "etc/systemd/system/multi-user.target.wants/pershome-ltsp-client.service",
    ] {
        if root.join(leftover).exists() {
            bail!("after purging pershome, /{leftover} is still there");
        }
    }
    eprintln!(
        "{suite}: install + purge left /etc/pam.d byte-identical ({} entries)",
        after.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_the_suite() {
        let host = "Suites: bookworm bookworm-updates\nURIs: http://deb.debian.org/debian\n\
                    Suites: bookworm-security\n";
        let got = sources_for(host, "trixie");
        assert_eq!(
            got,
            "Suites: trixie trixie-updates\nURIs: http://deb.debian.org/debian\n\
             Suites: trixie-security\n"
        );
    }

    #[test]
    fn lintian_lines_are_parsed() {
        let text = "E: pershome: no-changelog usr/share/doc/pershome/changelog.gz\n\
                    W: pershome: initial-upload-closes-no-bugs [usr/share/doc/pershome/changelog.Debian.gz:1]\n\
                    I: pershome: some-info\n\
                    N: a note\n";
        let got: Vec<(char, String)> = lintian_findings(text)
            .into_iter()
            .map(|(l, t, _)| (l, t))
            .collect();
        let want = vec![
            ('E', "no-changelog".to_owned()),
            ('W', "initial-upload-closes-no-bugs".to_owned()),
        ];
        assert_eq!(got, want, "expected {want:?}, got {got:?}");
    }

    #[test]
    fn accepted_lintian_tags_are_documented() {
        let doc = std::fs::read_to_string(util::project_root().join("docs/install.md"))
            .expect("docs/install.md is readable");
        for (tag, reason) in ACCEPTED_LINTIAN_TAGS {
            assert!(!reason.is_empty(), "the accepted tag {tag} has no reason");
            assert!(
                doc.contains(tag),
                "expected docs/install.md to list the accepted lintian tag {tag}"
            );
        }
    }

    #[test]
    fn snapshot_diff_sees_content_and_additions() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("common-session"), "a\n").expect("write");
        let before = snapshot(dir.path()).expect("snapshot");
        std::fs::write(dir.path().join("common-session"), "b\n").expect("write");
        std::fs::write(dir.path().join("extra"), "").expect("write");
        let after = snapshot(dir.path()).expect("snapshot");
        let got = diff(&before, &after);
        assert_eq!(
            got.len(),
            2,
            "expected a change and an addition, got {got:?}"
        );
        assert!(
            diff(&after, &after).is_empty(),
            "a snapshot differs from itself"
        );
    }
}
