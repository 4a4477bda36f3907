//! The `-o` mount options of `pershomefs`, in the syntax `mount.fuse3` and `/etc/fstab` use:
//! comma-separated words and `key=value` pairs, a backslash escaping the next character (so a
//! value may hold `\,`), `-o` given any number of times.
//!
//! This module owns parsing those options into [`MountOptions`] and turning them into a
//! [`fuser::Config`]. It never touches the backing directory or the mount point and never
//! mounts anything; the only system look-ups it makes go through [`IdResolver`] (the caller's
//! uid/gid and user or group names), so the parser is testable with a fake resolver.
//!
//! Security invariant: whatever the options say, the produced configuration always carries
//! `nosuid`, `nodev` and `default_permissions`. A stick is attacker-controlled: a setuid binary
//! or a device node on it must never gain power, and the kernel, not the daemon, checks modes.

use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};

pub use crate::fs::PartsMode;
use crate::names::NameMode;

/// The filesystem subtype: `mount` and `df` show the type as `fuse.pershomefs`.
pub const SUBTYPE: &str = "pershomefs";

/// The default metadata commit interval in seconds.
pub const DEFAULT_COMMIT_SECS: u32 = 5;

/// The longest commit interval accepted. Longer intervals would let a yanked stick lose an
/// hour of metadata changes, which is never what a person wants from a removable home.
pub const MAX_COMMIT_SECS: u32 = 3600;

/// Who besides the mounting user may use the mount (`allow_other` / `allow_root`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only the user who mounted (FUSE's default).
    Owner,
    /// The mounting user and root (`allow_root`).
    OwnerAndRoot,
    /// Every user (`allow_other`; a non-root user needs `user_allow_other` in /etc/fuse.conf).
    Everyone,
}

/// Parsed mount options. Build with [`parse_options`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// The uid the stick's owner appears as (`uid=`; default: the user running the command).
    pub uid: u32,
    /// The gid the stick's owner appears as (`gid=`; default: the group running the command).
    pub gid: u32,
    /// `allow_other` / `allow_root`.
    pub access: Access,
    /// `ro`: mount read-only, never write to the stick.
    pub read_only: bool,
    /// `commit=SECONDS`: how often gathered metadata changes are committed to the stick.
    pub commit_interval: Duration,
    /// `fsname=`: the source shown by `mount` and `df`; `None` means "the BACKING path".
    pub fsname: Option<String>,
    /// `noexec`: programs on the mount cannot be executed.
    pub noexec: bool,
    /// `noatime`: the kernel does not update access times (the default is `relatime`).
    pub noatime: bool,
    /// `sync`: all I/O is synchronous.
    pub sync: bool,
    /// `dirsync`: directory changes are synchronous.
    pub dirsync: bool,
    /// `names=long|8.3`: how names are written on the stick. `None` (no option) adopts the
    /// mode recorded in the stick's store, and is `long` on a new store.
    pub names: Option<NameMode>,
    /// `parts=auto|always|never`: when files growing past the part size are stored in parts.
    pub parts: PartsMode,
    /// `part_size=BYTES` (for tests: tiny parts cross boundaries often): the part size of
    /// files split from now on.
    pub part_size: u64,
    /// `status=PATH`: where the daemon writes its exit status when it ends (the login hook
    /// reads it to say whether the last commit landed). An absolute path; `None`: nowhere.
    pub status_file: Option<std::path::PathBuf>,
    /// `compact_after=BYTES` (for tests): compact the metadata store once its journal holds
    /// this many bytes, instead of 4 MiB, so that compaction races everything else.
    pub compact_after: Option<u64>,
    /// `threads=N`: how many threads serve FUSE requests (1-16).
    pub threads: usize,
    /// `counters`: count requests per opcode (see `crate::requests`), for the bench and tests.
    pub counters: bool,
    /// `private_home` (the login hook's mounts): every owner on the stick shows as `uid=`/
    /// `gid=`, and the root is theirs with mode 0700 from the mount on (see
    /// `FsOptions::private_home`).
    pub private_home: bool,
}

