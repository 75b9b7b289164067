//! Connect's two codecs over the prost types: binary protobuf, and protobuf's
//! canonical JSON (lowerCamelCase out, both spellings in, enums by name, bytes
//! as base64, 64-bit integers as strings, Timestamp as RFC 3339, unknown
//! fields ignored). JSON goes through `prost-reflect` with the descriptors
//! envd embeds, so the prost types stay the only message model.

use std::sync::LazyLock;

use bytes::Bytes;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

use crate::proto::process::process_event::data_event::Output;
use crate::status::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .expect("embedded descriptors are valid")
});

/// Builds the descriptor pool now. It is what every Connect JSON request
/// (the E2B SDKs' protocol) needs, and it stays for envd's life: built at
/// start-up it is part of idle memory rather than a step up after the
/// first request (~1.2 MiB in the allocator's pages, against ~0.13 MiB of
/// live objects: its many small objects of many sizes each take a page).
pub fn warm() {
    LazyLock::force(&POOL);
}

fn descriptor(name: &str) -> Result<prost_reflect::MessageDescriptor> {
    POOL.get_message_by_name(name)
        .ok_or_else(|| Error::internal(format!("no descriptor for {name}")))
}

/// Decodes a request message named `name` (e.g. "process.StartRequest").
pub fn decode<M: Message + Default>(codec: Codec, name: &str, bytes: &[u8]) -> Result<M> {
    match codec {
        Codec::Proto => {
            M::decode(bytes).map_err(|e| Error::invalid(format!("malformed {name}: {e}")))
        }
        Codec::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let options = DeserializeOptions::new().deny_unknown_fields(false);
            let dynamic =
                DynamicMessage::deserialize_with_options(descriptor(name)?, &mut de, &options)
                    .and_then(|m| de.end().map(|()| m))
                    .map_err(|e| Error::invalid(format!("malformed JSON for {name}: {e}")))?;
            M::decode(dynamic.encode_to_vec().as_slice())
                .map_err(|e| Error::internal(format!("re-decoding {name}: {e}")))
        }
    }
}

/// Encodes a response message named `name`.
pub fn encode<M: Message + 'static>(codec: Codec, name: &str, msg: &M) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_into(codec, name, msg, &mut out)?;
    Ok(out)
}

/// Appends the encoding of a response message named `name` to `out` (for a
/// streamed message, after its envelope's prefix: no second copy).
pub fn encode_into<M: Message + 'static>(
    codec: Codec,
    name: &str,
    msg: &M,
    out: &mut Vec<u8>,
) -> Result<()> {
    let len = msg.encoded_len();
    if len > crate::wire::MAX_ENCODE {
        return Err(Error::new(
            crate::status::Code::ResourceExhausted,
            format!(
                "the {name} response would be {len} bytes, more than the {} allowed",
                crate::wire::MAX_ENCODE
            ),
        ));
    }
    match codec {
        Codec::Proto => {
            out.reserve(len);
            msg.encode(out)
                .map_err(|e| Error::internal(format!("encoding {name}: {e}")))
        }
        Codec::Json => {
            if output_event_json(msg, out) {
                return Ok(());
            }
            if let Some(written) = list_json(msg, out) {
                return written;
            }
            generic_json(name, msg, out)
        }
    }
}

/// Any message as canonical JSON, through its descriptor: the message is
/// decoded into a dynamic one first, which holds every field's value
/// apart (many times the encoding's size).
fn generic_json<M: Message>(name: &str, msg: &M, out: &mut Vec<u8>) -> Result<()> {
    let dynamic = DynamicMessage::decode(descriptor(name)?, msg.encode_to_vec().as_slice())
        .map_err(|e| Error::internal(format!("encoding {name}: {e}")))?;
    out.reserve(128);
    let mut ser = serde_json::Serializer::new(out);
    dynamic
        .serialize_with_options(&mut ser, &SerializeOptions::new())
        .map_err(|e| Error::internal(format!("encoding {name} as JSON: {e}")))
}

