//! The login hook in real PAM sessions on this machine: a test PAM service
//! (`/etc/pam.d/pershome-test-*`: pam_permit for auth and account, pam_exec running the built
//! `pershome-config session` for the session), real users (useradd), and the `pam-client`
//! crate opening and closing sessions as a login program does. The "stick" is a directory
//! (`--stick-dir`), and the configuration lives under a `--root` of its own, so nothing of
//! the machine's own /etc/ltsp or /etc/pershome is touched.
//!
//! Needs root (PAM service files, useradd, mounts); skipped otherwise. Every test cleans up
//! through guards, also when it fails: users, the service file, mounts, daemons.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pam_client::conv_mock::Conversation;
use pam_client::{Context, Flag};
use pershome::stick::{discover, StickFs};

mod common;

const HOOK: &str = env!("CARGO_BIN_EXE_pershome-config");

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test run: `phtPPPPPN` (short: user names stay under 32 bytes).
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// A user made with useradd, removed (with its group) on drop.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn new() -> TestUser {
        let name = unique("pht");
        let status = Command::new("useradd")
            .args([
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(&name)
            .status()
            .expect("running useradd");
        assert!(
            status.success(),
            "useradd {name}: expected success, got {status}"
        );
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
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// The test's root (`--root`): under /run, whose parents only root can write (the hook
/// refuses homes below a world-writable /tmp). Holds etc/passwd, etc/ltsp/persistent_homes,
/// etc/pershome/config.toml, home/USER, run/, and the stick directories. On drop, anything
/// still mounted below it is unmounted and its daemons waited for.
struct TestRoot {
    dir: tempfile::TempDir,
}

impl TestRoot {
    fn new(config: &str) -> TestRoot {
        let dir = tempfile::Builder::new()
            .prefix("pershome-pamtest")
            .tempdir_in("/run")
            .expect("temporary root under /run");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in ["etc/ltsp", "etc/pershome", "home", "run", "sticks"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("etc/pershome/config.toml"), config).unwrap();
        std::fs::write(
            dir.path().join("etc/ltsp/persistent_homes"),
            "# test users\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "").unwrap();
        TestRoot { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds `user` to the root's passwd with home /home/NAME (created 0700, owned by them).
    fn add_account(&self, user: &TestUser) -> PathBuf {
        let line = format!(
            "{0}:x:{1}:{2}::/home/{0}:/usr/sbin/nologin\n",
            user.name, user.uid, user.gid
        );
        let mut passwd = std::fs::read_to_string(self.path().join("etc/passwd")).unwrap();
        passwd.push_str(&line);
        std::fs::write(self.path().join("etc/passwd"), passwd).unwrap();
        let home = self.path().join("home").join(&user.name);
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(user.uid), Some(user.gid)).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        home
    }

    /// Lists `user` in etc/ltsp/persistent_homes.
    fn list(&self, user: &TestUser) {
        let path = self.path().join("etc/ltsp/persistent_homes");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!("{}\n", user.name));
        std::fs::write(path, text).unwrap();
    }

    /// A stick directory for `user`; with `prepared`, it has a pershome/ folder.
    fn stick(&self, name: &str, prepared: bool) -> PathBuf {
        let stick = self.path().join("sticks").join(name);
        std::fs::create_dir_all(&stick).unwrap();
        if prepared {
            std::fs::create_dir(stick.join("pershome")).unwrap();
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

/// `/etc/pam.d/pershome-test-*`, removed on drop.
struct PamService {
    name: String,
}

impl PamService {
    fn new(root: &Path, stick: &Path) -> PamService {
        Self::with_control(root, stick, "optional")
    }

    /// With `control` (`optional`, `required`) on the session line.
    fn with_control(root: &Path, stick: &Path, control: &str) -> PamService {
        let name = unique("pershome-test-");
        let text = format!(
            "# pershome test service (tests/pam_session.rs); removed when the test ends\n\
             auth     required pam_permit.so\n\
             account  required pam_permit.so\n\
             session  {control} pam_exec.so quiet stdout {HOOK} --root {} session --stick-dir {}\n",
            root.display(),
            stick.display()
        );
        std::fs::write(Path::new("/etc/pam.d").join(&name), text).expect("writing the PAM service");
        PamService { name }
    }
}

impl Drop for PamService {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(Path::new("/etc/pam.d").join(&self.name));
    }
}

/// A PAM context for `user` through `service`, authenticated and with its account checked.
fn pam(service: &PamService, user: &TestUser) -> Context<Conversation> {
    let mut ctx = Context::new(
        &service.name,
        Some(&user.name),
        Conversation::with_credentials(&user.name, "unused"),
    )
    .expect("PAM context");
    ctx.authenticate(Flag::NONE)
        .expect("authenticate (pam_permit)");
    ctx.acct_mgmt(Flag::NONE).expect("account (pam_permit)");
    ctx
}

/// The info messages (pam_exec's `stdout`) the conversation got, as one text.
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

/// Runs `program args` as `uid`/`gid`; returns (success, stderr).
fn run_as(uid: u32, gid: u32, program: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("running a program as the test user");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CONFIG: &str = "commit_interval = 1\nlogout_timeout = 3\n";

macro_rules! needs_root {
    () => {
        if pershome::testing::skip_without_root(
            "a PAM session test (service files, useradd, mounts)",
        ) {
            return;
        }
    };
}

/// The whole flow for a listed user with a prepared stick: the open mounts pershomefs on the
/// home (owned by the user, private), files land on the stick, another user gets EACCES, the
/// close unmounts and no daemon is left.
#[test]
fn open_mounts_the_stick_home_and_close_unmounts_it() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let (alice, bob) = (TestUser::new(), TestUser::new());
    let home = root.add_account(&alice);
    root.add_account(&bob);
    root.list(&alice);
    let stick = root.stick("s1", true);
    // An attacker's stick: a symlink to a file only root may read. The daemon runs as root; it
    // must neither follow nor show it.
    std::os::unix::fs::symlink("/etc/shadow", stick.join("pershome/shadow")).unwrap();
    // The stick has content, so it must be claimed for alice first (by the administrator).
    config_ok(
        &root,
        &["claim".as_ref(), alice.name.as_ref(), stick.as_os_str()],
    );
    let service = PamService::new(root.path(), &stick);

    let mut ctx = pam(&service, &alice);
    let session = ctx.open_session(Flag::NONE).expect("open_session");
    let token = session.leak();
    assert_eq!(
        fstype_at(&home).as_deref(),
        Some("fuse.pershomefs"),
        "expected pershomefs on {home:?}"
    );
    let said = infos(&ctx);
    assert!(
        said.contains("your home folder is on your stick"),
        "expected the mount message, got {said:?}"
    );

    // The user works in the home: the file lands in the stick's pershome/.
    let file = home.join("notes.txt");
    let (ok, err) = run_as(alice.uid, alice.gid, "touch", &[file.as_os_str()]);
    assert!(ok, "alice creating {file:?}: expected success, got {err}");
    assert!(
        stick.join("pershome/notes.txt").is_file(),
        "expected notes.txt on the stick"
    );
    let meta = std::fs::metadata(&home).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (alice.uid, 0o700),
        "expected the home owned by alice, mode 700"
    );
    let planted = home.join("shadow");
    let (ok, err) = run_as(alice.uid, alice.gid, "cat", &[planted.as_os_str()]);
    assert!(
        !ok && err.contains("No such file"),
        "expected the planted symlink to be invisible, got ok={ok} {err}"
    );
    // Another local user cannot read it (security: docs/security.md).
    let (ok, err) = run_as(bob.uid, bob.gid, "ls", &[home.as_os_str()]);
    assert!(
        !ok && err.contains("Permission denied"),
        "expected EACCES for bob, got ok={ok} {err}"
    );
    let (ok, err) = run_as(bob.uid, bob.gid, "cat", &[file.as_os_str()]);
    assert!(
        !ok && err.contains("Permission denied"),
        "expected EACCES for bob reading a file, got ok={ok} {err}"
    );
    // The stick's raw mount is out of reach of the user too (it sits in a root-only 0700
    // directory), so nobody changes the stick behind the daemon's back.
    let stick_mp = root
        .path()
        .join("run/pershome")
        .join(&alice.name)
        .join("raw/stick");
    assert!(
        fstype_at(&stick_mp).is_some(),
        "expected the stick directory bound on {stick_mp:?}"
    );
    let (ok, err) = run_as(alice.uid, alice.gid, "ls", &[stick_mp.as_os_str()]);
    assert!(
        !ok && err.contains("Permission denied"),
        "expected EACCES for alice on the raw stick, got ok={ok} {err}"
    );

    let session = ctx.unleak_session(token);
    session
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close_session");
    assert_eq!(
        fstype_at(&home),
        None,
        "expected nothing mounted on {home:?} after close"
    );
    let left = common::daemons_serving(&home);
    assert!(
        left.is_empty(),
        "expected no pershomefs daemon after close, got {left:?}"
    );
    let said = infos(&ctx);
    assert!(
        said.contains("you can remove your stick"),
        "expected the removal message, got {said:?}"
    );
    // The stick is claimed for alice with this site's key.
    let mark =
        std::fs::read_to_string(stick.join("pershome/.pershome/owner-name")).unwrap_or_default();
    let mut lines = mark.lines();
    assert_eq!(
        lines.next(),
        Some(alice.name.as_str()),
        "owner mark: {mark:?}"
    );
    assert!(
        lines.next().is_some_and(|l| l.starts_with("claim1 ")),
        "expected a claim line in {mark:?}"
    );
}

/// Issue 11, defect 4: when the daemon's last commit does not land (here the stick is full),
/// the logout message must not say the files are saved: the daemon's exit status (its
/// `status=` file) tells the hook, and the hook says the last changes could NOT be saved.
#[test]
fn a_full_stick_is_not_reported_as_saved_at_logout() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let erin = TestUser::new();
    let home = root.add_account(&erin);
    root.list(&erin);
    let stick = root.stick("full", false);
    // The stick: a 2 MiB tmpfs, unmounted when the test ends (before `root` goes).
    struct Tmpfs(PathBuf);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    nix::mount::mount(
        Some("tmpfs"),
        &stick,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("size=2m,mode=0755"),
    )
    .expect("mount a tmpfs as the stick");
    let _tmpfs = Tmpfs(stick.clone());
    std::fs::create_dir(stick.join("pershome")).expect("mkdir pershome");
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &erin);
    let token = ctx.open_session(Flag::NONE).expect("open_session").leak();
    assert_eq!(fstype_at(&home).as_deref(), Some("fuse.pershomefs"));
    // Fill the stick, then work: the changes cannot be committed any more.
    let mut filler = std::fs::File::create(stick.join("filler")).expect("filler");
    let chunk = vec![0u8; 4096];
    while std::io::Write::write(&mut filler, &chunk).is_ok_and(|n| n > 0) {}
    drop(filler);
    let dirs: Vec<PathBuf> = (0..60)
        .map(|i| home.join(format!("made while the stick was full, a long name {i:03}")))
        .collect();
    let args: Vec<&std::ffi::OsStr> = dirs.iter().map(|d| d.as_os_str()).collect();
    let (ok, err) = run_as(erin.uid, erin.gid, "/usr/bin/mkdir", &args);
    assert!(ok, "mkdir in the home: {err}");
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close_session");
    assert_eq!(
        fstype_at(&home),
        None,
        "nothing mounted on {home:?} after close"
    );
    let said = infos(&ctx);
    assert!(
        said.contains("could NOT be saved") && !said.contains("your files are saved"),
        "expected the logout message to say the last changes were not saved, got {said:?}"
    );
}

/// `wants` is honoured: a user who is not listed (and has no ~/.persistent_home) gets nothing
/// mounted and no message.
#[test]
fn a_user_who_does_not_want_it_gets_nothing() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let carol = TestUser::new();
    let home = root.add_account(&carol);
    let stick = root.stick("s2", true);
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &carol);
    let session = ctx.open_session(Flag::NONE).expect("open_session");
    let token = session.leak();
    assert_eq!(
        fstype_at(&home),
        None,
        "expected nothing mounted on {home:?}"
    );
    let said = infos(&ctx);
    assert!(said.is_empty(), "expected no message, got {said:?}");
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close_session");
    assert!(
        !root.path().join("run/pershome").join(&carol.name).exists(),
        "expected no runtime directory for a user without a stick home"
    );
}