/// Worker threads serving requests by default. On the shared 2-vCPU build machines one thread
/// untarred faster than two or four (docs/testing.md § Worker threads), but those figures come
/// from a machine loaded by other jobs; several threads let a request that waits for a slow
/// stick (an fsync) not stall every other one, so the default stays until a quiet measurement.
pub const DEFAULT_THREADS: usize = 4;
/// Most `threads=`: more would only contend for the state lock.
const MAX_THREADS: usize = 16;

/// A rejected `-o` option. The message names the option and says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("unknown mount option `{0}` (see `pershomefs --help` for the options it knows)")]
    Unknown(String),
    #[error("mount option `{0}` needs a value, as in `{0}=...`")]
    MissingValue(String),
    #[error("mount option `{0}` takes no value, but got `{1}`")]
    UnexpectedValue(String, String),
    #[error("mount option `{option}={value}`: {reason}")]
    InvalidValue {
        option: String,
        value: String,
        reason: String,
    },
    #[error("mount option `uid={0}`: there is no such user")]
    UnknownUser(String),
    #[error("mount option `gid={0}`: there is no such group")]
    UnknownGroup(String),
    #[error("mount options `allow_other` and `allow_root` exclude each other: give only one")]
    AllowOtherAndRoot,
    #[error("mount options `{0}` end in a lone backslash: escape a backslash as `\\\\`")]
    TrailingBackslash(String),
}

/// The system look-ups the parser needs, behind a trait so tests can use fixed answers.
pub trait IdResolver {
    /// The real uid of the user running the command.
    fn current_uid(&self) -> u32;
    /// The real gid of the user running the command.
    fn current_gid(&self) -> u32;
    /// The uid of a user name, `None` when there is no such user.
    fn user_by_name(&self, name: &str) -> Option<u32>;
    /// The gid of a group name, `None` when there is no such group.
    fn group_by_name(&self, name: &str) -> Option<u32>;
}

/// The real system: getuid/getgid and the passwd/group databases (NSS) through nix.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemIds;

