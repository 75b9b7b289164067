//! Connect's two codecs over the prost types: binary protobuf, and protobuf's
//! canonical JSON (lowerCamelCase out, both spellings in, enums by name, bytes
//! as base64, 64-bit integers as strings, Timestamp as RFC 3339, unknown
//! fields ignored). JSON goes through `prost-reflect` with the descriptors
//! envd embeds, so the prost types stay the only message model.

use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

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
pub fn encode<M: Message>(codec: Codec, name: &str, msg: &M) -> Result<Vec<u8>> {
    match codec {
        Codec::Proto => Ok(msg.encode_to_vec()),
        Codec::Json => {
            let dynamic = DynamicMessage::decode(descriptor(name)?, msg.encode_to_vec().as_slice())
                .map_err(|e| Error::internal(format!("encoding {name}: {e}")))?;
            let mut out = Vec::with_capacity(128);
            let mut ser = serde_json::Serializer::new(&mut out);
            dynamic
                .serialize_with_options(&mut ser, &SerializeOptions::new())
                .map_err(|e| Error::internal(format!("encoding {name} as JSON: {e}")))?;
            Ok(out)
        }
    }
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
}