/// A stick without `pershome/`: the login goes on with the normal home, and the person is
/// told why and how to fix it, on the terminal and in the notice for the desktop dialog.
#[test]
fn a_stick_without_pershome_falls_back_with_the_message() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let dave = TestUser::new();
    let home = root.add_account(&dave);
    root.list(&dave);
    let stick = root.stick("s3", false);
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &dave);
    let session = ctx
        .open_session(Flag::NONE)
        .expect("open_session succeeds in fallback");
    let token = session.leak();
    assert_eq!(
        fstype_at(&home),
        None,
        "expected the normal home, nothing mounted"
    );
    let said = infos(&ctx);
    for want in [
        "no folder named \"pershome\"",
        "normal home folder",
        "pershome prepare",
    ] {
        assert!(
            said.contains(want),
            "expected {want:?} in the message, got {said:?}"
        );
    }
    let notice = root
        .path()
        .join("run/pershome")
        .join(&dave.name)
        .join("notice");
    let meta = std::fs::symlink_metadata(&notice).expect("the notice for the desktop dialog");
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (dave.uid, 0o400),
        "notice owner and mode"
    );
    // What `pershome notice` (the autostart entry) shows, here on a terminal.
    let mut shown = Vec::new();
    pershome::session::entry::show_notice_for(root.path(), &dave.name, false, &mut shown)
        .expect("showing the notice");
    let shown = String::from_utf8_lossy(&shown);
    assert!(
        shown.contains("pershome prepare") && shown.contains("no folder named"),
        "expected the notice to say why and how to fix it, got {shown:?}"
    );
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close_session");
}

