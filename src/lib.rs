//! envd: the agent inside every sandbox microVM.
//!
//! Service logic lives in [`process`] (and later `filesystem`), written once
//! against the prost types in [`proto`]; [`grpc`] adapts it to tonic, and
//! [`status`] is the one map from errors to status codes.

pub mod auth;
pub mod body;
pub mod client;
pub mod config;
pub mod connect;
pub mod connections;
pub mod defaults;
pub mod filesystem;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod ids;
pub mod init;
pub mod limits;
pub mod listen;
pub mod logging;
pub mod paths;
pub mod process;
pub mod proto;
pub mod request;
pub mod sd;
pub mod server;
pub mod status;
pub mod streams;
pub mod unix_authority;
pub mod users;
pub mod wire;
