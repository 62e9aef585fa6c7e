//! The generated gRPC protocol, package `nixdispatch.v1` (`proto/nixdispatch/v1/`).
//!
//! These are wire types: every component converts them into its own validated domain types
//! at its boundary and never lets them into its core.

#[allow(missing_docs, unreachable_pub, clippy::all)]
mod generated {
    tonic::include_proto!("nixdispatch.v1");
}

pub use generated::*;

/// The encoded `FileDescriptorSet` of the protocol, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("nixdispatch_descriptor");
