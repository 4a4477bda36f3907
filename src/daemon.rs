//! The life of a `pershomefs` process around its FUSE session: mounting (so that `mount` and
//! `df` show `fuse.pershomefs`), going to the background only once the mount is ready,
//! turning SIGTERM/SIGINT/SIGHUP into a clean unmount, and cleaning up after the session loop.
//!
//! This module owns fork/setsid, the stdio redirection, the readiness pipe, the signal mask and
//! the kernel mount call. It never looks at the backing directory, never parses options and
//! never prints messages meant for a person: the caller (`cli::pershomefs`) does those.
//!
//! Why fork early: `daemonize` forks *before* the filesystem is opened and mounted, and the
//! parent waits on a pipe until the child says the mount is ready (or why it failed). Forking
//! after the mount would lose every thread the filesystem started while opening (a commit
//! timer, say), since only the forking thread survives fork(2). The parent therefore still
//! "returns only once the mount is ready", with the child's exit code when it is not.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use fuser::{Config, Filesystem, MountOption, Session, SessionACL};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::ForkResult;

/// Gives the process one malloc arena, before any thread exists.
///
/// glibc gives each thread that allocates while another holds the main arena an arena of its
/// own (up to 8 per core), and memory freed in one arena is never reused by another thread's.
/// The daemon's inode table is built by whichever worker answers a LOOKUP or READDIRPLUS, so
/// with its 4 workers and the commit thread the same tree ended up spread over several arenas:
/// 39.0 MiB RSS after `ls -lR` of 100,100 entries against a live heap of 25 MiB. With one
/// arena the same walk holds less (docs/testing.md, "Scale"), and tree-walk times did not
/// move: requests allocate little, and small blocks come from each thread's tcache without the
/// arena lock. A no-op outside glibc.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread
    // starts, and a refusal (return 0) leaves glibc's default, which is merely larger.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// What [`daemonize`] returns in each process.
pub enum Forked {
    /// In the original process: the child has reported; exit with this code.
    Parent(u8),
    /// In the daemon: report readiness or failure through this.
    Child(Readiness),
}

/// The daemon's end of the readiness pipe. Dropping it without reporting makes the parent
/// exit with `failure_code` (given to [`daemonize`]), so a crash never reads as success.
pub struct Readiness {
    pipe: File,
}

impl Readiness {
    /// The mount is ready: detach from the caller's directory and terminal (chdir "/", stdio to
    /// /dev/null) and let the parent exit 0. Errors here leave the daemon running; the caller
    /// logs them.
    pub fn ready(mut self) -> io::Result<()> {
        let detach = detach_stdio();
        // Tell the parent even when detaching failed: the mount is up and serving.
        self.pipe.write_all(&[0])?;
        detach
    }

    /// Setting up failed: the parent exits with `code` (nonzero). The caller has already
    /// printed the reason on stderr, which is still the caller's terminal.
    pub fn failed(mut self, code: u8) {
        // If the parent is gone there is nobody to tell; nothing more to do.
        let _ = self.pipe.write_all(&[code]);
    }
}

/// Makes sure file descriptors 0, 1 and 2 are open (on /dev/null when closed), so that no file
/// the program opens later, such as /dev/fuse, lands on a standard descriptor and is then
/// overwritten when stdio is redirected.
pub fn ensure_stdio_open() -> io::Result<()> {
    for fd in 0..3 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) == Err(Errno::EBADF) {
            let null = File::options().read(true).write(true).open("/dev/null")?;
            if null.as_raw_fd() != fd {
                // The lowest free descriptor is `fd` itself, so this only happens if another
                // thread raced us; move it into place explicitly.
                nix::unistd::dup2(null.as_raw_fd(), fd)?;
            } else {
                // Keep the descriptor open: it now *is* the standard descriptor.
                std::mem::forget(null);
            }
        }
    }
    Ok(())
}

/// Forks into the background. Call it while the process is single-threaded (before the
/// filesystem is opened). The parent blocks until the child reports through [`Readiness`],
/// then returns `Forked::Parent(code)`; it returns `failure_code` if the child dies first.
pub fn daemonize(failure_code: u8) -> io::Result<Forked> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the caller guarantees the process is single-threaded, so the child may run any
    // code, not only async-signal-safe functions.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut byte = [0u8; 1];
            let code = match File::from(read_end).read(&mut byte) {
                Ok(1) => byte[0],
                // EOF: the child exited or crashed without reporting.
                Ok(_) | Err(_) => failure_code,
            };
            if code != 0 {
                // The child is exiting after a failure: reap it so no zombie is left behind.
                let _ = nix::sys::wait::waitpid(child, None);
            }
            Ok(Forked::Parent(code))
        }
        ForkResult::Child => {
            drop(read_end);
            // A new session: no controlling terminal, so the terminal's Ctrl-C and hangup no
            // longer reach the daemon (SIGHUP sent on purpose still unmounts).
            nix::unistd::setsid()?;
            Ok(Forked::Child(Readiness {
                pipe: File::from(write_end),
            }))
        }
    }
}

