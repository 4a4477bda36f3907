//! `cargo xtask fuzz`: runs every libFuzzer target of `fuzz/` (cargo-fuzz layout) for a fixed
//! time each, on the decoders of attacker-controlled stick data.
//!
//! This module owns the cargo-fuzz version, the list of targets, and the seed inputs: before a
//! run it writes seeds made with pershome's own encoders (records, a real store through
//! `Journal`, encoded hostile names, ACLs) and every input kept in `fuzz/regressions/<target>/`
//! into `fuzz/corpus/<target>/`, so a known crash fails the run at once and the fuzzer starts
//! past the checksums. It never edits `fuzz/regressions/`: keeping a crashing input there is a
//! human decision. Any crash, leak or timeout of a target fails the run, naming the artifact.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use pershome::fs::acl;
use pershome::meta::codec::{encode_all, encode_record};
use pershome::meta::{Journal, Meta, OpenMode, Record, Timespec, OWNER_ID, STORE_DIR};
use pershome::names::{self, Form};
use xshell::{cmd, Shell};

use crate::guards::TempDir;
use crate::{deps, util};

/// cargo-fuzz, pinned like the other cargo tools (its flags and output are parsed here).
const CARGO_FUZZ: (&str, &str) = ("cargo-fuzz", "0.13.2");

/// Every target in `fuzz/fuzz_targets/`.
pub const TARGETS: &[&str] = &[
    "codec_decode",
    "store_recover",
    "names_decode",
    "acl_parse",
    "journal_replay",
    "fs_walk",
    "store_layout",
    "owner_mark",
    "stick_parsers",
];

/// libFuzzer's `-timeout` in seconds: one input running longer is a finding (a hang, or a
/// loop the stick can make as long as it likes). Every target handles an input in
/// milliseconds, so this is far from what a loaded CI machine needs.
const INPUT_TIMEOUT_SECS: u64 = 30;

/// The store file names of `store_recover`'s input layout, in its order (see the target).
const STORE_NAMES: [&str; 4] = [
    "checkpoint.0000000000000001",
    "journal.0000000000000001",
    "checkpoint.0000000000000002",
    "journal.0000000000000002",
];

pub struct Options {
    /// Seconds of fuzzing per target.
    pub seconds: u64,
    /// The targets to run; empty means every one of `TARGETS`.
    pub targets: Vec<String>,
}

fn fuzz_dir() -> PathBuf {
    util::project_root().join("fuzz")
}

fn install_cargo_fuzz(sh: &Shell) -> Result<()> {
    let (krate, version) = CARGO_FUZZ;
    if deps::tool_version_ok(krate, version) {
        eprintln!("{krate} {version} is installed");
        return Ok(());
    }
    eprintln!("installing {krate} {version} from crates.io");
    let spec = format!("{krate}@={version}");
    cmd!(sh, "cargo install --locked {spec}")
        .run()
        .with_context(|| format!("cargo install {spec}"))?;
    if !deps::tool_version_ok(krate, version) {
        bail!("cargo install {spec} finished but `{krate} --version` does not report {version}");
    }
    Ok(())
}

/// A `cargo fuzz` command in `fuzz/`. cargo-fuzz passes nightly-only flags (`-Z sanitizer`,
/// `-Cpasses=sancov-module`) to rustc; RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command
        .arg("fuzz")
        .args(args)
        .current_dir(fuzz_dir())
        .env("RUSTC_BOOTSTRAP", "1");
    command
}

pub fn run(sh: &Shell, options: &Options) -> Result<()> {
    for t in &options.targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t}; the targets are {}", TARGETS.join(", "));
        }
    }
    let targets: Vec<&str> = if options.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        options.targets.iter().map(String::as_str).collect()
    };
    util::banner(&format!(
        "fuzz: {} targets, {} s each",
        targets.len(),
        options.seconds
    ));
    install_cargo_fuzz(sh)?;
    util::run_checked(cargo_fuzz(&["build"]), "cargo fuzz build")?;
    let logs = util::target_dir().join("fuzz");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    for target in targets {
        util::banner(&format!("fuzz {target} for {} s", options.seconds));
        let corpus = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = write_seeds(target, &corpus)?;
        let kept = copy_regressions(target, &corpus)?;
        eprintln!(
            "{seeds} seeds and {kept} kept regression inputs in {}",
            corpus.display()
        );
        let log = logs.join(format!("{target}.log"));
        let max_time = format!("-max_total_time={}", options.seconds);
        let timeout = format!("-timeout={INPUT_TIMEOUT_SECS}");
        let status = util::run_logged(
            cargo_fuzz(&[
                "run",
                target,
                "--",
                &max_time,
                &timeout,
                "-print_final_stats=1",
            ]),
            &format!("cargo fuzz run {target}"),
            &log,
        )?;
        let text =
            std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed ({status}); the crashing input is under \
                 fuzz/artifacts/{target}/ (keep it in fuzz/regressions/{target}/), full log \
                 {}:\n{}",
                log.display(),
                tail.join("\n")
            );
        }
        // The closing stats: total runs, speed, coverage and corpus at the end.
        for line in text.lines().filter(|l| {
            l.starts_with("Done ")
                || l.starts_with("stat::number_of_executed_units")
                || l.starts_with("stat::average_exec_per_sec")
                || (l.contains("DONE") && l.contains("cov:"))
        }) {
            eprintln!("{target}: {line}");
        }
    }
    Ok(())
}

