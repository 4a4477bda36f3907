//! Helpers the tests share with the library's own unit tests: today, the one rule for a test
//! that needs root.
//!
//! This module owns that rule and nothing else; production code never calls it.

/// The environment variable that turns a skipped root test into a failure. CI runs as root
/// and sets it (`.ci/run`), so a root test that quietly skips there is a failure, as
/// `PERSHOME_REQUIRE_GUI` already is for the desktop tests.
pub const REQUIRE_ROOT_ENV: &str = "PERSHOME_REQUIRE_ROOT";

/// Whether a test that needs root must skip: `true` (after saying so on stderr) when this
/// process is not root. Panics instead when [`REQUIRE_ROOT_ENV`] is `1`.
pub fn skip_without_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    let msg = format!("{test} needs root");
    if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v == "1") {
        panic!("{msg}; {REQUIRE_ROOT_ENV}=1 is set, so a skip is a failure");
    }
    eprintln!("\n*** SKIPPED {msg} ***\n");
    true
}
