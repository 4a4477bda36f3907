//! `pershomefs BACKING MOUNTPOINT [-o OPTIONS]`: see `pershomefs --help` and pershomefs(1).

use std::process::ExitCode;

use pershome::cli::OpenError;
use pershome::fs::{FsOptions, OpenError as FsOpenError};
use pershome::meta::journal::StoreError;

fn main() -> ExitCode {
    pershome::cli::pershomefs::main(std::env::args_os(), |backing, opts| {
        let fs_opts = FsOptions {
            uid: opts.uid,
            gid: opts.gid,
            read_only: opts.read_only,
            commit_interval: opts.commit_interval,
            names: opts.names,
            parts: opts.parts,
            part_size: opts.part_size,
            private_home: opts.private_home,
        };
        let counters = opts.counters;
        let adapter = pershome::fuse::Adapter::open(backing, fs_opts);
        if let (Ok(a), Some(bytes)) = (&adapter, opts.compact_after) {
            a.fs().set_compact_after(bytes);
        }
        let adapter = adapter.map(|a| if counters { a.with_counters() } else { a });
        adapter.map_err(|e| match e {
            FsOpenError::Backing { .. } => OpenError::Backing(anyhow::Error::new(e)),
            FsOpenError::Store(StoreError::NewerFormat { .. }) => OpenError::NewerFormat(format!(
                "{e}: this stick was written by a newer pershome; update pershome on this \
                 computer, or mount it read-only with a newer version"
            )),
            FsOpenError::NameMode { .. } | FsOpenError::OldShortStore => {
                OpenError::Refused(e.to_string())
            }
            FsOpenError::PartSize(_) => OpenError::Refused(e.to_string()),
            FsOpenError::Store(s) => OpenError::Refused(format!(
                "the metadata store in {} cannot be used: {s}; run `pershome fsck` on it",
                backing.display()
            )),
        })
    })
}
