//! The system configuration, `/etc/pershome/config.toml`: what an administrator may change
//! about login integration (commit interval, how a stick is mounted, which filesystems count as
//! a stick, what happens when the stick is missing, whether `~/.persistent_home` counts, how
//! long logout waits for lingering processes). Every key has a built-in default, so a missing
//! file is the default configuration. docs/admin-guide.md documents every key.
//!
//! This module owns the file's syntax, its defaults and its validation. It never mounts
//! anything and never reads user-controlled files: the file is root's. A bad file is never
//! half-applied: an unknown key, a wrong type or a value out of range is an error naming the
//! line, and callers decide what to do (the login hook logs it and falls back).

use std::fmt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use serde::{Deserialize, Deserializer, Serialize};

use crate::stick::StickFs;

/// Where the file lives, relative to the root (`--root DIR`, normally `/`).
pub const CONFIG_PATH: &str = "etc/pershome/config.toml";

/// The system configuration. Field docs are the key docs; keys are `snake_case` in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SystemConfig {
    /// `commit_interval`: seconds between metadata commits of a mounted home (pershomefs
    /// `commit=`), 1 to 3600. A stick pulled without logging out loses at most this much of
    /// metadata changes (names, modes, times; file contents are written through). Default 5.
    pub commit_interval: Seconds,
    /// `on_missing_stick`: what a login does when the user wants a stick home but no stick
    /// with a `pershome/` directory is plugged in (or it cannot be mounted). Default
    /// `fallback`.
    pub on_missing_stick: OnMissingStick,
    /// `honour_user_file`: whether a user may ask for a stick home by creating
    /// `$HOME/.persistent_home` in their server home (checked without following symlinks, only
    /// if owned by the user; see `wants`). When false only `/etc/ltsp/persistent_homes`
    /// counts. Default true.
    pub honour_user_file: bool,
    /// `logout_timeout`: seconds the logout waits for the user's remaining processes to let go
    /// of the home before it unmounts lazily, 0 to 600. Default 10.
    pub logout_timeout: Seconds,
    /// `remote_sessions`: what the hook does in a session opened from another machine
    /// (`PAM_RHOST` set, or the `sshd` service): `skip` (default) does nothing and never
    /// fails such a session, because on an LTSP server those are the `ssh`/`sftp` sessions
    /// pamltsp opens for a client's login, and the stick is on the client; `open` treats them
    /// like local logins (the thin-client case of `--stick-dir`, where the stick is reached
    /// from the server).
    pub remote_sessions: RemoteSessions,
    /// `[stick]`: which filesystems count as a stick and how they are mounted.
    pub stick: StickConfig,
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            commit_interval: Seconds(5),
            on_missing_stick: OnMissingStick::Fallback,
            honour_user_file: true,
            logout_timeout: Seconds(10),
            remote_sessions: RemoteSessions::Skip,
            stick: StickConfig::default(),
        }
    }
}

/// What to do when the stick is missing or unprepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissingStick {
    /// Log in with the normal server home, and tell the user why and how to fix it.
    Fallback,
    /// Fail the session: the login is refused with the same message. Use it where a student
    /// must never write into the server home.
    Deny,
}

/// What the hook does in a remote session (see `SystemConfig::remote_sessions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteSessions {
    /// Do nothing, exit 0: the session belongs to the server side of a client's login.
    Skip,
    /// Open the stick home as for a local login.
    Open,
}

/// The `[stick]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StickConfig {
    /// `filesystems`: the filesystem types (as blkid names them) that count as a stick.
    /// Allowed: `vfat` (FAT12/16/32, as blkid reports all three) and `exfat`. `msdos` is not
    /// allowed: the msdos driver only knows 8.3 names, which cannot hold a home. Default
    /// `["vfat", "exfat"]`.
    pub filesystems: Vec<StickFs>,
    /// `umask`: the umask of the stick mount (octal string). Only the user and root ever see
    /// the raw stick, under `/run/pershome/USER/`. Default `"077"`.
    pub umask: Umask,
    /// `vfat_options`: extra mount options for a vfat stick. Default
    /// `["utf8=1", "shortname=mixed", "flush", "noatime"]`: names in UTF-8, 8.3 names keep
    /// their case, data is flushed early (a stick gets pulled), no atime writes (wear).
    pub vfat_options: Vec<MountOption>,
    /// `exfat_options`: extra mount options for an exFAT stick. Default
    /// `["iocharset=utf8", "noatime"]` (the exfat driver has no `utf8=`/`shortname=`/`flush`).
    pub exfat_options: Vec<MountOption>,
}

