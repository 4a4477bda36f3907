//! Scenario 12, the kernel's vfat as a student's stick meets it (issue 12, defects 1 and 2).
//!
//! **8.3 aliases.** vfat also finds a file by its 8.3 alias: "Quarterly Report.odt" answers to
//! `quarte~1.odt`, a name no listing shows. Files with long names are made on the raw stick
//! first (as Windows would), then pershomefs renames, creates, symlinks, links and makes
//! folders onto their aliases, in long-name mode and with `-o names=8.3` (whose own
//! `NAME~N.EXT` names can be a Windows file's alias). Every operation must succeed, give the
//! new name its content, leave every original with its bytes (also after a remount), and the
//! daemon must log each clash it resolved.
//!
//! **Rename durability.** vfat writes a renamed file's new directory entry with start cluster
//! 0 and size 0 and fills it in only when the file's inode is written back, so an fsync of
//! the directory does not make a rename durable. The stick is served through nbdkit's
//! write-back cache (as in `powercut`); the guest's periodic writeback is turned off, so only
//! what is explicitly synced reaches the stick. The editor's safe save (write a temporary
//! file, fsync it, `mv` it over the document, fsync the folder), a plain `mv` and an `mv` over
//! a durable file are made on raw vfat and through pershomefs; then nbdkit and QEMU get
//! SIGKILL. After the next boot pershome must have kept all three; what raw vfat kept is
//! reported (and a control file written without fsync must be gone, or the cut proved
//! nothing).
//!
//! Failures are gathered, not stopped at: one run reports every broken case.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::powercut::Nbdkit;
use crate::guest;
use crate::stick::{self, StickFs};
use crate::util::shq;
use crate::Ctx;

/// Where each mode's pershomefs is mounted, and its backing on the stick.
const LONG_MNT: &str = "/mnt/long";
const SHORT_MNT: &str = "/mnt/short";
const SHORT_BACKING: &str = "/media/stick/p83";
/// Raw vfat's half of the durability comparison, beside `pershome/` on the stick.
const RAW_DUR: &str = "/media/stick/rawdur";

/// Shell helpers every guest script starts with: `fail` records a broken case (printed as a
/// `FAIL:` line), `is FILE CONTENT WHAT` checks a file's bytes, `run WHAT CMD…` runs a command
/// that must succeed. The script ends with `finish`, whose status says whether all held.
const HELPERS: &str = r#"
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
is() { got=$(cat "$1" 2>&1); [ "$got" = "$2" ] || fail "$3: $1 holds '$got', expected '$2'"; }
run() { what=$1; shift; out=$("$@" 2>&1) || fail "$what: '$*' failed: $out"; }
finish() { [ "$fails" -eq 0 ]; }
"#;

/// The Windows-made files (long names, so each gets an alias from the kernel) in `al/` of
/// the long-mode backing, and the aliases the kernel's vfat answers to, as found.
const MAKE_LONG: &str = r#"
R=/media/stick/pershome/al
mkdir -p "$R"
printf AAA > "$R/Quarterly Report.odt"
mkdir "$R/Quarterly Reports"
printf CCC > "$R/Summary Notes.txt"
printf DDD > "$R/Holiday Photos.txt"
printf EEE > "$R/Meeting Minutes.txt"
printf FFF > "$R/Travel Plans.txt"
printf GGG > "$R/Budget Forecast.txt"
P=/media/stick/p83
mkdir -p "$P"
printf MMM > "$P/Makefile.backup-old"
printf NNN > "$P/Notes from class.txt"
sync
# What the kernel's vfat does with the aliases (recorded in docs/testing.md).
is "$R/quarte~1.odt" AAA "kernel vfat: the alias of 'Quarterly Report.odt'"
[ -d "$R/quarte~1" ] || fail "kernel vfat: 'Quarterly Reports' is not found as quarte~1"
is "$P/makefi~1.bac" MMM "kernel vfat: the alias of 'Makefile.backup-old'"
is "$P/notesf~1.txt" NNN "kernel vfat: the alias of 'Notes from class.txt'"
# renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) onto an alias, then onto a free
# name (perl-base is in every Debian; 316 is renameat2 on x86_64).
printf x > "$R/probe"
noreplace() { perl -e '$r = syscall(316, -100, $ARGV[0], -100, $ARGV[1], 1); print $r == 0 ? "ok\n" : "$!\n"' "$1" "$2"; }
echo "kernel vfat: RENAME_NOREPLACE onto an alias: $(noreplace "$R/probe" "$R/summar~1.txt")"
echo "kernel vfat: RENAME_NOREPLACE onto a free name: $(noreplace "$R/probe" "$R/probe2")"
rm -f "$R/probe" "$R/probe2"
is "$R/Summary Notes.txt" CCC "kernel vfat: after RENAME_NOREPLACE onto its alias"
sync
"#;

