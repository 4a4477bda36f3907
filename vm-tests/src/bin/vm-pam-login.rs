//! `vm-pam-login USER -- COMMAND...`: a login program for the test guest. With the password
//! from the environment variable VM_PAM_PASSWORD it does what login(1) or a display manager
//! does through the `login` PAM service: authenticate, account check, open the session (this
//! runs the whole session stack, pam_exec with `pershome-config session` among it), run
//! COMMAND as the user in the home with PAM's environment, close the session. It prints every
//! message PAM modules sent (pam_exec's `stdout`: the hook's messages to the person) as
//! `PAM: ...` lines on stderr, and exits with COMMAND's status (or 100+ on a PAM failure).
//!
//! It owns nothing but that sequence; it never changes the PAM configuration. The password
//! comes from the environment so that it does not show in `ps`.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _, Result};
use nix::unistd::{Gid, Uid, User};
use pam_client::conv_mock::Conversation;
use pam_client::{Context, Flag};

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vm-pam-login: {e:#}");
            ExitCode::from(100)
        }
    }
}

fn print_messages(conversation: &mut Conversation) {
    for info in conversation.infos() {
        eprintln!("PAM: {}", info.to_string_lossy());
    }
    for error in conversation.errors() {
        eprintln!("PAM error: {}", error.to_string_lossy());
    }
    conversation.clear_log();
}

fn run() -> Result<u8> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(split) = args.iter().position(|a| a == "--") else {
        bail!("usage: VM_PAM_PASSWORD=... vm-pam-login USER -- COMMAND...");
    };
    let (user_args, command) = (&args[..split], &args[split + 1..]);
    let [user] = user_args else {
        bail!("usage: VM_PAM_PASSWORD=... vm-pam-login USER -- COMMAND...");
    };
    if command.is_empty() {
        bail!("no COMMAND after --");
    }
    let password = std::env::var("VM_PAM_PASSWORD").context("VM_PAM_PASSWORD is not set")?;
    let account = User::from_name(user)
        .context("looking up the user")?
        .with_context(|| format!("no user {user:?}"))?;

    let mut context = Context::new(
        "login",
        Some(user),
        Conversation::with_credentials(user.as_str(), password),
    )
    .context("pam_start(login)")?;
    context
        .authenticate(Flag::NONE)
        .context("pam_authenticate")?;
    context.acct_mgmt(Flag::NONE).context("pam_acct_mgmt")?;
    let session = context
        .open_session(Flag::NONE)
        .context("pam_open_session")?;
    let env: Vec<(String, String)> = session
        .envlist()
        .iter_tuples()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let status = {
        let name = CString::new(user.as_str()).context("user name")?;
        let (uid, gid): (Uid, Gid) = (account.uid, account.gid);
        let home = account.dir.clone();
        let mut child = Command::new(&command[0]);
        child
            .args(&command[1..])
            .env_clear()
            .envs(env)
            .env("HOME", &home)
            .env("USER", user)
            .env("LOGNAME", user)
            .env("SHELL", &account.shell)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .current_dir("/");
        // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
        // (initgroups, setgid, setuid, chdir) on data prepared before the fork.
        unsafe {
            child.pre_exec(move || {
                nix::unistd::initgroups(&name, gid)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
                // The home as the user sees it after the session opened (maybe the stick).
                nix::unistd::chdir(&home)?;
                Ok(())
            });
        }
        child.status().context("running the command as the user")?
    };
    // Closing the session runs the hook's session close (unmount, "you can remove your stick").
    // (The error owns the session; keep only its text, so the context is free again.)
    let closed = session.close(Flag::NONE).map_err(|e| e.to_string());
    print_messages(context.conversation_mut());
    if let Err(e) = closed {
        bail!("pam_close_session: {e}");
    }
    Ok(status
        .code()
        .map_or(101, |c| u8::try_from(c).unwrap_or(102)))
}
