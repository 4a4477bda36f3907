//! The concurrent stress test (issue 11): several threads of mixed operations on a real
//! pershomefs mount (create, write, rename across directories, link, unlink, setxattr,
//! chmod, truncate, fsync), with the commit timer at 1 s and compaction lowered to a few KiB
//! so both race everything, over several mounts. After each mount: a model of what every
//! thread did is compared with the remounted tree, `fsck` must be clean and the backing
//! must pass the FAT audit. The last mount ends with SIGKILL of the daemon after each thread
//! fsync'ed its files and directories: nothing fsync'ed may be lost.
//!
//! Each thread owns a subtree (and its own names in a shared directory), so its model is
//! exact whatever the interleaving; the threads share the daemon's lock, pending changes,
//! commits and compactions. The operations come from a seeded generator: a failure names the
//! seed, and a run with the same seed repeats the same operations per thread.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pershome::audit::assert_fat_clean;
use pershome::fsck::{self, FsckOptions};

mod common;
use common::{daemons_serving, mounted, scratch, wait_until, Mount};

const THREADS: usize = 4;
const OPS_PER_ROUND: usize = 400;
const ROUNDS: usize = 3;
const SEED: u64 = 0x5eed_1111;

/// A small deterministic generator (xorshift64*): no dependency, and a seed repeats a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One file of a thread: its content, permission bits, `user.s` xattr, and its names
/// (relative to the mount; more than one when hard-linked).
#[derive(Debug, Clone, PartialEq)]
struct FileModel {
    content: Vec<u8>,
    perm: u32,
    xattr: Option<Vec<u8>>,
    names: Vec<String>,
}

/// What one thread made: its files by id.
#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    files: BTreeMap<u64, FileModel>,
    next_id: u64,
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in a path")
}

