"""Reading a StartWorkflow request whose text is not UTF-8, to say where it is not.

Proto3 `string` fields must be UTF-8: protobuf refuses the whole request otherwise, and gRPC
answers INTERNAL ("Exception deserializing request!") without a word about the Fuzzfile.
`start_workflow_deserializer` reads such a request again as bytes, with a twin of the
message whose fields are `bytes`, so that the server can answer with the loader's
diagnostic (file, line, column of the first byte that is not UTF-8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from api.squall.v1 import control_pb2 as pb

__all__ = ["RawStartWorkflowRequest", "start_workflow_deserializer"]


@dataclass(frozen=True, slots=True)
class RawStartWorkflowRequest:
    """A StartWorkflow request that is not valid UTF-8: its name (None if that is the part
    that is not UTF-8) and the Fuzzfile's bytes."""

    name: str | None
    fuzzfile: bytes


def _bytes_twin(message: type[Message]) -> type[Message]:
    """A message type with the string fields of `message` (numbers and names) as `bytes`."""
    source = message.DESCRIPTOR
    file = descriptor_pb2.FileDescriptorProto(
        name=f"squall/raw/{source.name}.proto", package="squall.raw", syntax="proto3"
    )
    twin = file.message_type.add(name=source.name)
    for field in source.fields:
        if field.type != descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            continue
        twin.field.add(
            name=field.name,
            number=field.number,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool: Any = descriptor_pool.DescriptorPool()  # untyped
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"squall.raw.{source.name}"))


_RawStart = _bytes_twin(pb.StartWorkflowRequest)


def start_workflow_deserializer(data: bytes) -> pb.StartWorkflowRequest | RawStartWorkflowRequest:
    """The request, or its raw form when a string in it is not UTF-8. Bytes that are not a
    request at all still raise DecodeError (gRPC answers INTERNAL)."""
    try:
        return pb.StartWorkflowRequest.FromString(data)
    except DecodeError:
        raw = _RawStart.FromString(data)
    name_bytes: bytes = raw.name  # type: ignore[attr-defined]
    try:
        name: str | None = name_bytes.decode("utf-8")
    except UnicodeDecodeError:
        name = None
    return RawStartWorkflowRequest(name, raw.fuzzfile)  # type: ignore[attr-defined]
