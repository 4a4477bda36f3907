//! `cargo xtask man` and `cargo xtask install`: the one install recipe every package uses.
//! The Debian package (`cargo xtask deb`, through cargo-deb) and the Nix package
//! (`packaging/nix/package.nix`) both lay out their files by calling `install`, so a file added
//! here reaches both.
//!
//! This module owns the installed layout (which file goes where, with which mode) and the
//! generation of the man pages and shell completions from the binaries' clap definitions, so
//! those never drift from the real command lines. It never installs outside
//! `DESTDIR/PREFIX` and `DESTDIR/SYSCONFDIR`, never runs a maintainer action (no
//! `pam-auth-update`, no user changes: that is the package manager's job), and never overwrites
//! an administrator's configuration file when installing straight into a live system.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap_complete::Shell as CompletionShell;
use xshell::{cmd, Shell};

use crate::util;

/// A program the package ships: its name in `/usr/bin`, its man page section, and its
/// command line as clap defines it.
pub struct Program {
    pub name: &'static str,
    pub section: &'static str,
    pub command: fn() -> clap::Command,
}

/// Every program, with its clap definition. A program is listed here once its command line
/// lives in the library (`pershome::cli::*::command()`), so the xtask can generate from it.
pub fn programs() -> Vec<Program> {
    vec![
        Program {
            name: "pershomefs",
            section: "1",
            command: pershome::cli::pershomefs::command,
        },
        Program {
            name: "pershome",
            section: "1",
            command: pershome::cli::pershome::command,
        },
        // Section 8: an administrator's command (it edits /etc and the PAM stack).
        Program {
            name: "pershome-config",
            section: "8",
            command: pershome::cli::pershome_config::command,
        },
    ]
}

/// Documentation installed to `share/doc/pershome/`, relative to the project root.
const DOCS: &[&str] = &[
    "README.md",
    "docs/install.md",
    "docs/admin-guide.md",
    "docs/user-guide.md",
    "docs/architecture.md",
    "docs/format.md",
    "docs/fsck.md",
    "docs/security.md",
];

/// The XDG autostart entry that shows the login notice (`pershome notice`) in the desktop
/// session; installed as `SYSCONFDIR/xdg/autostart/pershome-notice.desktop`.
const AUTOSTART_ENTRY: &str = "data/pershome-notice.desktop";

/// The menu entry of `pershome prepare --gui` (for people who do not use a terminal);
/// installed as `PREFIX/share/applications/pershome-prepare.desktop`.
const PREPARE_ENTRY: &str = "data/pershome-prepare.desktop";

/// The example list of users, installed as `SYSCONFDIR/ltsp/persistent_homes` (a conffile in
/// the Debian package).
const PERSISTENT_HOMES_EXAMPLE: &str = "packaging/etc/ltsp/persistent_homes";

// No `/sbin/mount.fuse.pershomefs` helper is installed: for `mount -t fuse.pershomefs` (and
// fstab entries of that type) mount(8) falls back to fuse3's `/sbin/mount.fuse`, which runs
// `pershomefs` from PATH (see docs/install.md, "mount -t fuse.pershomefs").

/// Man pages and completions for one program, rendered in memory.
pub struct Generated {
    /// (file name, e.g. `pershome-fsck.1`, section, roff text)
    pub man_pages: Vec<(String, String, Vec<u8>)>,
    /// (shell, file contents)
    pub completions: Vec<(CompletionShell, Vec<u8>)>,
}

/// Render the man page of `cmd` and of each visible subcommand (as `git` does:
/// `pershome-fsck(1)`), with a SEE ALSO section naming the other programs' pages.
fn man_pages(program: &Program, all: &[Program]) -> Result<Vec<(String, String, Vec<u8>)>> {
    let mut cmd = (program.command)()
        .disable_help_subcommand(true)
        .name(program.name);
    // Building fills in the display names (`pershome-fsck`) and bin names (`pershome fsck`)
    // of the subcommands, which the subcommand pages use as their titles and synopses.
    cmd.build();
    let mut pages = Vec::new();
    let see_also: Vec<String> = all
        .iter()
        .filter(|p| p.name != program.name)
        .map(|p| format!("{}({})", p.name, p.section))
        .collect();
    render_recursive(&cmd, program.section, &see_also, &mut pages)?;
    Ok(pages)
}