/// A listing, or a polling watcher's events, written one item at a time
/// (the same bytes as [`generic_json`]; see the test below): as one
/// dynamic message a listing of 16 MiB took envd ~300 MiB more at once.
/// `None` for any other message.
fn list_json(msg: &dyn std::any::Any, out: &mut Vec<u8>) -> Option<Result<()>> {
    use crate::proto::filesystem::{GetWatcherEventsResponse, ListDirResponse};
    if let Some(r) = msg.downcast_ref::<ListDirResponse>() {
        return Some(items_json(
            out,
            "entries",
            "filesystem.EntryInfo",
            &r.entries,
        ));
    }
    let r = msg.downcast_ref::<GetWatcherEventsResponse>()?;
    Some(items_json(
        out,
        "events",
        "filesystem.FilesystemEvent",
        &r.events,
    ))
}

/// `{"<field>":[<item>,...]}` (`{}` with no items): a message whose only
/// field is the repeated message field `field`, of messages named `item`.
fn items_json<M: Message>(out: &mut Vec<u8>, field: &str, item: &str, items: &[M]) -> Result<()> {
    if items.is_empty() {
        out.extend_from_slice(b"{}");
        return Ok(());
    }
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(b"\":[");
    for (i, m) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        generic_json(item, m, out)?;
    }
    out.extend_from_slice(b"]}");
    Ok(())
}

/// A process's output event, which is nearly every message of a streamed
/// command, written straight out: one base64 pass into the buffer instead of
/// the generic path's re-decode, base64 string and JSON escaping scan (the
/// output is the same bytes; see the test below). Appends to `out` and
/// says whether `msg` was such an event; `out` is left as it was if not.
fn output_event_json(msg: &dyn std::any::Any, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let written = append_output_event(msg, out).is_some();
    if !written {
        out.truncate(start);
    }
    written
}

/// The output a process's output event carries, if `msg` is one (a
/// `StartResponse` or `ConnectResponse` with a data event).
fn output_of(msg: &dyn std::any::Any) -> Option<&Output> {
    use crate::proto::process::process_event::Event;
    use crate::proto::process::{ConnectResponse, StartResponse};
    let event = if let Some(r) = msg.downcast_ref::<StartResponse>() {
        r.event.as_ref()
    } else {
        msg.downcast_ref::<ConnectResponse>()?.event.as_ref()
    };
    match event?.event.as_ref()? {
        Event::Data(data) => data.output.as_ref(),
        _ => None,
    }
}

/// A process's output event in binary protobuf as a streamed message's
/// envelope prefix (no flags) with the message's head (the field keys and
/// lengths down to the output) and the output itself, to be sent one after
/// the other: the output is framed without being copied. `None` for any
/// other message.
pub fn framed_output_event(msg: &dyn std::any::Any) -> Option<(Bytes, Bytes)> {
    use prost::encoding::{encode_varint, encoded_len_varint};
    let (field, bytes) = match output_of(msg)? {
        Output::Stdout(b) => (1u64, b),
        Output::Stderr(b) => (2, b),
        Output::Pty(b) => (3, b),
    };
    // Key of a length-delimited field: (number << 3) | 2.
    let key = |number: u64| (number << 3) | 2;
    let n = bytes.len() as u64;
    let data_event = 1 + encoded_len_varint(n) as u64 + n;
    let process_event = 1 + encoded_len_varint(data_event) as u64 + data_event;
    let response = 1 + encoded_len_varint(process_event) as u64 + process_event;
    let len = u32::try_from(response).ok()?;
    let mut head = Vec::with_capacity(24);
    head.push(0);
    head.extend_from_slice(&len.to_be_bytes());
    // StartResponse/ConnectResponse.event = 1, ProcessEvent.data = 2, then
    // DataEvent's output field.
    for (number, len) in [(1, process_event), (2, data_event), (field, n)] {
        encode_varint(key(number), &mut head);
        encode_varint(len, &mut head);
    }
    Some((Bytes::from(head), bytes.clone()))
}