impl IdResolver for SystemIds {
    fn current_uid(&self) -> u32 {
        nix::unistd::getuid().as_raw()
    }
    fn current_gid(&self) -> u32 {
        nix::unistd::getgid().as_raw()
    }
    fn user_by_name(&self, name: &str) -> Option<u32> {
        // A look-up error (an unreachable NSS service) is treated like "no such user": the
        // option is then refused with a clear message rather than mounting with a wrong owner.
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }
    fn group_by_name(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

/// Parses the values of every `-o` (each a comma-separated list) against the real system.
pub fn parse_options(opts: &[&str]) -> Result<MountOptions, OptionError> {
    parse_options_with(opts, &SystemIds)
}

/// Parses the values of every `-o` with the given id resolver. Later options override earlier
/// ones (`ro,rw` is read-write), as with mount(8).
pub fn parse_options_with(
    opts: &[&str],
    ids: &dyn IdResolver,
) -> Result<MountOptions, OptionError> {
    let mut out = MountOptions {
        uid: ids.current_uid(),
        gid: ids.current_gid(),
        access: Access::Owner,
        read_only: false,
        commit_interval: Duration::from_secs(u64::from(DEFAULT_COMMIT_SECS)),
        fsname: None,
        noexec: false,
        noatime: false,
        sync: false,
        dirsync: false,
        names: None,
        parts: PartsMode::Auto,
        part_size: crate::fs::parts::DEFAULT_PART_SIZE,
        status_file: None,
        compact_after: None,
        threads: DEFAULT_THREADS,
        counters: false,
        private_home: false,
    };
    let mut allow_other = false;
    let mut allow_root = false;
    for list in opts {
        for item in split_escaped(list)? {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item.as_str(), None),
            };
            match key {
                "uid" => {
                    let v = required(key, value)?;
                    out.uid = parse_id(v)
                        .or_else(|| ids.user_by_name(v))
                        .ok_or_else(|| OptionError::UnknownUser(v.to_owned()))?;
                }
                "gid" => {
                    let v = required(key, value)?;
                    out.gid = parse_id(v)
                        .or_else(|| ids.group_by_name(v))
                        .ok_or_else(|| OptionError::UnknownGroup(v.to_owned()))?;
                }
                "commit" => {
                    let v = required(key, value)?;
                    out.commit_interval = Duration::from_secs(u64::from(parse_commit(v)?));
                }
                "names" => {
                    let v = required(key, value)?;
                    out.names = Some(NameMode::parse(v).ok_or_else(|| {
                        OptionError::InvalidValue {
                            option: key.to_owned(),
                            value: v.to_owned(),
                            reason:
                                "expected `long` (FAT long names, the default) or `8.3` (MS-DOS \
                                 short names only, for a stick mounted `msdos` or an old device)"
                                    .to_owned(),
                        }
                    })?);
                }
                "parts" => {
                    out.parts = match required(key, value)? {
                        "auto" => PartsMode::Auto,
                        "always" => PartsMode::Always,
                        "never" => PartsMode::Never,
                        v => {
                            return Err(OptionError::InvalidValue {
                                option: key.to_owned(),
                                value: v.to_owned(),
                                reason: "expected auto, always or never".to_owned(),
                            })
                        }
                    };
                }
                "part_size" => {
                    let v = required(key, value)?;
                    out.part_size = parse_part_size(v)?;
                }
                "status" => {
                    let v = required(key, value)?;
                    if !v.starts_with('/') {
                        return Err(OptionError::InvalidValue {
                            option: key.to_owned(),
                            value: v.to_owned(),
                            reason: "expected an absolute path".to_owned(),
                        });
                    }
                    out.status_file = Some(v.into());
                }
                "compact_after" => {
                    let v = required(key, value)?;
                    out.compact_after = Some(v.parse().map_err(|_| OptionError::InvalidValue {
                        option: key.to_owned(),
                        value: v.to_owned(),
                        reason: "expected a number of bytes".to_owned(),
                    })?);
                }
                "threads" => {
                    let v = required(key, value)?;
                    out.threads = match v.parse::<usize>() {
                        Ok(n) if (1..=MAX_THREADS).contains(&n) => n,
                        _ => {
                            return Err(OptionError::InvalidValue {
                                option: key.to_owned(),
                                value: v.to_owned(),
                                reason: format!(
                                    "expected a number of threads from 1 to {MAX_THREADS}"
                                ),
                            })
                        }
                    };
                }
                "fsname" => {
                    let v = required(key, value)?;
                    if v.is_empty() {
                        return Err(OptionError::MissingValue(key.to_owned()));
                    }
                    out.fsname = Some(v.to_owned());
                }
                // The subtype is always `pershomefs`; mount(8) hands `subtype=` over when the
                // fstab type is `fuse.pershomefs`, so it is accepted with any value.
                "subtype" => {}
                // `user=NAME` is what some mount(8) versions hand a helper for a user mount.
                "user" => {}
                // Anything in the `x-` namespace (x-systemd.automount, x-gvfs-show, ...) is
                // for other tools; `comment=` is its older spelling.
                k if k.starts_with("x-") || k == "comment" => {}
                _ => {
                    if let Some(v) = value {
                        return Err(if is_flag(key) {
                            OptionError::UnexpectedValue(key.to_owned(), v.to_owned())
                        } else {
                            OptionError::Unknown(item.clone())
                        });
                    }
                    apply_flag(key, &mut out, &mut allow_other, &mut allow_root)?;
                }
            }
        }
    }
    out.access = match (allow_other, allow_root) {
        (true, true) => return Err(OptionError::AllowOtherAndRoot),
        (true, false) => Access::Everyone,
        (false, true) => Access::OwnerAndRoot,
        (false, false) => Access::Owner,
    };
    Ok(out)
}