/// Two sessions of one user share one mount; it goes at the close of the last.
#[test]
fn the_home_stays_until_the_last_session_closes() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let erin = TestUser::new();
    let home = root.add_account(&erin);
    root.list(&erin);
    let stick = root.stick("s4", true);
    let service = PamService::new(root.path(), &stick);
    let mut first = pam(&service, &erin);
    let mut second = pam(&service, &erin);
    let t1 = first.open_session(Flag::NONE).expect("first open").leak();
    let t2 = second.open_session(Flag::NONE).expect("second open").leak();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let n = mounts
        .lines()
        .filter(|l| l.contains(&format!(" {} ", home.display())))
        .count();
    assert_eq!(n, 1, "expected one mount on {home:?}, got {n}");
    first
        .unleak_session(t1)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("first close");
    assert_eq!(
        fstype_at(&home).as_deref(),
        Some("fuse.pershomefs"),
        "still mounted for the second session"
    );
    second
        .unleak_session(t2)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("second close");
    assert_eq!(
        fstype_at(&home),
        None,
        "expected the home unmounted after the last close"
    );
}

/// A program still in the home at logout: the close returns at once (the logout is never
/// held), and the background finisher unmounts once the program is gone.
#[test]
fn a_busy_home_is_unmounted_in_the_background() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let fred = TestUser::new();
    let home = root.add_account(&fred);
    root.list(&fred);
    let stick = root.stick("s5", true);
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &fred);
    let token = ctx.open_session(Flag::NONE).expect("open").leak();
    // A lingering program with its working directory in the home.
    let mut lingering = Command::new("sleep")
        .arg("300")
        .current_dir(&home)
        .uid(fred.uid)
        .gid(fred.gid)
        .spawn()
        .expect("starting a lingering program");
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let reap = Reap(&mut lingering);
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
    // The close returned while the program still runs in the home (it only ends when `reap`
    // kills it below): the logout did not wait for it, whatever the machine's speed.
    assert!(
        matches!(reap.0.try_wait(), Ok(None)),
        "expected the lingering program to outlive the close"
    );
    assert_eq!(
        fstype_at(&home).as_deref(),
        Some("fuse.pershomefs"),
        "still busy: still mounted"
    );
    drop(reap);
    common::wait_until("the finisher unmounts the home", || {
        fstype_at(&home).is_none()
    });
    common::wait_until("the daemon exits", || {
        common::daemons_serving(&home).is_empty()
    });
}

/// Runs `pershome-config --root ROOT ARGS` and asserts success.
fn config_ok(root: &TestRoot, args: &[&std::ffi::OsStr]) {
    let out = Command::new(HOOK)
        .arg("--root")
        .arg(root.path())
        .args(args)
        .output()
        .expect("running pershome-config");
    assert!(
        out.status.success(),
        "pershome-config {args:?}: expected success, got {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Security: a stick claimed as another user's home is not mounted as this user's home.
#[test]
fn a_stick_of_another_user_is_refused() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let (gina, owner) = (TestUser::new(), TestUser::new());
    let home = root.add_account(&gina);
    root.add_account(&owner);
    root.list(&gina);
    let stick = root.stick("s6", true);
    std::fs::write(stick.join("pershome/report.txt"), "the owner's work\n").unwrap();
    config_ok(
        &root,
        &["claim".as_ref(), owner.name.as_ref(), stick.as_os_str()],
    );
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &gina);
    let token = ctx.open_session(Flag::NONE).expect("open").leak();
    assert_eq!(
        fstype_at(&home),
        None,
        "expected another user's stick not to be mounted"
    );
    let said = infos(&ctx);
    assert!(
        said.contains(&owner.name),
        "expected the refusal to name the owner, got {said:?}"
    );
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
}