/// Through pershomefs in long-name mode, onto the aliases of `MAKE_LONG`'s files.
const OPS_LONG: &str = r#"
M=/mnt/long/al
ls "$M" >/dev/null
printf BBB > /mnt/long/x
run "mv onto an alias" mv /mnt/long/x "$M/quarte~1.odt"
is "$M/quarte~1.odt" BBB "mv onto an alias, through pershome"
mkdir /mnt/long/d
run "mv of a folder onto a folder's alias" mv /mnt/long/d "$M/quarte~1"
run "ln -s onto an alias" ln -s target "$M/summar~1.txt"
[ "$(readlink "$M/summar~1.txt")" = target ] || fail "ln -s onto an alias: reads '$(readlink "$M/summar~1.txt")'"
run "touch onto an alias" touch "$M/holida~1.txt"
run "cp onto an alias" cp /etc/hostname "$M/meetin~1.txt"
cmp -s /etc/hostname "$M/meetin~1.txt" || fail "cp onto an alias: content differs"
run "mkdir onto an alias" mkdir "$M/travel~1.txt"
printf HHH > /mnt/long/h
run "ln onto an alias" ln /mnt/long/h "$M/budget~1.txt"
is /mnt/long/h HHH "the source of ln onto an alias"
is "$M/budget~1.txt" HHH "ln onto an alias, the new name"
"#;

/// Through pershomefs with `-o names=8.3`, onto names whose generated `NAME~1.EXT` is a
/// Windows file's alias.
const OPS_SHORT: &str = r#"
S=/mnt/short
ls "$S" >/dev/null
printf YYY > "$S/y"
run "names=8.3: mv onto a name whose 8.3 form is an alias" mv "$S/y" "$S/Makefile.backup"
is "$S/Makefile.backup" YYY "names=8.3: mv"
run "names=8.3: touch" touch "$S/Notes for exam.txt"
run "names=8.3: ln -s" ln -s t "$S/Notes for link.txt"
printf HHH > "$S/h"
run "names=8.3: ln" ln "$S/h" "$S/Notes for hard.txt"
is "$S/h" HHH "names=8.3: the source of ln"
run "names=8.3: mkdir" mkdir "$S/Notes for dirs.txt"
"#;

