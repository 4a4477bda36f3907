//! Scenario 8, the 8.3 stick (issue 3 item 6) on the kernel's real `msdos` driver: the stick
//! is mounted `-t msdos` (upper-case `NAME.EXT` names only, no leading dot, long names
//! refused or cut), `pershome prepare --names 8.3` makes its store, and pershomefs
//! `-o names=8.3` serves a POSIX home over it. Proved: pjdfstest gives the host's counts;
//! every hostile name of `names::hostile_examples()`, `:` and `?`, `Makefile` beside
//! `makefile`, long and unicode names, a symlink, a hard link, a fifo, an executable, xattrs,
//! nanosecond times and a file stored in 4 KiB parts are written, and after unmounting the
//! tree reads back byte for byte: on `msdos` without the `names=` option (the stick's
//! recorded mode), and on the same stick mounted `-t vfat` (what a long-name system shows is
//! logged); fsx runs on the remounted home. `pershome fsck` is clean throughout,
//! `fsck.vfat -n` in the guest and `fsck.fat -n` on the host too. On the host, mtools lists
//! every entry of the stick, the store included: each must be an upper-case 8.3 name without
//! a VFAT long-name entry; the tree copied out with mtools passes the strict 8.3 FAT audit.
//!
//! This module owns that scenario. The names reach the guest shell only as octal escapes
//! made here (`printf`), never as raw bytes.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use xshell::cmd;

use pershome::fatrules;
use pershome::names::{self, NameMode};

use super::conformance;
use crate::guest::{self, BACKING, STICK_MNT};
use crate::qemu::Vm;
use crate::stick::{self, StickFs};
use crate::util::shq;
use crate::Ctx;

/// 4 GiB, as in `conformance`: pjdfstest's `open::interact_2gb` writes at 2 GiB, and FAT has
/// no sparse files. The image file stays sparse on the host.
const STICK_MIB: u64 = 4096;

/// The stick as the `msdos` driver mounts it: the login hook's options less the vfat-only
/// ones (`utf8`, `shortname`), which the msdos driver refuses.
const MSDOS_OPTIONS: &str = "uid=1000,gid=1000,umask=077,flush,noatime,nosuid,nodev,noexec";

const HOME: &str = "/home/joseph";
/// The first mount: 8.3 names asked for, and every file in 4 KiB parts so that the parts
/// (`PERSHOME.DB/PARTS/…`) are on the stick too.
const HOME_FIRST: &str = "uid=joseph,gid=joseph,allow_other,names=8.3,parts=always,part_size=4096";
/// Later mounts name no mode: the stick's recorded one (8.3) must be adopted.
const HOME_AGAIN: &str = "uid=joseph,gid=joseph,allow_other";

/// Bytes of the file written in parts of 4,096: parts 1 to 4 past part 0.
const PARTS_FILE_BYTES: u64 = 20_000;
const PARTS_EXPECTED: usize = 4;

const FSX_OPS: u64 = 3_000;
const FSX_SEED: u64 = 8_383;

