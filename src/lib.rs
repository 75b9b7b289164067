//! envd: the agent inside every sandbox microVM.
//!
//! Service logic lives in [`process`] and [`filesystem`], written once
//! against the prost types in [`proto`]; the tonic adapters (`grpc`), the
//! Connect dispatcher (`connect`) and the REST endpoints (`http`) only
//! convert, all behind one [`server::Router`], and [`status`] is the one map
//! from errors to status codes. Only what the binaries, the host client, the
//! tests and the fuzz targets use is public.

pub(crate) mod answers;
pub mod auth;
pub mod backlog;
pub mod body;
pub mod build_id;
pub mod cgroups;
pub mod client;
pub mod compat;
pub mod config;
pub(crate) mod connect;
pub mod connections;
pub mod defaults;
pub mod filesystem;
#[doc(hidden)]
pub mod fuzzing;
pub mod goflags;
pub(crate) mod grpc;
pub mod guest;
pub mod handover;
pub mod http;
pub(crate) mod ids;
pub mod init;
pub mod limits;
pub mod linger;
pub mod listen;
pub mod logging;
pub mod memory;
pub(crate) mod paths;
pub(crate) mod pieces;
pub mod ports;
pub mod process;
pub mod proto;
pub mod quota;
pub mod relay;
pub(crate) mod request;
pub mod request_body;
pub mod sd;
pub mod server;
pub(crate) mod small_files;
pub mod status;
pub(crate) mod streams;
pub(crate) mod threads;
pub(crate) mod unix_authority;
pub mod users;
pub mod wire;