/// What must hold after the operations, and again after a remount and after the power cut:
/// every original keeps its content, and pershome's names read back.
const CHECK_ALIASES: &str = r#"
R=/media/stick/pershome/al
P=/media/stick/p83
is "$R/Quarterly Report.odt" AAA "original 'Quarterly Report.odt'"
[ -d "$R/Quarterly Reports" ] && [ -z "$(ls -A "$R/Quarterly Reports")" ] || fail "original 'Quarterly Reports' is not an empty folder any more"
is "$R/Summary Notes.txt" CCC "original 'Summary Notes.txt'"
is "$R/Holiday Photos.txt" DDD "original 'Holiday Photos.txt'"
is "$R/Meeting Minutes.txt" EEE "original 'Meeting Minutes.txt'"
is "$R/Travel Plans.txt" FFF "original 'Travel Plans.txt'"
is "$R/Budget Forecast.txt" GGG "original 'Budget Forecast.txt'"
is "$P/Makefile.backup-old" MMM "original 'Makefile.backup-old' (names=8.3)"
is "$P/Notes from class.txt" NNN "original 'Notes from class.txt' (names=8.3)"
if mountpoint -q /mnt/long; then
    M=/mnt/long/al
    is "$M/quarte~1.odt" BBB "pershome's quarte~1.odt"
    [ -d "$M/quarte~1" ] || fail "pershome's folder quarte~1 is missing"
    [ "$(readlink "$M/summar~1.txt")" = target ] || fail "pershome's symlink summar~1.txt"
    [ -f "$M/holida~1.txt" ] || fail "pershome's holida~1.txt is missing"
    cmp -s /etc/hostname "$M/meetin~1.txt" || fail "pershome's meetin~1.txt"
    [ -d "$M/travel~1.txt" ] || fail "pershome's folder travel~1.txt is missing"
    is "$M/budget~1.txt" HHH "pershome's hard link budget~1.txt"
    is /mnt/long/h HHH "pershome's h"
fi
if mountpoint -q /mnt/short; then
    S=/mnt/short
    is "$S/Makefile.backup" YYY "names=8.3: pershome's Makefile.backup"
    [ -f "$S/Notes for exam.txt" ] || fail "names=8.3: 'Notes for exam.txt' is missing"
    [ "$(readlink "$S/Notes for link.txt")" = t ] || fail "names=8.3: the symlink"
    is "$S/Notes for hard.txt" HHH "names=8.3: the hard link"
    [ -d "$S/Notes for dirs.txt" ] || fail "names=8.3: the folder is missing"
fi
"#;

/// The durability workload's starting point in the folder `$1`: four files, made durable by
/// the `sync` that follows for both folders at once. No global `sync` may come after it: it
/// would write every dirty inode, and so complete the other folder's renames.
const DURABILITY_SETUP: &str = r#"
D=$1
mkdir -p "$D"
printf 'version 1' > "$D/doc.odt"
printf 'moved plainly' > "$D/plain.txt"
printf 'was durable' > "$D/durable.txt"
printf 'goes over the durable one' > "$D/over.txt"
"#;

/// The renames, in the folder `$1` (raw vfat or through pershomefs), each followed by an
/// fsync of the folder (coreutils `sync DIR`).
const DURABILITY: &str = r#"
D=$1
# The editor's safe save.
printf 'version 2' > "$D/.doc.odt.tmp"
sync "$D/.doc.odt.tmp"
mv "$D/.doc.odt.tmp" "$D/doc.odt"
sync "$D"
# A plain mv.
mv "$D/plain.txt" "$D/plain moved.txt"
sync "$D"
# mv over a durable file.
mv "$D/over.txt" "$D/durable.txt"
sync "$D"
"#;

/// After the cut: each case as `NAME: content` (or `NAME: absent`), for the folder `$1`.
const DURABILITY_SHOW: &str = r#"
D=$1
for f in doc.odt "plain moved.txt" durable.txt; do
    if [ -e "$D/$f" ]; then echo "$f: $(cat "$D/$f")"; else echo "$f: absent"; fi
done
"#;

