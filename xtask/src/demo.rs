//! `cargo xtask demo`: mount pershomefs over a pretend stick in /tmp/pershome-demo, write a few
//! things FAT cannot hold, and show the POSIX view next to the FAT-safe names on the stick.
//!
//! The mount is deliberately left in place for the person to explore (that is the point of a
//! demo); it prints how to unmount it, and a rerun unmounts the previous demo first. This is
//! the one subcommand that leaves a mount behind, and only at these fixed paths.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::guards::{mounted_type, processes_with_arg, Mount};
use crate::{deps, target, util};

const DEMO: &str = "/tmp/pershome-demo";

pub fn run(sh: &Shell) -> Result<()> {
    deps::run(sh)?;
    let bin = target::pershomefs_binary()?;
    let root = Path::new(DEMO);
    let home = root.join("home");
    let stick = root.join("stick");
    let backing = stick.join("pershome");

    if mounted_type(&home)?.is_some() {
        util::banner("unmounting the previous demo");
        // Reuse the guard's unmount, which also waits for the old daemon to finish.
        let previous = Mount::adopt(
            "pershomefs (previous demo)",
            &home,
            processes_with_arg(&home),
        );
        previous.unmount()?;
    }
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("removing the old {DEMO}"))?;
    }
    std::fs::create_dir_all(&backing).with_context(|| format!("creating {}", backing.display()))?;
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;

    util::banner(&format!(
        "mounting: {} {} {}",
        bin.display(),
        backing.display(),
        home.display()
    ));
    let mut mount_cmd = Command::new(&bin);
    mount_cmd.arg(&backing).arg(&home);
    let mount = Mount::start("pershomefs", mount_cmd, &home)?;

    let written = write_examples(&home);
    if let Err(e) = written {
        // Take the half-made demo down rather than leave a confusing mount.
        let _ = mount.unmount();
        return Err(e);
    }
    // From here on the mount is meant to stay.
    mount.leak();

    util::banner(&format!(
        "what you see through pershomefs: ls -la {}",
        home.display()
    ));
    cmd!(sh, "ls -la {home}").run()?;
    util::banner(&format!(
        "what is on the (FAT-safe) stick: ls -laR {}",
        stick.display()
    ));
    cmd!(sh, "ls -laR {stick}").run()?;
    println!(
        "\nThe demo is still mounted: explore {home}, and compare with {stick}.\n\
         Unmount it with:  fusermount3 -u {home}",
        home = home.display(),
        stick = stick.display()
    );
    Ok(())
}

fn write_examples(home: &Path) -> Result<()> {
    util::banner("writing through the mount");
    let write = |name: &str, text: &str| -> Result<()> {
        let path = home.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {name:?}");
        Ok(())
    };
    // Characters FAT forbids in names.
    write(
        "notes: draft?.txt",
        "A name with ':' and '?', which FAT forbids.\n",
    )?;
    // Names differing only in case: FAT would make them one file.
    write("Makefile", "all:\n\techo upper\n")?;
    write("makefile", "all:\n\techo lower\n")?;
    // A symlink: FAT has none.
    std::os::unix::fs::symlink("notes: draft?.txt", home.join("latest"))
        .with_context(|| format!("creating the symlink {}", home.join("latest").display()))?;
    println!("made symlink \"latest\" -> \"notes: draft?.txt\"");
    // Permission bits: FAT has none.
    write("secret.txt", "only for me\n")?;
    let secret = home.join("secret.txt");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", secret.display()))?;
    println!("chmod 0600 \"secret.txt\"");
    // A plain name keeps its name on the stick.
    std::fs::create_dir(home.join("Documents")).context("creating Documents")?;
    write(
        "Documents/report.txt",
        "Readable on Windows under the same name.\n",
    )?;

    // Read back what matters, so the demo shows it working rather than just claims it.
    let mode = std::fs::metadata(&secret)
        .with_context(|| format!("stat {}", secret.display()))?
        .permissions()
        .mode()
        & 0o7777;
    let upper = std::fs::read_to_string(home.join("Makefile")).context("reading Makefile")?;
    let lower = std::fs::read_to_string(home.join("makefile")).context("reading makefile")?;
    let link = std::fs::read_link(home.join("latest")).context("reading the symlink")?;
    if mode != 0o600 || upper == lower || link != Path::new("notes: draft?.txt") {
        bail!("read back differs: mode {mode:o} (expected 600), Makefile/makefile same: {}, link {link:?}", upper == lower);
    }
    Ok(())
}