impl Default for StickConfig {
    fn default() -> Self {
        let opts = |list: &[&str]| list.iter().map(|o| MountOption(o.to_string())).collect();
        StickConfig {
            filesystems: vec![StickFs::Vfat, StickFs::Exfat],
            umask: Umask(0o077),
            vfat_options: opts(&["utf8=1", "shortname=mixed", "flush", "noatime"]),
            exfat_options: opts(&["iocharset=utf8", "noatime"]),
        }
    }
}

/// A number of seconds, range-checked by the key that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Seconds(pub u32);

impl Seconds {
    /// As a `Duration`.
    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.0))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Both seconds keys share one type, so the range is the union (0..=3600) here and the
        // key-specific limits are checked in `validate`, which knows the key's line.
        struct SecondsVisitor;
        impl serde::de::Visitor<'_> for SecondsVisitor {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number of seconds (0 to 3600)")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Seconds, E> {
                u32::try_from(n)
                    .ok()
                    .filter(|n| *n <= 3600)
                    .map(Seconds)
                    .ok_or_else(|| E::custom(format!("{n} seconds is out of range (0 to 3600)")))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Seconds, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_i64(SecondsVisitor)
    }
}

/// A umask, written as an octal string (`"077"`) so that it cannot be confused with decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Umask(pub u32);

impl Serialize for Umask {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:03o}", self.0))
    }
}

impl<'de> Deserialize<'de> for Umask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let value = u32::from_str_radix(&text, 8)
            .ok()
            .filter(|v| *v <= 0o777 && !text.is_empty())
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "umask {text:?} is not an octal number from \"000\" to \"777\""
                ))
            })?;
        // The stick holds the user's whole home: a umask that lets others read it would
        // expose the raw files of /run/pershome/USER to every local user.
        if value & 0o077 != 0o077 {
            return Err(serde::de::Error::custom(format!(
                "umask {text:?} lets group or others read the stick; it must mask 077 \
                 (e.g. \"077\")"
            )));
        }
        Ok(Umask(value))
    }
}

/// One extra mount option (`name` or `name=value`), checked when the file is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MountOption(pub String);

/// Options pershome sets itself; the file may not set or undo them.
const RESERVED_OPTIONS: &[(&str, &str)] = &[
    ("uid", "pershome sets it to the user at mount time"),
    ("gid", "pershome sets it to the user's group at mount time"),
    ("umask", "use the `umask` key of [stick]"),
    ("dmask", "use the `umask` key of [stick]"),
    ("fmask", "use the `umask` key of [stick]"),
    (
        "suid",
        "a stick must never gain setuid programs (nosuid is forced)",
    ),
    (
        "dev",
        "a stick must never gain device nodes (nodev is forced)",
    ),
    (
        "exec",
        "nothing on the raw stick is executable (noexec is forced)",
    ),
    ("nosuid", "it is always set"),
    ("nodev", "it is always set"),
    ("noexec", "it is always set"),
    ("ro", "a stick home must be writable"),
    ("rw", "it is always set"),
    ("remount", "not a mount option for a new mount"),
    ("bind", "not a mount option for a new mount"),
];

/// Options that are VFS flags rather than filesystem data; mount(2) takes them as `MsFlags`.
const FLAG_OPTIONS: &[(&str, MsFlags)] = &[
    ("noatime", MsFlags::MS_NOATIME),
    ("nodiratime", MsFlags::MS_NODIRATIME),
    ("relatime", MsFlags::MS_RELATIME),
    ("strictatime", MsFlags::MS_STRICTATIME),
    ("lazytime", MsFlags::MS_LAZYTIME),
    ("sync", MsFlags::MS_SYNCHRONOUS),
    ("dirsync", MsFlags::MS_DIRSYNC),
];

impl MountOption {
    /// The option's name (before `=`).
    pub fn name(&self) -> &str {
        self.0.split_once('=').map_or(&self.0, |(n, _)| n)
    }

    /// Checks the syntax and refuses what pershome owns. The characters allowed are those of
    /// every vfat/exfat option; a comma would smuggle in a second option.
    fn check(text: &str) -> Result<(), String> {
        let (name, value) = match text.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (text, None),
        };
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let value_ok = value.is_none_or(|v| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-+:".contains(&b))
        });
        if !name_ok || !value_ok {
            return Err(format!(
                "mount option {text:?} is not of the form name or name=value \
                 (letters, digits, _ . - + :, no commas)"
            ));
        }
        if let Some((_, why)) = RESERVED_OPTIONS.iter().find(|(n, _)| *n == name) {
            return Err(format!("mount option {text:?} may not be set here: {why}"));
        }
        if value.is_some() && FLAG_OPTIONS.iter().any(|(n, _)| *n == name) {
            return Err(format!("mount option {name:?} takes no value"));
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for MountOption {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        MountOption::check(&text).map_err(serde::de::Error::custom)?;
        Ok(MountOption(text))
    }
}

