//! What every protocol shares on the wire: the response body type, message
//! size limits, and the HTTP/2 settings used by envd's server and its host
//! client alike (so both ends agree).

/// The body of every response envd sends (tonic's, so gRPC routes need no
/// conversion).
pub type HttpBody = tonic::body::Body;

/// Largest request message envd decodes (4 MiB, tonic's usual limit), on
/// gRPC and Connect alike. Bigger inputs must be split (e.g. StreamInput
/// chunks).
pub const MAX_DECODE: usize = 4 << 20;
/// Largest response message envd encodes. Output chunks are at most 64 KiB,
/// file chunks 1 MiB.
pub const MAX_ENCODE: usize = 16 << 20;

/// HTTP/2 flow-control windows: large enough for full-speed streams, small
/// enough to keep what a connection can buffer bounded.
pub const STREAM_WINDOW: u32 = 2 << 20;
pub const CONNECTION_WINDOW: u32 = 4 << 20;
/// Large HTTP/2 frames: fewer per MiB.
pub const MAX_FRAME: u32 = 256 * 1024;
