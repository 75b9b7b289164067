//! HTTP/2 settings shared by envd's server and its host client, so both ends
//! agree: windows large enough for full-speed streams, small enough to keep
//! what a connection can buffer bounded; large frames, fewer per MiB.

pub const STREAM_WINDOW: u32 = 2 << 20;
pub const CONNECTION_WINDOW: u32 = 4 << 20;
pub const MAX_FRAME: u32 = 256 * 1024;