/// Security (issue 10, hole 2): a stick nobody claimed, whose `pershome/` holds a planted
/// `.bashrc`, never becomes the home of the listed user who logs in with it (nor is it
/// claimed for them); the person is told how to claim a stick. Once the administrator claims
/// it for them, it is their home.
#[test]
fn a_planted_stick_never_becomes_the_next_users_home() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let lena = TestUser::new();
    let home = root.add_account(&lena);
    root.list(&lena);
    let stick = root.stick("s12", true);
    std::fs::write(stick.join("pershome/.bashrc"), "echo planted\n").unwrap();
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &lena);
    let token = ctx.open_session(Flag::NONE).expect("open").leak();
    assert_eq!(
        fstype_at(&home),
        None,
        "expected the planted stick not to be mounted as the home"
    );
    let said = infos(&ctx);
    assert!(
        said.contains("not claimed as your home") && said.contains("pershome-config claim"),
        "expected the message to say how to claim, got {said:?}"
    );
    assert!(
        !stick.join("pershome/.pershome/owner-name").exists(),
        "expected nothing written on the planted stick"
    );
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
    config_ok(
        &root,
        &["claim".as_ref(), lena.name.as_ref(), stick.as_os_str()],
    );
    let mut ctx = pam(&service, &lena);
    let token = ctx.open_session(Flag::NONE).expect("open").leak();
    assert_eq!(
        fstype_at(&home).as_deref(),
        Some("fuse.pershomefs"),
        "expected the claimed stick mounted; said {:?}",
        infos(&ctx)
    );
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
}

/// Writes a store on `backing` that claims other owners, as any computer can: the root owned
/// by root with mode 0777 and an access ACL, `secret.txt` root's with mode 0600, `shared.txt`
/// owned by `other` with mode 0666.
fn plant_foreign_owners(backing: &Path, other: u32) {
    use pershome::fs::{Ctx, Fs, FsOptions, SetAttr, ROOT};
    let who = Ctx {
        uid: 0,
        gid: 0,
        pid: 1,
        umask: 0,
    };
    let fs = Fs::open_backing(backing, FsOptions::new(4242, 4242)).expect("opening the store");
    for (name, uid, mode) in [("secret.txt", 0, 0o600), ("shared.txt", other, 0o666)] {
        let (attr, fh) = fs
            .create(who, ROOT, name.as_bytes(), mode, libc::O_RDWR)
            .expect("create");
        fs.write(fh, 0, b"data\n").expect("write");
        fs.release(fh).expect("release");
        fs.setattr(
            attr.ino,
            SetAttr {
                uid: Some(uid),
                gid: Some(uid),
                mode: Some(mode),
                ..SetAttr::default()
            },
        )
        .expect("chown");
    }
    fs.setattr(
        ROOT,
        SetAttr {
            uid: Some(0),
            gid: Some(0),
            mode: Some(0o777),
            ..SetAttr::default()
        },
    )
    .expect("chmod the root");
    // user:OTHER:rwx, with a mask that lets it through.
    let mut acl = vec![2u8, 0, 0, 0];
    for (tag, perm, id) in [
        (1u16, 7u16, u32::MAX),
        (2, 7, other),
        (4, 7, u32::MAX),
        (0x10, 7, u32::MAX),
        (0x20, 7, u32::MAX),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    fs.setxattr(ROOT, b"system.posix_acl_access", &acl, 0)
        .expect("an access ACL on the root");
    fs.shutdown();
}

/// Security (issue 10, hole 3), in process: with `private_home` the store's owners do not
/// count from the first request on: the root is the mounting user's with mode 0700 and no
/// access ACL, and every file shows as theirs. Without it (a plain mount, pjdfstest), the
/// stored owners stay.
#[test]
fn private_home_ignores_the_owners_the_stick_claims() {
    use pershome::fs::{Fs, FsOptions, ROOT};
    let dir = tempfile::tempdir().unwrap();
    plant_foreign_owners(dir.path(), 4343);
    let private = FsOptions {
        private_home: true,
        ..FsOptions::new(1500, 1600)
    };
    let fs = Fs::open_backing(dir.path(), private).expect("opening privately");
    let root = fs.getattr(ROOT).unwrap();
    assert_eq!(
        (root.uid, root.gid, root.perm),
        (1500, 1600, 0o700),
        "expected the root the user's, 0700, at the first request"
    );
    let acl = fs.getxattr(ROOT, b"system.posix_acl_access", 0);
    assert!(
        acl.is_err(),
        "expected no access ACL on the root, got {acl:?}"
    );
    for name in ["secret.txt", "shared.txt"] {
        let a = fs.lookup(ROOT, name.as_bytes()).unwrap();
        assert_eq!((a.uid, a.gid), (1500, 1600), "{name}: expected the user's");
    }
    fs.shutdown();
    drop(fs);
    let plain = Fs::open_backing(dir.path(), FsOptions::new(1500, 1600)).unwrap();
    let root = plain.getattr(ROOT).unwrap();
    assert!(
        plain.getxattr(ROOT, b"system.posix_acl_access", 0).is_ok(),
        "expected the planted ACL in a plain mount"
    );
    assert_eq!(
        (root.uid, root.perm),
        (0, 0o777),
        "a plain mount keeps the stored owner"
    );
    let a = plain.lookup(ROOT, b"shared.txt").unwrap();
    assert_eq!(a.uid, 4343, "a plain mount keeps the stored owner");
    plain.shutdown();
}

/// Security (issue 10, hole 3), through the hook: a stick whose store says the home's root is
/// root's with mode 0777 (and an ACL for another user), that a file is root's 0600 and another
/// is a second user's: in the mounted home the root is the user's, 0700, the second user is
/// kept out, and the user reads every file.
#[test]
fn the_stick_never_decides_who_owns_the_home() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let (nora, otto) = (TestUser::new(), TestUser::new());
    let home = root.add_account(&nora);
    root.add_account(&otto);
    root.list(&nora);
    let stick = root.stick("s14", true);
    plant_foreign_owners(&stick.join("pershome"), otto.uid);
    config_ok(
        &root,
        &["claim".as_ref(), nora.name.as_ref(), stick.as_os_str()],
    );
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &nora);
    let token = ctx.open_session(Flag::NONE).expect("open").leak();
    assert_eq!(
        fstype_at(&home).as_deref(),
        Some("fuse.pershomefs"),
        "expected the stick home mounted; said {:?}",
        infos(&ctx)
    );
    let meta = std::fs::metadata(&home).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (nora.uid, 0o700),
        "expected the home nora's, mode 700"
    );
    for name in ["secret.txt", "shared.txt"] {
        let file = home.join(name);
        let (ok, err) = run_as(nora.uid, nora.gid, "/usr/bin/cat", &[file.as_os_str()]);
        assert!(ok, "nora reading {name}: expected success, got {err}");
        let (ok, err) = run_as(otto.uid, otto.gid, "/usr/bin/cat", &[file.as_os_str()]);
        assert!(
            !ok && err.contains("Permission denied"),
            "otto reading {name}: expected EACCES, got ok={ok} {err}"
        );
    }
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
}

