//! Generated protobuf and gRPC types (see `build.rs`).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod process {
    tonic::include_proto!("process");
}

pub mod filesystem {
    tonic::include_proto!("filesystem");
}

/// envd's own packages (`envd.*`).
pub mod envd {
    pub mod transfer {
        tonic::include_proto!("envd.transfer");
    }
    pub mod ports {
        tonic::include_proto!("envd.ports");
    }
    pub mod handover {
        tonic::include_proto!("envd.handover");
    }
}

pub use envd::{ports, transfer};

/// Encoded `FileDescriptorSet` of every proto package, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("envd_descriptor");