fn set_xattr(p: &Path, value: &[u8]) {
    let name = CString::new("user.s").expect("name");
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            c(p).as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn get_xattr(p: &Path) -> Option<Vec<u8>> {
    let name = CString::new("user.s").expect("name");
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            c(p).as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn fsync_dir(p: &Path) {
    File::open(p)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync of directory {}: {e}", p.display()));
}

/// The directories of thread `t`: two of its own, and the shared one.
fn dirs(t: usize) -> [String; 3] {
    [format!("t{t}/a"), format!("t{t}/b"), "shared".to_owned()]
}

/// One round of thread `t`'s operations on the mount at `mnt`.
fn run_thread(mnt: &Path, t: usize, round: usize, mut model: Model) -> Model {
    let mut rng = Rng(SEED ^ ((t as u64 + 1) << 32) ^ (round as u64 + 1));
    let p = |rel: &str| mnt.join(rel);
    for i in 0..OPS_PER_ROUND {
        let op = rng.below(10);
        let ids: Vec<u64> = model.files.keys().copied().collect();
        if op == 0 || ids.is_empty() {
            // create + write
            let id = model.next_id;
            model.next_id += 1;
            let dir = &dirs(t)[rng.below(3)];
            let name = format!("{dir}/t{t}-f{id}");
            let content =
                format!("t{t} file {id} round {round} op {i}\n").repeat(rng.below(50) + 1);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(p(&name))
                .unwrap_or_else(|e| panic!("create {name}: {e}"));
            f.write_all(content.as_bytes()).expect("write");
            model.files.insert(
                id,
                FileModel {
                    content: content.into_bytes(),
                    perm: 0o644,
                    xattr: None,
                    names: vec![name],
                },
            );
            continue;
        }
        let id = ids[rng.below(ids.len())];
        let file = model.files.get_mut(&id).expect("file");
        let name = file.names[rng.below(file.names.len())].clone();
        match op {
            1 => {
                // overwrite a part
                let at = rng.below(file.content.len() + 1);
                let data = format!("<{round}:{i}>").into_bytes();
                let f = OpenOptions::new().write(true).open(p(&name)).expect("open");
                std::os::unix::fs::FileExt::write_all_at(&f, &data, at as u64).expect("pwrite");
                let end = at + data.len();
                if file.content.len() < end {
                    file.content.resize(end, 0);
                }
                file.content[at..end].copy_from_slice(&data);
            }
            2 | 3 => {
                // rename across directories
                let dir = &dirs(t)[rng.below(3)];
                let leaf = format!("t{t}-f{id}-r{round}-{i}");
                let to = format!("{dir}/{leaf}");
                std::fs::rename(p(&name), p(&to))
                    .unwrap_or_else(|e| panic!("rename {name} {to}: {e}"));
                for n in file.names.iter_mut() {
                    if *n == name {
                        *n = to.clone();
                    }
                }
            }
            4 => {
                // link, or unlink one of several names
                if file.names.len() > 1 && rng.below(2) == 0 {
                    let k = rng.below(file.names.len());
                    let gone = file.names.remove(k);
                    std::fs::remove_file(p(&gone)).expect("unlink");
                } else {
                    let dir = &dirs(t)[rng.below(3)];
                    let to = format!("{dir}/t{t}-f{id}-l{round}-{i}");
                    std::fs::hard_link(p(&name), p(&to))
                        .unwrap_or_else(|e| panic!("link {name} {to}: {e}"));
                    file.names.push(to);
                }
            }
            5 => {
                let v = format!("r{round}-{i}").into_bytes();
                set_xattr(&p(&name), &v);
                file.xattr = Some(v);
            }
            6 => {
                let perm = [0o600, 0o640, 0o644, 0o664, 0o400][rng.below(5)];
                std::fs::set_permissions(p(&name), std::fs::Permissions::from_mode(perm))
                    .expect("chmod");
                file.perm = perm;
            }
            7 => {
                let len = rng.below(file.content.len() + 10);
                OpenOptions::new()
                    .write(true)
                    .open(p(&name))
                    .and_then(|f| f.set_len(len as u64))
                    .expect("truncate");
                file.content.resize(len, 0);
            }
            8 => {
                OpenOptions::new()
                    .read(true)
                    .open(p(&name))
                    .and_then(|f| f.sync_all())
                    .expect("fsync");
            }
            _ => {
                // delete the file (every name)
                if model.files.len() > 3 {
                    let file = model.files.remove(&id).expect("file");
                    for n in &file.names {
                        std::fs::remove_file(p(n)).expect("unlink");
                    }
                } else {
                    fsync_dir(&p(&dirs(t)[rng.below(3)]));
                }
            }
        }
    }
    model
}

/// Every file and directory of thread `t` made durable by fsync.
fn fsync_all(mnt: &Path, t: usize, model: &Model) {
    for file in model.files.values() {
        for n in &file.names {
            File::open(mnt.join(n))
                .and_then(|f| f.sync_all())
                .unwrap_or_else(|e| panic!("fsync {n}: {e}"));
        }
    }
    for d in dirs(t) {
        fsync_dir(&mnt.join(d));
    }
}

/// What differs between thread `t`'s files on the mount and its model.
fn differences(mnt: &Path, t: usize, model: &Model) -> Vec<String> {
    let mut out = Vec::new();
    let mut expected_names = std::collections::BTreeSet::new();
    for (id, file) in &model.files {
        let mut inos = std::collections::BTreeSet::new();
        for n in &file.names {
            expected_names.insert(n.clone());
            let path = mnt.join(n);
            let Ok(meta) = std::fs::metadata(&path) else {
                out.push(format!("{n} (file {id}) is missing"));
                continue;
            };
            inos.insert(meta.ino());
            if meta.mode() & 0o7777 != file.perm {
                out.push(format!(
                    "{n}: mode {:o}, expected {:o}",
                    meta.mode() & 0o7777,
                    file.perm
                ));
            }
            if meta.nlink() as usize != file.names.len() {
                out.push(format!(
                    "{n}: nlink {}, expected {}",
                    meta.nlink(),
                    file.names.len()
                ));
            }
            let mut content = Vec::new();
            // A 0400 file is still readable by root, who runs this test.
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut content))
                .unwrap_or_else(|e| panic!("read {n}: {e}"));
            if content != file.content {
                out.push(format!(
                    "{n}: {} bytes that differ from the {} expected",
                    content.len(),
                    file.content.len()
                ));
            }
            if get_xattr(&path) != file.xattr {
                out.push(format!(
                    "{n}: user.s is {:?}, expected {:?}",
                    get_xattr(&path),
                    file.xattr
                ));
            }
        }
        if inos.len() > 1 {
            out.push(format!(
                "the names of file {id} are {} different files",
                inos.len()
            ));
        }
    }
    for d in dirs(t) {
        for entry in std::fs::read_dir(mnt.join(&d)).expect("read_dir") {
            let name = entry.expect("entry").file_name();
            let name = name.to_string_lossy();
            if !name.starts_with(&format!("t{t}-")) {
                continue;
            }
            let rel = format!("{d}/{name}");
            if !expected_names.contains(&rel) {
                out.push(format!("{rel} exists but the model has no such name"));
            }
        }
    }
    out
}

