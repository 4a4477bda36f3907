//! Fuzz target: POSIX ACL xattr values (`fs::acl::parse`), which the stick stores.
//!
//! Asserts no panic, and that a parsed ACL serializes to the very bytes it came from (the
//! binary form has no slack: fixed header, fixed-size entries) and parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pershome::fs::acl;

fuzz_target!(|data: &[u8]| {
    let Some(entries) = acl::parse(data) else {
        return;
    };
    let bytes = acl::serialize(&entries);
    assert_eq!(
        bytes, data,
        "serialize(parse(x)) != x for entries {entries:?}"
    );
    assert_eq!(
        acl::parse(&bytes).as_deref(),
        Some(entries.as_slice()),
        "parse(serialize(parse(x))) differs"
    );
    // The mode derived from any valid ACL is permission bits only.
    let bits = acl::mode_bits(&entries);
    assert!(bits <= 0o777, "mode_bits {bits:o} exceeds 0o777");
});
