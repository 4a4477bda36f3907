//! Test hook: injected failures of every write-like system call pershomefs makes on the stick,
//! to prove recovery at every point a write can stop (tests/crash.rs, design property 6).
//!
//! One `Faults` is shared by the metadata store (`meta::Journal`) and the backing tree
//! (`backing::Backing`), so "the Nth write" counts file data, directory operations and store
//! commits in the order they really happen. This module owns only the counting and the
//! decision; each caller decides what a failed or torn operation leaves behind. Production
//! never sets it: a `Journal` or `Backing` without faults does not consult this at all. Both
//! consult it through `backing::sys`, the one layer of write-like system calls. In the
//! power-loss mode (`Faults::with_power_loss`) it also carries the durability model of
//! `backing::power_loss`, which `backing::sys` tells of every sync and removal.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::backing::power_loss::PowerLoss;

/// Injected failures. Every write-like operation made while these are set counts as one:
/// in the store each `pwrite`, `fsync`/`fdatasync`, `O_CREAT` open, `unlink`, `rename` and
/// `ftruncate`; on the backing each data `pwrite`, file `fsync`, `O_CREAT`/`O_TRUNC` open,
/// `mkdir`, `unlink`/`rmdir`, `rename`, `ftruncate`, `fallocate` and `copy_file_range`. The
/// first `allow` operations run normally; the next one fails with EIO — a write that is
/// `torn` first writes the first half of its buffer, as a power cut can — and so does every
/// later one, as on a stick that was pulled.
#[derive(Debug)]
pub struct Faults {
    allow: u64,
    torn: bool,
    attempted: AtomicU64,
    tripped: AtomicBool,
    /// The power-loss mode: what the stick keeps when the fault fires (see `PowerLoss`).
    power: Option<Arc<PowerLoss>>,
}

/// What an injected-fault check decided for one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Go,
    /// Fail; when `torn`, a write first writes the leading `torn_len` bytes of its buffer.
    Fail {
        torn: bool,
    },
}

impl Faults {
    /// Allows `allow` operations, then fails every later one (the first of them torn, if
    /// `torn` and it is a write).
    pub fn new(allow: u64, torn: bool) -> Faults {
        Faults {
            allow,
            torn,
            attempted: AtomicU64::new(0),
            tripped: AtomicBool::new(false),
            power: None,
        }
    }

    /// The power-loss mode: allows `allow` operations, then fails every later one (the stick
    /// was pulled), and `power` learns from every sync before that what a pulled stick keeps.
    /// The test then calls `PowerLoss::pull` to turn the backing into it.
    pub fn with_power_loss(allow: u64, power: Arc<PowerLoss>) -> Faults {
        Faults {
            power: Some(power),
            ..Faults::new(allow, false)
        }
    }

    /// The durability model of the power-loss mode, if this is it.
    pub(crate) fn power(&self) -> Option<&PowerLoss> {
        self.power.as_deref()
    }

    /// Never fails: only counts the operations (to learn how many a workload makes).
    pub fn counting() -> Faults {
        Faults::new(u64::MAX, false)
    }

    /// Write-like operations attempted so far (the failed ones included).
    pub fn operations(&self) -> u64 {
        self.attempted.load(Ordering::SeqCst)
    }

    /// Whether an operation has been failed.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::SeqCst)
    }

    pub(crate) fn gate(&self) -> Gate {
        let n = self.attempted.fetch_add(1, Ordering::SeqCst);
        if n < self.allow {
            return Gate::Go;
        }
        self.tripped.store(true, Ordering::SeqCst);
        Gate::Fail {
            torn: self.torn && n == self.allow,
        }
    }
}

/// The length of the prefix a torn write leaves: half the buffer, rounded down, so a one-byte
/// write leaves nothing and every longer one leaves part of itself.
pub(crate) fn torn_len(len: usize) -> usize {
    len / 2
}
