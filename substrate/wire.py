"""Stream messages that carry one bytes field, serialized and parsed without message objects.

The exec and port-forward streams move bulk bytes in messages whose payload is a single bytes
field. Building such a message, serializing it and parsing it back copies the payload at each
step, and upb's serializer allocates its output as it grows: for a 1 MiB field it took 90 us
here, and 1.7 ms in a process with glibc's default heap thresholds (see heap.py), against
20 us for the one copy `Framer` makes. So the agent writes the wire form itself, straight
from its read buffer, and a client takes the payload as a view of the message as it arrived
(parsing it took 70 us a MiB). The bytes on the wire are what `SerializeToString` gives, so
either side may use the generated code instead.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CHUNK", "Framer", "field_bytes"]

# the most bytes one stream message carries: with its header, under the 4 MiB a gRPC client
# accepts by default, so that any client reads the agent's streams
CHUNK = 2 << 20
_HEAD = 6  # room for a field's tag and its length (a varint of up to 5 bytes)


def _tag(field: int) -> int:
    return field << 3 | 2  # wire type 2: length-delimited


class Framer:
    """Reads into one reused buffer, after room for a header, and returns each read as the
    serialized message whose only field, bytes field `field`, holds what was read (as
    `PortForwardOutput(data=...)` or `ExecOutput(stdout=...)` serializes): one copy."""

    def __init__(self, field: int, size: int = CHUNK) -> None:
        self._tag = bytes([_tag(field)])
        self._buffer = memoryview(bytearray(_HEAD + size))
        self._room = self._buffer[_HEAD:]

    def read(self, read_into: Callable[[memoryview], int]) -> bytes | None:
        """A message of what `read_into(buffer)` read (it returns the count); None at its end."""
        n = read_into(self._room)
        if not n:
            return None
        head = self._tag + _varint(n)
        start = _HEAD - len(head)
        self._buffer[start:_HEAD] = head
        return bytes(self._buffer[start : _HEAD + n])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field_bytes(message: bytes, field: int) -> memoryview | None:
    """The value of bytes field `field`, as a view into `message`, when the serialized
    `message` holds that field alone; None otherwise (parse it with the generated code)."""
    if message[:1] != bytes([_tag(field)]):
        return None
    length = shift = 0
    for at in range(1, min(len(message), _HEAD)):
        byte = message[at]
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            if at + 1 + length != len(message):
                return None
            return memoryview(message)[at + 1 :]
    return None