fn detach_stdio() -> io::Result<()> {
    std::env::set_current_dir("/")?;
    let null = File::options().read(true).write(true).open("/dev/null")?;
    for fd in 0..3 {
        nix::unistd::dup2(null.as_raw_fd(), fd)?;
    }
    Ok(())
}

/// The signals that end the daemon with a clean unmount.
fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread. Call it before any thread is
/// started (threads inherit the mask), so these signals are only ever taken by the signal
/// thread that [`MountedSession::run`] starts, which unmounts instead of dying mid-write. A
/// signal that arrives before then stays pending and is handled as soon as the mount is up.
pub fn block_termination_signals() -> io::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&termination_signals()), None)?;
    Ok(())
}

/// A mounted filesystem whose session loop has not started yet.
pub struct MountedSession<F: Filesystem> {
    session: Session<F>,
    mount: Arc<OurMount>,
}

/// A mount made by [`mount`]. `dev` is a duplicate of the session's /dev/fuse descriptor,
/// kept only to ask the kernel whether this very mount still exists.
struct OurMount {
    mountpoint: PathBuf,
    dev: OwnedFd,
    /// Made by the setuid `fusermount3` (so only it can unmount), not by mount(2) as root.
    by_helper: bool,
}

impl OurMount {
    /// Whether the connection is still alive. Checked before unmounting so that we never
    /// unmount a different filesystem mounted later at the same place.
    fn is_mounted(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            let mut fds = [PollFd::new(self.dev.as_fd(), PollFlags::empty())];
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(0) => return true,
                Ok(_) => {
                    return !fds[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLERR))
                }
                Err(Errno::EINTR) => continue,
                // Cannot tell: assume mounted, the unmount itself will then say.
                Err(_) => return true,
            }
        }
    }

    /// Unmounts; if files are still open (busy), detaches lazily: the mount vanishes from the
    /// tree at once and the daemon keeps serving the open files until they are closed, then
    /// the session ends normally and `destroy` commits.
    fn unmount(&self) -> io::Result<()> {
        if !self.is_mounted() {
            return Ok(());
        }
        if self.by_helper {
            if run_fusermount_unmount(&self.mountpoint, false).is_ok() {
                return Ok(());
            }
            tracing::warn!(
                "{} is busy: detaching it now, the daemon ends when the last open file is \
                 closed",
                self.mountpoint.display()
            );
            return run_fusermount_unmount(&self.mountpoint, true);
        }
        match nix::mount::umount2(&self.mountpoint, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EBUSY) => {
                tracing::warn!(
                    "{} is busy: detaching it now, the daemon ends when the last open file \
                     is closed",
                    self.mountpoint.display()
                );
                nix::mount::umount2(&self.mountpoint, MntFlags::MNT_DETACH).map_err(io::Error::from)
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn run_fusermount_unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let mut cmd = crate::exec::command(crate::exec::system_program_or_missing(FUSERMOUNT));
    cmd.arg("-u").arg("-q");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{FUSERMOUNT} -u {}: {}",
            mountpoint.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The setuid mount helper of FUSE 3.
const FUSERMOUNT: &str = "fusermount3";

/// What to mount, worked out from a fuser configuration once for both ways of mounting.
#[derive(Debug, PartialEq, Eq)]
struct MountPlan {
    /// The source shown by `mount` and `df` (`fsname`).
    source: String,
    /// The subtype: the type shows as `fuse.<subtype>`.
    subtype: String,
    /// The generic mount flags, always with nosuid and nodev.
    flags: MsFlags,
    /// The same flags as option words, for fusermount3.
    flag_words: Vec<&'static str>,
    /// FUSE's own options (`default_permissions`, `allow_other`).
    fuse_options: Vec<&'static str>,
}

fn mount_plan(config: &Config) -> io::Result<MountPlan> {
    fn flag(plan: &mut MountPlan, f: MsFlags, word: &'static str) {
        plan.flags |= f;
        if !plan.flag_words.contains(&word) {
            plan.flag_words.push(word);
        }
    }
    let mut plan = MountPlan {
        source: String::from("pershomefs"),
        subtype: String::from(crate::mount_opts::SUBTYPE),
        // nosuid,nodev always: the stick is untrusted, whatever the configuration says.
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        flag_words: vec!["nosuid", "nodev"],
        fuse_options: Vec::new(),
    };
    for option in &config.mount_options {
        match option {
            MountOption::FSName(name) => plan.source = name.clone(),
            MountOption::Subtype(subtype) => plan.subtype = subtype.clone(),
            MountOption::DefaultPermissions => plan.fuse_options.push("default_permissions"),
            MountOption::NoSuid => flag(&mut plan, MsFlags::MS_NOSUID, "nosuid"),
            MountOption::NoDev => flag(&mut plan, MsFlags::MS_NODEV, "nodev"),
            MountOption::RO => flag(&mut plan, MsFlags::MS_RDONLY, "ro"),
            MountOption::NoExec => flag(&mut plan, MsFlags::MS_NOEXEC, "noexec"),
            MountOption::NoAtime => flag(&mut plan, MsFlags::MS_NOATIME, "noatime"),
            MountOption::Sync => flag(&mut plan, MsFlags::MS_SYNCHRONOUS, "sync"),
            MountOption::DirSync => flag(&mut plan, MsFlags::MS_DIRSYNC, "dirsync"),
            MountOption::RW | MountOption::Exec | MountOption::Atime | MountOption::Async => {}
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("mount option {other:?} is not supported by pershomefs"),
                ))
            }
        }
    }
    match config.acl {
        // The kernel only knows allow_other; fuser itself refuses other users for RootAndOwner.
        SessionACL::All | SessionACL::RootAndOwner => plan.fuse_options.push("allow_other"),
        SessionACL::Owner => {}
    }
    Ok(plan)
}

