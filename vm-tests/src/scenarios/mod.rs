//! The scenarios of issue 6, each a function that boots what it needs and returns an error
//! that says what it expected and what it got. Numbers follow the issue.
//!
//! This module owns the list. A scenario never leaves a QEMU running (its `Vm`s are dropped,
//! and so killed, on every path out of it).

mod bench;
mod conformance;
mod kernels;
mod login;
mod ltsp;
mod msdos;
mod powercut;
mod vfat;
mod wear;
mod yank;

use anyhow::Result;

use crate::Ctx;

pub struct Scenario {
    pub number: u8,
    pub name: &'static str,
    pub summary: &'static str,
    pub run: fn(&mut Ctx) -> Result<()>,
}

pub const ALL: &[Scenario] = &[
    Scenario {
        number: 5,
        name: "conformance",
        summary: "pjdfstest and fsx on pershomefs over a real vfat stick and a real exFAT stick",
        run: conformance::run,
    },
    Scenario {
        number: 7,
        name: "kernels",
        summary: "Debian 12's 6.1 and backports' 6.12 (FUSE passthrough on): the same checks pass",
        run: kernels::run,
    },
    Scenario {
        number: 3,
        name: "yank",
        summary:
            "the stick is pulled during writes: no hang, unmount completes, fsync'ed data survives",
        run: yank::run,
    },
    Scenario {
        number: 6,
        name: "wear",
        summary: "bytes the stick receives (QMP) for the wear workloads: pershome vs plain vfat",
        run: wear::run,
    },
    Scenario {
        number: 1,
        name: "day",
        summary: "the student's day: real PAM login on machine A, host checks the stick, machine B (other uid) sees it all",
        run: login::run_day,
    },
    Scenario {
        number: 2,
        name: "windows",
        summary: "edited on Windows: mtools adds, renames and deletes between the machines; B sees it",
        run: login::run_windows,
    },
    Scenario {
        number: 4,
        name: "fallback",
        summary: "no stick, then an unprepared stick: normal home, the user is told why and how to prepare",
        run: login::run_fallback,
    },
    Scenario {
        number: 8,
        name: "msdos",
        summary: "an 8.3 stick on the real msdos driver: prepare --names 8.3, hostile names, pjdfstest, fsx; vfat remount; only 8.3 names on the disk",
        run: msdos::run,
    },
    Scenario {
        number: 9,
        name: "ltsp",
        summary: "LTSP 23 on Debian 13: a server VM netboots a diskless client; alice's stick home beside pamltsp, bob's SSHFS home, the fallback, deny, unlock, carol added",
        run: ltsp::run,
    },
    Scenario {
        number: 10,
        name: "powercut",
        summary: "power cuts: nbdkit's write-back cache and QEMU killed mid-workload, three times; fsync'ed files intact, the rest old or new, never garbage",
        run: powercut::run,
    },
    Scenario {
        number: 11,
        name: "bench",
        summary: "issue 14's workloads (tar x, find, ls -lR cold and warm, rm -rf, a 32 MiB write) on pershomefs over vfat and on plain vfat, in one VM: the ratio table (informational)",
        run: bench::run,
    },
    Scenario {
        number: 12,
        name: "vfat",
        summary: "the kernel's vfat: renames, creates, links, symlinks and mkdirs onto 8.3 aliases of Windows-made files (long and names=8.3); renames durable after a folder fsync across a power cut, beside raw vfat",
        run: vfat::run,
    },
];
