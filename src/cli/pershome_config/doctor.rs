//! `pershome-config doctor`: checks what a stick home needs on this system and prints each
//! check as `OK` or `PROBLEM` with how to fix it.
//!
//! This module only reads: it never fixes anything itself (the fixes it prints are commands
//! for the administrator) and never runs a program except `xmllint` with fixed arguments (by
//! absolute path, with a cleared environment: `crate::exec`).

use std::path::{Path, PathBuf};

mod ltsp;

use super::exit_code;
use crate::homes_list;
use crate::pam_setup;
use crate::sysconfig::{self, OnMissingStick};
use crate::wants;

/// One check's outcome.
struct Check {
    name: String,
    problem: Option<String>,
    /// What the check found (OK) or how to fix it (problem).
    detail: String,
}

fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        problem: None,
        detail: detail.into(),
    }
}

fn problem(name: impl Into<String>, what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        problem: Some(what.into()),
        detail: fix.into(),
    }
}

/// Runs every check, prints them, returns the exit code.
pub fn run(root: &Path) -> u8 {
    let checks = checks(root);
    let mut problems = 0;
    for check in &checks {
        match &check.problem {
            None => println!("OK       {}: {}", check.name, check.detail),
            Some(what) => {
                problems += 1;
                println!(
                    "PROBLEM  {}: {what}\n         fix: {}",
                    check.name, check.detail
                );
            }
        }
    }
    if problems == 0 {
        println!("all {} checks OK", checks.len());
        exit_code::SUCCESS
    } else {
        println!("{problems} of {} checks found a problem", checks.len());
        tracing::warn!("doctor: {problems} problems");
        exit_code::NO
    }
}

fn checks(root: &Path) -> Vec<Check> {
    let mut out = vec![dev_fuse(root), fusermount(root), fuse_conf(root)];
    let cfg = match sysconfig::load(root) {
        Ok(cfg) => {
            out.push(ok(
                "config.toml",
                format!("{} parses", root.join(sysconfig::CONFIG_PATH).display()),
            ));
            Some(cfg)
        }
        Err(e) => {
            out.push(problem(
                "config.toml",
                e.to_string(),
                "correct that line (every key is in docs/admin-guide.md), or delete the file \
                 to use the defaults",
            ));
            None
        }
    };
    let users = match homes_list::list(root) {
        Ok(users) => {
            out.push(ok(
                "persistent_homes",
                format!("{} user(s) listed", users.len()),
            ));
            Some(users)
        }
        Err(e) => {
            out.push(problem(
                "persistent_homes",
                e.to_string(),
                "correct that line: one user name per line, # for comments",
            ));
            None
        }
    };
    if let Some(users) = &users {
        out.push(users_exist(root, users));
    }
    out.extend(pam_stack(
        root,
        cfg.as_ref().map(|c| c.on_missing_stick),
        users.as_deref(),
    ));
    out.extend(ltsp::checks(root, cfg.as_ref(), users.as_deref()));
    out.push(pam_user_environment(root));
    out.push(claim_key(root));
    out
}

/// The site's claim key (docs/security.md): present, root's, readable by nobody else.
fn claim_key(root: &Path) -> Check {
    let name = "claim key";
    let path = root.join(crate::session::claim::KEY_PATH);
    if !path.exists() {
        return problem(
            name,
            format!("{} does not exist", path.display()),
            "pershome-config claim-key (on an LTSP server, then `ltsp image` so that the \
             clients share it)",
        );
    }
    match crate::session::claim::SiteKey::load(root, false) {
        Ok(_) => ok(name, format!("{} is root's, mode 600", path.display())),
        Err(e) => problem(
            name,
            format!("{e:#}"),
            format!(
                "chown root:root {0}; chmod 600 {0}; if others could read it, delete it, run \
                 pershome-config claim-key and claim the sticks again",
                path.display()
            ),
        ),
    }
}