/// Copies `fuzz/regressions/<target>/*` into the corpus; returns how many.
fn copy_regressions(target: &str, corpus: &Path) -> Result<usize> {
    let dir = fuzz_dir().join("regressions").join(target);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut count = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if !entry.path().is_file() {
            continue;
        }
        let to = corpus.join(format!(
            "regression-{}",
            entry.file_name().to_string_lossy()
        ));
        std::fs::copy(entry.path(), &to)
            .with_context(|| format!("copying {} to {}", entry.path().display(), to.display()))?;
        count += 1;
    }
    Ok(count)
}

/// Writes the seed inputs of `target` into `corpus` as `seed-N`; returns how many.
fn write_seeds(target: &str, corpus: &Path) -> Result<usize> {
    let seeds = match target {
        "codec_decode" => codec_seeds(),
        "store_recover" => store_seeds()?,
        "names_decode" => name_seeds(),
        "acl_parse" => acl_seeds(),
        "journal_replay" | "fs_walk" | "store_layout" | "owner_mark" => structured_seeds(),
        "stick_parsers" => stick_parser_seeds(),
        other => bail!("no seeds defined for fuzz target {other}"),
    };
    for (i, seed) in seeds.iter().enumerate() {
        let path = corpus.join(format!("seed-{i}"));
        std::fs::write(&path, seed).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(seeds.len())
}

/// Seeds for the targets that decode their input as a structure (`arbitrary::Unstructured`):
/// byte patterns that take different branches from the first choice on. The fuzzer finds
/// its way from these quickly; they only keep the first seconds from being spent on nothing.
fn structured_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for step in [1u8, 3, 7, 31, 101] {
        let seed: Vec<u8> = (0..512u32)
            .map(|i| (i as u8).wrapping_mul(step).wrapping_add(step))
            .collect();
        seeds.push(seed);
    }
    seeds.push(vec![0; 256]);
    seeds.push(vec![0xff; 256]);
    seeds
}

/// Mountinfo and blkid texts of the kinds the hook reads (mode byte 0: raw text), and
/// structured inputs (odd mode bytes).
fn stick_parser_seeds() -> Vec<Vec<u8>> {
    let texts = [
        "42 27 7:0 / /tmp/ex\\040probe rw,nosuid,nodev,relatime - fuseblk /dev/loop0 rw,user_id=0,group_id=0\n\
         50 27 0:61 / /home/jo rw,nosuid,nodev - fuse.pershomefs /run/pershome/jo/pershome rw,user_id=1000,group_id=1000\n\
         36 35 98:0 /sub /mnt1 ro,noatime master:1 shared:9 - ext3 /dev/root rw,errors=continue\n",
        "DEVNAME=/dev/sda1\nUUID=1234-ABCD\nLABEL=STICK\nBLOCK_SIZE=512\nTYPE=vfat\nPARTUUID=abcd-01\n",
        "DEVNAME=/dev/sdb1\nLABEL=TYPE=ext4\nTYPE=exfat\n",
    ];
    let mut seeds: Vec<Vec<u8>> = texts
        .iter()
        .map(|t| {
            let mut seed = vec![0u8];
            seed.extend(t.as_bytes());
            seed
        })
        .collect();
    for mode in [1u8, 3] {
        let mut seed = vec![mode];
        seed.extend((0..256u32).map(|i| (i * 37) as u8));
        seeds.push(seed);
    }
    seeds
}

/// One record of every kind, every optional Meta field used at least once.
fn sample_records() -> Vec<Record> {
    let t = |sec, nsec| Timespec { sec, nsec };
    let path =
        |parts: &[&str]| -> Vec<Vec<u8>> { parts.iter().map(|p| p.as_bytes().to_vec()).collect() };
    let plain = Meta {
        mode: 0o100644,
        uid: OWNER_ID,
        gid: OWNER_ID,
        mtime: t(1_700_000_000, 5),
        atime: t(1_700_000_000, 5),
        ctime: t(1_700_000_000, 5),
        btime: t(1_700_000_000, 5),
        backing_size: 12,
        backing_mtime: t(1_700_000_000, 5),
        ..Meta::default()
    };
    let full = Meta {
        mode: 0o020600,
        uid: 1000,
        gid: 100,
        rdev: 0x0103,
        atime: t(-5, 999_999_999),
        ctime: t(1, 0),
        xattrs: vec![
            (b"user.a".to_vec(), b"1".to_vec()),
            (acl::ACCESS.to_vec(), acl_value(true)),
        ],
        link: Some(7),
        name: Some("Makefile\u{e9}".as_bytes().to_vec()),
        nlink: 2,
        ..plain.clone()
    };
    vec![
        Record::Put {
            path: path(&["dir"]),
            meta: Meta {
                mode: 0o040755,
                ..plain.clone()
            },
        },
        Record::Put {
            path: path(&["dir", "file.txt"]),
            meta: plain,
        },
        Record::Put {
            path: path(&["dir", "dev"]),
            meta: full.clone(),
        },
        Record::Rename {
            from: path(&["dir", "file.txt"]),
            to: path(&["dir", "b"]),
        },
        Record::Exchange {
            a: path(&["dir"]),
            b: path(&["e"]),
        },
        Record::PutInode { id: 7, meta: full },
        Record::Remove {
            path: path(&["dir", "b"]),
        },
        Record::RemoveInode { id: 7 },
    ]
}