fn check_all(mnt: &Path, models: &[Model], when: &str) {
    let mut all = BTreeMap::new();
    for (t, model) in models.iter().enumerate() {
        let d = differences(mnt, t, model);
        if !d.is_empty() {
            all.insert(t, d);
        }
    }
    assert!(all.is_empty(), "{when} (seed {SEED:#x}): {all:#?}");
}

fn fsck_clean(backing: &Path, when: &str) {
    let report = fsck::fsck(
        backing,
        &FsckOptions {
            repair: false,
            force: false,
        },
    )
    .unwrap_or_else(|e| panic!("fsck {when}: {e}"));
    let problems: Vec<_> = report.problems_left().collect();
    assert!(problems.is_empty(), "fsck {when}: {problems:#?}");
}

/// Kills the daemon serving `mnt` with SIGKILL (a crash: no final commit), then takes the
/// dead mount away.
fn kill_daemon(mount: Mount) {
    let mnt = mount.mountpoint.clone();
    for pid in daemons_serving(&mnt) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
    wait_until("the killed daemon is gone", || {
        daemons_serving(&mnt).is_empty()
    });
    // Dropping the guard unmounts the dead mount (lazily when it must).
    drop(mount);
    assert!(mounted(&mnt).is_none(), "the dead mount is gone");
}

#[test]
fn threads_of_mixed_operations_racing_commits_and_compaction_lose_nothing() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts pershomefs: run it as root (CI does)"
    );
    let s = scratch("pershome-stress");
    let backing: PathBuf = s.backing.clone();
    let mnt: PathBuf = s.mnt.clone();
    // Commit every second and compact past 8 KiB of journal: both race the threads.
    let opts = "commit=1,compact_after=8192";
    let mut models: Vec<Model> = vec![Model::default(); THREADS];
    {
        let mount = Mount::new(&backing, &mnt, opts);
        for t in 0..THREADS {
            for d in dirs(t) {
                std::fs::create_dir_all(mnt.join(d)).expect("mkdir");
            }
        }
        mount.unmount();
    }
    for round in 0..ROUNDS {
        let mount = Mount::new(&backing, &mnt, opts);
        // The previous mount's state, read back after the remount.
        check_all(
            &mnt,
            &models,
            &format!("after remount before round {round}"),
        );
        let handles: Vec<_> = models
            .drain(..)
            .enumerate()
            .map(|(t, model)| {
                let mnt = mnt.clone();
                std::thread::spawn(move || {
                    let model = run_thread(&mnt, t, round, model);
                    if round == ROUNDS - 1 {
                        fsync_all(&mnt, t, &model);
                    }
                    model
                })
            })
            .collect();
        models = handles
            .into_iter()
            .map(|h| h.join().expect("a worker thread failed"))
            .collect();
        check_all(&mnt, &models, &format!("live, after round {round}"));
        if round == ROUNDS - 1 {
            // Everything was fsync'ed: a crash now must lose nothing.
            kill_daemon(mount);
        } else {
            mount.unmount();
        }
        fsck_clean(&backing, &format!("after round {round}"));
        assert_fat_clean(&backing);
    }
    let mount = Mount::new(&backing, &mnt, opts);
    check_all(&mnt, &models, "after the crash and a remount");
    mount.unmount();
    fsck_clean(&backing, "at the end");
    let generation = store_generation(&backing);
    assert!(
        generation >= 5,
        "compaction should have run several times (store generation {generation})"
    );
}

/// The generation of the store's journal: how many checkpoints were written.
fn store_generation(backing: &Path) -> u64 {
    std::fs::read_dir(backing.join(".pershome"))
        .expect("list the store")
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            u64::from_str_radix(name.strip_prefix("journal.")?, 16).ok()
        })
        .max()
        .expect("a journal")
}
