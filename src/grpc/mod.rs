//! Native gRPC (tonic) adapters: thin glue from tonic requests to the service
//! logic. Each handler parses the [`RequestContext`], calls the service and
//! maps errors through [`crate::status`].

pub mod filesystem;
pub mod output;
pub mod ports;
pub mod process;

use crate::defaults::Defaults;
use crate::request::RequestContext;

/// A client stream's transport errors (a client that goes away mid-stream)
/// as service errors.
fn client_stream<T>(
    s: tonic::Streaming<T>,
) -> impl futures_util::Stream<Item = crate::status::Result<T>> + Unpin {
    use futures_util::StreamExt;
    s.map(|r| {
        r.map_err(|st| {
            crate::status::Error::new(
                crate::status::Code::InvalidArgument,
                format!("input stream: {}", st.message()),
            )
        })
    })
}

fn context<T>(
    req: &tonic::Request<T>,
    defaults: &Defaults,
) -> Result<RequestContext, tonic::Status> {
    let headers = req.metadata().clone().into_headers();
    Ok(RequestContext::from_headers(&headers, defaults)?)
}

/// A call that failed before its first message: status and message in the
/// response headers (gRPC's trailers-only response).
pub fn trailers_only(status: &tonic::Status) -> http::Response<crate::wire::HttpBody> {
    let (parts, ()) = status.clone().into_http::<()>().into_parts();
    http::Response::from_parts(parts, crate::wire::HttpBody::default())
}