fn codec_seeds() -> Vec<Vec<u8>> {
    let records = sample_records();
    let mut seeds: Vec<Vec<u8>> = records
        .iter()
        .map(|r| {
            let mut out = Vec::new();
            encode_record(r, &mut out);
            out
        })
        .collect();
    let mut all = Vec::new();
    encode_all(&records, &mut all);
    seeds.push(all);
    seeds
}

/// A valid ACL: minimal, or with a named user, a named group and a mask.
fn acl_value(named: bool) -> Vec<u8> {
    let e = |tag, perm, id| acl::Entry { tag, perm, id };
    let mut entries = vec![
        e(0x01, 7, u32::MAX),
        e(0x04, 5, u32::MAX),
        e(0x20, 4, u32::MAX),
    ];
    if named {
        entries.extend([e(0x02, 6, 1000), e(0x08, 4, 100), e(0x10, 6, u32::MAX)]);
    }
    acl::serialize(&entries)
}

fn acl_seeds() -> Vec<Vec<u8>> {
    vec![acl_value(false), acl_value(true)]
}

/// Backing names as `encode` makes them, each behind the target's flag byte (bit 0: at_root).
fn name_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let mut hostile = names::hostile_examples();
    hostile.push(STORE_DIR.as_bytes().to_vec());
    for name in hostile {
        for at_root in [false, true] {
            for form in [Form::Natural, Form::CaseEscaped, Form::Hashed] {
                let mut seed = vec![u8::from(at_root)];
                seed.extend(names::encode(&name, form, at_root));
                seeds.push(seed);
            }
        }
    }
    seeds
}

/// Packs store files into `store_recover`'s input layout; None if it cannot hold them.
fn pack_store(files: &[(usize, Vec<u8>)]) -> Option<Vec<u8>> {
    if files.is_empty() || files.len() > 3 {
        return None;
    }
    let mut head = (files.len() - 1) as u8;
    let mut body = Vec::new();
    for (i, (name, bytes)) in files.iter().enumerate() {
        head |= (*name as u8) << (2 + 2 * i);
        if i + 1 < files.len() {
            body.extend(u16::try_from(bytes.len()).ok()?.to_le_bytes());
        }
        body.extend(bytes);
    }
    let mut out = vec![head];
    out.extend(body);
    Some(out)
}

/// The store files now in `root/.pershome` that `store_recover` can name, with their index.
fn store_files(root: &Path) -> Result<Vec<(usize, Vec<u8>)>> {
    let mut files = Vec::new();
    for (i, name) in STORE_NAMES.iter().enumerate() {
        let path = root.join(STORE_DIR).join(name);
        if path.exists() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            files.push((i, bytes));
        }
    }
    Ok(files)
}

/// Real stores written by `Journal`: a journal with batches, then after a checkpoint the
/// checkpoint with its journal, and a torn journal.
fn store_seeds() -> Result<Vec<Vec<u8>>> {
    let dir = TempDir::new("fuzz store seeds")?;
    let root = std::fs::File::open(dir.path())
        .with_context(|| format!("opening {}", dir.path().display()))?;
    let records = sample_records();
    let mut seeds = Vec::new();
    {
        use std::os::fd::AsFd;
        let (mut journal, _) =
            Journal::open(root.as_fd(), OpenMode::ReadWrite).context("creating a seed store")?;
        for batch in records.chunks(3) {
            journal
                .append(batch)
                .context("appending to the seed store")?;
        }
        let gen1 = store_files(dir.path())?;
        seeds.extend(pack_store(&gen1));
        if let Some((i, bytes)) = gen1.first() {
            // A torn last batch.
            let torn = bytes[..bytes.len().saturating_sub(5)].to_vec();
            seeds.extend(pack_store(&[(*i, torn)]));
        }
        journal
            .checkpoint(&records[..3])
            .context("checkpointing the seed store")?;
        journal
            .append(&records[3..])
            .context("appending after the checkpoint")?;
        let gen2 = store_files(dir.path())?;
        seeds.extend(pack_store(&gen2));
        // Both generations at once (a compaction that did not clean up).
        let mut both = gen1;
        both.extend(gen2);
        both.truncate(3);
        seeds.extend(pack_store(&both));
    }
    Ok(seeds)
}
