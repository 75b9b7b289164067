//! The process service: spawning, supervising and talking to commands.
//!
//! A command goes start (`service.rs`, the RPC) → prepare (`prepare.rs`:
//! request → everything the child needs) → spawn (`spawn.rs`, registered
//! with `reaper.rs`) → supervise (`supervise.rs`: output pumps, deadline,
//! exit, `end`). `started.rs` holds a started `Process`; `system.rs` runs
//! envd's own commands (mount, `-cmd`) through the same path.

pub mod clone;
pub mod dispositions;
pub mod events;
pub mod exit;
pub mod flag;
pub mod handover;
pub mod linger;
pub mod output;
pub mod prepare;
pub mod pty;
pub mod reaper;
pub mod service;
pub mod spawn;
pub mod stall;
pub mod started;
pub mod supervise;
pub mod system;
pub mod table;

pub use prepare::DEFAULT_PATH;
pub use reaper::Reaper;
pub use service::{ProcessService, Settings};