/// Security (issue 10, hole 7): a mount over the stick home that the hook did not make (a
/// user's own FUSE mount) cannot keep the stick mounted after logout:
/// the close detaches their mount and unmounts the hook's, and the stick is released.
#[test]
fn a_users_mount_over_the_home_does_not_keep_the_stick() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let pia = TestUser::new();
    let home = root.add_account(&pia);
    root.list(&pia);
    let stick = root.stick("s15", true);
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &pia);
    let token = ctx.open_session(Flag::NONE).expect("open").leak();
    assert_eq!(fstype_at(&home).as_deref(), Some("fuse.pershomefs"));
    // A mount over the home that the hook did not make. A user does that with a FUSE mount
    // of their own (fusermount3 is setuid); this host's /dev/fuse is root's only, so the test
    // makes the covering mount itself (a tmpfs): to the hook both are "not its pershomefs".
    nix::mount::mount(
        Some("cover"),
        &home,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mounting a tmpfs over the home");
    let top = pershome::stick::mountinfo::mount_at(&home)
        .unwrap()
        .unwrap();
    assert_eq!(top.fstype, "tmpfs", "expected the cover on top: {top:?}");
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
    assert_eq!(
        fstype_at(&home),
        None,
        "expected nothing left on the home after the close"
    );
    let stick_mp = root
        .path()
        .join("run/pershome")
        .join(&pia.name)
        .join("raw/stick");
    assert_eq!(
        fstype_at(&stick_mp),
        None,
        "expected the stick released after the close"
    );
    common::wait_until("the daemons exit", || {
        common::daemons_serving(&home).is_empty()
    });
}

/// Security (issue 10, hole 7): a logout never waits without a bound on the daemon. With the
/// home's pershomefs daemon stopped (SIGSTOP: it answers nothing, as a daemon stuck on a dead
/// stick), the close still returns; only then is the daemon let go on. A watchdog continues
/// the daemon after two minutes so that a regression fails instead of hanging the suite; the
/// test checks which came first, not how long anything took.
#[test]
fn a_stopped_daemon_does_not_hold_the_logout() {
    needs_root!();
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let root = TestRoot::new(CONFIG);
    let quin = TestUser::new();
    let home = root.add_account(&quin);
    root.list(&quin);
    let stick = root.stick("s16", true);
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &quin);
    let token = ctx.open_session(Flag::NONE).expect("open").leak();
    let pids = common::daemons_serving(&home);
    assert_eq!(pids.len(), 1, "expected one daemon, got {pids:?}");
    let pid = nix::unistd::Pid::from_raw(pids[0]);
    // Something for the commit to do.
    let file = home.join("late.txt");
    let (ok, err) = run_as(quin.uid, quin.gid, "/usr/bin/touch", &[file.as_os_str()]);
    assert!(ok, "touch: {err}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let continued = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let continued = continued.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(120));
            continued.store(true, Ordering::SeqCst);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        })
    };
    struct Continue(nix::unistd::Pid);
    impl Drop for Continue {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let cont = Continue(pid);
    let closed = ctx
        .unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string());
    let returned_while_stopped = !continued.load(Ordering::SeqCst);
    drop(cont);
    drop(watchdog);
    closed.expect("close");
    assert!(
        returned_while_stopped,
        "expected the close to return while the daemon was stopped; it returned only after \
         the watchdog continued the daemon"
    );
    common::wait_until("the daemon exits", || {
        common::daemons_serving(&home).is_empty()
    });
}

/// Security (issue 10, hole 6): a `--stick-dir` reached through a symlinked component (which
/// whoever controls that link could point anywhere) is refused: nothing is bound or mounted,
/// and the person is told why.
#[test]
fn a_stick_dir_through_a_symlink_is_refused() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let mia = TestUser::new();
    let home = root.add_account(&mia);
    root.list(&mia);
    let real = root.path().join("real");
    std::fs::create_dir_all(real.join("s13/pershome")).unwrap();
    std::os::unix::fs::symlink(&real, root.path().join("sticklink")).unwrap();
    let service = PamService::new(root.path(), &root.path().join("sticklink/s13"));
    let mut ctx = pam(&service, &mia);
    let token = ctx.open_session(Flag::NONE).expect("open").leak();
    assert_eq!(
        fstype_at(&home),
        None,
        "expected nothing mounted from a stick directory behind a symlink"
    );
    let said = infos(&ctx);
    assert!(
        said.contains("symlink"),
        "expected the message to name the symlink, got {said:?}"
    );
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
}