/// The non-comment lines of a PAM service file with its `@include`, `include` and
/// `substack` files spliced in (at most 8 levels deep: a loop of includes ends there).
fn pam_stack_lines(root: &Path, file: &str, depth: u32, out: &mut Vec<String>) {
    if depth > 8 || file.contains('/') {
        return;
    }
    for line in pam_lines(root, file) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["@include", inc, ..] => pam_stack_lines(root, inc, depth + 1, out),
            [_, control, inc, ..] if *control == "include" || *control == "substack" => {
                pam_stack_lines(root, inc, depth + 1, out)
            }
            _ => out.push(line),
        }
    }
}

/// Security (docs/security.md, "What root runs"): a PAM service whose stack runs pershome
/// and also `pam_env.so user_readenv=1` lets each user put variables of their choice
/// (`LD_PRELOAD`, `PATH`) into the environment pam_exec starts the root hook with. The hook
/// gives none of them to what it runs, but the dynamic loader maps an `LD_PRELOAD` library
/// into the hook itself before its first instruction: only the stack can prevent that.
fn pam_user_environment(root: &Path) -> Check {
    let name = "PAM user environment";
    let Ok(entries) = std::fs::read_dir(root.join("etc/pam.d")) else {
        return ok(name, "no /etc/pam.d");
    };
    let mut services: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    services.sort();
    let mut bad = Vec::new();
    for service in services {
        let mut lines = Vec::new();
        pam_stack_lines(root, &service, 0, &mut lines);
        let runs_pershome = lines.iter().any(|l| {
            l.contains("pershome-config")
                || (l.contains("pam_mount.so") && l.starts_with("session"))
        });
        let reads_user_env = lines.iter().any(|l| {
            l.contains("pam_env.so")
                && l.split_whitespace()
                    .any(|w| w == "user_readenv=1" || w.starts_with("user_readenv=1"))
        });
        if runs_pershome && reads_user_env {
            bad.push(service);
        }
    }
    if bad.is_empty() {
        ok(
            name,
            "no PAM service that runs pershome reads users' environment files",
        )
    } else {
        problem(
            name,
            format!(
                "/etc/pam.d/{} run(s) pershome and pam_env.so user_readenv=1: each user's \
                 ~/.pam_environment (LD_PRELOAD, PATH) then reaches the root login hook",
                bad.join(", /etc/pam.d/")
            ),
            "remove `user_readenv=1` from the pam_env.so lines of those files (Debian's \
             default is 0; locale settings belong in /etc/default/locale)",
        )
    }
}

fn dev_fuse(root: &Path) -> Check {
    use std::os::unix::fs::FileTypeExt;
    let path = root.join("dev/fuse");
    match std::fs::metadata(&path) {
        Ok(m) if m.file_type().is_char_device() => ok("/dev/fuse", "present"),
        Ok(_) => problem(
            "/dev/fuse",
            format!("{} is not a character device", path.display()),
            "remove it and run `modprobe fuse` (or reboot)",
        ),
        Err(e) => problem(
            "/dev/fuse",
            format!("{}: {e}", path.display()),
            "run `modprobe fuse`; in a container, pass the device in (--device /dev/fuse)",
        ),
    }
}

fn find_program(root: &Path, name: &str) -> Option<PathBuf> {
    ["usr/bin", "bin", "usr/sbin", "sbin", "usr/local/bin"]
        .iter()
        .map(|dir| root.join(dir).join(name))
        .find(|p| p.exists())
}

fn fusermount(root: &Path) -> Check {
    match find_program(root, "fusermount3") {
        Some(p) => ok("fuse3", format!("{} present", p.display())),
        None => problem("fuse3", "fusermount3 not found", "apt-get install fuse3"),
    }
}

fn fuse_conf(root: &Path) -> Check {
    // The hook mounts as root, and root may use allow_other without user_allow_other; the
    // option only matters for users who mount pershomefs themselves with allow_other.
    let path = root.join("etc/fuse.conf");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let allowed = text
                .lines()
                .any(|l| l.split('#').next().unwrap_or("").trim() == "user_allow_other");
            ok(
                "/etc/fuse.conf",
                if allowed {
                    "user_allow_other is set (not needed by the login hook, which mounts as root)"
                } else {
                    "user_allow_other not set; not needed: the login hook mounts as root"
                },
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ok(
            "/etc/fuse.conf",
            "absent; not needed: the login hook mounts as root",
        ),
        Err(e) => problem(
            "/etc/fuse.conf",
            format!("{}: {e}", path.display()),
            "make it readable (mode 644, owner root)",
        ),
    }
}