/// The tree besides the hostile names, written as joseph (`set -e`: any refusal fails it).
const MAKE_TREE: &str = r#"
mkdir -p project 'A long directory name with spaces'
printf 'report of the day\n' > project/report.txt
printf 'colon\n' > 'project/a:b'
printf 'question\n' > 'project/why?'
printf 'all:\n\techo upper\n' > project/Makefile
printf 'all:\n\techo lower\n' > project/makefile
printf 'inside a long directory\n' > 'A long directory name with spaces/a file with a long name.text'
printf 'unicode\n' > 'A long directory name with spaces/Übung – café ☕.txt'
ln -s ../report.txt project/link
ln project/report.txt project/report-hardlink.txt
mkfifo project/fifo
printf '#!/bin/sh\necho run\n' > project/run.sh
chmod 750 project/run.sh
setfattr -n user.colour -v blue project/report.txt
setfattr -n user.note -v 'on a:b' 'project/a:b'
head -c PARTS_FILE_BYTES /dev/urandom > parts.bin
touch -h -d '2023-01-02 03:04:05.987654321' project/* project
touch -d '2024-02-29 12:34:56.123456789' project/report.txt
sync
"#;

/// What must read back identically: every entry's type, mode, owner, links, size, mtime (ns)
/// and link target; every file's SHA-256; the xattrs. Hex, so that names that are not UTF-8
/// arrive unchanged.
const DESCRIBE: &str = r#"set -e
cd /home/joseph
{
  find hostile project parts.bin 'A long directory name with spaces' \
    -printf '%p//%y %m %U %G %n %s %T@ %l\0' | LC_ALL=C sort -z
  printf '\n--\n'
  find hostile project parts.bin 'A long directory name with spaces' -type f -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum
  printf -- '--\n'
  getfattr --only-values -n user.colour project/report.txt; echo
  getfattr --only-values -n user.note 'project/a:b'; echo
  project/run.sh
} | od -An -v -tx1 | tr -d ' \n'
"#;

/// The names in `hostile/`, NUL-separated, in hex.
const LIST_HOSTILE: &str =
    "cd /home/joseph/hostile && find . -mindepth 1 -maxdepth 1 -printf '%P\\0' | od -An -v -tx1 | tr -d ' \\n'";

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let hostile = names::hostile_examples();
    let image = ctx.run_dir.join("stick-msdos.img");
    // Not prepared by the harness: `pershome prepare` makes `pershome/` through the driver.
    stick::create_with(&ctx.sh, &image, StickFs::Fat32, STICK_MIB, false)?;
    let mut vm = ctx.boot("msdos", ctx.kernel, Some(&image))?;
    let device = guest::wait_for_stick(&mut vm)?;
    mount_stick_as(&mut vm, &device, "msdos", MSDOS_OPTIONS)?;

    // The real driver's rules, so that the rest of the scenario means something.
    let probe = vm.run(
        &format!("cd {STICK_MNT} && if touch .dotfile 2>/dev/null; then echo TOOK-IT; fi"),
        guest::SHORT,
    )?;
    if !probe.ok() || probe.response.stdout.contains("TOOK-IT") {
        bail!(
            "expected the msdos driver to refuse a name with a leading dot: {}",
            probe.describe()
        );
    }

    let started = Instant::now();
    let prepared = vm
        .ok(
            &format!("pershome prepare --names 8.3 --no-gui {STICK_MNT} 2>&1; ls -a {BACKING}"),
            guest::SHORT,
        )
        .context("pershome prepare --names 8.3 on the msdos stick")?;
    if !prepared
        .lines()
        .any(|l| l.eq_ignore_ascii_case("PERSHOME.DB"))
    {
        bail!("after pershome prepare --names 8.3, expected PERSHOME.DB in pershome/, got:\n{prepared}");
    }
    ctx.note(format!(
        "pershome prepare --names 8.3 on the msdos stick: {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // As `conformance` runs it (and `cargo xtask pjdfstest --names 8.3` on the host).
    conformance::pjdfstest(ctx, &mut vm, "allow_other,names=8.3", "msdos")?;
    guest::pershome_fsck_clean(&mut vm).context("after pjdfstest")?;

    // The home: hostile names and every kind of object, a file in parts.
    let started = Instant::now();
    guest::mount_home(&mut vm, HOME, HOME_FIRST)?;
    vm.ok(
        &format!(
            "chown joseph:joseph {HOME} && runuser -u joseph -- sh -c {}",
            shq(&make_tree_script(&hostile))
        ),
        Duration::from_secs(300),
    )
    .context("writing the tree as joseph")?;
    let before = describe(&mut vm)?;
    let listed = list_hostile(&mut vm)?;
    expect_names(&hostile, &listed).context("hostile/ right after writing it")?;
    ctx.note(format!(
        "{} hostile names, the project tree and {PARTS_FILE_BYTES} bytes in 4 KiB parts written in {:.0} s",
        hostile.len(),
        started.elapsed().as_secs_f64()
    ));
    let parts = vm
        .ok(
            &format!("find {BACKING}/PERSHOME.DB/PARTS -type f | wc -l"),
            guest::SHORT,
        )
        .context("counting the parts on the stick")?;
    let parts: usize = parts.trim().parse().context("parsing the parts count")?;
    if parts != PARTS_EXPECTED {
        bail!("expected {PARTS_EXPECTED} parts of parts.bin in PERSHOME.DB/PARTS, found {parts}");
    }
    guest::unmount_home(&mut vm, HOME)?;
    guest::pershome_fsck_clean(&mut vm).context("after the tree")?;
    let raw = vm.ok(
        &format!("find {STICK_MNT} -mindepth 1 | wc -l"),
        guest::SHORT,
    )?;
    ctx.note(format!(
        "the msdos driver lists {} entries on the stick; pershome fsck (8.3 audit as listed): clean",
        raw.trim()
    ));

    // Back on msdos, the mode named by nobody: everything as it was.
    guest::mount_home(&mut vm, HOME, HOME_AGAIN)?;
    let after = describe(&mut vm)?;
    compare(&before, &after, "after unmount and remount on msdos")?;
    expect_names(&hostile, &list_hostile(&mut vm)?).context("hostile/ after the remount")?;
    let started = Instant::now();
    vm.ok(
        &format!("runuser -u joseph -- mkdir {HOME}/fsx"),
        guest::SHORT,
    )?;
    guest::fsx(&mut vm, &format!("{HOME}/fsx/fsx.bin"), FSX_OPS, FSX_SEED)?;
    vm.ok(&format!("rm -r {HOME}/fsx"), guest::SHORT)?;
    ctx.note(format!(
        "fsx -N {FSX_OPS} -S {FSX_SEED} on msdos: A-OK in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    guest::unmount_home(&mut vm, HOME)?;
    guest::pershome_fsck_clean(&mut vm).context("after fsx")?;
    guest::unmount_and_check_stick(&mut vm, &device, StickFs::Fat32)
        .context("fsck.vfat -n after the msdos mounts")?;

    // The same stick on the long-name driver: what Windows or a vfat mount shows, and the
    // home still reads back identically over it.
    mount_stick_as(
        &mut vm,
        &device,
        "vfat",
        guest::stick_options(StickFs::Fat32),
    )?;
    let shown = vm.ok(
        &format!("cd {BACKING} && find . -mindepth 1 | LC_ALL=C sort"),
        guest::SHORT,
    )?;
    let shown_path = ctx.run_dir.join("vfat-listing.txt");
    std::fs::write(&shown_path, &shown)
        .with_context(|| format!("writing {}", shown_path.display()))?;
    let not_short: Vec<&str> = shown
        .lines()
        .filter(|l| {
            l.rsplit('/')
                .next()
                .is_some_and(|n| fatrules::check_short_name(n.as_bytes()).is_err())
        })
        .collect();
    if !not_short.is_empty() {
        bail!(
            "on a vfat mount every name should show as the upper-case 8.3 name on the disk, these do not:\n{}",
            not_short.join("\n")
        );
    }
    let sample: Vec<&str> = shown
        .lines()
        .filter(|l| l.starts_with("./HOSTILE/"))
        .take(6)
        .collect();
    ctx.note(format!(
        "vfat shows {} entries, all upper-case 8.3 (e.g. {}); listing in {}",
        shown.lines().count(),
        sample.join(" "),
        shown_path.display()
    ));
    guest::pershome_fsck_clean(&mut vm).context("on the vfat mount")?;
    guest::mount_home(&mut vm, HOME, HOME_AGAIN)?;
    let on_vfat = describe(&mut vm)?;
    compare(&before, &on_vfat, "over the vfat driver")?;
    expect_names(&hostile, &list_hostile(&mut vm)?).context("hostile/ over vfat")?;
    guest::unmount_home(&mut vm, HOME)?;
    guest::pershome_fsck_clean(&mut vm).context("after the vfat mount")?;
    guest::unmount_and_check_stick(&mut vm, &device, StickFs::Fat32)
        .context("fsck.vfat -n after the vfat mount")?;
    vm.shutdown()?;

    // On the host, as an old device or DOS would read the stick.
    stick::fsck_fat_host(&ctx.sh, &image).context("the stick, checked on the host")?;
    let entries = check_mdir(ctx, &image)?;
    let audited = audit_copy(ctx, &image)?;
    ctx.note(format!(
        "host: fsck.fat -n clean; mdir -/ -a: {entries} entries, all upper-case 8.3 without a long name; \
         the tree copied out with mcopy ({audited} entries) passes the strict 8.3 FAT audit"
    ));
    Ok(())
}

/// Mount the stick's partition at [`STICK_MNT`] with the given driver.
fn mount_stick_as(vm: &mut Vm, device: &str, fstype: &str, options: &str) -> Result<()> {
    let script = format!(
        "set -e; mkdir -p {STICK_MNT}; mount -t {fstype} -o {options} {} {STICK_MNT}",
        shq(device)
    );
    vm.ok(&script, guest::SHORT)
        .with_context(|| format!("mounting the stick -t {fstype} -o {options}"))
        .map(drop)
}

/// The script that writes `hostile/` (each name a file holding its index) and the rest of
/// the tree. Each name is rebuilt in the guest from octal escapes; the `x` guards a trailing
/// newline against `$(...)`.
fn make_tree_script(hostile: &[Vec<u8>]) -> String {
    let mut script = String::from("set -e\ncd /home/joseph\nmkdir hostile\n");
    for (i, name) in hostile.iter().enumerate() {
        let _ = writeln!(
            script,
            "n=$(printf '{}x'); n=${{n%x}}; printf 'hostile {i}\\n' > \"hostile/$n\"",
            octal(name)
        );
    }
    script.push_str(&MAKE_TREE.replace("PARTS_FILE_BYTES", &PARTS_FILE_BYTES.to_string()));
    script
}

/// Every byte as a `printf` octal escape.
fn octal(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "\\{b:03o}");
        s
    })
}

fn unhex(hex: &str) -> Result<Vec<u8>> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        bail!("odd hex length {} from the guest", hex.len());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .with_context(|| format!("bad hex {:?} from the guest", &hex[i..i + 2]))
        })
        .collect()
}

fn describe(vm: &mut Vm) -> Result<Vec<u8>> {
    let out = vm
        .ok(
            &format!("runuser -u joseph -- sh -c {}", shq(DESCRIBE)),
            Duration::from_secs(120),
        )
        .context("describing the tree as joseph")?;
    let description = unhex(&out)?;
    if description.is_empty() {
        bail!("the description of the tree is empty");
    }
    Ok(description)
}

fn list_hostile(vm: &mut Vm) -> Result<Vec<Vec<u8>>> {
    let out = vm
        .ok(
            &format!("runuser -u joseph -- sh -c {}", shq(LIST_HOSTILE)),
            guest::SHORT,
        )
        .context("listing hostile/")?;
    let bytes = unhex(&out)?;
    Ok(bytes
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// `hostile/` must hold exactly the names written, byte for byte.
fn expect_names(want: &[Vec<u8>], got: &[Vec<u8>]) -> Result<()> {
    let mut want = want.to_vec();
    let mut got = got.to_vec();
    want.sort();
    got.sort();
    if want != got {
        let missing: Vec<String> = want
            .iter()
            .filter(|n| !got.contains(n))
            .map(|n| format!("{:?}", String::from_utf8_lossy(n)))
            .collect();
        let extra: Vec<String> = got
            .iter()
            .filter(|n| !want.contains(n))
            .map(|n| format!("{:?}", String::from_utf8_lossy(n)))
            .collect();
        bail!(
            "expected the {} hostile names, got {}: missing {}, unexpected {}",
            want.len(),
            got.len(),
            missing.join(", "),
            extra.join(", ")
        );
    }
    Ok(())
}

fn compare(before: &[u8], after: &[u8], when: &str) -> Result<()> {
    if before != after {
        let b = String::from_utf8_lossy(before).replace('\0', "\n");
        let a = String::from_utf8_lossy(after).replace('\0', "\n");
        let diff: Vec<String> = a
            .lines()
            .filter(|l| !b.lines().any(|x| x == *l))
            .map(|l| format!("+ {l}"))
            .chain(
                b.lines()
                    .filter(|l| !a.lines().any(|x| x == *l))
                    .map(|l| format!("- {l}")),
            )
            .collect();
        bail!(
            "the tree changed {when} (- expected, + got):\n{}",
            diff.join("\n")
        );
    }
    Ok(())
}

/// One entry of `mdir` output: its 8.3 name, and the long name mdir prints after the time
/// when the entry has VFAT long-name entries.
#[derive(Debug, PartialEq, Eq)]
struct MdirEntry {
    dir: String,
    short: String,
    long: String,
}

/// The entries of `mdir -/ -a` output (`.` and `..` left out). Lines: `NAME     EXT  size-or-<DIR>
/// date  time  [long name]`, the name in columns 0–7, the extension in 9–11, under a
/// `Directory for ::/…` header.
fn parse_mdir(listing: &str) -> Result<Vec<MdirEntry>> {
    let mut dir = String::new();
    let mut entries = Vec::new();
    for line in listing.lines() {
        if let Some(d) = line.strip_prefix("Directory for ") {
            dir = d.trim().to_owned();
            continue;
        }
        if line.is_empty() || line.starts_with(' ') || line.starts_with("Total files listed") {
            continue;
        }
        let (Some(base), Some(ext), Some(rest)) = (line.get(..8), line.get(9..12), line.get(12..))
        else {
            bail!("cannot read this mdir line: {line:?}");
        };
        let tokens: Vec<&str> = rest.split_whitespace().collect();
        let is_date = |t: &str| {
            t.len() == 10
                && t.bytes().enumerate().all(|(i, b)| {
                    if i == 4 || i == 7 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                })
        };
        let Some(date) = tokens.iter().position(|t| is_date(t)) else {
            bail!("no date in this mdir line: {line:?}");
        };
        // After the date comes the time, then the long name if there is one.
        let long = tokens.get(date + 2..).unwrap_or_default().join(" ");
        let (base, ext) = (base.trim_end(), ext.trim_end());
        if base == "." || base == ".." {
            continue;
        }
        let short = if ext.is_empty() {
            base.to_owned()
        } else {
            format!("{base}.{ext}")
        };
        entries.push(MdirEntry {
            dir: dir.clone(),
            short,
            long,
        });
    }
    Ok(entries)
}

/// `mdir -/ -a` of the whole stick: every entry an upper-case 8.3 name (mdir shows a short
/// name in lower case when its case flags say so, which the msdos driver never writes) with no
/// long name. Returns how many entries were checked.
fn check_mdir(ctx: &Ctx, image: &std::path::Path) -> Result<usize> {
    let img = stick::mtools_image(image);
    let sh = &ctx.sh;
    let listing = cmd!(sh, "mdir -/ -a -i {img} ::/")
        .env("MTOOLS_SKIP_CHECK", "1")
        .quiet()
        .read()
        .context("listing the stick with mdir -/ -a")?;
    let saved = ctx.run_dir.join("mdir.txt");
    std::fs::write(&saved, &listing).with_context(|| format!("writing {}", saved.display()))?;
    let entries = parse_mdir(&listing)?;
    let bad: Vec<String> = entries
        .iter()
        .filter(|e| !e.long.is_empty() || fatrules::check_short_name(e.short.as_bytes()).is_err())
        .map(|e| format!("{}/{} {:?}", e.dir, e.short, e.long))
        .collect();
    if !bad.is_empty() {
        bail!(
            "expected only upper-case 8.3 names without long names on the stick, mdir ({}) shows:\n{}",
            saved.display(),
            bad.join("\n")
        );
    }
    // Not vacuous: the hostile names and the store must be among what was checked.
    let store = entries.iter().any(|e| e.short == "PERSHOME.DB");
    let in_hostile = entries
        .iter()
        .filter(|e| e.dir.ends_with("/HOSTILE") || e.dir.ends_with("/hostile"))
        .count();
    if !store || in_hostile < names::hostile_examples().len() {
        bail!(
            "mdir ({}) should list PERSHOME.DB and every hostile name: store found {store}, {in_hostile} entries in HOSTILE",
            saved.display()
        );
    }
    Ok(entries.len())
}

/// Copy `pershome/` out with mtools (the names as the disk holds them) and run the strict 8.3
/// FAT audit of the project on the copy. Returns how many entries the copy holds.
fn audit_copy(ctx: &Ctx, image: &std::path::Path) -> Result<usize> {
    let img = stick::mtools_image(image);
    let dest = ctx.run_dir.join("stick-copy");
    if dest.exists() {
        std::fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    let sh = &ctx.sh;
    cmd!(sh, "mcopy -s -p -n -i {img} ::/PERSHOME {dest}")
        .env("MTOOLS_SKIP_CHECK", "1")
        .quiet()
        .run()
        .context("copying pershome/ off the stick with mcopy -s")?;
    let copied = std::fs::read_dir(&dest)
        .with_context(|| format!("listing {}", dest.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .next()
        .with_context(|| format!("mcopy left nothing in {}", dest.display()))?;
    let problems = pershome::audit::audit_tree_in(&copied, NameMode::Short83)
        .with_context(|| format!("auditing {}", copied.display()))?;
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        bail!(
            "the 8.3 FAT audit of the stick's pershome/ (copied out by mcopy) found:\n{}",
            list.join("\n")
        );
    }
    let count = walk_count(&copied)?;
    std::fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    Ok(count)
}

fn walk_count(dir: &std::path::Path) -> Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        count += 1;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            count += walk_count(&entry.path())?;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mdir_entries_and_their_long_names() {
        // mdir's own output (mtools 4.0.33) for a small stick.
        let listing = [
            " Volume in drive : is PERSHOME   ",
            " Volume Serial Number is 834D-2C87",
            "Directory for ::/pershome",
            "",
            ".            <DIR>     2026-11-26  10:21 ",
            "REPORT   TXT         3 2026-11-26  10:21 ",
            "LONGNA~1 TXT         3 2026-11-26  10:21  Long name here.txt",
            "abc      txt         3 2026-11-26  10:21 ",
            "PERSHOME DB  <DIR>     2026-11-26  10:21 ",
            "        6 files                   9 bytes",
            "",
            "Total files listed:",
        ]
        .join("\n");
        let got = parse_mdir(&listing).expect("parse");
        let want = vec![
            ("REPORT.TXT", ""),
            ("LONGNA~1.TXT", "Long name here.txt"),
            ("abc.txt", ""),
            ("PERSHOME.DB", ""),
        ];
        let got_pairs: Vec<(&str, &str)> = got
            .iter()
            .map(|e| (e.short.as_str(), e.long.as_str()))
            .collect();
        assert_eq!(got_pairs, want, "expected the four entries, got {got:?}");
        assert!(got.iter().all(|e| e.dir == "::/pershome"), "dir: {got:?}");
    }

    #[test]
    fn octal_escapes_every_byte() {
        assert_eq!(octal(b"a\n\xff"), "\\141\\012\\377", "octal escapes");
        assert_eq!(unhex("61000aff").expect("hex"), b"a\0\n\xff", "unhex");
        assert!(unhex("abc").is_err(), "odd length must fail");
    }
}