/// Every option word that takes no value, for telling "takes no value" from "unknown".
const FLAGS: &[&str] = &[
    "allow_other",
    "allow_root",
    "ro",
    "rw",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "sync",
    "async",
    "dirsync",
    "defaults",
    "auto",
    "noauto",
    "users",
    "nouser",
    "_netdev",
    "nofail",
    "default_permissions",
    "nosuid",
    "nodev",
    "suid",
    "dev",
    "counters",
    "private_home",
];

fn is_flag(key: &str) -> bool {
    FLAGS.contains(&key)
}

fn apply_flag(
    key: &str,
    out: &mut MountOptions,
    allow_other: &mut bool,
    allow_root: &mut bool,
) -> Result<(), OptionError> {
    match key {
        "allow_other" => *allow_other = true,
        "allow_root" => *allow_root = true,
        "ro" => out.read_only = true,
        "rw" => out.read_only = false,
        "noexec" => out.noexec = true,
        "exec" => out.noexec = false,
        "noatime" => out.noatime = true,
        // `relatime` is the kernel's default when no atime flag is given, and `atime` asks
        // for exactly that default too: both just cancel an earlier `noatime`.
        "atime" | "relatime" => out.noatime = false,
        "sync" => out.sync = true,
        "async" => out.sync = false,
        "dirsync" => out.dirsync = true,
        "private_home" => out.private_home = true,
        // mount(8)/fstab bookkeeping and settings that are always on anyway.
        "defaults"
        | "auto"
        | "noauto"
        | "users"
        | "nouser"
        | "_netdev"
        | "nofail"
        | "default_permissions"
        | "nosuid"
        | "nodev" => {}
        // mount.fuse3 adds `dev,suid` to every mount root makes (mount(8)'s defaults), so
        // refusing them would break `mount -t fuse.pershomefs` and fstab. They are accepted
        // and have no effect: the mount is always nosuid,nodev, because a stick is untrusted.
        "suid" | "dev" => {}
        "counters" => out.counters = true,
        _ => return Err(OptionError::Unknown(key.to_owned())),
    }
    Ok(())
}

fn required<'a>(key: &str, value: Option<&'a str>) -> Result<&'a str, OptionError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(OptionError::MissingValue(key.to_owned())),
    }
}

/// A numeric uid/gid: decimal digits only (no sign, no blanks), within u32 and not the
/// kernel's "no id" value `u32::MAX`.
fn parse_id(v: &str) -> Option<u32> {
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u32>().ok().filter(|&id| id != u32::MAX)
}

fn parse_part_size(v: &str) -> Result<u64, OptionError> {
    use crate::meta::{MAX_PART_SIZE, MIN_PART_SIZE, PART_ALIGN};
    let bad = |reason: String| OptionError::InvalidValue {
        option: "part_size".to_owned(),
        value: v.to_owned(),
        reason,
    };
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(
            "expected a number of bytes, such as part_size=65536".to_owned()
        ));
    }
    let n: u64 = v
        .parse()
        .map_err(|_| bad(format!("at most {MAX_PART_SIZE}")))?;
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&n) || n % PART_ALIGN != 0 {
        return Err(bad(format!(
            "expected a multiple of {PART_ALIGN} from {MIN_PART_SIZE} to {MAX_PART_SIZE}"
        )));
    }
    Ok(n)
}

fn parse_commit(v: &str) -> Result<u32, OptionError> {
    let invalid = |reason: &str| OptionError::InvalidValue {
        option: "commit".to_owned(),
        value: v.to_owned(),
        reason: reason.to_owned(),
    };
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            "expected a whole number of seconds, such as commit=5",
        ));
    }
    let secs: u32 = v
        .parse()
        .map_err(|_| invalid("the number of seconds is too large"))?;
    if secs == 0 {
        return Err(invalid(
            "the interval must be at least 1 second (0 would never commit on a timer)",
        ));
    }
    if secs > MAX_COMMIT_SECS {
        return Err(invalid(&format!(
            "at most {MAX_COMMIT_SECS} seconds, so a yanked stick loses little"
        )));
    }
    Ok(secs)
}