fn users_exist(root: &Path, users: &[String]) -> Check {
    let mut missing = Vec::new();
    for user in users {
        match wants::lookup_user(root, user) {
            Ok(Some(_)) => {}
            Ok(None) => missing.push(user.clone()),
            Err(e) => missing.push(format!("{user} ({e})")),
        }
    }
    if missing.is_empty() {
        ok("listed users", "every listed user exists")
    } else {
        problem(
            "listed users",
            format!("no such user: {}", missing.join(", ")),
            "create the users, or `pershome-config remove-user NAME`",
        )
    }
}

/// Lines of a PAM file without comments, for a simple "does the stack use X" check.
fn pam_lines(root: &Path, file: &str) -> Vec<String> {
    std::fs::read_to_string(root.join("etc/pam.d").join(file))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

fn pam_stack(
    root: &Path,
    on_missing: Option<OnMissingStick>,
    users: Option<&[String]>,
) -> Vec<Check> {
    let mut out = Vec::new();
    let session = pam_lines(root, "common-session");
    let hook_lines: Vec<&String> = session
        .iter()
        .filter(|l| l.contains("pam_exec.so") && l.contains("pershome-config"))
        .collect();
    let exec_enabled = !hook_lines.is_empty();
    let pam_mount_enabled = session.iter().any(|l| l.contains("pam_mount.so"));
    let conf_path = root.join(pam_setup::PAM_MOUNT_CONF);
    let conf_text = std::fs::read_to_string(&conf_path).ok();
    let mount_users = conf_text
        .as_deref()
        .map(pam_setup::pam_mount_users)
        .transpose();

    // pershome must never be in an auth stack.
    let in_auth: Vec<String> = ["common-auth", "common-account", "common-password"]
        .iter()
        .filter(|f| pam_lines(root, f).iter().any(|l| l.contains("pershome")))
        .map(|f| f.to_string())
        .collect();
    if !in_auth.is_empty() {
        out.push(problem(
            "PAM",
            format!("pershome appears in /etc/pam.d/{}", in_auth.join(", ")),
            "remove it there: pershome is a session hook only (pershome-config pam --install)",
        ));
    }

    let has_mount_volumes = matches!(&mount_users, Ok(Some(u)) if !u.is_empty());
    match (exec_enabled, has_mount_volumes) {
        (true, true) => out.push(problem(
            "PAM",
            "both the pam_exec hook and pam_mount volumes are set up: homes would be mounted twice",
            "keep one: `pam-auth-update --package --remove pershome`, or empty pershome's block \
             in pam_mount.conf.xml",
        )),
        (false, false) => out.push(problem(
            "PAM",
            "no pershome hook in /etc/pam.d/common-session and no pershome volume in \
             pam_mount.conf.xml",
            "pershome-config pam --install (or --mode mount --install)",
        )),
        _ => {}
    }

    if exec_enabled {
        let profile_path = root.join(pam_setup::PROFILE_PATH);
        let expected =
            on_missing.map(|m| pam_setup::pam_auth_update_profile(m == OnMissingStick::Deny));
        match (std::fs::read_to_string(&profile_path), expected) {
            (Ok(text), Some(expected)) if text == expected => out.push(ok(
                "PAM (exec)",
                format!(
                    "profile {} enabled in common-session",
                    pam_setup::PROFILE_NAME
                ),
            )),
            (Ok(_), Some(_)) => out.push(problem(
                "PAM (exec)",
                format!(
                    "{} is out of date (or on_missing_stick changed)",
                    profile_path.display()
                ),
                "pershome-config pam --install",
            )),
            (Ok(_), None) => {}
            (Err(e), _) => out.push(problem(
                "PAM (exec)",
                format!(
                    "common-session uses the hook but {}: {e}",
                    profile_path.display()
                ),
                "pershome-config pam --install",
            )),
        }
        if on_missing == Some(OnMissingStick::Deny)
            && !hook_lines.iter().any(|l| l.starts_with("required"))
        {
            out.push(problem(
                "PAM (exec)",
                "on_missing_stick = \"deny\" but the hook is not `required` in common-session",
                "pershome-config pam --install",
            ));
        }
    }

    if has_mount_volumes || (!exec_enabled && conf_text.is_some()) {
        out.extend(pam_mount_checks(
            &conf_path,
            pam_mount_enabled,
            &mount_users,
            users,
        ));
    }
    out
}

fn pam_mount_checks(
    conf_path: &Path,
    enabled: bool,
    mount_users: &Result<Option<Vec<String>>, String>,
    users: Option<&[String]>,
) -> Vec<Check> {
    let mut out = Vec::new();
    if !enabled {
        out.push(problem(
            "PAM (mount)",
            "pam_mount.so is not in /etc/pam.d/common-session",
            "apt-get install libpam-mount (its pam-auth-update profile enables it)",
        ));
    }
    match mount_users {
        Err(e) => out.push(problem(
            "PAM (mount)",
            format!("{}: {e}", conf_path.display()),
            "correct the XML at that line",
        )),
        Ok(found) => {
            let found = found.clone().unwrap_or_default();
            if let Some(users) = users {
                if found.as_slice() != users {
                    out.push(problem(
                        "PAM (mount)",
                        format!(
                            "pam_mount volumes are for [{}] but persistent_homes lists [{}]",
                            found.join(", "),
                            users.join(", ")
                        ),
                        "pershome-config pam --mode mount --install",
                    ));
                }
            }
        }
    }
    out.push(validate_pam_mount(conf_path));
    out
}

/// Validates the file against libpam-mount's DTD with `xmllint` (fixed arguments, no shell).
fn validate_pam_mount(path: &Path) -> Check {
    let name = "pam_mount.conf.xml";
    let dtd = Path::new(pam_setup::PAM_MOUNT_DTD_DIR).join("pam_mount.conf.xml.dtd");
    if !dtd.exists() {
        return problem(
            name,
            format!("{} not found", dtd.display()),
            "apt-get install libpam-mount",
        );
    }
    match crate::exec::command(crate::exec::system_program_or_missing("xmllint"))
        .arg("--noout")
        .arg("--dtdvalid")
        .arg(&dtd)
        .arg(path)
        .output()
    {
        Ok(o) if o.status.success() => ok(name, format!("{} is valid", path.display())),
        Ok(o) => problem(
            name,
            format!(
                "{} does not validate: {}",
                path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            "correct it (see pam_mount.conf(5)), then pershome-config pam --mode mount --install",
        ),
        Err(e) => problem(
            name,
            format!("cannot run xmllint to validate {}: {e}", path.display()),
            "apt-get install libxml2-utils",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's sshd stack with `user_readenv=1` and the hook in common-session is a problem;
    /// the same stack without it, or a service that does not run pershome, is not.
    #[test]
    fn user_environment_files_in_a_pershome_stack_are_a_problem() {
        let t = tempfile::tempdir().expect("temporary root");
        let pam = t.path().join("etc/pam.d");
        std::fs::create_dir_all(&pam).unwrap();
        std::fs::write(
            pam.join("common-session"),
            "session optional pam_exec.so quiet stdout /usr/sbin/pershome-config session\n",
        )
        .unwrap();
        std::fs::write(
            pam.join("sshd"),
            "@include common-session\n\
             session required pam_env.so user_readenv=1 envfile=/etc/default/locale\n",
        )
        .unwrap();
        std::fs::write(
            pam.join("other"),
            "session required pam_env.so user_readenv=1\n",
        )
        .unwrap();
        let got = pam_user_environment(t.path());
        let what = got.problem.clone().unwrap_or_default();
        assert!(
            what.contains("/etc/pam.d/sshd") && !what.contains("other"),
            "expected a problem naming sshd only, got {what:?}"
        );
        std::fs::write(
            pam.join("sshd"),
            "@include common-session\n# session required pam_env.so user_readenv=1\n\
             session required pam_env.so envfile=/etc/default/locale\n",
        )
        .unwrap();
        let got = pam_user_environment(t.path());
        assert!(got.problem.is_none(), "expected OK, got {:?}", got.problem);
    }
}