/// Mounts `fs` on `mountpoint` and performs the FUSE handshake (the filesystem's `init` runs
/// here), so the mount is usable when this returns. As root the mount is made with mount(2);
/// otherwise, or when the kernel says EPERM (root without CAP_SYS_ADMIN), through the setuid
/// `fusermount3`. Either way the type is `fuse.<subtype>`. (fuser's own mount code is not
/// used: as root it mounts with type plain `fuse`, and it gives up without trying
/// fusermount3 when /dev/fuse is not readable by the user.)
pub fn mount<F: Filesystem>(
    fs: F,
    mountpoint: &Path,
    config: &Config,
) -> io::Result<MountedSession<F>> {
    let plan = mount_plan(config)?;
    let mountpoint = mountpoint.canonicalize()?;
    let mut made = None;
    if nix::unistd::geteuid().is_root() {
        made = mount_with_syscall(&plan, &mountpoint)?;
    }
    let (dev, by_helper) = match made {
        Some(dev) => (dev, false),
        None => (mount_with_fusermount(&plan, &mountpoint)?, true),
    };
    let mount = Arc::new(OurMount {
        mountpoint: mountpoint.clone(),
        dev: dev.try_clone()?,
        by_helper,
    });
    match Session::from_fd(fs, dev, config.acl, config.clone()) {
        Ok(session) => Ok(MountedSession { session, mount }),
        Err(e) => {
            if let Err(u) = mount.unmount() {
                tracing::error!("unmounting {mountpoint:?} after a failed handshake: {u}");
            }
            Err(e)
        }
    }
}

/// mount(2) as root. `Ok(None)` when the kernel refuses with EPERM.
fn mount_with_syscall(plan: &MountPlan, mountpoint: &Path) -> io::Result<Option<OwnedFd>> {
    let root_mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    let dev: OwnedFd = File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/fuse: {e}")))?
        .into();
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        dev.as_raw_fd(),
        root_mode,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    for option in &plan.fuse_options {
        data.push(',');
        data.push_str(option);
    }
    let fstype = format!("fuse.{}", plan.subtype);
    match nix::mount::mount(
        Some(plan.source.as_str()),
        mountpoint,
        Some(fstype.as_str()),
        plan.flags,
        Some(data.as_str()),
    ) {
        Ok(()) => Ok(Some(dev)),
        Err(Errno::EPERM) => Ok(None),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "mount({:?}, {mountpoint:?}, {fstype}, {data}): {e}",
                plan.source
            ),
        )),
    }
}

/// The option list fusermount3 gets; it splits at commas, so the fsname is escaped.
fn fusermount_options(plan: &MountPlan) -> String {
    let mut options = vec![
        format!(
            "fsname={}",
            crate::mount_opts::escape_option_value(&plan.source)
        ),
        format!("subtype={}", plan.subtype),
    ];
    options.extend(plan.flag_words.iter().map(|w| (*w).to_owned()));
    options.extend(plan.fuse_options.iter().map(|w| (*w).to_owned()));
    options.join(",")
}

