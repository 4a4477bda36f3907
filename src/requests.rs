//! Counts of the FUSE requests the daemon serves, per opcode (`-o counters`), for the bench and
//! for tests that pin how many round trips an operation costs.
//!
//! This module owns the counts, their text report and the reading of that report. It never
//! decides anything from the counts. Off (the default) the adapter holds no [`Counters`], so
//! counting costs one never-taken branch per request.
//!
//! The report is read as the extended attribute [`REPORT_XATTR`] of the mount's root, which
//! only root may read (`trusted.*`). A getxattr is synchronous and exact: the report holds
//! every request answered before it. Reading the report is not itself counted, so a test can
//! take a snapshot before and after an operation and assert the difference exactly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// The extended attribute of the root that holds the report while counting is on.
pub const REPORT_XATTR: &str = "trusted.pershome.requests";

macro_rules! opcodes {
    ($($variant:ident => $name:literal,)*) => {
        /// A FUSE request, named as the kernel names it (`include/uapi/linux/fuse.h`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Op {
            $($variant,)*
        }

        impl Op {
            /// Every opcode, in report order.
            pub const ALL: &'static [Op] = &[$(Op::$variant,)*];

            /// The kernel's name for the opcode, as the report spells it.
            pub fn name(self) -> &'static str {
                match self {
                    $(Op::$variant => $name,)*
                }
            }
        }
    };
}

opcodes! {
    Lookup => "LOOKUP",
    // fuser hands a BATCH_FORGET to the filesystem one inode at a time (its batch type is
    // private), so FORGET counts forgotten inodes, not requests. Forgets are never answered:
    // they cost the kernel no round trip.
    Forget => "FORGET",
    Getattr => "GETATTR",
    Setattr => "SETATTR",
    Readlink => "READLINK",
    Symlink => "SYMLINK",
    Mknod => "MKNOD",
    Mkdir => "MKDIR",
    Unlink => "UNLINK",
    Rmdir => "RMDIR",
    Rename => "RENAME",
    Link => "LINK",
    Open => "OPEN",
    Read => "READ",
    Write => "WRITE",
    Statfs => "STATFS",
    Release => "RELEASE",
    Fsync => "FSYNC",
    Setxattr => "SETXATTR",
    Getxattr => "GETXATTR",
    Listxattr => "LISTXATTR",
    Removexattr => "REMOVEXATTR",
    Flush => "FLUSH",
    Opendir => "OPENDIR",
    Readdir => "READDIR",
    Releasedir => "RELEASEDIR",
    Fsyncdir => "FSYNCDIR",
    Getlk => "GETLK",
    Setlk => "SETLK",
    Access => "ACCESS",
    Create => "CREATE",
    Bmap => "BMAP",
    Ioctl => "IOCTL",
    Poll => "POLL",
    Fallocate => "FALLOCATE",
    Readdirplus => "READDIRPLUS",
    Lseek => "LSEEK",
    CopyFileRange => "COPY_FILE_RANGE",
}

/// The counts, one per opcode, updated by every worker thread without a lock.
#[derive(Debug)]
pub struct Counters {
    counts: Vec<AtomicU64>,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            counts: Op::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Counters {
    pub fn add(&self, op: Op) {
        // Relaxed: the counts order nothing; a reader only needs each increment to be seen
        // once the request it counts has been answered, which the reply's syscall ensures.
        self.counts[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, op: Op) -> u64 {
        self.counts[op as usize].load(Ordering::Relaxed)
    }

    /// One line `NAME COUNT` per opcode seen at least once, in opcode order.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for &op in Op::ALL {
            let n = self.get(op);
            if n > 0 {
                out.push_str(op.name());
                out.push(' ');
                out.push_str(&n.to_string());
                out.push('\n');
            }
        }
        out
    }
}

/// A parsed report: opcode name → count (opcodes never seen are absent).
pub type Report = BTreeMap<String, u64>;

/// Parses [`Counters::report`]'s text; a malformed line is an error naming it.
pub fn parse_report(text: &str) -> Result<Report, String> {
    let mut report = Report::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (name, count) = line
            .split_once(' ')
            .ok_or_else(|| format!("request report line {line:?} is not `NAME COUNT`"))?;
        let count: u64 = count
            .trim()
            .parse()
            .map_err(|_| format!("request report line {line:?}: the count is not a number"))?;
        report.insert(name.to_owned(), count);
    }
    Ok(report)
}

/// What happened between two snapshots: `after - before` per opcode, zero counts dropped.
pub fn difference(before: &Report, after: &Report) -> Report {
    after
        .iter()
        .map(|(name, &n)| {
            (
                name.clone(),
                n - before.get(name).copied().unwrap_or(0).min(n),
            )
        })
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// The total number of requests in a report.
pub fn total(report: &Report) -> u64 {
    report.values().sum()
}

/// Reads the report of the pershomefs mount whose root is `mountpoint` (root only; the mount
/// must have been made with `-o counters`).
pub fn read_report(mountpoint: &std::path::Path) -> std::io::Result<Report> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let name = std::ffi::CString::new(REPORT_XATTR).map_err(std::io::Error::other)?;
    // The report is a few hundred bytes; one generous buffer avoids a size probe (which would
    // be a second request, though an uncounted one).
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: both strings are NUL-terminated and outlive the call; the buffer's length is
    // passed with it.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!(
                "reading {REPORT_XATTR} of {}: {e} (was it mounted with -o counters?)",
                mountpoint.display()
            ),
        ));
    }
    buf.truncate(n as usize);
    let text = String::from_utf8(buf).map_err(std::io::Error::other)?;
    parse_report(&text).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_and_differences_are_per_opcode() {
        let c = Counters::default();
        for op in [Op::Lookup, Op::Lookup, Op::Create, Op::Getxattr] {
            c.add(op);
        }
        let before = parse_report(&c.report()).expect("report parses");
        c.add(Op::Lookup);
        c.add(Op::Write);
        let after = parse_report(&c.report()).expect("report parses");
        assert_eq!(
            c.report(),
            "LOOKUP 3\nWRITE 1\nGETXATTR 1\nCREATE 1\n",
            "report text"
        );
        let diff = difference(&before, &after);
        let expected: Report = [("LOOKUP".to_owned(), 1), ("WRITE".to_owned(), 1)].into();
        assert_eq!(diff, expected, "difference");
        assert_eq!(total(&after), 6);
    }

    #[test]
    fn malformed_report_lines_are_errors() {
        for bad in ["LOOKUP", "LOOKUP x"] {
            assert!(parse_report(bad).is_err(), "expected {bad:?} to be refused");
        }
    }
}