/// How to mount one stick: `flags` and `data` for mount(2), or `options` for `mount -o`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickMount {
    /// The filesystem type to pass to mount.
    pub fstype: StickFs,
    /// VFS flags: always `MS_NOSUID | MS_NODEV | MS_NOEXEC`, plus the configured flag options.
    pub flags: MsFlags,
    /// Filesystem-specific data: `uid=,gid=,umask=` and the configured data options.
    pub data: String,
    /// Everything as one `mount -o` string (flags by name, then data).
    pub options: String,
}

impl SystemConfig {
    /// The mount of a stick of type `fstype` for the user `uid`/`gid`, with the flash-friendly
    /// options of the configuration. nosuid, nodev and noexec are always set: the stick is
    /// attacker-controlled, and only pershomefs (which keeps its own modes) shows its files.
    pub fn stick_mount(&self, fstype: StickFs, uid: u32, gid: u32) -> StickMount {
        let extra = match fstype {
            StickFs::Vfat => &self.stick.vfat_options,
            StickFs::Exfat => &self.stick.exfat_options,
        };
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let mut flag_names = vec!["nosuid", "nodev", "noexec"];
        let mut data = vec![
            format!("uid={uid}"),
            format!("gid={gid}"),
            format!("umask={:03o}", self.stick.umask.0),
        ];
        for opt in extra {
            match FLAG_OPTIONS.iter().find(|(n, _)| *n == opt.0) {
                Some((name, flag)) => {
                    flags |= *flag;
                    flag_names.push(name);
                }
                None => data.push(opt.0.clone()),
            }
        }
        let data = data.join(",");
        let options = format!("{},{}", flag_names.join(","), data);
        StickMount {
            fstype,
            flags,
            data,
            options,
        }
    }

    /// The file as it would be written with these values (used by `pershome-config` to show
    /// the effective configuration and by tests to round-trip).
    pub fn to_toml(&self) -> String {
        // Serialising a struct of plain values cannot fail; an empty string would only hide a
        // bug in this module, which the round-trip test catches.
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks what serde cannot check per value: key-specific ranges and the list contents.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.commit_interval.0 == 0 {
            return Err((
                "commit_interval",
                "commit_interval must be 1 to 3600 seconds".into(),
            ));
        }
        if self.logout_timeout.0 > 600 {
            return Err((
                "logout_timeout",
                "logout_timeout must be 0 to 600 seconds".into(),
            ));
        }
        if self.stick.filesystems.is_empty() {
            return Err((
                "filesystems",
                "[stick] filesystems is empty: no stick would ever be found".into(),
            ));
        }
        Ok(())
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A syntax error, unknown key, wrong type or bad value. `line` is 1-based.
    #[error("{path}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
}

/// Reads `root/etc/pershome/config.toml`. A missing file gives the defaults.
pub fn load(root: &Path) -> Result<SystemConfig, ConfigError> {
    let path = root.join(CONFIG_PATH);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SystemConfig::default()),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    parse(&text, &path)
}