/// Splits one `-o` value at unescaped commas, removing the escaping backslashes: `\x` stands
/// for `x` for any character, as libfuse's option parser does. Empty items are skipped.
fn split_escaped(list: &str) -> Result<Vec<String>, OptionError> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = list.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped) => current.push(escaped),
                None => return Err(OptionError::TrailingBackslash(list.to_owned())),
            },
            ',' => {
                if !current.is_empty() {
                    items.push(std::mem::take(&mut current));
                }
            }
            other => current.push(other),
        }
    }
    if !current.is_empty() {
        items.push(current);
    }
    Ok(items)
}

/// Escapes a value for an option list that `fusermount3` splits at commas.
pub fn escape_option_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == ',' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl MountOptions {
    /// The name shown as the mount's source: `fsname=` or else the BACKING path.
    pub fn source_name(&self, backing: &std::path::Path) -> String {
        match &self.fsname {
            Some(name) => name.clone(),
            None => backing.to_string_lossy().into_owned(),
        }
    }

    /// The fuser session configuration for these options. `fsname` is the source name as
    /// given to the kernel (see [`MountOptions::source_name`]); it is not escaped here.
    pub fn to_fuser_config(&self, fsname: &str) -> Config {
        let mut mount_options = vec![
            MountOption::FSName(fsname.to_owned()),
            MountOption::Subtype(SUBTYPE.to_owned()),
            MountOption::DefaultPermissions,
            MountOption::NoSuid,
            MountOption::NoDev,
        ];
        if self.read_only {
            mount_options.push(MountOption::RO);
        }
        if self.noexec {
            mount_options.push(MountOption::NoExec);
        }
        if self.noatime {
            mount_options.push(MountOption::NoAtime);
        }
        if self.sync {
            mount_options.push(MountOption::Sync);
        }
        if self.dirsync {
            mount_options.push(MountOption::DirSync);
        }
        let mut config = Config::default();
        config.mount_options = mount_options;
        config.acl = match self.access {
            Access::Owner => SessionACL::Owner,
            Access::OwnerAndRoot => SessionACL::RootAndOwner,
            Access::Everyone => SessionACL::All,
        };
        config.n_threads = Some(self.threads);
        config.clone_fd = true;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed answers: the caller is 1000:1000, user `alice` is 1001, group `staff` is 50.
    struct FakeIds;

    impl IdResolver for FakeIds {
        fn current_uid(&self) -> u32 {
            1000
        }
        fn current_gid(&self) -> u32 {
            1000
        }
        fn user_by_name(&self, name: &str) -> Option<u32> {
            (name == "alice").then_some(1001)
        }
        fn group_by_name(&self, name: &str) -> Option<u32> {
            (name == "staff").then_some(50)
        }
    }

    fn parse(opts: &[&str]) -> Result<MountOptions, OptionError> {
        parse_options_with(opts, &FakeIds)
    }

    fn ok(opts: &[&str]) -> MountOptions {
        match parse(opts) {
            Ok(o) => o,
            Err(e) => panic!("options {opts:?}: expected Ok, got error: {e}"),
        }
    }

    fn err(opts: &[&str]) -> OptionError {
        match parse(opts) {
            Ok(o) => panic!("options {opts:?}: expected an error, got {o:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn defaults() {
        let o = ok(&[]);
        let expected = MountOptions {
            uid: 1000,
            gid: 1000,
            access: Access::Owner,
            read_only: false,
            commit_interval: Duration::from_secs(5),
            fsname: None,
            noexec: false,
            noatime: false,
            sync: false,
            dirsync: false,
            names: None,
            parts: PartsMode::Auto,
            part_size: crate::fs::parts::DEFAULT_PART_SIZE,
            status_file: None,
            compact_after: None,
            threads: DEFAULT_THREADS,
            counters: false,
            private_home: false,
        };
        assert_eq!(o, expected, "expected {expected:?}, got {o:?}");
        assert!(ok(&["private_home"]).private_home, "private_home is a flag");
    }

    #[test]
    fn name_modes() {
        assert_eq!(ok(&["names=8.3"]).names, Some(NameMode::Short83));
        assert_eq!(ok(&["names=long"]).names, Some(NameMode::Long));
        assert_eq!(ok(&["names=8.3,names=long"]).names, Some(NameMode::Long));
        for bad in ["names=short", "names=83", "names=8.3 "] {
            match err(&[bad]) {
                OptionError::InvalidValue { option, .. } => {
                    assert_eq!(
                        option, "names",
                        "{bad}: expected option `names`, got {option}"
                    )
                }
                other => panic!("{bad}: expected InvalidValue, got {other:?}"),
            }
        }
        assert_eq!(err(&["names"]), OptionError::MissingValue("names".into()));
    }

    #[test]
    fn uid_gid_numbers_and_names() {
        let o = ok(&["uid=42,gid=43"]);
        assert_eq!((o.uid, o.gid), (42, 43), "numeric ids");
        let o = ok(&["uid=alice", "gid=staff"]);
        assert_eq!((o.uid, o.gid), (1001, 50), "names resolved");
        assert_eq!(err(&["uid=bob"]), OptionError::UnknownUser("bob".into()));
        assert_eq!(
            err(&["gid=nogroup"]),
            OptionError::UnknownGroup("nogroup".into())
        );
        assert_eq!(err(&["uid="]), OptionError::MissingValue("uid".into()));
        assert_eq!(err(&["gid"]), OptionError::MissingValue("gid".into()));
        // Signs, blanks and out-of-range numbers are not ids and no fake user is named so.
        assert_eq!(err(&["uid=-1"]), OptionError::UnknownUser("-1".into()));
        assert_eq!(
            err(&["uid=4294967295"]),
            OptionError::UnknownUser("4294967295".into())
        );
        assert_eq!(
            err(&["gid=99999999999"]),
            OptionError::UnknownGroup("99999999999".into())
        );
    }

    #[test]
    fn system_resolver_knows_root() {
        let o = match parse_options(&["uid=root,gid=root"]) {
            Ok(o) => o,
            Err(e) => panic!("expected root to resolve, got {e}"),
        };
        assert_eq!((o.uid, o.gid), (0, 0), "root:root");
        let me = parse_options(&[]).map(|o| o.uid);
        assert_eq!(
            me,
            Ok(nix::unistd::getuid().as_raw()),
            "default uid is getuid()"
        );
    }

    #[test]
    fn access_options() {
        assert_eq!(ok(&["allow_other"]).access, Access::Everyone);
        assert_eq!(ok(&["allow_root"]).access, Access::OwnerAndRoot);
        assert_eq!(
            err(&["allow_other,allow_root"]),
            OptionError::AllowOtherAndRoot
        );
        assert_eq!(
            err(&["allow_root", "allow_other"]),
            OptionError::AllowOtherAndRoot
        );
    }

    #[test]
    fn ro_rw_last_wins() {
        assert!(ok(&["ro"]).read_only, "ro");
        assert!(!ok(&["ro,rw"]).read_only, "ro,rw");
        assert!(ok(&["rw", "ro"]).read_only, "rw then ro");
    }

    #[test]
    fn parts_and_part_size() {
        assert_eq!(ok(&["parts=never"]).parts, PartsMode::Never, "parts=never");
        assert_eq!(
            ok(&["parts=always"]).parts,
            PartsMode::Always,
            "parts=always"
        );
        assert_eq!(
            ok(&["parts=always,parts=auto"]).parts,
            PartsMode::Auto,
            "last wins"
        );
        assert_eq!(ok(&["part_size=4096"]).part_size, 4096, "part_size=4096");
        assert_eq!(
            ok(&["part_size=4294963200"]).part_size,
            crate::meta::MAX_PART_SIZE,
            "the largest part size"
        );
        for bad in [
            "parts=sometimes",
            "part_size=4095",
            "part_size=5000",
            "part_size=4294967296",
            "part_size=-4096",
            "part_size=1e6",
            "part_size=99999999999999999999999",
        ] {
            match err(&[bad]) {
                OptionError::InvalidValue { option, .. } => {
                    assert!(bad.starts_with(&option), "{bad}: error names {option}")
                }
                other => panic!("{bad}: expected InvalidValue, got {other:?}"),
            }
        }
        assert_eq!(err(&["parts"]), OptionError::MissingValue("parts".into()));
    }

    #[test]
    fn commit_interval() {
        assert_eq!(ok(&["commit=1"]).commit_interval, Duration::from_secs(1));
        assert_eq!(ok(&["commit=30"]).commit_interval, Duration::from_secs(30));
        assert_eq!(
            ok(&["commit=3600"]).commit_interval,
            Duration::from_secs(3600)
        );
        for bad in [
            "commit=0",
            "commit=abc",
            "commit=-5",
            "commit=1.5",
            "commit= 5",
            "commit=3601",
        ] {
            match err(&[bad]) {
                OptionError::InvalidValue { option, .. } => assert_eq!(option, "commit", "{bad}"),
                other => panic!("{bad}: expected InvalidValue, got {other:?}"),
            }
        }
        let too_big = err(&["commit=99999999999"]).to_string();
        assert!(too_big.contains("too large"), "got {too_big}");
        assert_eq!(err(&["commit"]), OptionError::MissingValue("commit".into()));
        assert_eq!(
            err(&["commit="]),
            OptionError::MissingValue("commit".into())
        );
    }

    #[test]
    fn fsname_and_subtype() {
        assert_eq!(ok(&["fsname=stick"]).fsname.as_deref(), Some("stick"));
        // Values may contain `=`; the key ends at the first one.
        assert_eq!(ok(&["fsname=a=b=c"]).fsname.as_deref(), Some("a=b=c"));
        assert_eq!(
            err(&["fsname="]),
            OptionError::MissingValue("fsname".into())
        );
        assert_eq!(ok(&["subtype=whatever"]), ok(&[]), "subtype= is ignored");
    }

    #[test]
    fn escaped_commas_and_backslashes() {
        assert_eq!(
            ok(&[r"fsname=my\,stick,ro"]).fsname.as_deref(),
            Some("my,stick"),
            "escaped comma stays in the value"
        );
        assert!(
            ok(&[r"fsname=my\,stick,ro"]).read_only,
            "the option after it is parsed"
        );
        assert_eq!(ok(&[r"fsname=a\\b"]).fsname.as_deref(), Some(r"a\b"));
        assert_eq!(ok(&[r"fsname=\a"]).fsname.as_deref(), Some("a"));
        assert_eq!(
            err(&[r"ro,fsname=x\"]),
            OptionError::TrailingBackslash(r"ro,fsname=x\".into())
        );
        // An escaped comma does not split, so `r\,o` is one unknown word `r,o`.
        assert_eq!(err(&[r"r\,o"]), OptionError::Unknown("r,o".into()));
    }

    #[test]
    fn empty_items_are_skipped() {
        assert_eq!(ok(&[",,ro,,", ""]), ok(&["ro"]));
    }

    #[test]
    fn kernel_flags() {
        let o = ok(&["noexec,noatime,sync,dirsync"]);
        assert!(
            o.noexec && o.noatime && o.sync && o.dirsync,
            "all set: {o:?}"
        );
        let o = ok(&["noexec,exec,noatime,atime,sync,async"]);
        assert!(!o.noexec && !o.noatime && !o.sync, "all cancelled: {o:?}");
        assert!(
            !ok(&["noatime,relatime"]).noatime,
            "relatime cancels noatime"
        );
        assert_eq!(ok(&["relatime"]), ok(&[]), "relatime is the default");
    }

    #[test]
    fn fstab_bookkeeping_is_ignored() {
        let plain = ok(&[]);
        for o in [
            "defaults",
            "auto",
            "noauto",
            "user",
            "user=alice",
            "users",
            "nouser",
            "_netdev",
            "nofail",
            "x-systemd.automount",
            "x-systemd.device-timeout=10s",
            "x-gvfs-show",
            "comment=systemd.automount",
            "default_permissions",
            "nosuid",
            "nodev",
        ] {
            assert_eq!(ok(&[o]), plain, "{o} should change nothing");
        }
    }

    /// Regression: mount.fuse3 passes `dev,suid` for every root mount, and refusing them
    /// made `mount -t fuse.pershomefs` fail. They are accepted and change nothing.
    #[test]
    fn suid_and_dev_from_mount_fuse3_are_accepted_and_ignored() {
        assert_eq!(ok(&["rw,dev,suid,exec"]), ok(&["rw"]));
        let config = ok(&["dev,suid"]).to_fuser_config("stick");
        for wanted in [fuser::MountOption::NoSuid, fuser::MountOption::NoDev] {
            assert!(config.mount_options.contains(&wanted), "{wanted:?} missing");
        }
    }

    #[test]
    fn threads_and_counters() {
        let o = ok(&["threads=1,counters"]);
        assert_eq!((o.threads, o.counters), (1, true));
        assert_eq!(o.to_fuser_config("s").n_threads, Some(1));
        for bad in ["threads=0", "threads=17", "threads=x"] {
            assert!(
                matches!(err(&[bad]), OptionError::InvalidValue { .. }),
                "expected {bad} to be refused"
            );
        }
        assert_eq!(
            err(&["counters=1"]),
            OptionError::UnexpectedValue("counters".into(), "1".into())
        );
    }

    #[test]
    fn unknown_options_are_named() {
        assert_eq!(err(&["ro,bogus"]), OptionError::Unknown("bogus".into()));
        assert_eq!(err(&["bogus=1"]), OptionError::Unknown("bogus=1".into()));
        assert!(err(&["frobnicate"]).to_string().contains("`frobnicate`"));
        assert_eq!(
            err(&["ro=1"]),
            OptionError::UnexpectedValue("ro".into(), "1".into())
        );
        assert_eq!(
            err(&["allow_other=yes"]),
            OptionError::UnexpectedValue("allow_other".into(), "yes".into())
        );
    }

    #[test]
    fn fuser_config_always_safe() {
        let c = ok(&[]).to_fuser_config("/media/s/pershome");
        let expected = vec![
            MountOption::FSName("/media/s/pershome".into()),
            MountOption::Subtype("pershomefs".into()),
            MountOption::DefaultPermissions,
            MountOption::NoSuid,
            MountOption::NoDev,
        ];
        assert_eq!(c.mount_options, expected);
        assert_eq!(c.acl, SessionACL::Owner);
        assert_eq!((c.n_threads, c.clone_fd), (Some(4), true));
    }

    #[test]
    fn fuser_config_with_everything() {
        let c = ok(&["ro,noexec,noatime,sync,dirsync,allow_other"]).to_fuser_config("s");
        for want in [
            MountOption::RO,
            MountOption::NoExec,
            MountOption::NoAtime,
            MountOption::Sync,
            MountOption::DirSync,
            MountOption::NoSuid,
            MountOption::NoDev,
        ] {
            assert!(
                c.mount_options.contains(&want),
                "expected {want:?} in {:?}",
                c.mount_options
            );
        }
        assert_eq!(c.acl, SessionACL::All);
        assert_eq!(
            ok(&["allow_root"]).to_fuser_config("s").acl,
            SessionACL::RootAndOwner
        );
    }

    #[test]
    fn source_name_defaults_to_backing() {
        let p = std::path::Path::new("/media/x/pershome");
        assert_eq!(ok(&[]).source_name(p), "/media/x/pershome");
        assert_eq!(ok(&["fsname=stick"]).source_name(p), "stick");
    }

    #[test]
    fn escape_for_fusermount() {
        assert_eq!(escape_option_value(r"a,b\c"), r"a\,b\\c");
        // Round trip through our own splitter.
        let escaped = format!("fsname={}", escape_option_value(r"a,b\c"));
        assert_eq!(ok(&[&escaped]).fsname.as_deref(), Some(r"a,b\c"));
    }
}
