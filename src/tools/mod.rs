//! The user's tools of the `pershome` command: `prepare` (make a stick ready), `status` (what
//! is mounted, is it safe to remove the stick), `migrate` (copy an existing home onto a
//! stick). Finding sticks and mounts, the `pershome/` look-up and temporary mounts are
//! `crate::stick`'s, shared with the login hook.
//!
//! These modules own what a person sees of a stick outside a login. They never format a
//! stick, never write to a store that a mount holds, and never pass a user string to a shell.

pub mod migrate;
pub mod prepare;
pub mod status;
pub mod zenity;