fn render_recursive(
    cmd: &clap::Command,
    section: &str,
    see_also: &[String],
    pages: &mut Vec<(String, String, Vec<u8>)>,
) -> Result<()> {
    let man = clap_mangen::Man::new(cmd.clone())
        .section(section)
        .manual("pershome manual")
        .source(format!(
            "pershome {}",
            cmd.get_version().unwrap_or(env!("CARGO_PKG_VERSION"))
        ));
    let name = man.get_filename();
    let mut text = Vec::new();
    man.render(&mut text)
        .with_context(|| format!("rendering the man page {name}"))?;
    let mut roff = clap_mangen::roff::Roff::new();
    roff.control("SH", ["SEE ALSO"]);
    let mut refs: Vec<String> = see_also.to_vec();
    if let Some(parent) = cmd
        .get_display_name()
        .and_then(|d| d.rsplit_once('-').map(|(p, _)| p))
    {
        // A subcommand page points back at its program's page.
        refs.insert(0, format!("{parent}({section})"));
    }
    refs.push("mount.fuse3(8)".to_owned());
    refs.push("pam_exec(8)".to_owned());
    roff.text([clap_mangen::roff::roman(format!(
        "{}. The guides are in /usr/share/doc/pershome/.",
        refs.join(", ")
    ))]);
    roff.to_writer(&mut text)
        .with_context(|| format!("rendering SEE ALSO of {name}"))?;
    pages.push((name, section.to_owned(), text));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_recursive(sub, section, see_also, pages)?;
    }
    Ok(())
}

/// bash, zsh and fish completions of one program.
fn completions(program: &Program) -> Vec<(CompletionShell, Vec<u8>)> {
    [
        CompletionShell::Bash,
        CompletionShell::Zsh,
        CompletionShell::Fish,
    ]
    .into_iter()
    .map(|shell| {
        let mut cmd = (program.command)();
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, program.name, &mut out);
        (shell, out)
    })
    .collect()
}

/// Man pages and completions of every program.
pub fn generate_all() -> Result<Vec<(&'static str, Generated)>> {
    let all = programs();
    all.iter()
        .map(|p| {
            Ok((
                p.name,
                Generated {
                    man_pages: man_pages(p, &all)?,
                    completions: completions(p),
                },
            ))
        })
        .collect()
}

