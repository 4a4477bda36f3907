//! The command-line front ends of pershome. Each binary's `main` is a thin call into a
//! submodule here, so the argument handling, validation and exit codes are library code that
//! tests can drive.
//!
//! This module owns the types shared by the front ends; it never implements filesystem
//! operations and never reads the stick's metadata itself: that is the opener's job.

pub mod pershome_config;
pub mod pershomefs;

/// Why the filesystem could not be opened: returned by the opener that `pershomefs::main`
/// calls. The variant decides the exit code; the message is shown to the person as it is, so
/// it should say what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The stick's metadata was written by a newer pershome (exit code 3).
    #[error("{0}")]
    NewerFormat(String),
    /// The metadata store cannot be read or recovered (exit code 3).
    #[error("{0}")]
    Refused(String),
    /// The backing directory cannot be used: permissions, I/O errors (exit code 2).
    #[error("{0:#}")]
    Backing(anyhow::Error),
    /// Anything else (exit code 5).
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl OpenError {
    /// The `pershomefs` exit code for this error.
    pub fn exit_code(&self) -> u8 {
        use pershomefs::exit_code;
        match self {
            OpenError::NewerFormat(_) | OpenError::Refused(_) => exit_code::METADATA,
            OpenError::Backing(_) => exit_code::PATHS,
            OpenError::Other(_) => exit_code::INTERNAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_error_codes_and_messages() {
        let cases = [
            (
                OpenError::NewerFormat("format 9 is newer".into()),
                3,
                "format 9 is newer",
            ),
            (
                OpenError::Refused("journal unreadable".into()),
                3,
                "journal unreadable",
            ),
            (
                OpenError::Backing(anyhow::anyhow!("denied").context("opening /x")),
                2,
                "opening /x: denied",
            ),
            (OpenError::Other(anyhow::anyhow!("boom")), 5, "boom"),
        ];
        for (err, code, text) in cases {
            assert_eq!(
                (err.exit_code(), err.to_string()),
                (code, text.to_owned()),
                "for {err:?}"
            );
        }
    }
}
