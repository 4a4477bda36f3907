//! `cargo xtask nix-check`: every `.nix` file of the repository must parse
//! (`nix-instantiate --parse`, from Debian's `nix-bin`).
//!
//! This module owns only the syntax check. It cannot evaluate the NixOS module or run the VM
//! test: both need nixpkgs, which these machines cannot fetch (see docs/install.md). It never
//! builds anything and never touches a Nix store.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util;

/// The `.nix` files below `dir`, sorted, skipping `target/` and hidden directories.
pub fn nix_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in
            std::fs::read_dir(&current).with_context(|| format!("listing {}", current.display()))?
        {
            let entry = entry.with_context(|| format!("listing {}", current.display()))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let ft = entry
                .file_type()
                .with_context(|| format!("lstat {}", path.display()))?;
            if ft.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    stack.push(path);
                }
            } else if ft.is_file() && name.ends_with(".nix") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

pub fn check(sh: &xshell::Shell) -> Result<()> {
    crate::deps::ensure_apt(sh, &["nix-bin"])?;
    util::banner("nix-check: nix-instantiate --parse on every .nix file");
    let files = nix_files(&util::project_root())?;
    if files.is_empty() {
        bail!("found no .nix files; expected packaging/nix/*.nix");
    }
    let mut failed = Vec::new();
    for file in &files {
        let output = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(file)
            .output()
            .context("running nix-instantiate (apt-get install nix-bin)")?;
        if output.status.success() {
            eprintln!("parses: {}", file.display());
        } else {
            failed.push(format!(
                "{}: {}",
                file.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} .nix file(s) do not parse:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    eprintln!(
        "{} .nix files parse (evaluation needs nixpkgs, which cannot be fetched here)",
        files.len()
    );
    Ok(())
}
