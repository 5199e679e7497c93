//! The command line that talks to a running broker through its admin API.
//!
//! Every command prints a human-readable table by default and JSON with `--output json`, and
//! exits non-zero with a one-line reason on failure: 1 when the broker refused or failed the
//! request, 2 for a usage error, 3 when the broker cannot be reached.

mod client;
mod commands;
mod table;

pub use commands::{Cli as AdminCommand, run};
