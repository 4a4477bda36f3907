//! Scenarios 1, 2 and 4: logins through the guest's real PAM stack (`login` service:
//! pam_unix with joseph's password, then the session stack with pam_exec running
//! `pershome-config session`). The image has the project's package installed and configured
//! as the admin guide says (`pershome-config add-user joseph`, `pershome-config pam --install`,
//! see `image.rs`); each machine only sets joseph's uid and password. Three login programs:
//! Debian's `pamtester` (password on stdin, authenticate, open and close the session: a whole
//! login and logout with the hook's messages), Debian's own `login(1)` on a pseudo-terminal
//! driven by `vm-tty-login` (the password typed at its prompt, a command in the login shell,
//! `exit`: what a person at a text console sees), and `vm-pam-login`, which runs the
//! scenario's commands as joseph in his session, reporting every message PAM sent to the
//! person.
//!
//! 1. The student's day: machine A (joseph is uid 1000) writes a report and a project with
//!    names FAT forbids, `Makefile` beside `makefile`, a symlink, a hard link, a fifo, an
//!    executable, an xattr, nanosecond times; the host checks the stick with `fsck.fat -n` and
//!    reads the report with mtools; machine B (joseph is uid 2001) sees the same tree, edits
//!    the report; the host reads the edit.
//! 2. Edited on Windows: the same, with the host adding, renaming and deleting files on the
//!    stick with mtools between the machines; B sees exactly those changes. A folder `proj`
//!    (modes 0700/0600/0640, xattrs, nested folders, a hard link inside it and one of its
//!    names moved out) is renamed to "Project Files" with `mren`, and a hard-link name moved
//!    out of it with `mmove` (issue 12, defect 3): B sees every mode, xattr and link of it
//!    under the new name, the moved name shows the link's content, and the daemon logged the
//!    match.
//! 4. No stick / unprepared stick: the login goes on in the normal home, and the person is
//!    told why and how to prepare a stick; the unprepared stick is left untouched.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use xshell::cmd;

use crate::guest;
use crate::qemu::{Output, Vm};
use crate::stick::{self, StickFs};
use crate::util::shq;
use crate::Ctx;

const PASSWORD: &str = "correct horse battery staple";
const UID_A: u32 = 1000;
const UID_B: u32 = 2001;

const REPORT_A: &str = "Report, written at the college lab.\n";
const REPORT_EDIT: &str = "Edited at the town library.\n";

