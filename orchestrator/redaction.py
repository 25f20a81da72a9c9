"""Secret values kept out of what Squall writes: task logs, events, reasons.

A `Redactor` knows the values of the secrets one run uses and replaces each of them with
`***` wherever it appears, in text, in bytes and in a stream of chunks (a value split across
two chunks is still caught). Values shorter than MIN_LENGTH (4) characters are not masked:
masking every `1` or `ab` would mangle the output and tell a reader the value anyway.

The engine registers the redactor of each run it drives (`register`) and forgets it when the
run ends (`forget`); whatever writes an event or a reason for a run passes it through `scrub`,
which leaves the text as it is for a run this process does not drive.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

__all__ = ["MASK", "MIN_LENGTH", "Masker", "Redactor", "current", "forget", "register", "scrub"]

MASK = "***"
MIN_LENGTH = 4  # shorter values are not masked


class Redactor:
    """Masks each of `values` with `***`. Values shorter than MIN_LENGTH characters are not
    masked; where two values overlap, the longer one is masked first."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        kept = sorted({v for v in values if len(v) >= MIN_LENGTH}, key=lambda v: (-len(v), v))
        self.values: tuple[str, ...] = tuple(kept)
        raw = sorted({v.encode() for v in kept}, key=lambda v: (-len(v), v))
        self._text = re.compile("|".join(map(re.escape, kept))) if kept else None
        self._bytes = re.compile(b"|".join(map(re.escape, raw))) if raw else None
        self.longest = len(raw[0]) if raw else 0  # in bytes

    def __bool__(self) -> bool:
        return bool(self.values)

    def text(self, text: str) -> str:
        return self._text.sub(MASK, text) if self._text is not None and text else text

    def data(self, data: bytes) -> bytes:
        return self._bytes.sub(MASK.encode(), data) if self._bytes is not None and data else data

    def masker(self) -> Masker:
        """A masker for one stream of chunks."""
        return Masker(self)


class Masker:
    """Masks a stream given in chunks: `feed` returns what can be told already (it holds back
    the last len(longest value) - 1 bytes, which may be the start of a value that the next
    chunk completes); `end` returns the rest."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        pattern = self.redactor._bytes
        if pattern is None:
            return chunk
        buf = self._held + chunk
        # a match that starts before `safe` has every byte the longest value needs here
        safe = len(buf) - (self.redactor.longest - 1)
        out = bytearray()
        done = 0
        for m in pattern.finditer(buf):
            if m.start() >= safe:
                break
            out += buf[done : m.start()]
            out += MASK.encode()
            done = m.end()
        cut = max(done, safe)
        out += buf[done:cut]
        self._held = buf[cut:]
        return bytes(out)

    def end(self) -> bytes:
        rest, self._held = self._held, b""
        return self.redactor.data(rest)


# ---- the redactors of the runs this process drives ------------------------------------------

_NONE = Redactor()
_runs: dict[str, Redactor] = {}
_lock = threading.Lock()


def register(run_id: str, redactor: Redactor) -> None:
    with _lock:
        _runs[run_id] = redactor


def forget(run_id: str) -> None:
    with _lock:
        _runs.pop(run_id, None)


def current(run_id: str) -> Redactor:
    """The redactor registered for `run_id`; one that masks nothing when there is none."""
    with _lock:
        return _runs.get(run_id, _NONE)


def scrub(run_id: str, text: str) -> str:
    """`text` with the secret values of run `run_id` masked (as it is when this process does
    not drive that run)."""
    return current(run_id).text(text) if text else text