/// Mounts through `fusermount3`, which opens /dev/fuse, mounts, and passes the descriptor
/// back over a socket named by `_FUSE_COMMFD`.
fn mount_with_fusermount(plan: &MountPlan, mountpoint: &Path) -> io::Result<OwnedFd> {
    let (ours, theirs) = UnixStream::pair()?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = crate::exec::command(crate::exec::system_program_or_missing(FUSERMOUNT));
    cmd.arg("-o")
        .arg(fusermount_options(plan))
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls fcntl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // std opens sockets close-on-exec; fusermount3 must inherit this one.
            let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("running {FUSERMOUNT}: {e} (is the fuse3 package installed?)"),
        )
    })?;
    drop(theirs);
    let received = receive_fd(&ours);
    drop(ours);
    // Without auto_unmount, fusermount3 exits right after passing the descriptor.
    let output = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    match received {
        Ok(Some(fd)) => Ok(fd),
        Ok(None) | Err(_) if !stderr.is_empty() => Err(io::Error::other(stderr)),
        Ok(None) => Err(io::Error::other(format!(
            "{FUSERMOUNT} exited ({}) without mounting",
            output.status
        ))),
        Err(e) => Err(io::Error::other(format!(
            "receiving the FUSE descriptor from {FUSERMOUNT}: {e}"
        ))),
    }
}

/// Receives one file descriptor sent with SCM_RIGHTS; `None` when the sender closed the
/// socket without sending one (fusermount3 failed).
fn receive_fd(socket: &UnixStream) -> io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::os::fd::{FromRawFd, RawFd};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = loop {
        match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut received = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us; nothing else
                // owns it. Any extra descriptors are closed by their OwnedFd being dropped.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if received.is_none() {
                    received = Some(owned);
                }
            }
        }
    }
    Ok(received)
}

impl<F: Filesystem> MountedSession<F> {
    /// Serves requests until the filesystem is unmounted, by `umount`/`fusermount3 -u` or by
    /// a termination signal (caught by a thread started here; see
    /// [`block_termination_signals`]). The filesystem's `destroy` has run when this returns.
    pub fn run(self) -> io::Result<()> {
        let MountedSession { session, mount } = self;
        spawn_signal_thread(Arc::clone(&mount))?;
        let result = session.run();
        // Normally the mount is already gone (that is what ended the loop); if the loop ended
        // with an error while still mounted, unmount so no dead mount is left behind.
        if let Err(e) = mount.unmount() {
            tracing::error!("unmounting after the session ended: {e}");
        }
        result
    }
}

fn spawn_signal_thread(mount: Arc<OurMount>) -> io::Result<()> {
    let set = termination_signals();
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || loop {
            match set.wait() {
                Ok(signal) => {
                    tracing::info!("received {signal}: unmounting");
                    if let Err(e) = mount.unmount() {
                        tracing::error!("unmounting on {signal}: {e}");
                    }
                }
                Err(e) => {
                    tracing::error!("waiting for signals: {e}; signals no longer unmount");
                    return;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_always_nosuid_nodev() {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("/media/s,x/pershome".into()),
            MountOption::Subtype("pershomefs".into()),
            MountOption::DefaultPermissions,
            MountOption::RO,
            MountOption::NoExec,
            MountOption::NoSuid,
        ];
        config.acl = SessionACL::RootAndOwner;
        let got = mount_plan(&config).map_err(|e| e.to_string());
        let expected = Ok(MountPlan {
            source: "/media/s,x/pershome".to_owned(),
            subtype: "pershomefs".to_owned(),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC,
            flag_words: vec!["nosuid", "nodev", "ro", "noexec"],
            fuse_options: vec!["default_permissions", "allow_other"],
        });
        assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
        let plan = mount_plan(&config).map_err(|e| e.to_string());
        let words = plan.map(|p| fusermount_options(&p));
        let expected = Ok(r"fsname=/media/s\,x/pershome,subtype=pershomefs,nosuid,nodev,ro,noexec,default_permissions,allow_other".to_owned());
        assert_eq!(words, expected, "fusermount3 options");
    }

    #[test]
    fn plan_refuses_suid_and_dev() {
        for bad in [
            MountOption::Suid,
            MountOption::Dev,
            MountOption::AutoUnmount,
        ] {
            let mut config = Config::default();
            config.mount_options = vec![bad.clone()];
            assert!(
                mount_plan(&config).is_err(),
                "expected {bad:?} to be refused"
            );
        }
    }
}
