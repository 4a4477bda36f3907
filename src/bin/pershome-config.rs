//! `pershome-config`: the administrator's command (users with a stick home, PAM set-up,
//! checks). Everything is in `pershome::cli::pershome_config`; see `pershome-config --help`
//! and docs/admin-guide.md.

fn main() -> std::process::ExitCode {
    pershome::cli::pershome_config::main(std::env::args_os())
}
