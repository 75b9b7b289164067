"""grpc-core (Python grpcio) over envd's Unix socket, without overriding the
authority: grpc-core sends the socket path as :authority. Messages are
hand-encoded protobuf so no generated stubs are needed.

usage: grpcio_unix.py unix:///path/to/envd.sock FILE_TO_STAT
"""
import sys

import grpc


def field_string(number: int, value: bytes) -> bytes:
    # wire type 2 (length-delimited); short values only
    assert len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


def main() -> int:
    target, path = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(target)
    ident = lambda b: b
    list_ = channel.unary_unary("/process.Process/List", request_serializer=ident, response_deserializer=ident)
    reply = list_(b"", timeout=10)
    print(f"List: {len(reply)} bytes")
    stat = channel.unary_unary("/filesystem.Filesystem/Stat", request_serializer=ident, response_deserializer=ident)
    reply = stat(field_string(1, path.encode()), timeout=10)
    assert path.encode() in reply, reply
    print("Stat: ok")
    try:
        stat(field_string(1, b"/no/such/file/envd"), timeout=10)
        raise SystemExit("Stat of a missing file succeeded")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        print("Stat missing: NOT_FOUND")
    print("grpcio over unix: 3 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
