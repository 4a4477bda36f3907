//! `doctor`'s LTSP checks (see `crate::ltsp`): on a server, what the clients got (pamltsp.conf's
//! block, `ltsp initrd` and `ltsp image` newer than what changed, remote sessions skipped); on
//! a client, the PAM order beside pamltsp, pamltsp's state for each listed user, and the
//! options of the sticks mounted for stick homes.
//!
//! Like the rest of doctor it only reads, and it runs no program.

use std::path::Path;

use super::{ok, pam_lines, problem, Check};
use crate::ltsp::{self, Role};
use crate::sysconfig::{RemoteSessions, SystemConfig};

/// The LTSP checks for the system under `root` (none where there is no LTSP).
pub(super) fn checks(
    root: &Path,
    cfg: Option<&SystemConfig>,
    users: Option<&[String]>,
) -> Vec<Check> {
    match ltsp::role(root) {
        Role::None => Vec::new(),
        Role::Server => server(root, cfg),
        Role::Client => client(root, users.unwrap_or_default()),
    }
}

fn block_check(root: &Path, fix: &str) -> Check {
    let path = root.join(ltsp::PAMLTSP_CONF);
    match std::fs::read_to_string(&path) {
        Ok(text) if ltsp::has_block(&text) => ok(
            "pamltsp.conf",
            format!("{} has pershome's SSHFS block", path.display()),
        ),
        Ok(_) => problem(
            "pamltsp.conf",
            format!(
                "{} lacks pershome's block: pamltsp would mount the server home over SSHFS \
                 for stick users too",
                path.display()
            ),
            fix,
        ),
        Err(e) => problem("pamltsp.conf", format!("{}: {e}", path.display()), fix),
    }
}

fn server(root: &Path, cfg: Option<&SystemConfig>) -> Vec<Check> {
    let mut out = vec![
        ok(
            "LTSP",
            "this is an LTSP server (ltsp is installed; not booted as a client)",
        ),
        block_check(
            root,
            "run `pershome-config ltsp setup`, then `ltsp initrd`, and reboot the clients",
        ),
    ];
    if cfg.is_some_and(|c| c.remote_sessions == RemoteSessions::Open) {
        out.push(problem(
            "remote sessions",
            "remote_sessions = \"open\": the hook also runs in the ssh sessions pamltsp opens \
             on this server for every client login",
            "set remote_sessions = \"skip\" (the default) in /etc/pershome/config.toml, then \
             `ltsp image /`",
        ));
    } else {
        out.push(ok(
            "remote sessions",
            "skipped: pamltsp's ssh sessions on this server never run the hook",
        ));
    }
    out.push(match ltsp::initrd_current(root) {
        Ok(t) => ok("ltsp initrd", t),
        Err(t) => problem("ltsp initrd", t, "ltsp initrd && reboot the clients"),
    });
    out.push(match ltsp::image_current(root) {
        Ok(t) => ok("ltsp image", t),
        Err(t) => problem(
            "ltsp image",
            t,
            "ltsp image / (chrootless) or ltsp image NAME; then ltsp initrd and reboot the clients",
        ),
    });
    out
}

fn client(root: &Path, users: &[String]) -> Vec<Check> {
    let mut out = vec![ok("LTSP", "this is an LTSP client (booted by ltsp init)")];
    let auth = pam_lines(root, "common-auth");
    if auth
        .iter()
        .any(|l| l.contains("pamltsp") && l.contains("pam_auth"))
    {
        out.push(ok("pamltsp", "pamltsp checks passwords in common-auth"));
    } else {
        out.push(problem(
            "pamltsp",
            "pamltsp is not in /etc/pam.d/common-auth: client logins are not checked against \
             the server",
            "check PAM_AUTH_TYPE in /etc/ltsp/ltsp.conf (not 0), `ltsp initrd`, reboot",
        ));
    }
    let session = pam_lines(root, "common-session");
    let ours = session
        .iter()
        .position(|l| l.contains("pam_exec.so") && l.contains("pershome-config"));
    let theirs = session
        .iter()
        .position(|l| l.contains("pamltsp") && l.contains("pam_session"));
    out.push(match (ours, theirs) {
        (Some(a), Some(b)) if a < b => ok(
            "PAM order",
            "pershome's session hook runs before pamltsp's session line",
        ),
        (Some(_), Some(_)) => problem(
            "PAM order",
            "pamltsp's session line comes before pershome's in common-session: an autologin \
             could get the SSHFS home before the stick home is mounted",
            "pershome-config pam --install (its profile has a higher priority than pamltsp's)",
        ),
        (Some(_), None) => ok("PAM order", "pershome's session hook is in common-session"),
        (None, _) => problem(
            "PAM order",
            "pershome's session hook is not in common-session on this client",
            "pershome-config pam --install on the server, then `ltsp image /`",
        ),
    });
    out.push(block_check(
        root,
        "systemctl restart pershome-ltsp-client (or `pershome-config ltsp setup`); is \
         pershome-ltsp-client.service enabled in the image?",
    ));
    let shadow = std::fs::read_to_string(root.join("etc/shadow")).unwrap_or_default();
    let mounts = crate::stick::mountinfo::mounts().unwrap_or_default();
    for user in users {
        let Ok(Some(entry)) = crate::wants::lookup_user(root, user) else {
            continue;
        };
        let pamltsp_user = shadow.lines().any(|l| {
            l.strip_prefix(user.as_str())
                .is_some_and(|r| r.starts_with(":pamltsp"))
        });
        let home = crate::wants::under_root(root, &entry.dir);
        let on_home = crate::stick::mountinfo::mount_of(&mounts, &home)
            .filter(|m| m.mountpoint == home)
            .map(|m| m.fstype.clone());
        let state = match on_home.as_deref() {
            Some(crate::stick::mountinfo::PERSHOMEFS_TYPE) => "logged in with the stick home",
            Some("fuse.sshfs") => "logged in with the SSHFS server home (no stick at login)",
            Some(_) => "home mounted by something else",
            None => "not logged in",
        };
        out.push(if pamltsp_user {
            ok(
                format!("pamltsp {user}"),
                format!("password checked by the server; {state}"),
            )
        } else {
            problem(
                format!("pamltsp {user}"),
                format!("{user} is not a pamltsp user here (/etc/shadow); {state}"),
                "is the user in the server's passwd? `ltsp initrd`, reboot the client",
            )
        });
    }
    let run = root.join(crate::session::rundir::RUN_DIR);
    for m in mounts
        .iter()
        .filter(|m| m.mountpoint.starts_with(&run) && m.mountpoint.ends_with("raw/stick"))
    {
        let opts: Vec<&str> = m.mount_options.split(',').collect();
        let missing: Vec<&str> = ["nosuid", "nodev", "noexec"]
            .into_iter()
            .filter(|o| !opts.contains(o))
            .collect();
        let name = format!("stick {}", m.mountpoint.display());
        out.push(if missing.is_empty() {
            ok(
                name,
                format!("{} {} mounted {}", m.fstype, m.source, m.mount_options),
            )
        } else {
            problem(
                name,
                format!("mounted without {}", missing.join(",")),
                "log the user out; report this: the hook always mounts sticks nosuid,nodev,noexec",
            )
        });
    }
    out
}
