//! One chokepoint for the stick (docs/architecture.md): outside `src/backing.rs` and
//! `src/backing/`, no code that works on the stick (`src/fs/`, `src/meta/`, `src/fsck.rs`)
//! makes a write-like system call, or reads file data, by itself. Everything goes through
//! `backing::Backing` or `backing::sys`, so the injected faults, the write counters and the
//! power-loss model of `tests/crash.rs` see every one of them, in the order they happen.
//!
//! A source scan: each pattern below is a way to reach the kernel without `backing`. Test
//! modules (`#[cfg(test)]` to the end of a file, and the files `tests.rs` and `*_tests.rs`) are
//! not product code and are skipped; so are comments.

use std::path::{Path, PathBuf};

/// Direct system calls on files and directories, as the libc and nix crates spell them.
const SYSCALLS: &[&str] = &[
    "open",
    "openat",
    "creat",
    "write",
    "pwrite",
    "pwritev",
    "read",
    "pread",
    "preadv",
    "fsync",
    "fdatasync",
    "syncfs",
    "sync_file_range",
    "ftruncate",
    "truncate",
    "fallocate",
    "copy_file_range",
    "lseek",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "rmdir",
    "link",
    "linkat",
    "symlinkat",
    "mknodat",
];

/// Other ways around `backing`: std's own file I/O.
const STD: &[&str] = &[
    "std::os::unix::fs::FileExt",
    ".sync_all()",
    ".sync_data()",
    "std::fs::write",
    "std::fs::File::create",
    "OpenOptions",
    "std::fs::remove_file",
    "std::fs::remove_dir",
    "std::fs::rename",
    "std::fs::create_dir",
    "std::fs::copy",
    "std::fs::hard_link",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())) {
        let path = e.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs")
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n != "tests.rs" && !n.ends_with("_tests.rs"))
        {
            out.push(path);
        }
    }
}

/// The product code of a source file: up to its `#[cfg(test)]`, without `//` comments.
fn product_lines(text: &str) -> Vec<(usize, &str)> {
    text.lines()
        .enumerate()
        .take_while(|(_, l)| l.trim() != "#[cfg(test)]")
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
        .collect()
}

/// Where a line calls the kernel around `backing`: the pattern found, if any.
fn bypass(line: &str) -> Option<String> {
    for call in SYSCALLS {
        for prefix in [
            "libc::",
            "nix::unistd::",
            "nix::fcntl::",
            "nix::sys::uio::",
            "nix::sys::stat::",
        ] {
            let pat = format!("{prefix}{call}(");
            if line.contains(&pat) {
                return Some(pat);
            }
        }
    }
    // Imports of nix's file calls (`use nix::unistd::{fsync, …}`): called bare afterwards.
    if line.trim_start().starts_with("use nix::") {
        let names = line
            .split(['{', '}', ',', ';', ':', ' '])
            .map(str::trim)
            .filter(|w| !w.is_empty());
        for name in names {
            if SYSCALLS.contains(&name) {
                return Some(format!("an import of nix's {name}"));
            }
        }
    }
    STD.iter()
        .find(|p| line.contains(*p))
        .map(|p| p.to_string())
}

/// `.set_len(size)` with one argument is std's `File::set_len` (backing's takes the file too).
fn std_set_len(text: &str) -> bool {
    let mut rest = text;
    while let Some(at) = rest.find(".set_len(") {
        let args = &rest[at + ".set_len(".len()..];
        let mut depth = 1;
        let mut commas = 0;
        for c in args.chars() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                ',' if depth == 1 => commas += 1,
                _ => {}
            }
        }
        if commas == 0 {
            return true;
        }
        rest = args;
    }
    false
}

#[test]
fn only_backing_makes_system_calls_on_the_stick() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root.join("fs"), &mut files);
    sources(&root.join("meta"), &mut files);
    files.push(root.join("fsck.rs"));
    assert!(
        files.len() > 10,
        "expected the sources of fs and meta, found {files:?}"
    );
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read a source file");
        let lines = product_lines(&text);
        for (n, line) in &lines {
            if let Some(what) = bypass(line) {
                found.push(format!("{}:{n}: {what}: {}", file.display(), line.trim()));
            }
        }
        let product: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        if std_set_len(&product) {
            found.push(format!("{}: std's File::set_len", file.display()));
        }
    }
    assert!(
        found.is_empty(),
        "expected every system call on the stick to go through backing (backing::Backing or \
         backing::sys), found {} that do not:\n{}",
        found.len(),
        found.join("\n")
    );
}

#[test]
fn the_scan_sees_each_way_around_backing() {
    // The patterns must catch what they are for, or the test above proves nothing.
    for line in [
        "let r = unsafe { libc::fallocate(fd, 0, 0, 1) };",
        "unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) }",
        "use nix::unistd::{fdatasync, fsync, ftruncate};",
        "use std::os::unix::fs::FileExt;",
        "file.sync_all()?;",
        "nix::fcntl::renameat(Some(dir), a, Some(dir), b)",
    ] {
        assert!(bypass(line).is_some(), "expected {line:?} to be found");
    }
    assert!(std_set_len("f.set_len(p.size).map_err(x)?;"));
    assert!(!std_set_len("self.backing.set_len(&f, p.size)?;"));
    assert!(bypass("self.backing.sync_file(&f, false)").is_none());
}
