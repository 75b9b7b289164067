//! Native gRPC (tonic) adapters: thin glue from tonic requests to the service
//! logic. Each handler parses the [`RequestContext`], calls the service and
//! maps errors through [`crate::status`].

pub mod charge;
pub mod filesystem;
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
            // A message refused for the shared body budget, or too slow to
            // arrive once charged to it, says so.
            let code = match st.code() {
                tonic::Code::ResourceExhausted => crate::status::Code::ResourceExhausted,
                tonic::Code::DeadlineExceeded => crate::status::Code::DeadlineExceeded,
                _ => crate::status::Code::InvalidArgument,
            };
            crate::status::Error::new(code, format!("input stream: {}", st.message()))
        })
    })
}

fn context<T>(
    req: &tonic::Request<T>,
    defaults: &Defaults,
) -> Result<RequestContext, tonic::Status> {
    let headers = req.metadata().clone().into_headers();
    let answer = req
        .extensions()
        .get::<crate::answers::Share>()
        .cloned()
        .unwrap_or_default();
    Ok(RequestContext::from_headers(&headers, defaults, answer)?)
}