fn append_output_event(msg: &dyn std::any::Any, out: &mut Vec<u8>) -> Option<()> {
    let (key, bytes): (&[u8], _) = match output_of(msg)? {
        Output::Stdout(b) => (b"stdout", b),
        Output::Stderr(b) => (b"stderr", b),
        Output::Pty(b) => (b"pty", b),
    };
    const HEAD: &[u8] = b"{\"event\":{\"data\":{\"";
    const TAIL: &[u8] = b"\"}}}";
    let engine = &base64_simd::STANDARD;
    let text_len = engine.encoded_length(bytes.len());
    out.reserve(HEAD.len() + key.len() + 3 + text_len + TAIL.len());
    out.extend_from_slice(HEAD);
    out.extend_from_slice(key);
    out.extend_from_slice(b"\":\"");
    let at = out.len();
    // Encoded straight into the spare capacity: no zero-fill pass first.
    let spare = out.spare_capacity_mut().get_mut(..text_len)?;
    let written = engine
        .encode(bytes, base64_simd::Out::from_uninit_slice(spare))
        .len();
    if written != text_len {
        return None;
    }
    // SAFETY: the encoder initialised the `text_len` bytes after `at`
    // (checked just above), all within the capacity reserved for them.
    unsafe { out.set_len(at + text_len) };
    out.extend_from_slice(TAIL);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::process::*;

    #[test]
    fn json_is_canonical_both_ways() {
        let req: StartRequest = decode(
            Codec::Json,
            "process.StartRequest",
            br#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo"],"envs":{"A":"1"}},"stdin":false,"unknown":1}"#,
        )
        .unwrap();
        assert_eq!(req.process.as_ref().unwrap().cmd, "/bin/bash");
        assert_eq!(req.stdin, Some(false));
        // snake_case accepted too; enums by name.
        let sig: SendSignalRequest = decode(
            Codec::Json,
            "process.SendSignalRequest",
            br#"{"process":{"pid":7},"signal":"SIGNAL_SIGKILL"}"#,
        )
        .unwrap();
        assert_eq!(sig.signal, Signal::Sigkill as i32);
        let end = StartResponse {
            event: Some(ProcessEvent {
                event: Some(process_event::Event::End(process_event::EndEvent {
                    exit_code: 3,
                    exited: true,
                    status: "exit status 3".into(),
                    error: None,
                    ..Default::default()
                })),
            }),
        };
        let json =
            String::from_utf8(encode(Codec::Json, "process.StartResponse", &end).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"event":{"end":{"exitCode":3,"exited":true,"status":"exit status 3"}}}"#
        );
        assert!(decode::<StartRequest>(Codec::Json, "process.StartRequest", b"{bad").is_err());
    }

    /// A `StartResponse` and a `ConnectResponse` carrying `data` as each
    /// kind of output.
    fn output_responses(data: &bytes::Bytes) -> Vec<(StartResponse, ConnectResponse)> {
        use process_event::data_event::Output;
        [
            Output::Stdout(data.clone()),
            Output::Stderr(data.clone()),
            Output::Pty(data.clone()),
        ]
        .into_iter()
        .map(|out| {
            let event = Some(ProcessEvent {
                event: Some(process_event::Event::Data(process_event::DataEvent {
                    output: Some(out),
                })),
            });
            let start = StartResponse {
                event: event.clone(),
            };
            (start, ConnectResponse { event })
        })
        .collect()
    }

    /// An output event framed in two parts is byte for byte the envelope
    /// the generic path makes, for every output and varint length class.
    #[test]
    fn output_events_are_framed_as_prost_encodes_them() {
        for len in [
            0usize,
            1,
            100,
            115,
            116,
            127,
            128,
            16_371,
            16_372,
            16_384,
            262_144,
            2 << 20,
        ] {
            let data = bytes::Bytes::from(vec![7u8; len]);
            for (start, connect) in output_responses(&data) {
                let generic = |m: &dyn Fn(&mut Vec<u8>) -> Result<()>| {
                    crate::connect::envelope::frame_with(0, m).unwrap().to_vec()
                };
                for (msg, want) in [
                    (
                        &start as &dyn std::any::Any,
                        generic(&|o| encode_into(Codec::Proto, "", &start, o)),
                    ),
                    (
                        &connect,
                        generic(&|o| encode_into(Codec::Proto, "", &connect, o)),
                    ),
                ] {
                    let (head, body) = framed_output_event(msg).unwrap();
                    assert_eq!([&head[..], &body[..]].concat(), want, "length {len}");
                    // The output is the event's own buffer, not a copy.
                    assert_eq!(body.as_ptr(), data.as_ptr());
                }
            }
        }
        let end = StartResponse {
            event: Some(ProcessEvent {
                event: Some(process_event::Event::Keepalive(process_event::KeepAlive {})),
            }),
        };
        assert!(framed_output_event(&end).is_none());
    }

    /// The direct writer of output events says exactly what the generic
    /// (descriptor-driven) path says, for every output and size class.
    #[test]
    fn output_events_are_written_as_the_generic_path_writes_them() {
        let generic = |name: &str, bytes: Vec<u8>| {
            let dynamic = DynamicMessage::decode(descriptor(name).unwrap(), bytes.as_slice());
            let mut out = Vec::new();
            dynamic
                .unwrap()
                .serialize_with_options(
                    &mut serde_json::Serializer::new(&mut out),
                    &SerializeOptions::new(),
                )
                .unwrap();
            out
        };
        // Sizes around the SIMD blocks (12, 24, 48 bytes in) and their tails.
        for len in [
            0usize, 1, 2, 3, 4, 11, 12, 13, 23, 24, 25, 47, 48, 49, 100, 1000, 65_535, 65_536,
        ] {
            let data: bytes::Bytes = (0..len)
                .map(|i| u8::try_from(i * 7 % 256).unwrap())
                .collect();
            for (start, connect) in output_responses(&data) {
                assert_eq!(
                    encode(Codec::Json, "process.StartResponse", &start).unwrap(),
                    generic("process.StartResponse", start.encode_to_vec())
                );
                assert_eq!(
                    encode(Codec::Json, "process.ConnectResponse", &connect).unwrap(),
                    generic("process.ConnectResponse", connect.encode_to_vec())
                );
            }
        }
    }

    /// A listing and a watcher's events written item by item are byte for
    /// byte what the generic path writes for the whole message. (Metadata
    /// with one key: the order of a map's keys is not fixed.)
    #[test]
    fn lists_are_written_as_the_generic_path_writes_them() {
        use crate::proto::filesystem::*;
        let entry = |i: i32| EntryInfo {
            name: format!("f\u{e9}\n\"{i}\x1b"),
            r#type: i % 4,
            path: format!("/home/user/f{i}"),
            size: if i % 2 == 0 { i64::MAX } else { 0 },
            mode: 0o755 + i.unsigned_abs(),
            permissions: "-rwxr-xr-x".into(),
            owner: "user".into(),
            group: if i == 1 { String::new() } else { "user".into() },
            modified_time: (i != 2).then(|| prost_types::Timestamp {
                seconds: 1_700_000_000 + i64::from(i),
                nanos: i * 1_000_000,
            }),
            symlink_target: (i % 3 == 0).then(|| format!("../t{i}")),
            metadata: if i == 4 {
                [("k".to_owned(), "v\u{0}".to_owned())].into()
            } else {
                Default::default()
            },
            is_symlink: i % 3 == 0,
        };
        for n in [0i32, 1, 2, 7] {
            let listing = ListDirResponse {
                entries: (0..n).map(entry).collect(),
            };
            let events = GetWatcherEventsResponse {
                events: (0..n)
                    .map(|i| FilesystemEvent {
                        name: format!("e{i}"),
                        r#type: i % 6,
                        entry: (i % 2 == 1).then(|| entry(i)),
                    })
                    .collect(),
            };
            for (name, msg) in [
                ("filesystem.ListDirResponse", &listing as &dyn std::any::Any),
                ("filesystem.GetWatcherEventsResponse", &events),
            ] {
                let (mut by_item, mut whole) = (Vec::new(), Vec::new());
                if let Some(r) = msg.downcast_ref::<ListDirResponse>() {
                    encode_into(Codec::Json, name, r, &mut by_item).unwrap();
                    generic_json(name, r, &mut whole).unwrap();
                } else {
                    let r = msg.downcast_ref::<GetWatcherEventsResponse>().unwrap();
                    encode_into(Codec::Json, name, r, &mut by_item).unwrap();
                    generic_json(name, r, &mut whole).unwrap();
                }
                assert_eq!(
                    String::from_utf8(by_item).unwrap(),
                    String::from_utf8(whole).unwrap(),
                    "{name} with {n} items"
                );
            }
        }
    }
}
