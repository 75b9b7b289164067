//! The process service: spawning, supervising and talking to commands.

pub mod events;
pub mod exit;
pub mod handle;
pub mod launch;
pub mod lifecycle;
pub mod output;
pub mod pty;
pub mod reaper;
pub mod service;
pub mod spawn;
pub mod table;

pub use launch::DEFAULT_PATH;
pub use reaper::Reaper;
pub use service::{ProcessService, Settings};