/// The price of the alternative to syncing renamed files: the stick mounted `dirsync`, which
/// makes every directory change (and vfat's renamed inode) synchronous. The same small
/// workload through pershomefs (100 files created, each renamed, then `sync`), on the stick
/// mounted as the login hook does and then also `dirsync`; prints the sectors the stick's
/// partition received and the milliseconds it took. `$1` is the partition, `$2` the options.
const DIRSYNC_COST: &str = r#"
part=$(basename "$1")
for mode in plain dirsync; do
    opts=$2
    [ $mode = dirsync ] && opts=$opts,dirsync
    mount -t vfat -o "$opts" "$1" /media/stick
    mkdir -p /mnt/cost
    pershomefs /media/stick/pershome /mnt/cost
    s0=$(awk '{print $7}' /sys/class/block/$part/stat); t0=$(date +%s%N)
    mkdir /mnt/cost/w-$mode
    i=0; while [ $i -lt 100 ]; do i=$((i + 1)); echo "file $i" > /mnt/cost/w-$mode/f$i; done
    i=0; while [ $i -lt 100 ]; do i=$((i + 1)); mv /mnt/cost/w-$mode/f$i /mnt/cost/w-$mode/g$i; done
    sync /mnt/cost/w-$mode
    umount /mnt/cost
    while pgrep -x pershomefs >/dev/null; do sleep 0.1; done
    s1=$(awk '{print $7}' /sys/class/block/$part/stat); t1=$(date +%s%N)
    echo "$mode: $((s1 - s0)) sectors written, $(( (t1 - t0) / 1000000 )) ms"
    umount /media/stick
done
"#;

const EXPECTED: &[(&str, &str)] = &[
    ("doc.odt", "version 2"),
    ("plain moved.txt", "moved plainly"),
    ("durable.txt", "goes over the durable one"),
];

/// Runs a script (after `HELPERS`) with `args`; returns its output and adds every `FAIL:`
/// line to `fails`.
fn phase(
    vm: &mut crate::qemu::Vm,
    what: &str,
    script: &str,
    args: &str,
    fails: &mut Vec<String>,
) -> Result<String> {
    let full = format!("{HELPERS}\n{script}\nfinish");
    let out = vm.run(
        &format!("sh -c {} sh {args} 2>&1", shq(&full)),
        Duration::from_secs(300),
    )?;
    let text = out.response.stdout.clone();
    let found: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL: "))
        .map(|l| format!("{what}: {l}"))
        .collect();
    if !out.ok() && found.is_empty() {
        fails.push(format!("{what}: {}", out.describe()));
    }
    fails.extend(found);
    Ok(text)
}

/// The count of clash messages in the guest's journal (the daemon logs to syslog).
fn clashes_logged(vm: &mut crate::qemu::Vm) -> Result<usize> {
    let out = vm.ok(
        "journalctl -b --no-pager -o cat 2>/dev/null | grep -c 'clash resolved' || true",
        guest::SHORT,
    )?;
    Ok(out.trim().parse().unwrap_or(0))
}

/// Unmount both homes, then wait for both daemons to finish their last commit.
fn unmount_both(vm: &mut crate::qemu::Vm) -> Result<()> {
    vm.ok(
        &format!(
            "set -e; umount {SHORT_MNT}; umount {LONG_MNT}; \
             for i in $(seq 600); do pgrep -x pershomefs >/dev/null || exit 0; sleep 0.1; done; \
             echo 'pershomefs still running 60 s after unmount' >&2; exit 1"
        ),
        Duration::from_secs(90),
    )
    .context("unmounting both pershomefs mounts")
    .map(drop)
}

