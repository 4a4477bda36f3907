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

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use fuser::{Config, Filesystem, MountOption, Session, SessionACL, SessionUnmounter};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::ForkResult;

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
    unmounter: Unmounter,
}

/// How to unmount: through fuser (it used fusermount3), or our own direct mount as root.
enum Unmounter {
    Fuser(SessionUnmounter),
    Direct(Arc<DirectMount>),
}

impl Unmounter {
    fn unmount(&mut self) -> io::Result<()> {
        match self {
            Unmounter::Fuser(u) => u.unmount(),
            Unmounter::Direct(m) => m.unmount(),
        }
    }
}

/// A mount made by [`mount_direct`]. `dev` is a duplicate of the session's /dev/fuse
/// descriptor, kept only to ask the kernel whether this very mount still exists.
struct DirectMount {
    mountpoint: CString,
    dev: OwnedFd,
}

impl DirectMount {
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
                // Cannot tell: assume mounted, the umount call itself will then say.
                Err(_) => return true,
            }
        }
    }

    /// Unmounts; if files are still open (EBUSY), detaches lazily: the mount vanishes from the
    /// tree at once and the daemon keeps serving the open files until they are closed, then
    /// the session ends normally and `destroy` commits.
    fn unmount(&self) -> io::Result<()> {
        if !self.is_mounted() {
            return Ok(());
        }
        match nix::mount::umount2(self.mountpoint.as_c_str(), MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EBUSY) => {
                tracing::warn!(
                    "{:?} is busy: detaching it now, the daemon ends when the last open file \
                     is closed",
                    self.mountpoint
                );
                nix::mount::umount2(self.mountpoint.as_c_str(), MntFlags::MNT_DETACH)
                    .map_err(io::Error::from)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Mounts `fs` on `mountpoint` and performs the FUSE handshake (the filesystem's `init` runs
/// here), so the mount is usable when this returns. As root the mount is made directly with
/// type `fuse.<subtype>`; otherwise (or if the kernel refuses with EPERM) fuser mounts through
/// the setuid `fusermount3`, which sets the same type from the `subtype=` option.
pub fn mount<F: Filesystem>(
    fs: F,
    mountpoint: &Path,
    config: &Config,
) -> io::Result<MountedSession<F>> {
    let fs = if nix::unistd::geteuid().is_root() {
        match mount_direct(fs, mountpoint, config)? {
            Ok(mounted) => return Ok(mounted),
            Err(fs) => fs,
        }
    } else {
        fs
    };
    // fusermount3 splits its option list at commas and honours backslash escapes; fuser
    // passes the fsname unescaped, so escape it here.
    let mut config = config.clone();
    for option in &mut config.mount_options {
        if let MountOption::FSName(name) = option {
            *name = crate::mount_opts::escape_option_value(name);
        }
    }
    let mut session = Session::new(fs, mountpoint, &config)?;
    let unmounter = Unmounter::Fuser(session.unmount_callable());
    Ok(MountedSession { session, unmounter })
}

/// The kernel's mount(2) arguments for a configuration: (source, fstype, flags, options).
fn kernel_mount_args(config: &Config) -> io::Result<(String, String, MsFlags, Vec<String>)> {
    let mut source = String::from("/dev/fuse");
    let mut fstype = String::from("fuse");
    // nosuid,nodev always: the stick is untrusted, whatever the configuration says.
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mut options = Vec::new();
    for option in &config.mount_options {
        match option {
            MountOption::FSName(name) => source = name.clone(),
            MountOption::Subtype(subtype) => fstype = format!("fuse.{subtype}"),
            MountOption::DefaultPermissions => options.push("default_permissions".to_owned()),
            MountOption::NoSuid => flags |= MsFlags::MS_NOSUID,
            MountOption::NoDev => flags |= MsFlags::MS_NODEV,
            MountOption::RO => flags |= MsFlags::MS_RDONLY,
            MountOption::NoExec => flags |= MsFlags::MS_NOEXEC,
            MountOption::NoAtime => flags |= MsFlags::MS_NOATIME,
            MountOption::Sync => flags |= MsFlags::MS_SYNCHRONOUS,
            MountOption::DirSync => flags |= MsFlags::MS_DIRSYNC,
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
        SessionACL::All | SessionACL::RootAndOwner => options.push("allow_other".to_owned()),
        SessionACL::Owner => {}
    }
    Ok((source, fstype, flags, options))
}

/// Mounts as root with mount(2), then hands the /dev/fuse descriptor to fuser. Returns the
/// filesystem back (`Ok(Err(fs))`) when the kernel says EPERM, so the caller can try
/// fusermount3 (root without CAP_SYS_ADMIN, e.g. in a user namespace).
fn mount_direct<F: Filesystem>(
    fs: F,
    mountpoint: &Path,
    config: &Config,
) -> io::Result<Result<MountedSession<F>, F>> {
    let (source, fstype, flags, extra) = kernel_mount_args(config)?;
    let mountpoint = mountpoint.canonicalize()?;
    let root_mode = std::fs::metadata(&mountpoint)?.mode() & libc::S_IFMT;
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
    for option in extra {
        data.push(',');
        data.push_str(&option);
    }
    match nix::mount::mount(
        Some(source.as_str()),
        &mountpoint,
        Some(fstype.as_str()),
        flags,
        Some(data.as_str()),
    ) {
        Ok(()) => {}
        Err(Errno::EPERM) => return Ok(Err(fs)),
        Err(e) => {
            return Err(io::Error::new(
                io::Error::from(e).kind(),
                format!("mount({source:?}, {mountpoint:?}, {fstype}, {data}): {e}"),
            ))
        }
    }
    let direct = Arc::new(DirectMount {
        mountpoint: CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        dev: dev.try_clone()?,
    });
    match Session::from_fd(fs, dev, config.acl, config.clone()) {
        Ok(session) => Ok(Ok(MountedSession {
            session,
            unmounter: Unmounter::Direct(direct),
        })),
        Err(e) => {
            if let Err(u) = direct.unmount() {
                tracing::error!("unmounting {mountpoint:?} after a failed handshake: {u}");
            }
            Err(e)
        }
    }
}

impl<F: Filesystem> MountedSession<F> {
    /// Serves requests until the filesystem is unmounted, by `umount`/`fusermount3 -u` or by
    /// a termination signal (caught by a thread started here; see
    /// [`block_termination_signals`]). The filesystem's `destroy` has run when this returns.
    pub fn run(self) -> io::Result<()> {
        let MountedSession { session, unmounter } = self;
        let direct = match &unmounter {
            Unmounter::Direct(d) => Some(Arc::clone(d)),
            Unmounter::Fuser(_) => None,
        };
        spawn_signal_thread(unmounter)?;
        let result = session.run();
        // fuser unmounts its own mounts when the session is dropped; ours we unmount here,
        // which matters only when the loop ended with an error while still mounted.
        if let Some(direct) = direct {
            if let Err(e) = direct.unmount() {
                tracing::error!("unmounting after the session ended: {e}");
            }
        }
        result
    }
}

fn spawn_signal_thread(mut unmounter: Unmounter) -> io::Result<()> {
    let set = termination_signals();
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || loop {
            match set.wait() {
                Ok(signal) => {
                    tracing::info!("received {signal}: unmounting");
                    if let Err(e) = unmounter.unmount() {
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
    fn kernel_args_are_always_nosuid_nodev() {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("/media/s,x/pershome".into()),
            MountOption::Subtype("pershomefs".into()),
            MountOption::DefaultPermissions,
            MountOption::RO,
            MountOption::NoExec,
        ];
        config.acl = SessionACL::RootAndOwner;
        let got = kernel_mount_args(&config).map_err(|e| e.to_string());
        let expected = Ok((
            "/media/s,x/pershome".to_owned(),
            "fuse.pershomefs".to_owned(),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC,
            vec!["default_permissions".to_owned(), "allow_other".to_owned()],
        ));
        assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
    }

    #[test]
    fn kernel_args_refuse_suid_and_dev() {
        for bad in [
            MountOption::Suid,
            MountOption::Dev,
            MountOption::AutoUnmount,
        ] {
            let mut config = Config::default();
            config.mount_options = vec![bad.clone()];
            assert!(
                kernel_mount_args(&config).is_err(),
                "expected {bad:?} to be refused"
            );
        }
    }
}
