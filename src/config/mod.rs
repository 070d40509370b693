//! The configuration, split by job:
//!
//! - [`raw`]: the file's serde shape, exactly as an operator writes it;
//! - [`model`] and [`lb`]: the validated types workers and the control plane run from;
//! - [`defaults`]: every default, in one place;
//! - [`units`]: sizes, durations, tokens;
//! - [`error`]: what can be wrong, located by file, line and key path;
//! - `load`, `validate`, `validate_lb`, `unknown`, [`lines`]: reading a file into a config,
//!   reporting every problem at once.
//!
//! Nothing here owns a thread or does I/O beyond reading the file (and resolving host names
//! once, at load).

pub mod defaults;
pub mod error;
pub mod lb;
pub mod lines;
mod load;
pub mod model;
pub mod raw;
pub mod units;
mod unknown;
mod validate;
mod validate_edge;
mod validate_lb;

pub use error::{ConfigError, ConfigErrors, Problem};
pub use model::*;
pub use units::{parse_duration, parse_size};
