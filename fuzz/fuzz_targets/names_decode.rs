//! Fuzz target: backing names from the stick (`names::decode`, `names::is_canonical`, and the
//! 8.3 mode's `names::decode_in` and `names::short_candidate`).
//!
//! The first input byte chooses `at_root` (its low bit); the rest is the backing name.
//! Asserts no panic, and exactly what `is_canonical` promises: a canonical backing name that
//! decodes to `Name(n)` has `n` a valid POSIX name and is what `encode(n, Natural)` or
//! `encode(n, CaseEscaped)` produces; and a valid POSIX name encodes (Natural, CaseEscaped)
//! to backing names that decode back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pershome::names::{self, Decoded, Form};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, backing)) = data.split_first() else {
        return;
    };
    let at_root = flags & 1 == 1;
    let decoded = names::decode(backing, at_root);
    let canonical = names::is_canonical(backing, at_root);
    if let Decoded::Name(name) = &decoded {
        if canonical {
            assert!(
                names::is_valid_posix_name(name),
                "canonical backing {backing:02x?} decodes to invalid POSIX name {name:02x?}"
            );
            let natural = names::encode(name, Form::Natural, at_root);
            let escaped = names::encode(name, Form::CaseEscaped, at_root);
            assert!(
                natural == backing || escaped == backing,
                "canonical backing {backing:02x?} (at_root {at_root}) is neither encoding of \
                 {name:02x?}: Natural {natural:02x?}, CaseEscaped {escaped:02x?}"
            );
        }
    }
    // The module invariant: decode inverts encode for valid POSIX names. Here the fuzzer's
    // bytes serve as a POSIX name too.
    if names::is_valid_posix_name(backing) {
        for form in [Form::Natural, Form::CaseEscaped] {
            let enc = names::encode(backing, form, at_root);
            let back = names::decode(&enc, at_root);
            assert_eq!(
                back,
                Decoded::Name(backing.to_vec()),
                "decode(encode({backing:02x?}, {form:?}, {at_root})) via {enc:02x?}"
            );
        }
    }
    // Hashed encoding is total and never panics either.
    let _ = names::encode(backing, Form::Hashed, at_root);
    // 8.3 mode: decoding is total; every candidate is a valid upper-case 8.3 name; the first
    // candidate, when there is one, decodes to the name lower-cased.
    let _ = names::decode_in(names::NameMode::Short83, backing, at_root);
    let attempt = u32::from(flags >> 1) * 64;
    for a in [0, 1, 9, 10, attempt] {
        if let Some(short) = names::short_candidate(backing, a) {
            assert_eq!(
                pershome::fatrules::check_short_name(&short),
                Ok(()),
                "short_candidate({backing:02x?}, {a}) = {short:02x?}"
            );
            if a == 0 {
                assert_eq!(
                    names::decode_in(names::NameMode::Short83, &short, at_root),
                    Decoded::Name(backing.to_ascii_lowercase()),
                    "the readable 8.3 name {short:02x?} of {backing:02x?}"
                );
            }
        }
    }
});
