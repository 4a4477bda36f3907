//! pershome beside LTSP 23's pamltsp, outside the VM: real PAM sessions (pam-client, a test
//! service with pam_exec running the built `pershome-config`), real users (useradd), a stick
//! directory (`--stick-dir`), and a `--root` of its own that plays the LTSP machine
//! (`run/ltsp/client` for a client, `usr/sbin/ltsp` for a server). Covers: the server side
//! of a client login (a remote session) never fails, even with `deny`; the per-user SSHFS
//! decision, through pershome's real block in pamltsp.conf sourced by /bin/sh as pamltsp does;
//! on a client, a missing home is made and a home pamltsp mounted over SSHFS is left alone with
//! the person told; add-user on an LTSP server says what must follow.
//!
//! Needs root (PAM service files, useradd, mounts). Every test cleans up through guards.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pam_client::conv_mock::Conversation;
use pam_client::{Context, Flag};

mod common;

const HOOK: &str = env!("CARGO_BIN_EXE_pershome-config");

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tests/ltsp.rs needs root (PAM service files, useradd, mounts): run it as root"
    );
}

struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn new() -> TestUser {
        let name = unique("phl");
        let status = Command::new("/usr/sbin/useradd")
            .args([
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(&name)
            .status()
            .expect("running useradd");
        assert!(status.success(), "useradd {name}: {status}");
        let user = nix::unistd::User::from_name(&name)
            .expect("look-up")
            .expect("the user just added");
        TestUser {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/userdel").arg(&self.name).status();
    }
}

/// The test's root, under /run (its parents are root's, as the hook requires of a home's).
struct TestRoot {
    dir: tempfile::TempDir,
}

impl TestRoot {
    fn new(config: &str) -> TestRoot {
        let dir = tempfile::Builder::new()
            .prefix("pershome-ltsptest")
            .tempdir_in("/run")
            .expect("temporary root under /run");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in ["etc/ltsp", "etc/pershome", "home", "run", "sticks"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("etc/pershome/config.toml"), config).unwrap();
        std::fs::write(dir.path().join("etc/ltsp/persistent_homes"), "").unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "").unwrap();
        TestRoot { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Makes the root an LTSP client, as `ltsp init` marks one.
    fn client(&self) {
        std::fs::create_dir_all(self.path().join(pershome::ltsp::CLIENT_MARK)).unwrap();
    }

    /// Adds `user` to the root's passwd with home /home/NAME; the home is not created.
    fn add_account(&self, user: &TestUser) -> PathBuf {
        let line = format!(
            "{0}:x:{1}:{2}::/home/{0}:/usr/sbin/nologin\n",
            user.name, user.uid, user.gid
        );
        let mut passwd = std::fs::read_to_string(self.path().join("etc/passwd")).unwrap();
        passwd.push_str(&line);
        std::fs::write(self.path().join("etc/passwd"), passwd).unwrap();
        self.path().join("home").join(&user.name)
    }

    fn make_home(&self, user: &TestUser) -> PathBuf {
        let home = self.path().join("home").join(&user.name);
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(user.uid), Some(user.gid)).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        home
    }

    fn list(&self, user: &TestUser) {
        let path = self.path().join("etc/ltsp/persistent_homes");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!("{}\n", user.name));
        std::fs::write(path, text).unwrap();
    }

    /// The stick directory (shared by all users of the root); `prepared`: with pershome/.
    fn stick(&self, prepared: bool) -> PathBuf {
        let stick = self.path().join("sticks/s1");
        std::fs::create_dir_all(&stick).unwrap();
        if prepared {
            std::fs::create_dir_all(stick.join("pershome")).unwrap();
        }
        stick
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mine: Vec<PathBuf> = pershome::stick::mountinfo::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mountpoint)
            .filter(|m| m.starts_with(self.path()))
            .collect();
        for m in mine.iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !common::daemons_serving(m).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `/etc/pam.d/pershome-ltsptest-*` with the hook as `required` (what `deny` installs).
struct PamService {
    name: String,
}

impl PamService {
    fn new(root: &Path, stick: &Path) -> PamService {
        let name = unique("pershome-ltsptest-");
        let text = format!(
            "# pershome test service (tests/ltsp.rs); removed when the test ends\n\
             auth     required pam_permit.so\n\
             account  required pam_permit.so\n\
             session  required pam_exec.so quiet stdout {HOOK} --root {} session --stick-dir {}\n",
            root.display(),
            stick.display()
        );
        std::fs::write(Path::new("/etc/pam.d").join(&name), text).expect("writing the service");
        PamService { name }
    }
}

impl Drop for PamService {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(Path::new("/etc/pam.d").join(&self.name));
    }
}

fn pam(service: &PamService, user: &TestUser, rhost: Option<&str>) -> Context<Conversation> {
    let mut ctx = Context::new(
        &service.name,
        Some(&user.name),
        Conversation::with_credentials(&user.name, "unused"),
    )
    .expect("PAM context");
    if let Some(host) = rhost {
        ctx.set_rhost(Some(host)).expect("setting PAM_RHOST");
    }
    ctx.authenticate(Flag::NONE).expect("authenticate");
    ctx.acct_mgmt(Flag::NONE).expect("account");
    ctx
}

fn infos(ctx: &Context<Conversation>) -> String {
    ctx.conversation()
        .infos()
        .map(|m| m.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn fstype_at(path: &Path) -> Option<String> {
    pershome::stick::mountinfo::mount_at(path)
        .expect("reading mountinfo")
        .map(|m| m.fstype)
}

const DENY: &str = "commit_interval = 1\nlogout_timeout = 3\non_missing_stick = \"deny\"\n";
const FALLBACK: &str = "commit_interval = 1\nlogout_timeout = 3\n";

/// The server side of an LTSP login: pamltsp's `ssh user@server sftp` opens a PAM session on
/// the server with PAM_RHOST set. With `deny` and no stick there (the stick is on the client),
/// that session must still open, and nothing is mounted. The same user at the console (no
/// PAM_RHOST) is refused, so the configuration does deny.
#[test]
fn remote_session_is_left_alone_even_with_deny() {
    require_root();
    let root = TestRoot::new(DENY);
    let alice = TestUser::new();
    let home = root.add_account(&alice);
    root.make_home(&alice);
    root.list(&alice);
    let stick = root.path().join("sticks/none"); // no stick on the server
    let service = PamService::new(root.path(), &stick);

    let mut ctx = pam(&service, &alice, Some("192.168.67.20"));
    let session = ctx
        .open_session(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("a remote session (pamltsp's ssh) must open although deny is set");
    assert_eq!(
        fstype_at(&home),
        None,
        "expected nothing mounted on {home:?}"
    );
    assert!(
        !root.path().join("run/pershome").join(&alice.name).exists(),
        "expected the hook to do nothing at all in a remote session"
    );
    session
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");

    let mut ctx = pam(&service, &alice, None);
    let refused = ctx.open_session(Flag::NONE).map(|s| s.leak()).is_err();
    assert!(
        refused,
        "expected a local session without a stick to be refused with deny"
    );
}

/// Runs pershome's block of pamltsp.conf as pamltsp does (`. /etc/ltsp/pamltsp.conf` in
/// /bin/sh with PAM_USER set), with /usr/bin/pershome-config standing for the built binary
/// under this root and stick, and returns the SSHFS value it leaves (`unset` when none).
fn sshfs_after_block(root: &Path, stick: &Path, user: &str) -> String {
    sshfs_after_block_at(root, stick, user, "auth")
}

/// As `sshfs_after_block`, with pamltsp's PAM_TYPE `pam_type`.
fn sshfs_after_block_at(root: &Path, stick: &Path, user: &str, pam_type: &str) -> String {
    let wrapper = root.join("pershome-config");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {HOOK} --root {} \"$@\" --stick-dir {}\n",
            root.display(),
            stick.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let block = pershome::ltsp::block().replace(
        pershome::pam_setup::PERSHOME_CONFIG_BIN,
        wrapper.to_str().unwrap(),
    );
    assert_ne!(
        block,
        pershome::ltsp::block(),
        "the block names the program"
    );
    let conf = root.join(pershome::ltsp::PAMLTSP_CONF);
    std::fs::write(&conf, format!("SSH_SERVER='server'\n{block}")).unwrap();
    let out = Command::new("/bin/sh")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("PAM_USER", user)
        .env("PAM_TYPE", pam_type)
        .arg("-c")
        .arg(". \"$1\"; printf %s \"${SSHFS-unset}\"")
        .arg("sh")
        .arg(&conf)
        .output()
        .expect("running /bin/sh");
    assert!(out.status.success(), "sourcing the block: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The SSHFS decision through the real block: a listed user with a prepared stick gets
/// SSHFS=0; without the stick (fallback) pamltsp keeps the SSHFS server home; with `deny` and
/// no stick no SSHFS home is mounted for a login that will be refused; an unlisted user is
/// never touched. Nothing stays mounted after the probe.
#[test]
fn pamltsp_block_decides_sshfs_per_user() {
    require_root();
    let root = TestRoot::new(FALLBACK);
    let (alice, bob) = (TestUser::new(), TestUser::new());
    root.add_account(&alice);
    root.add_account(&bob);
    root.list(&alice);
    let stick = root.stick(false);

    assert_eq!(
        sshfs_after_block(root.path(), &stick, &alice.name),
        "unset",
        "alice without a prepared stick keeps her SSHFS server home"
    );
    std::fs::create_dir(stick.join("pershome")).unwrap();
    assert_eq!(
        sshfs_after_block(root.path(), &stick, &alice.name),
        "0",
        "alice with her stick: no SSHFS home"
    );
    assert!(
        pershome::session::claim::look(&stick.join("pershome"))
            .mark
            .is_none(),
        "the probe runs before the password is checked: it must not claim the fresh stick"
    );
    assert_eq!(
        sshfs_after_block_at(root.path(), &stick, &alice.name, "close_session"),
        "unset",
        "at session close pamltsp only unmounts: no probe (it would mount the stick again)"
    );
    assert_eq!(
        sshfs_after_block(root.path(), &stick, &bob.name),
        "unset",
        "bob is not listed: pamltsp as configured"
    );
    let mp = root
        .path()
        .join("run/pershome")
        .join(&alice.name)
        .join("raw/stick");
    assert_eq!(
        fstype_at(&mp),
        None,
        "the probe must not leave the stick mounted"
    );

    std::fs::remove_dir(stick.join("pershome")).unwrap();
    std::fs::write(root.path().join("etc/pershome/config.toml"), DENY).unwrap();
    assert_eq!(
        sshfs_after_block(root.path(), &stick, &alice.name),
        "0",
        "deny and no stick: the login is refused, so no SSHFS home is mounted for it"
    );
}

/// On a client, a login pamltsp did not prepare (autologin, guest) has no /home/USER: the hook
/// makes it (0700, the user's) and mounts the stick home on it.
#[test]
fn client_makes_missing_home() {
    require_root();
    let root = TestRoot::new(FALLBACK);
    root.client();
    let alice = TestUser::new();
    let home = root.add_account(&alice);
    root.list(&alice);
    let stick = root.stick(true);
    let service = PamService::new(root.path(), &stick);

    let mut ctx = pam(&service, &alice, None);
    let session = ctx
        .open_session(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("open_session");
    let token = session.leak();
    assert_eq!(
        fstype_at(&home).as_deref(),
        Some("fuse.pershomefs"),
        "expected the stick home on the made {home:?}; said {:?}",
        infos(&ctx)
    );
    let session = ctx.unleak_session(token);
    session
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
    assert_eq!(fstype_at(&home), None, "nothing mounted after close");
    let meta = std::fs::symlink_metadata(&home).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (alice.uid, alice.gid, 0o700),
        "the made home"
    );
}

/// A mount of type fuse.sshfs on `path`, as pamltsp's sshfs makes one (its connection closed:
/// only the mount table entry matters to the hook). Unmounted on drop.
struct SshfsLike(PathBuf);

impl SshfsLike {
    fn mount(path: &Path, uid: u32, gid: u32) -> SshfsLike {
        use std::os::fd::AsRawFd;
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .expect("opening /dev/fuse");
        let data = format!(
            "fd={},rootmode=40000,user_id={uid},group_id={gid},allow_other",
            dev.as_raw_fd()
        );
        nix::mount::mount(
            Some("alice@server:"),
            path,
            Some("fuse.sshfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .expect("mounting a fuse.sshfs entry");
        drop(dev); // aborts the connection: any access gets ENOTCONN, never a hang
        SshfsLike(path.to_path_buf())
    }
}

impl Drop for SshfsLike {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The missing-stick fallback on a client: pamltsp mounted the server home over SSHFS (the
/// block kept SSHFS because no stick was there at auth). The hook leaves it alone, tells the
/// person that this is the server home, and leaves the desktop notice; the login goes on.
#[test]
fn client_with_sshfs_home_is_told_server_home() {
    require_root();
    let root = TestRoot::new(FALLBACK);
    root.client();
    let alice = TestUser::new();
    let home = root.add_account(&alice);
    root.make_home(&alice);
    root.list(&alice);
    let stick = root.path().join("sticks/none");
    let service = PamService::new(root.path(), &stick);
    let _sshfs = SshfsLike::mount(&home, alice.uid, alice.gid);

    let mut ctx = pam(&service, &alice, None);
    let session = ctx
        .open_session(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("the login goes on with the server home");
    let token = session.leak();
    assert_eq!(fstype_at(&home).as_deref(), Some("fuse.sshfs"), "untouched");
    let said = infos(&ctx);
    for want in ["home folder on the server", "no USB stick", "log in again"] {
        assert!(said.contains(want), "expected {want:?} in {said:?}");
    }
    let notice = pershome::session::rundir::read_notice(root.path(), &alice.name)
        .expect("reading the notice")
        .unwrap_or_default();
    assert!(
        notice.contains("home folder on the server"),
        "expected the desktop notice, got {notice:?}"
    );
    let session = ctx.unleak_session(token);
    session
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
}

/// add-user on an LTSP server puts the block into pamltsp.conf and names `ltsp initrd`;
/// doctor then reports the initrd as older than the list.
#[test]
fn add_user_on_ltsp_server_says_what_follows() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("usr/sbin")).unwrap();
    std::os::unix::fs::symlink("../share/ltsp/ltsp", root.path().join("usr/sbin/ltsp")).unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(root.path().join("etc/passwd"), "").unwrap();
    let out = Command::new(HOOK)
        .arg("--root")
        .arg(root.path())
        .args(["add-user", "carol"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "add-user: {out:?}");
    assert!(
        text.contains("ltsp initrd"),
        "expected `ltsp initrd` in {text:?}"
    );
    assert!(text.contains("reboot the clients"), "got {text:?}");
    let conf = std::fs::read_to_string(root.path().join(pershome::ltsp::PAMLTSP_CONF)).unwrap();
    assert!(pershome::ltsp::has_block(&conf), "got {conf:?}");

    let out = Command::new(HOOK)
        .arg("--root")
        .arg(root.path())
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PROBLEM  ltsp initrd") && text.contains("PROBLEM  ltsp image"),
        "expected doctor to ask for ltsp initrd and ltsp image, got:\n{text}"
    );
    assert!(text.contains("OK       pamltsp.conf"), "got:\n{text}");
}