/// `cargo xtask man --out DIR`: write the man pages (uncompressed roff) into DIR.
pub fn man(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (_, generated) in generate_all()? {
        for (name, _, text) in &generated.man_pages {
            let path = out.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Where the binaries come from.
#[derive(Debug, Clone)]
pub enum Binaries {
    /// `cargo build --release` first, then copy from the release directory.
    Build,
    /// Copy already-built binaries from this directory.
    From(PathBuf),
    /// Install no binaries (Nix: `buildRustPackage` installs them itself).
    Skip,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Staging root prepended to every path (empty: the live system).
    pub destdir: Option<PathBuf>,
    /// `/usr` for Debian, `$out` for Nix.
    pub prefix: PathBuf,
    /// `/etc` for Debian, `$out/etc` for Nix (the NixOS module writes the real /etc files).
    pub sysconfdir: PathBuf,
    /// zsh completions directory, relative to the prefix: Debian's zsh reads
    /// `share/zsh/vendor-completions`, Nix's `share/zsh/site-functions`.
    pub zsh_dir: PathBuf,
    pub binaries: Binaries,
}

/// The installed layout, relative to `DESTDIR`: computed in one place so the tests, the Debian
/// asset list and the docs agree.
pub struct Layout {
    root: PathBuf,
    opts: Options,
}

impl Layout {
    pub fn new(opts: &Options) -> Result<Layout> {
        for (what, path) in [
            ("--prefix", &opts.prefix),
            ("--sysconfdir", &opts.sysconfdir),
        ] {
            if !path.is_absolute() {
                bail!("{what} must be an absolute path, got {}", path.display());
            }
        }
        if opts.zsh_dir.is_absolute() {
            bail!(
                "--zsh-dir is relative to the prefix (e.g. share/zsh/site-functions), got {}",
                opts.zsh_dir.display()
            );
        }
        Ok(Layout {
            root: opts.destdir.clone().unwrap_or_else(|| PathBuf::from("/")),
            opts: opts.clone(),
        })
    }

    fn under(&self, base: &Path, rel: impl AsRef<Path>) -> PathBuf {
        // `base` is absolute: strip its leading `/` so it lands below DESTDIR.
        let base = base.strip_prefix("/").unwrap_or(base);
        self.root.join(base).join(rel)
    }
    pub fn prefix(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.under(&self.opts.prefix.clone(), rel)
    }
    pub fn sysconf(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.under(&self.opts.sysconfdir.clone(), rel)
    }
    fn completion_path(&self, shell: CompletionShell, program: &str) -> PathBuf {
        match shell {
            CompletionShell::Bash => {
                self.prefix(format!("share/bash-completion/completions/{program}"))
            }
            CompletionShell::Zsh => self.prefix(self.opts.zsh_dir.join(format!("_{program}"))),
            CompletionShell::Fish => {
                self.prefix(format!("share/fish/vendor_completions.d/{program}.fish"))
            }
            // Only the three above are generated.
            other => self.prefix(format!("share/completions/{other}/{program}")),
        }
    }
}

/// Write `contents` to `path` with `mode`, creating the parent directories.
fn put(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    eprintln!("  {mode:o} {}", path.display());
    Ok(())
}

/// `put`, except that on a live system (no DESTDIR) an existing configuration file is the
/// administrator's and is left alone.
fn put_config(layout: &Layout, path: &Path, contents: &[u8]) -> Result<()> {
    if layout.opts.destdir.is_none() && path.exists() {
        eprintln!("  kept existing {}", path.display());
        return Ok(());
    }
    put(path, contents, 0o644)
}

fn read_project_file(rel: &str) -> Result<Vec<u8>> {
    let path = util::project_root().join(rel);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// `cargo xtask install`: build (unless told otherwise) and lay out every file.
pub fn install(sh: &Shell, opts: &Options) -> Result<()> {
    let layout = Layout::new(opts)?;
    util::banner(&format!(
        "install: prefix {} sysconfdir {} into {}",
        opts.prefix.display(),
        opts.sysconfdir.display(),
        layout.root.display()
    ));
    let programs = programs();
    let bin_dir = match &opts.binaries {
        Binaries::Build => {
            cmd!(sh, "cargo build --release --bins -p pershome")
                .run()
                .context("cargo build --release failed")?;
            Some(util::target_dir().join("release"))
        }
        Binaries::From(dir) => Some(dir.clone()),
        Binaries::Skip => None,
    };
    if let Some(dir) = bin_dir {
        for p in &programs {
            let from = dir.join(p.name);
            let bytes = std::fs::read(&from).with_context(|| {
                format!(
                    "reading the binary {} (build it first, or drop --no-build)",
                    from.display()
                )
            })?;
            put(&layout.prefix(format!("bin/{}", p.name)), &bytes, 0o755)?;
        }
    }
    for (name, generated) in generate_all()? {
        for (file, section, text) in &generated.man_pages {
            put(
                &layout.prefix(format!("share/man/man{section}/{file}")),
                text,
                0o644,
            )?;
        }
        for (shell, text) in &generated.completions {
            put(&layout.completion_path(*shell, name), text, 0o644)?;
        }
    }
    for doc in DOCS {
        let name = Path::new(doc)
            .file_name()
            .context("a DOCS entry has no file name")?;
        put(
            &layout.prefix("share/doc/pershome").join(name),
            &read_project_file(doc)?,
            0o644,
        )?;
    }
    // The pam-auth-update profile, from the one function `pershome-config pam --print` and
    // `doctor` use, for the default configuration (`on_missing_stick = "fallback"`).
    put(
        &layout.prefix("share/pam-configs/pershome"),
        pershome::pam_setup::pam_auth_update_profile(false).as_bytes(),
        0o644,
    )?;
    put_config(
        &layout,
        &layout.sysconf("xdg/autostart/pershome-notice.desktop"),
        desktop_entry(AUTOSTART_ENTRY, &opts.prefix)?.as_bytes(),
    )?;
    put(
        &layout.prefix("share/applications/pershome-prepare.desktop"),
        desktop_entry(PREPARE_ENTRY, &opts.prefix)?.as_bytes(),
        0o644,
    )?;
    put_config(
        &layout,
        &layout.sysconf("ltsp/persistent_homes"),
        &read_project_file(PERSISTENT_HOMES_EXAMPLE)?,
    )?;
    Ok(())
}

/// A desktop entry from `data/`, with an `Exec=/usr/bin/...` pointing into PREFIX/bin: the
/// files in the repository name `/usr/bin`, which is right for the Debian package only (Nix
/// installs into the store). A bare `Exec=pershome ...` is left to PATH.
fn desktop_entry(rel: &str, prefix: &Path) -> Result<String> {
    let text = String::from_utf8(read_project_file(rel)?)
        .with_context(|| format!("{rel} is not UTF-8"))?;
    let bin = prefix.join("bin");
    let bin = bin.to_str().with_context(|| {
        format!(
            "the prefix {} is not UTF-8, which a .desktop file cannot name",
            prefix.display()
        )
    })?;
    let mut out = String::with_capacity(text.len());
    let mut execs = 0;
    for line in text.lines() {
        if line.starts_with("Exec=") {
            execs += 1;
        }
        match line.strip_prefix("Exec=/usr/bin/") {
            Some(rest) => out.push_str(&format!("Exec={bin}/{rest}\n")),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if execs != 1 {
        bail!("{rel} should have one `Exec=` line, found {execs}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_has_man_pages_and_completions() {
        let generated = generate_all().expect("generating");
        let names: Vec<&str> = generated.iter().map(|(n, _)| *n).collect();
        let want: Vec<&str> = programs().iter().map(|p| p.name).collect();
        assert_eq!(names, want, "expected a page set per program");
        for (name, g) in &generated {
            let main = g
                .man_pages
                .iter()
                .find(|(file, _, _)| file.starts_with(&format!("{name}.")))
                .unwrap_or_else(|| panic!("no main page for {name}: got {:?}", g.man_pages));
            let text = String::from_utf8_lossy(&main.2);
            let title = text.lines().find(|l| l.starts_with(".TH "));
            let want = format!(".TH {name} {} ", main.1);
            assert!(
                title.is_some_and(|t| t.starts_with(&want)),
                "expected a title line starting {want:?}, got {title:?}"
            );
            assert!(text.contains("SEE ALSO"), "no SEE ALSO in {name}'s page");
            assert_eq!(g.completions.len(), 3, "expected bash, zsh and fish");
            for (shell, body) in &g.completions {
                assert!(
                    String::from_utf8_lossy(body).contains(name),
                    "the {shell} completion of {name} does not name it"
                );
            }
        }
    }

    #[test]
    fn pershomefs_page_documents_every_mount_option() {
        let generated = generate_all().expect("generating");
        let (_, g) = generated
            .iter()
            .find(|(n, _)| *n == "pershomefs")
            .expect("pershomefs is a program");
        let text = String::from_utf8_lossy(&g.man_pages[0].2).into_owned();
        for option in ["allow_other", "commit=SECONDS", "uid=USER", "Exit status"] {
            assert!(
                text.contains(option),
                "expected pershomefs(1) to mention {option:?}; got:\n{text}"
            );
        }
    }

    #[test]
    fn autostart_entry_runs_the_installed_binary() {
        for (prefix, want) in [
            ("/usr", "Exec=/usr/bin/pershome notice"),
            (
                "/nix/store/abc-pershome",
                "Exec=/nix/store/abc-pershome/bin/pershome notice",
            ),
        ] {
            let text = desktop_entry(AUTOSTART_ENTRY, Path::new(prefix)).expect("it renders");
            let got: Vec<&str> = text.lines().filter(|l| l.starts_with("Exec=")).collect();
            assert_eq!(
                got,
                vec![want],
                "prefix {prefix}: expected {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn layout_stays_below_destdir() {
        let layout = Layout::new(&Options {
            destdir: Some(PathBuf::from("/stage")),
            prefix: PathBuf::from("/usr"),
            sysconfdir: PathBuf::from("/etc"),
            zsh_dir: PathBuf::from("share/zsh/vendor-completions"),
            binaries: Binaries::Skip,
        })
        .expect("a valid layout");
        let got = [
            layout.prefix("bin/pershome"),
            layout.sysconf("ltsp/persistent_homes"),
            layout.completion_path(CompletionShell::Zsh, "pershome"),
        ];
        let want = [
            "/stage/usr/bin/pershome",
            "/stage/etc/ltsp/persistent_homes",
            "/stage/usr/share/zsh/vendor-completions/_pershome",
        ];
        for (got, want) in got.iter().zip(want) {
            assert_eq!(
                got,
                Path::new(want),
                "expected {want}, got {}",
                got.display()
            );
        }
        let relative = Layout::new(&Options {
            destdir: None,
            prefix: PathBuf::from("usr"),
            sysconfdir: PathBuf::from("/etc"),
            zsh_dir: PathBuf::from("x"),
            binaries: Binaries::Skip,
        });
        assert!(relative.is_err(), "a relative prefix must be refused");
    }
}