fn mount_short(vm: &mut crate::qemu::Vm) -> Result<()> {
    vm.ok(
        &format!(
            "set -e; mkdir -p {SHORT_MNT} {SHORT_BACKING}; \
             pershomefs {SHORT_BACKING} {SHORT_MNT} -o names=8.3; \
             grep -q ' {SHORT_MNT} fuse.pershomefs ' /proc/mounts"
        ),
        guest::SHORT,
    )
    .context("mounting pershomefs -o names=8.3")
    .map(drop)
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let image = ctx.run_dir.join("stick-vfat.img");
    stick::create(&ctx.sh, &image, StickFs::Fat32, 128)?;
    let mut fails: Vec<String> = Vec::new();

    // Boot 1: the aliases, then the durability workload and the power cut.
    let mut nbd = Nbdkit::start(&image, &ctx.run_dir, 0)?;
    let socket = nbd.socket.clone();
    let mut vm = ctx.boot_nbd("vfat-0", ctx.kernel, &socket)?;
    let device = guest::wait_for_stick(&mut vm)?;
    guest::mount_stick(&mut vm, &device, StickFs::Fat32)?;
    let found = phase(&mut vm, "raw stick", MAKE_LONG, "", &mut fails)?;
    for line in found.lines().filter(|l| l.starts_with("kernel vfat:")) {
        ctx.note(line.to_owned());
    }
    guest::mount_home(&mut vm, LONG_MNT, "allow_other")?;
    mount_short(&mut vm)?;
    phase(&mut vm, "long names", OPS_LONG, "", &mut fails)?;
    phase(&mut vm, "names=8.3", OPS_SHORT, "", &mut fails)?;
    phase(
        &mut vm,
        "after the operations",
        CHECK_ALIASES,
        "",
        &mut fails,
    )?;
    let logged = clashes_logged(&mut vm)?;
    // Seven clashes in long mode, at least five in 8.3 mode (one per operation).
    if logged < 12 {
        fails.push(format!(
            "the daemon logged {logged} resolved clashes, expected at least 12 (one per \
             operation onto an alias)"
        ));
    }
    ctx.note(format!("the daemons logged {logged} resolved clashes"));
    unmount_both(&mut vm)?;
    guest::mount_home(&mut vm, LONG_MNT, "allow_other")?;
    mount_short(&mut vm)?;
    phase(&mut vm, "after a remount", CHECK_ALIASES, "", &mut fails)?;

    // Only explicit syncs reach the stick from here: no periodic writeback.
    vm.ok(
        "echo 0 > /proc/sys/vm/dirty_writeback_centisecs; \
         echo 360000 > /proc/sys/vm/dirty_expire_centisecs",
        guest::SHORT,
    )?;
    let home_dur = format!("{LONG_MNT}/dur");
    for dir in [RAW_DUR, home_dur.as_str()] {
        phase(
            &mut vm,
            "durability set-up",
            DURABILITY_SETUP,
            dir,
            &mut fails,
        )?;
    }
    vm.ok("sync", guest::SHORT)?;
    phase(
        &mut vm,
        "raw vfat durability",
        DURABILITY,
        RAW_DUR,
        &mut fails,
    )?;
    phase(
        &mut vm,
        "pershome durability",
        DURABILITY,
        &home_dur,
        &mut fails,
    )?;
    let control = vm.ok(
        &format!(
            "pkill -STOP -x pershomefs; \
             dd if=/dev/urandom of={mnt}/control bs=64k count=1 status=none && \
             sha256sum < {mnt}/control",
            mnt = guest::STICK_MNT
        ),
        guest::SHORT,
    )?;
    let control = control.split_whitespace().next().unwrap_or("").to_owned();
    // The power cut: the cache first, then the machine.
    nbd.kill();
    drop(vm);
    drop(nbd);

    // Boot 2: what the stick kept.
    let mut nbd = Nbdkit::start(&image, &ctx.run_dir, 1)?;
    let socket = nbd.socket.clone();
    let mut vm = ctx.boot_nbd("vfat-1", ctx.kernel, &socket)?;
    let device = guest::wait_for_stick(&mut vm)?;
    let fsck = vm.run(
        &format!("fsck.vfat -a {device} 2>&1"),
        Duration::from_secs(300),
    )?;
    ctx.note(format!(
        "after the cut: fsck.vfat -a exit {:?}: {}",
        fsck.response.code,
        fsck.response.stdout.trim().replace('\n', " | ")
    ));
    guest::mount_stick(&mut vm, &device, StickFs::Fat32)?;
    let survived = vm.ok(
        &format!(
            "if [ -e {m}/control ]; then sha256sum < {m}/control; else echo absent; fi",
            m = guest::STICK_MNT
        ),
        guest::SHORT,
    )?;
    if survived.split_whitespace().next() == Some(control.as_str()) {
        bail!(
            "the control file written without fsync survived the cut: the write-back cache \
             did not lose unflushed writes, so this scenario proves nothing"
        );
    }
    let check = vm.run(
        &format!("pershome fsck {} 2>&1", guest::BACKING),
        Duration::from_secs(300),
    )?;
    if !check.ok() {
        let repair = vm.run(
            &format!("pershome fsck --repair {} 2>&1", guest::BACKING),
            Duration::from_secs(300),
        )?;
        ctx.note(format!(
            "after the cut: pershome fsck: {} | repair: {}",
            check.response.stdout.trim().replace('\n', " | "),
            repair.response.stdout.trim().replace('\n', " | ")
        ));
    }
    let raw = phase(
        &mut vm,
        "raw after the cut",
        DURABILITY_SHOW,
        RAW_DUR,
        &mut fails,
    )?;
    ctx.note(format!(
        "raw vfat after the cut (each renamed, then its folder fsync'ed): {}",
        raw.trim().replace('\n', "; ")
    ));
    // The control for vfat's quirk: raw vfat must have lost what it renamed (else the cut
    // did not test what pershome must do better than raw vfat).
    if EXPECTED
        .iter()
        .all(|(name, want)| raw.lines().any(|l| l == format!("{name}: {want}")))
    {
        fails.push(
            "raw vfat kept every rename across the cut: the scenario did not reproduce vfat's \
             half-written rename, so pershome's result proves nothing"
                .to_owned(),
        );
    }
    guest::mount_home(&mut vm, LONG_MNT, "allow_other")?;
    mount_short(&mut vm)?;
    let kept = phase(
        &mut vm,
        "pershome after the cut",
        DURABILITY_SHOW,
        &home_dur,
        &mut fails,
    )?;
    ctx.note(format!(
        "pershome after the cut (each renamed, then its folder fsync'ed): {}",
        kept.trim().replace('\n', "; ")
    ));
    for (name, want) in EXPECTED {
        let line = format!("{name}: {want}");
        if !kept.lines().any(|l| l == line) {
            fails.push(format!(
                "pershome after the cut: expected \"{line}\" (renamed, then the folder \
                 fsync'ed: must be durable)"
            ));
        }
    }
    phase(&mut vm, "after the cut", CHECK_ALIASES, "", &mut fails)?;
    unmount_both(&mut vm)?;
    // The last checks report their failure together with the gathered ones.
    let end = (|| -> Result<()> {
        // The Windows-made long names cannot be in an 8.3 folder (fsck rightly says so): they go
        // before the store is checked.
        vm.ok(
            &format!(
                "rm '{SHORT_BACKING}/Makefile.backup-old' '{SHORT_BACKING}/Notes from class.txt'"
            ),
            guest::SHORT,
        )?;
        vm.ok(
            &format!(
                "pershome fsck {} 2>&1 && pershome fsck {SHORT_BACKING} 2>&1",
                guest::BACKING
            ),
            Duration::from_secs(300),
        )
        .context("pershome fsck at the end")?;
        vm.ok(&format!("umount {}", guest::STICK_MNT), guest::SHORT)?;
        let cost = vm.ok(
            &format!(
                "sh -c {} sh {} {} 2>&1",
                shq(DIRSYNC_COST),
                shq(&device),
                shq(guest::stick_options(StickFs::Fat32))
            ),
            Duration::from_secs(600),
        )?;
        ctx.note(format!(
            "100 creates + 100 renames + sync through pershomefs, stick mounted as the hook does \
             vs also dirsync: {}",
            cost.trim().replace('\n', "; ")
        ));
        vm.ok(
            &format!("fsck.vfat -n {device} 2>&1"),
            Duration::from_secs(300),
        )
        .context("fsck.vfat -n at the end")?;
        Ok(())
    })();
    if let Err(e) = end {
        fails.push(format!("{e:#}"));
    } else {
        vm.shutdown()?;
    }
    nbd.kill();
    if !fails.is_empty() {
        bail!("{} broken case(s):\n  {}", fails.len(), fails.join("\n  "));
    }
    Ok(())
}
