//! The filesystem service: entries, listing, mutations, watches, transfers.

pub mod compose;
pub mod download;
pub mod entry;
pub mod hidden;
pub mod inotify;
pub mod list;
pub mod ops;
pub mod pin;
pub mod pool;
pub mod service;
pub mod slots;
pub mod staged;
pub mod stop;
pub mod transfer;
pub mod tree;
pub mod watch;
pub mod watchers;

pub use service::{FilesystemService, Settings};