/// Joseph's work on machine A, run in his session (the home must be the stick).
const DAY_A: &str = r#"set -e
findmnt -n -o FSTYPE --target "$HOME" | grep -qx fuse.pershomefs
cd "$HOME"
printf 'Report, written at the college lab.\n' > report.txt
mkdir project
printf 'colon\n' > 'project/a:b'
printf 'question\n' > 'project/why?'
printf 'all:\n\techo upper\n' > project/Makefile
printf 'all:\n\techo lower\n' > project/makefile
ln -s ../report.txt project/link
printf 'shared data\n' > project/data
ln project/data project/data-hardlink
mkfifo project/fifo
printf '#!/bin/sh\necho run\n' > project/run.sh
chmod 750 project/run.sh
setfattr -n user.colour -v blue report.txt
printf 'notes\n' > notes.txt
printf 'old\n' > old.txt
touch -h -d '2023-01-02 03:04:05.987654321' project/* project
touch -d '2024-02-29 12:34:56.123456789' report.txt
"#;

/// The folder that Windows renames between the machines (scenario 2, issue 12 defect 3): what
/// pershome alone knows about it (modes, xattrs, a hard link) must follow it.
const PROJ_A: &str = r#"set -e
cd "$HOME"
mkdir -m 700 proj proj/src proj/src/deep
printf 'my notes\n' > proj/notes.txt
chmod 600 proj/notes.txt
setfattr -n user.tag -v blue proj/notes.txt
setfattr -n user.dir -v yes proj/src
printf 'fn main() {}\n' > proj/src/main.rs
chmod 640 proj/src/main.rs
printf '42\n' > proj/src/deep/secret
chmod 600 proj/src/deep/secret
printf 'shared content\n' > proj/data.bin
chmod 600 proj/data.bin
ln proj/data.bin proj/src/data-link
ln proj/data.bin proj/far-link
"#;

/// What must read the same in `proj` on A and in "Project Files" on B (run in the folder;
/// `far-link` is left out: Windows moves it elsewhere).
const PROJ_DESCRIBE: &str = r#"set -e
stat -c '%n %F %a %U %h %s' . notes.txt data.bin src src/main.rs src/data-link src/deep src/deep/secret
getfattr --only-values -n user.tag notes.txt || printf 'no user.tag'; echo
getfattr --only-values -n user.dir src || printf 'no user.dir'; echo
cat src/data-link src/deep/secret
"#;

/// What must read the same on machine B (owner by name: the uid differs on purpose).
const DESCRIBE: &str = r#"set -e
cd "$HOME"
stat -c '%n %F %a %U:%G %h %s %y' report.txt project project/* | LC_ALL=C sort
readlink project/link
cat 'project/a:b' 'project/why?' project/Makefile project/makefile project/data-hardlink report.txt
getfattr --only-values -n user.colour report.txt; echo
project/run.sh
"#;

/// Boot-time set-up of a machine: joseph's uid (machine B's account database differs) and
/// password. The pershome set-up itself is the image's (the package, `add-user`,
/// `pam --install`); it is checked here as an administrator would, with `list` and `doctor`.
fn setup_machine(vm: &mut Vm, uid: u32, hash: &str) -> Result<()> {
    let mut script = String::from("set -e\n");
    if uid != UID_A {
        // The same person, another machine's account database (usermod re-owns the home).
        script.push_str(&format!(
            "usermod -u {uid} joseph\ngroupmod -g {uid} joseph\n"
        ));
    }
    script.push_str(&format!("usermod -p {} joseph\n", shq(hash)));
    vm.ok(&script, Duration::from_secs(120))
        .context("setting up the machine (joseph's uid and password)")?;
    let listed = vm.ok("pershome-config list", guest::SHORT)?;
    if !listed.lines().any(|l| l.trim() == "joseph") {
        bail!("expected `pershome-config list` in the image to list joseph, got:\n{listed}");
    }
    let doctor = vm.run("pershome-config doctor 2>&1", guest::SHORT)?;
    if !doctor.ok() {
        bail!(
            "pershome-config doctor is not happy with the image's set-up: {}",
            doctor.describe()
        );
    }
    Ok(())
}

/// A whole login and logout with Debian's pamtester (the password on its stdin: printf is a
/// shell builtin, so it never shows in `ps`). Returns what the person was shown.
fn pamtester_login(vm: &mut Vm) -> Result<String> {
    let out = vm.run(
        &format!(
            "printf '%s\\n' {} | pamtester -v login joseph authenticate acct_mgmt open_session close_session 2>&1",
            shq(PASSWORD)
        ),
        Duration::from_secs(300),
    )?;
    if !out.ok() {
        bail!(
            "pamtester login joseph (authenticate, open and close the session): {}\n--- the hook's log:\n{}",
            out.describe(),
            hook_log(vm)
        );
    }
    Ok(out.response.stdout)
}

/// joseph at a text console: Debian's login(1) on a pty (`vm-tty-login`), `script` run in his
/// login shell, then `exit`. Returns what the terminal showed.
fn tty_login(vm: &mut Vm, script: &str) -> Result<String> {
    let out = vm.run(
        &format!(
            "VM_PAM_PASSWORD={} vm-tty-login joseph -- {} 2>&1",
            shq(PASSWORD),
            shq(script)
        ),
        Duration::from_secs(300),
    )?;
    if !out.ok() {
        bail!(
            "login(1) on a pty as joseph: {}\n--- the hook's log:\n{}",
            out.describe(),
            hook_log(vm)
        );
    }
    Ok(out.response.stdout)
}

/// `shown` (what `program` showed the person) must contain `needle`.
fn expect_shown(vm: &mut Vm, program: &str, shown: &str, needle: &str) -> Result<()> {
    if !shown.contains(needle) {
        bail!(
            "expected {program} to show the user {needle:?}; it showed:\n{shown}\n--- the hook's log:\n{}",
            hook_log(vm)
        );
    }
    Ok(())
}

/// Log joseph in with his password, run `script` in his session, log out.
fn login(vm: &mut Vm, script: &str) -> Result<Output> {
    vm.run(
        &format!(
            "VM_PAM_PASSWORD={} vm-pam-login joseph -- /bin/sh -c {}",
            shq(PASSWORD),
            shq(script)
        ),
        Duration::from_secs(300),
    )
}

fn pam_messages(out: &Output) -> String {
    out.response
        .stderr
        .lines()
        .filter(|l| l.starts_with("PAM"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The login hook's and the daemon's log lines of this boot, for failure reports.
fn hook_log(vm: &mut Vm) -> String {
    vm.run(
        "journalctl -b --no-pager -o cat -t pershome-config -t pershomefs | tail -n 30",
        guest::SHORT,
    )
    .map(|o| o.response.stdout)
    .unwrap_or_default()
}

fn expect_message(vm: &mut Vm, out: &Output, needle: &str) -> Result<()> {
    let messages = pam_messages(out);
    if !messages.contains(needle) {
        bail!(
            "expected the login to tell the user {needle:?}; it said:\n{messages}\n--- the hook's log (journalctl -t pershome-config -t pershomefs):\n{}",
            hook_log(vm)
        );
    }
    Ok(())
}

/// After logout: no pershome mount is left (home and stick).
fn expect_logged_out(vm: &mut Vm) -> Result<()> {
    vm.ok(
        "for i in $(seq 300); do grep -qE 'pershome|/run/pershome' /proc/mounts || exit 0; sleep 0.1; done; \
         echo 'still mounted 30 s after logout:' >&2; grep pershome /proc/mounts >&2; exit 1",
        guest::SHORT,
    )
    .context("after logout")
    .map(drop)
}

fn password_hash(ctx: &Ctx) -> Result<String> {
    let sh = &ctx.sh;
    Ok(cmd!(sh, "openssl passwd -6 -salt vmtests {PASSWORD}")
        .quiet()
        .read()
        .context("hashing the test password with openssl")?
        .trim()
        .to_owned())
}

fn read_on_host(ctx: &Ctx, image: &std::path::Path, path: &str) -> Result<String> {
    let sh = &ctx.sh;
    let img = stick::mtools_image(image);
    let file = format!("::/pershome/{path}");
    cmd!(sh, "mtype -i {img} {file}")
        .quiet()
        .read()
        .with_context(|| format!("reading {path} from the stick with mtools"))
        .map(|s| s + "\n")
}

pub fn run_day(ctx: &mut Ctx) -> Result<()> {
    day(ctx, false)
}

pub fn run_windows(ctx: &mut Ctx) -> Result<()> {
    day(ctx, true)
}

fn day(ctx: &mut Ctx, windows: bool) -> Result<()> {
    let hash = password_hash(ctx)?;
    let image = ctx.run_dir.join("stick.img");
    stick::create(&ctx.sh, &image, StickFs::Fat32, 256)?;

    // Machine A: the college lab.
    let mut vm = ctx.boot("machine-a", ctx.kernel, Some(&image))?;
    guest::wait_for_stick(&mut vm)?;
    setup_machine(&mut vm, UID_A, &hash)?;
    let shown = pamtester_login(&mut vm)?;
    for needle in [
        "your home folder is on your stick",
        "you can remove your stick now",
    ] {
        expect_shown(&mut vm, "pamtester", &shown, needle)?;
    }
    expect_logged_out(&mut vm)?;
    ctx.note(
        "machine A: pamtester login + logout (login service): the hook mounted and unmounted"
            .to_owned(),
    );
    let script = if windows {
        format!("{DAY_A}\n{PROJ_A}\n{DESCRIBE}\necho ---\ncd \"$HOME/proj\"\n{PROJ_DESCRIBE}")
    } else {
        format!("{DAY_A}\n{DESCRIBE}")
    };
    let out = login(&mut vm, &script)?;
    if !out.ok() {
        bail!(
            "joseph's session on machine A: {}\n--- the hook's log:\n{}",
            out.describe(),
            hook_log(&mut vm)
        );
    }
    let mut a_parts = out.response.stdout.split("---\n");
    let described_a = a_parts.next().unwrap_or_default().to_owned();
    let proj_a = a_parts.next().unwrap_or_default().to_owned();
    expect_message(&mut vm, &out, "your home folder is on your stick")?;
    expect_message(&mut vm, &out, "you can remove your stick now")?;
    expect_logged_out(&mut vm)?;
    vm.shutdown()?;
    ctx.note("machine A: logged in with the password, home on the stick, logged out".to_owned());

    // The host, as any other computer: the stick is clean FAT, the report a plain file.
    stick::fsck_fat_host(&ctx.sh, &image).context("the stick after machine A")?;
    let report = read_on_host(ctx, &image, "report.txt")?;
    if report.trim_end() != REPORT_A.trim_end() {
        bail!("report.txt read with mtools: expected {REPORT_A:?}, got {report:?}");
    }
    ctx.note("host: fsck.fat -n clean, report.txt readable by mtools with its content".to_owned());
    if windows {
        let sh = &ctx.sh;
        let img = stick::mtools_image(&image);
        cmd!(sh, "mcopy -i {img} - ::/pershome/from-windows.txt")
            .stdin("written on Windows\r\n")
            .quiet()
            .run()
            .context("mcopy of a new file")?;
        // A long new name: mtools stores a name that fits 8.3 as an upper-case short name
        // only (no case flags), which vfat then shows as RENAMED.TXT; Windows itself would
        // keep the case. A long name gets a long-name entry, as on Windows.
        cmd!(
            sh,
            "mren -i {img} ::/pershome/notes.txt ::/pershome/renamed-on-windows.txt"
        )
        .quiet()
        .run()
        .context("mren")?;
        cmd!(sh, "mdel -i {img} ::/pershome/old.txt")
            .quiet()
            .run()
            .context("mdel")?;
        // Issue 12, defect 3: a folder renamed, and a hard link's name moved to another folder.
        let renamed = "::/pershome/Project Files";
        cmd!(sh, "mren -i {img} ::/pershome/proj {renamed}")
            .quiet()
            .run()
            .context("mren of the folder proj")?;
        let far_link = "::/pershome/Project Files/far-link";
        cmd!(sh, "mmove -i {img} {far_link} ::/pershome/moved-link")
            .quiet()
            .run()
            .context("mmove of a hard link's name")?;
        ctx.note(
            "host (as Windows): added from-windows.txt, renamed notes.txt, deleted old.txt, \
             renamed the folder proj to \"Project Files\" (mren), moved the hard-link name \
             proj/far-link to moved-link (mmove)"
                .to_owned(),
        );
    }

    // Machine B: the town library, where joseph has another uid.
    let mut vm = ctx.boot("machine-b", ctx.kernel, Some(&image))?;
    guest::wait_for_stick(&mut vm)?;
    setup_machine(&mut vm, UID_B, &hash)?;
    // At a text console first: login(1) itself, the messages on the terminal.
    let shown = tty_login(
        &mut vm,
        "findmnt -n -o FSTYPE --target \"$HOME\"; head -n 1 \"$HOME/report.txt\"",
    )?;
    for needle in [
        "your home folder is on your stick",
        "fuse.pershomefs",
        REPORT_A.trim_end(),
        "you can remove your stick now",
    ] {
        expect_shown(&mut vm, "login(1) on a pty", &shown, needle)?;
    }
    expect_logged_out(&mut vm)?;
    ctx.note(
        "machine B: login(1) on a pty, password typed: the hook's messages on the terminal, home is pershomefs with the report"
            .to_owned(),
    );
    let edit = format!("printf {} >> \"$HOME/report.txt\"", shq(REPORT_EDIT));
    let windows_check = if windows {
        "cd \"$HOME\"\n\
         fail() { echo \"the Windows edits on B: $*\" >&2; ls -la >&2; exit 1; }\n\
         [ \"$(cat renamed-on-windows.txt 2>&1)\" = notes ] || fail \"renamed-on-windows.txt: $(cat renamed-on-windows.txt 2>&1)\"\n\
         [ ! -e notes.txt ] || fail 'notes.txt is still there'\n\
         [ ! -e old.txt ] || fail 'old.txt is still there'\n\
         printf 'written on Windows\\r\\n' | cmp - from-windows.txt || fail \"from-windows.txt: $(od -c from-windows.txt 2>&1 | head -n 3)\"\n\
         stat -c '%U %a' from-windows.txt renamed-on-windows.txt"
    } else {
        "true"
    };
    // Issue 12, defect 3: the renamed folder as A left it, the moved link with its content,
    // and the daemon's log of the match.
    let proj_b = if windows {
        format!(
            "echo ---\ncd \"$HOME/Project Files\"\n{PROJ_DESCRIBE}\necho ---\n\
             cd \"$HOME\"\ncat moved-link\nstat -c '%h %a' moved-link\n\
             [ ! -e proj ] || {{ echo 'proj is still there' >&2; exit 1; }}"
        )
    } else {
        String::new()
    };
    let out = login(
        &mut vm,
        &format!("{DESCRIBE}\necho ---\n{windows_check}\necho ---\nid -u\n{edit}\n{proj_b}"),
    )?;
    if !out.ok() {
        bail!("joseph's session on machine B: {}", out.describe());
    }
    let mut parts = out.response.stdout.split("---\n");
    let described_b = parts.next().unwrap_or_default();
    if described_b != described_a {
        bail!("machine B sees another tree than machine A wrote:\n--- A\n{described_a}\n--- B\n{described_b}");
    }
    let windows_seen = parts.next().unwrap_or_default().trim().to_owned();
    let uid_b = parts.next().unwrap_or_default().trim().to_owned();
    if uid_b != UID_B.to_string() {
        bail!("expected joseph to be uid {UID_B} on machine B, got {uid_b:?}");
    }
    if windows {
        let proj_b = parts.next().unwrap_or_default();
        if proj_b != proj_a {
            bail!(
                "the folder renamed on Windows lost what pershome knew about it (issue 12, \
                 defect 3):\n--- proj on A\n{proj_a}\n--- \"Project Files\" on B\n{proj_b}\n\
                 --- the daemon's log:\n{}",
                hook_log(&mut vm)
            );
        }
        let moved = parts.next().unwrap_or_default();
        if moved != "shared content\n3 600\n" {
            bail!(
                "the hard-link name moved on Windows (moved-link): expected its content, 3 \
                 links and mode 600, got {moved:?}"
            );
        }
        let logged = vm.ok(
            "journalctl -b --no-pager -o cat -t pershomefs | grep -F 'was renamed to'",
            guest::SHORT,
        )?;
        if !logged.contains("\"proj\" was renamed to \"Project Files\"") {
            bail!("expected the daemon to log the folder it matched, got {logged:?}");
        }
        ctx.note(format!(
            "machine B: \"Project Files\" (renamed from proj on Windows) has proj's modes, \
             xattrs and hard link; the moved link name reads its content; logged: {}",
            logged.trim()
        ));
    }
    if windows {
        for line in windows_seen.lines() {
            if !line.starts_with("joseph ") {
                bail!("a file Windows made or renamed is not joseph's on B: {line:?}");
            }
        }
        ctx.note(format!(
            "machine B: the Windows edits appear (owner, mode: {})",
            windows_seen.replace('\n', "; ")
        ));
    }
    expect_message(&mut vm, &out, "you can remove your stick now")?;
    expect_logged_out(&mut vm)?;
    vm.shutdown()?;
    ctx.note(format!(
        "machine B (uid {UID_B}): same names, owner, modes, ns times, links, xattr; report edited"
    ));
    stick::fsck_fat_host(&ctx.sh, &image).context("the stick after machine B")?;
    let report = read_on_host(ctx, &image, "report.txt")?;
    let want = format!("{REPORT_A}{REPORT_EDIT}");
    if report.trim_end() != want.trim_end() {
        bail!("report.txt after B, read with mtools: expected {want:?}, got {report:?}");
    }
    ctx.note("host: fsck.fat -n clean, the edit made on B is in report.txt".to_owned());
    Ok(())
}

/// What the fallback session checks: the home is the machine's own, and the notice is there.
const FALLBACK_SESSION: &str = r#"set -e
findmnt -n -o FSTYPE --target "$HOME"
cat /run/pershome/joseph/notice
"#;

pub fn run_fallback(ctx: &mut Ctx) -> Result<()> {
    let hash = password_hash(ctx)?;
    let image = ctx.run_dir.join("stick-unprepared.img");
    stick::create_with(&ctx.sh, &image, StickFs::Fat32, 256, false)?;
    let mut vm = ctx.boot("fallback", ctx.kernel, Some(&image))?;
    guest::wait_for_stick(&mut vm)?;
    setup_machine(&mut vm, UID_A, &hash)?;

    // No stick at all.
    vm.unplug_stick()?;
    vm.ok(
        "for i in $(seq 300); do [ -e /dev/disk/by-label/PERSHOME ] || exit 0; sleep 0.1; done; exit 1",
        guest::SHORT,
    )
    .context("waiting for the stick to vanish")?;
    let shown = pamtester_login(&mut vm)?;
    expect_shown(
        &mut vm,
        "pamtester",
        &shown,
        "no USB stick with a pershome folder was found",
    )?;
    ctx.note("no stick: pamtester login + logout told why".to_owned());
    let out = login(&mut vm, FALLBACK_SESSION)?;
    if !out.ok() {
        bail!(
            "the fallback session without a stick failed: {}",
            out.describe()
        );
    }
    let fstype = out
        .response
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if fstype != "ext4" {
        bail!("without a stick the home should be the machine's own (ext4), got {fstype:?}");
    }
    expect_message(
        &mut vm,
        &out,
        "no USB stick with a pershome folder was found",
    )?;
    expect_message(&mut vm, &out, "normal home folder")?;
    ctx.note(format!(
        "no stick: normal home (ext4), told: {:?}",
        pam_messages(&out)
            .lines()
            .find(|l| l.contains("pershome:"))
            .unwrap_or_default()
    ));

    // A stick that was never prepared.
    vm.replug_stick()?;
    guest::wait_for_stick(&mut vm)?;
    let out = login(&mut vm, FALLBACK_SESSION)?;
    if !out.ok() {
        bail!(
            "the fallback session with an unprepared stick failed: {}",
            out.describe()
        );
    }
    let fstype = out
        .response
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if fstype != "ext4" {
        bail!(
            "with an unprepared stick the home should be the machine's own (ext4), got {fstype:?}"
        );
    }
    expect_message(&mut vm, &out, "has no folder named \"pershome\"")?;
    expect_message(&mut vm, &out, "pershome prepare")?;
    ctx.note("unprepared stick: normal home, told why and to run `pershome prepare`".to_owned());
    expect_logged_out(&mut vm)?;
    vm.shutdown()?;

    // The hook looked at the stick but changed nothing on it.
    let sh = &ctx.sh;
    let img = stick::mtools_image(&image);
    let listing = cmd!(sh, "mdir -b -i {img} ::/")
        .quiet()
        .ignore_status()
        .read()
        .unwrap_or_default();
    if !listing.trim().is_empty() {
        bail!("the unprepared stick should still be empty, mdir shows:\n{listing}");
    }
    stick::fsck_fat_host(&ctx.sh, &image).context("the unprepared stick afterwards")?;
    ctx.note("the unprepared stick is untouched (empty, fsck.fat clean)".to_owned());
    Ok(())
}
