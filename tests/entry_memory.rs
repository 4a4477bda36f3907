//! Memory per looked-up entry (issue 14, Scale: at most 400 bytes of daemon memory per entry
//! the kernel has looked up, so 100,000 entries after `ls -lR` stay under 40 MiB).
//!
//! The test counts heap bytes, not RSS: a global allocator adds up every live allocation as
//! malloc holds it (its usable size plus the 8-byte chunk header glibc keeps in front), so the
//! figure is exact and the same on a loaded machine. Its own test binary, with one test: the
//! allocator counts the whole process, and another test running beside it would be counted too.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

use pershome::fs::{Ctx, ROOT};

/// `System`, counting the bytes of every live allocation.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

/// What malloc holds for an allocation at `ptr`: its usable size and the chunk header.
fn held(ptr: *mut u8) -> i64 {
    // SAFETY: `ptr` was returned by `System`, which is glibc's malloc (or posix_memalign for
    // large alignments), and has not been freed yet.
    unsafe { libc::malloc_usable_size(ptr.cast()) as i64 + 8 }
}

// SAFETY: every call is passed to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(held(p), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(held(p), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(held(ptr), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let before = held(ptr);
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(held(p) - before, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DIRS: u32 = 20;
const FILES: u32 = 20_000;
/// The target.
const MAX_BYTES_PER_ENTRY: i64 = 400;

fn ctx() -> Ctx {
    Ctx {
        uid: 1000,
        gid: 1000,
        pid: 1,
        umask: 0o022,
    }
}

/// A home like the bench's tree (`cargo xtask bench`: `dNNNN/fNNNNNN.dat`, made through the
/// mount, so every entry has a record in the store), then a fresh mount of it that lists every
/// directory and looks up every entry, as `ls -lR` does: the heap it holds afterwards, less
/// what it held idle, is at most 400 bytes per entry.
#[test]
fn a_looked_up_entry_costs_at_most_400_bytes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let fs = common::open(dir.path());
        let dirs: Vec<u64> = (0..DIRS)
            .map(|d| {
                fs.mkdir(ctx(), ROOT, format!("d{d:04}").as_bytes(), 0o755)
                    .unwrap()
                    .ino
            })
            .collect();
        for f in 0..FILES {
            let name = format!("f{f:06}.dat");
            let (_, fh) = fs
                .create(
                    ctx(),
                    dirs[(f % DIRS) as usize],
                    name.as_bytes(),
                    0o644,
                    libc::O_WRONLY,
                )
                .unwrap();
            fs.release(fh).unwrap();
        }
        fs.compact().unwrap();
        fs.shutdown();
    }

    let fs = common::open(dir.path());
    let idle = LIVE.load(Ordering::Relaxed);
    let mut entries = 0i64;
    let mut stack = vec![ROOT];
    while let Some(ino) = stack.pop() {
        // As the FUSE adapter lists a folder for the kernel: by inode, a page at a time.
        let mut listing = Vec::new();
        let mut offset = 0;
        loop {
            let page = fs.list_dir(ino, offset, 100).unwrap();
            let Some(&(last, _)) = page.last() else {
                break;
            };
            offset = last;
            listing.extend(page);
        }
        for (_, e) in listing {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let attr = fs.lookup(ino, &e.name).unwrap();
            fs.getattr(attr.ino).unwrap();
            entries += 1;
            if attr.kind == pershome::fs::Kind::Dir {
                stack.push(attr.ino);
            }
        }
    }
    let listed = LIVE.load(Ordering::Relaxed);
    assert_eq!(entries, i64::from(DIRS + FILES), "every entry was listed");
    let per_entry = (listed - idle) / entries;
    eprintln!(
        "heap: idle mount {idle} bytes; after looking up {entries} entries {listed} bytes \
         ({per_entry} bytes per entry)"
    );
    assert!(
        per_entry <= MAX_BYTES_PER_ENTRY,
        "the daemon holds {per_entry} heap bytes per looked-up entry (idle {idle}, after \
         looking up {entries} entries {listed}); the target is at most {MAX_BYTES_PER_ENTRY}"
    );
    fs.shutdown();
}
