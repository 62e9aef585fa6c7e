//! What the scheduler answers when a caller goes past a limit of the transport: a message
//! larger than `limits.max_message_bytes` is `RESOURCE_EXHAUSTED` (tonic's decoder says
//! `OUT_OF_RANGE`, which tells a client its request was wrong rather than too big), and an
//! agent stream that breaks ends with an error status, never OK.

use tonic::Code;
use tonic::codegen::http;
use tower::util::MapResponseLayer;

use crate::Error;

/// The error an agent stream ends with when its inbound side failed with `status`.
pub(crate) fn broken_stream(status: tonic::Status) -> Error {
    if status.code() == Code::OutOfRange {
        Error::TooLarge {
            detail: status.message().to_owned(),
        }
    } else {
        Error::Protocol(format!("the stream broke: {}", status.message()))
    }
}

/// A response in which `OUT_OF_RANGE` becomes `RESOURCE_EXHAUSTED`. Tonic answers a request
/// whose message it refused to decode with a trailers-only response, the status in the
/// headers; no handler of ours ever answers `OUT_OF_RANGE`, so every one is the decoder's
/// size limit.
fn oversize_to_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11")
    {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static("8"), // RESOURCE_EXHAUSTED
        );
    }
    response
}

/// The server layer applying [`oversize_to_exhausted`].
pub(crate) fn oversize_layer()
-> MapResponseLayer<fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>> {
    MapResponseLayer::new(oversize_to_exhausted::<tonic::body::Body>)
}