/// Security: a home that is a symlink is never mounted over (the mount would land wherever
/// the link points).
#[test]
fn a_symlinked_home_is_refused() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let hank = TestUser::new();
    let home = root.add_account(&hank);
    root.list(&hank);
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir(&home).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &home).unwrap();
    let stick = root.stick("s7", true);
    let service = PamService::new(root.path(), &stick);
    let mut ctx = pam(&service, &hank);
    let token = ctx.open_session(Flag::NONE).expect("open").leak();
    assert_eq!(
        fstype_at(&elsewhere),
        None,
        "expected nothing mounted through the symlink"
    );
    let said = infos(&ctx);
    assert!(
        said.contains("symlink"),
        "expected the message to name the symlink, got {said:?}"
    );
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close");
}

/// The pam_mount entry point, called the way pam_mount calls it: `mount.fuse3
/// PROGRAM#mount-home MOUNTPOINT -o OPTIONS` (mount.fuse3 runs `PROGRAM mount-home MOUNTPOINT
/// -o OPTIONS`). The home is mounted; after pam_mount's `umount` at logout the daemon exits and
/// the watcher forgets the state. Uses the real /run/pershome/USER (removed by a guard).
#[test]
fn mount_home_through_mount_fuse3() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let name_home = root.path().join("home");
    let user = TestUser::new();
    let home = name_home.join(&user.name);
    let status = Command::new("usermod")
        .arg("--home")
        .arg(&home)
        .arg(&user.name)
        .status()
        .expect("usermod");
    assert!(status.success(), "usermod --home: {status}");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(user.uid), Some(user.gid)).unwrap();
    struct RunDir(PathBuf);
    impl Drop for RunDir {
        fn drop(&mut self) {
            // Detach anything still mounted below it first: removing the tree through a
            // bound stick would delete the stick's files.
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            for m in pershome::stick::mountinfo::parse_mountinfo(&text)
                .iter()
                .rev()
            {
                if m.mountpoint.starts_with(&self.0) {
                    let _ = nix::mount::umount2(&m.mountpoint, nix::mount::MntFlags::MNT_DETACH);
                }
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let run = RunDir(Path::new("/run/pershome").join(&user.name));
    // mount-home works on the real / (pam_mount gives no --root): the hook makes the site's
    // claim key there at first use. One this test made is removed again.
    struct KeyGuard(Option<PathBuf>);
    impl Drop for KeyGuard {
        fn drop(&mut self) {
            if let Some(key) = &self.0 {
                let _ = std::fs::remove_file(key);
                if let Some(dir) = key.parent() {
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
    }
    let key = Path::new("/").join(pershome::session::claim::KEY_PATH);
    let _key = KeyGuard((!key.exists()).then_some(key));
    let stick = root.stick("s8", true);
    let out = Command::new("mount.fuse3")
        .arg(format!("{HOOK}#mount-home"))
        .arg(&home)
        .arg("-o")
        .arg(format!(
            "nosuid,nodev,pershome_user={},stick_dir={}",
            user.name,
            stick.display()
        ))
        .output()
        .expect("running mount.fuse3");
    assert!(
        out.status.success(),
        "mount.fuse3: expected success, got {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fstype_at(&home).as_deref(),
        Some("fuse.pershomefs"),
        "expected pershomefs on {home:?}"
    );
    let file = home.join("from-pam-mount");
    let (ok, err) = run_as(user.uid, user.gid, "touch", &[file.as_os_str()]);
    assert!(ok, "creating {file:?}: {err}");
    assert!(
        stick.join("pershome/from-pam-mount").is_file(),
        "expected the file on the stick"
    );
    let state = run.0.join("state");
    assert!(
        state.exists(),
        "expected the state of the mount in {state:?}"
    );
    let status = Command::new("umount").arg(&home).status().expect("umount");
    assert!(status.success(), "umount {home:?}: {status}");
    common::wait_until("the daemon exits", || {
        common::daemons_serving(&home).is_empty()
    });
    common::wait_until("the watcher forgets the state", || !state.exists());
}

/// Every Rust source file under `dir`, recursively.
fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("listing the sources") {
        let path = entry.expect("listing the sources").path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Security (docs/security.md, "What root runs"): across every module of the crate (the hook,
/// the stick code, the tools, the daemon, the command-line front ends), no shell is ever
/// started, and no program is started except through `pershome::exec`, which names it by
/// absolute path and clears the environment. `Command::new` appears nowhere else, and the
/// variant that passes display variables on (`user_command`) only where a person runs a
/// dialog with their own rights.
#[test]
fn every_program_is_run_by_absolute_path_with_a_cleared_environment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_sources(&root.join("src"), &mut files);
    assert!(
        files.len() >= 40,
        "expected every source file of the crate, got {files:?}"
    );
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    let user_command_allowed = ["src/tools/zenity.rs", "src/session/entry.rs", "src/exec.rs"];
    let mut offenders = Vec::new();
    for path in &files {
        let name = rel(path);
        let text = std::fs::read_to_string(path).expect("reading a source file");
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let at = format!("{name}:{}: {}", i + 1, line.trim());
            for needle in [
                "\"sh\"",
                "\"/bin/sh\"",
                "\"bash\"",
                "\"-c\"",
                "libc::system",
                "popen",
                "execvp",
                "execlp",
            ] {
                if code.contains(needle) {
                    offenders.push(format!("a shell or PATH search: {at}"));
                }
            }
            if code.contains("Command::new") && name != "src/exec.rs" {
                offenders.push(format!("Command::new outside src/exec.rs: {at}"));
            }
            if code.contains("user_command(") && !user_command_allowed.contains(&name.as_str()) {
                offenders.push(format!("user_command outside a user's dialog: {at}"));
            }
        }
    }
    // The one place that builds commands clears the environment and refuses relative names.
    let exec = std::fs::read_to_string(root.join("src/exec.rs")).expect("reading src/exec.rs");
    for want in ["env_clear()", "is_absolute()", "/nonexistent"] {
        if !exec.contains(want) {
            offenders.push(format!("src/exec.rs lacks {want}"));
        }
    }
    assert!(
        offenders.is_empty(),
        "expected every program run through pershome::exec, got:\n{}",
        offenders.join("\n")
    );
}

/// A shared library for `LD_PRELOAD` that appends `EXE PID PPID` of every process it is
/// loaded into to `log`; built with the C compiler every Rust build has.
fn preload_library(dir: &Path, log: &Path) -> PathBuf {
    let src = dir.join("spy.c");
    std::fs::write(
        &src,
        format!(
            "#include <fcntl.h>\n#include <stdio.h>\n#include <unistd.h>\n\
             __attribute__((constructor)) static void spy(void) {{\n\
             char exe[4096]; char line[4200];\n\
             ssize_t n = readlink(\"/proc/self/exe\", exe, sizeof exe - 1);\n\
             if (n < 0) n = 0; exe[n] = 0;\n\
             int len = snprintf(line, sizeof line, \"%s %d %d\\n\", exe, (int)getpid(), (int)getppid());\n\
             int fd = open(\"{}\", O_WRONLY | O_APPEND | O_CREAT, 0666);\n\
             if (fd >= 0) {{ write(fd, line, len); close(fd); }}\n}}\n",
            log.display()
        ),
    )
    .unwrap();
    let lib = dir.join("libspy.so");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("running cc");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

/// Security hole 1 of issue 10: the PAM environment (which `pam_env.so user_readenv=1` fills
/// from a user's `~/.pam_environment`) reaches nothing the root hook runs. The session's
/// environment has `PATH` naming a directory the user owns, holding a fake `systemd-run`,
/// `pershomefs`, `blkid`, `udisksctl` and `fusermount3`, and `LD_PRELOAD` naming a library
/// there that logs every process it is loaded into. Through a busy logout (the background
/// finisher runs), no fake program runs and the library is loaded into nothing but the hook
/// processes pam_exec itself starts (the dynamic loader maps it before the hook's first
/// instruction: only the PAM stack can prevent that, which `pershome-config doctor` checks).
#[test]
fn the_users_path_and_preload_never_reach_what_root_runs() {
    needs_root!();
    let root = TestRoot::new(CONFIG);
    let kim = TestUser::new();
    let home = root.add_account(&kim);
    root.list(&kim);
    let stick = root.stick("s11", true);
    let service = PamService::new(root.path(), &stick);
    // The user's own directory, as a user could make one anywhere they may write.
    let evil = tempfile::Builder::new()
        .prefix("pershome-evil")
        .tempdir_in("/var/tmp")
        .unwrap();
    let log = evil.path().join("spy.log");
    let ran = evil.path().join("ran.log");
    let lib = preload_library(evil.path(), &log);
    for fake in [
        "systemd-run",
        "pershomefs",
        "blkid",
        "udisksctl",
        "fusermount3",
        "zenity",
    ] {
        let path = evil.path().join(fake);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho {fake} >> {}\n", ran.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for entry in std::fs::read_dir(evil.path()).unwrap() {
        let p = entry.unwrap().path();
        std::os::unix::fs::chown(&p, Some(kim.uid), Some(kim.gid)).unwrap();
    }
    std::os::unix::fs::chown(evil.path(), Some(kim.uid), Some(kim.gid)).unwrap();

    let mut ctx = pam(&service, &kim);
    ctx.putenv(format!("PATH={}", evil.path().display()))
        .expect("putenv PATH");
    ctx.putenv(format!("LD_PRELOAD={}", lib.display()))
        .expect("putenv LD_PRELOAD");
    let token = ctx.open_session(Flag::NONE).expect("open_session").leak();
    assert_eq!(
        fstype_at(&home).as_deref(),
        Some("fuse.pershomefs"),
        "expected the stick home mounted; said {:?}",
        infos(&ctx)
    );
    // A program left in the home makes the logout busy: the finisher is started (through
    // systemd-run where systemd runs).
    let mut lingering = Command::new("/usr/bin/sleep")
        .arg("300")
        .current_dir(&home)
        .uid(kim.uid)
        .gid(kim.gid)
        .env_clear()
        .spawn()
        .expect("starting a lingering program");
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let reap = Reap(&mut lingering);
    ctx.unleak_session(token)
        .close(Flag::NONE)
        .map_err(|e| e.to_string())
        .expect("close_session");
    drop(reap);
    common::wait_until("the finisher unmounts the home", || {
        fstype_at(&home).is_none()
    });
    common::wait_until("the daemon exits", || {
        common::daemons_serving(&home).is_empty()
    });
    let ran = std::fs::read_to_string(&ran).unwrap_or_default();
    assert!(
        ran.is_empty(),
        "expected no program from the user's PATH to run, got:\n{ran}"
    );
    let hook = std::fs::canonicalize(HOOK).unwrap();
    let me = std::process::id();
    let spied = std::fs::read_to_string(&log).unwrap_or_default();
    // The spy works: pam_exec started the hook with it (else this test proves nothing).
    assert!(
        !spied.is_empty(),
        "expected the preload library in the hook that pam_exec started, got nothing"
    );
    let foreign: Vec<&str> = spied
        .lines()
        .filter(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            // The hook processes pam_exec starts (children of this test process) are the only
            // ones the loader may have mapped it into.
            !(w.len() == 3 && Path::new(w[0]) == hook && w[2] == me.to_string())
        })
        .collect();
    assert!(
        foreign.is_empty(),
        "expected LD_PRELOAD in nothing the hook started, got:\n{}",
        foreign.join("\n")
    );
}

/// `on_missing_stick = "deny"` with a `required` session line (as `pershome-config pam`
/// writes it then): no stick home means no session, and the person is still told why.
#[test]
fn deny_refuses_the_session_without_a_stick() {
    needs_root!();
    let root = TestRoot::new("on_missing_stick = \"deny\"\n");
    let ivan = TestUser::new();
    let home = root.add_account(&ivan);
    root.list(&ivan);
    let stick = root.stick("s9", false);
    let service = PamService::with_control(root.path(), &stick, "required");
    let mut ctx = pam(&service, &ivan);
    let got = ctx.open_session(Flag::NONE).map(|s| s.leak());
    assert!(
        got.is_err(),
        "expected the session to be refused, got {got:?}"
    );
    assert_eq!(fstype_at(&home), None, "expected nothing mounted");
    let said = infos(&ctx);
    assert!(
        said.contains("no folder named \"pershome\""),
        "expected the reason, got {said:?}"
    );
}

/// Without a phase or a user (not run by PAM, no arguments) the hook is a usage error, and
/// an auth-stack call is refused: it only ever runs in the session stack.
#[test]
fn the_hook_needs_a_phase_and_a_user() {
    let run = |envs: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(HOOK)
            .env_clear()
            .envs(envs.iter().copied())
            .arg("--root")
            .arg("/nonexistent")
            .arg("session")
            .args(args)
            .output()
            .expect("running pershome-config session");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[], &[]);
    assert!(
        code == Some(2) && err.contains("PAM_TYPE"),
        "no phase: expected exit 2, got {code:?} {err}"
    );
    let (code, err) = run(&[("PAM_TYPE", "auth"), ("PAM_USER", "x")], &[]);
    assert!(
        code == Some(2) && err.contains("session stack"),
        "auth: expected exit 2, got {code:?} {err}"
    );
    let (code, err) = run(&[("PAM_TYPE", "open_session")], &[]);
    assert!(
        code == Some(2) && err.contains("PAM_USER"),
        "no user: expected exit 2, got {code:?} {err}"
    );
}

/// Stick discovery on a real FAT filesystem: a loop device holding a vfat image, offered as a
/// removable disk by a fake `/sys/block`, is probed by `blkid -p` as vfat, and only counts when
/// vfat is a configured stick type. (Mounting it needs a vfat driver: the QEMU tests do that.)
#[test]
fn discovery_probes_a_real_fat_image() {
    needs_root!();
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let t = tempfile::tempdir().unwrap();
    let image = t.path().join("stick.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let out = Command::new("mkfs.vfat")
        .arg("-F")
        .arg("32")
        .arg(&image)
        .output()
        .expect("mkfs.vfat");
    assert!(
        out.status.success(),
        "mkfs.vfat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&image)
        .output()
        .expect("losetup");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let name = dev.0.trim_start_matches("/dev/").to_owned();
    let sys = t.path().join("sys-block");
    std::fs::create_dir_all(sys.join(&name)).unwrap();
    std::fs::write(sys.join(&name).join("removable"), "1\n").unwrap();
    // The size in 512-byte sectors, as sysfs shows it: a device of size 0 has no medium.
    std::fs::write(
        sys.join(&name).join("size"),
        format!("{}\n", (40u64 << 20) / 512),
    )
    .unwrap();
    let got = discover::candidates(&sys, &[StickFs::Vfat, StickFs::Exfat]).unwrap();
    let expected = vec![discover::Candidate {
        devnode: PathBuf::from(&dev.0),
        fs: StickFs::Vfat,
    }];
    assert_eq!(got, expected, "expected {expected:?}, got {got:?}");
    let got = discover::candidates(&sys, &[StickFs::Exfat]).unwrap();
    assert!(
        got.is_empty(),
        "expected no candidate when only exfat counts, got {got:?}"
    );
}

/// The hook logs to syslog (journald reads /dev/log), naming the user and the stick. Run in a
/// private mount namespace whose /dev holds only a test socket as `log`, so the machine's
/// logging is neither needed nor touched.
#[test]
fn the_hook_logs_to_syslog_naming_user_and_stick() {
    needs_root!();
    use std::os::unix::net::UnixDatagram;
    let root = TestRoot::new(CONFIG);
    let judy = TestUser::new();
    root.add_account(&judy);
    root.list(&judy);
    let stick = root.stick("s10", false);
    let devdir = tempfile::tempdir().unwrap();
    let socket = UnixDatagram::bind(devdir.path().join("log")).expect("binding the log socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let dev = std::ffi::CString::new(devdir.path().as_os_str().as_encoded_bytes()).unwrap();
    let mut cmd = Command::new(HOOK);
    cmd.arg("--root")
        .arg(root.path())
        .args(["session", "open", "--user", &judy.name, "--stick-dir"])
        .arg(&stick);
    // SAFETY: only unshare(2) and mount(2) with strings prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    dev.as_ptr(),
                    c"/dev".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let out = cmd.output().expect("running the hook");
    assert!(
        out.status.success(),
        "expected exit 0 (fallback), got {}",
        out.status
    );
    let mut lines = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let stick_shown = stick.display().to_string();
    let found = lines.iter().any(|l| {
        l.contains("pershome-config[") && l.contains(&judy.name) && l.contains(&stick_shown)
    });
    assert!(
        found,
        "expected a pershome-config line naming {} and {stick_shown}, got {lines:#?}",
        judy.name
    );
}