/// Parses the text of a config file; `path` is only used in error messages.
pub fn parse(text: &str, path: &Path) -> Result<SystemConfig, ConfigError> {
    let config: SystemConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        line: e.span().map(|span| line_of(text, span.start)),
        message: e.message().trim().to_owned(),
    })?;
    config
        .validate()
        .map_err(|(key, message)| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_of_key(text, key),
            message,
        })?;
    Ok(config)
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The line where `key` is assigned, for errors found after parsing. Keys are unique in a
/// valid TOML table, and every key name of this file is unique across its tables.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            line.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<SystemConfig, ConfigError> {
        parse(text, Path::new("config.toml"))
    }

    fn error_of(text: &str) -> (Option<usize>, String) {
        match parse_str(text) {
            Err(ConfigError::Invalid { line, message, .. }) => (line, message),
            other => panic!("expected an Invalid error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_is_defaults() {
        let got = parse_str("").expect("empty file parses");
        assert_eq!(got, SystemConfig::default());
    }

    #[test]
    fn defaults_round_trip() {
        let text = SystemConfig::default().to_toml();
        assert!(text.contains("commit_interval = 5"), "got:\n{text}");
        let back = parse_str(&text).expect("default TOML parses");
        assert_eq!(back, SystemConfig::default(), "round trip of:\n{text}");
    }

    #[test]
    fn all_keys_set() {
        let text = r#"
commit_interval = 30
on_missing_stick = "deny"
honour_user_file = false
logout_timeout = 0

[stick]
filesystems = ["exfat"]
umask = "0077"
vfat_options = ["utf8=1"]
exfat_options = ["iocharset=utf8", "sync"]
"#;
        let got = parse_str(text).expect("parses");
        assert_eq!(got.commit_interval, Seconds(30));
        assert_eq!(got.on_missing_stick, OnMissingStick::Deny);
        assert!(!got.honour_user_file);
        assert_eq!(got.logout_timeout, Seconds(0));
        assert_eq!(got.stick.filesystems, vec![StickFs::Exfat]);
        assert_eq!(got.stick.umask, Umask(0o077));
        let m = got.stick_mount(StickFs::Exfat, 1000, 100);
        assert_eq!(
            m.options,
            "nosuid,nodev,noexec,sync,uid=1000,gid=100,umask=077,iocharset=utf8"
        );
    }

    #[test]
    fn default_vfat_mount_is_flash_friendly_and_safe() {
        let m = SystemConfig::default().stick_mount(StickFs::Vfat, 1001, 1002);
        assert_eq!(
            m.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_NOATIME
        );
        assert_eq!(
            m.data,
            "uid=1001,gid=1002,umask=077,utf8=1,shortname=mixed,flush"
        );
        assert_eq!(
            m.options,
            "nosuid,nodev,noexec,noatime,uid=1001,gid=1002,umask=077,utf8=1,shortname=mixed,flush"
        );
    }

    #[test]
    fn unknown_key_names_its_line() {
        let (line, msg) = error_of("commit_interval = 5\n\ncomit = 3\n");
        assert_eq!(line, Some(3), "message: {msg}");
        assert!(msg.contains("unknown field `comit`"), "got: {msg}");
        let (line, msg) = error_of("[stick]\numask = \"077\"\nflush = true\n");
        assert_eq!(line, Some(3), "message: {msg}");
        assert!(msg.contains("flush"), "got: {msg}");
    }

    #[test]
    fn bad_values_name_their_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("commit_interval = \"5\"\n", 1, "whole number of seconds"),
            ("\ncommit_interval = 99999\n", 2, "out of range"),
            ("commit_interval = 0\n", 1, "1 to 3600"),
            ("logout_timeout = 601\n", 1, "0 to 600"),
            ("on_missing_stick = \"panic\"\n", 1, "fallback"),
            ("[stick]\nfilesystems = [\"msdos\"]\n", 2, "msdos"),
            ("[stick]\nfilesystems = []\n", 2, "empty"),
            ("[stick]\numask = \"022\"\n", 2, "077"),
            ("[stick]\numask = \"9\"\n", 2, "octal"),
            ("[stick]\nvfat_options = [\"uid=0\"]\n", 2, "uid"),
            (
                "[stick]\nvfat_options = [\"exec\"]\n",
                2,
                "noexec is forced",
            ),
            ("[stick]\nvfat_options = [\"a,suid\"]\n", 2, "no commas"),
            ("[stick]\nexfat_options = [\"noatime=1\"]\n", 2, "no value"),
            ("commit_interval = \n", 1, ""),
        ];
        for (text, want_line, want_msg) in cases {
            let (line, msg) = error_of(text);
            assert!(
                line == Some(*want_line) && msg.contains(want_msg),
                "for {text:?}: expected line {want_line} and a message containing \
                 {want_msg:?}, got line {line:?}, message {msg:?}"
            );
        }
    }

    #[test]
    fn error_display_names_file_and_line() {
        let err = parse_str("x = 1\n").expect_err("unknown key");
        let text = err.to_string();
        assert!(
            text.starts_with("config.toml, line 1: unknown field `x`"),
            "got: {text}"
        );
    }

    #[test]
    fn missing_file_is_defaults_and_unreadable_is_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).expect("missing"), SystemConfig::default());
        std::fs::create_dir_all(dir.path().join(CONFIG_PATH)).expect("mkdir");
        match load(dir.path()) {
            Err(ConfigError::Read { .. }) => {}
            other => panic!("expected a Read error for a directory, got {other:?}"),
        }
    }
}
