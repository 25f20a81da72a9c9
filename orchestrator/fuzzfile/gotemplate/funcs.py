"""Go template built-ins and the slim-sprig functions that the Fuzzball catalog uses.

Semantics follow text/template (https://pkg.go.dev/text/template#hdr-Functions) and sprig
(https://masterminds.github.io/sprig/): argument order is sprig's (`hasPrefix PREFIX S`,
`trimSuffix SUFFIX S`, `join SEP LIST`), and numbers go through sprig's int64 conversion.
"""

from __future__ import annotations

import base64
import json
import math
import posixpath
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["FailError", "GoFuncError", "builtin_funcs", "go_print", "truth"]


class FailError(Exception):
    """`fail "message"`: the template refuses the values it was given."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.line: int | None = None
        self.column: int | None = None


class GoFuncError(Exception):
    """A template function called with arguments it cannot take."""


def truth(value: Any) -> bool:
    """Go template truth: false, 0, nil and empty strings or collections are false."""
    return value is not None and bool(value)


def go_print(value: Any) -> str:
    """Format like Go's fmt `%v`, as template output does."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, list | tuple):
        return "[" + " ".join(go_print(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{go_print(k)}:{go_print(value[k])}" for k in sorted(value)) + "]"
    if isinstance(value, _Time):
        return time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(value.epoch))
    return str(value)


def _go_float(value: float) -> str:
    """Go's %v for float64: shortest repr, exponent form below 1e-4 or from 1e21."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    if "e" in text:
        mant, exp = text.split("e")
        sign = "-" if exp.startswith("-") else "+"
        return f"{mant}e{sign}{abs(int(exp)):02d}"
    return text


class _Time:
    def __init__(self, epoch: float) -> None:
        self.epoch = epoch


def _to_int(value: Any) -> int:
    """sprig's toInt64 (cast.ToInt64E with errors read as 0)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 0) if not re.fullmatch(r"0\d+", text) else int(text, 8)
        except ValueError:
            try:
                return int(float(text))
            except ValueError:
                return 0
    return 0


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _strval(value: Any) -> str:
    """sprig's strval: strings as they are, everything else as fmt %v."""
    return value if isinstance(value, str) else go_print(value)


def _empty(value: Any) -> bool:
    return not truth(value)


def _default(default: Any, *given: Any) -> Any:
    if not given or _empty(given[0]):
        return default
    return given[0]


def _basic_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "nil"
    raise GoFuncError(f"invalid type for comparison: {go_print(value)}")


def _eq(first: Any, *others: Any) -> bool:
    if not others:
        raise GoFuncError("missing argument for comparison")
    k1 = _basic_kind(first)
    for other in others:
        k2 = _basic_kind(other)
        if k1 != k2 and {k1, k2} != {"int", "float"}:
            raise GoFuncError(
                f"incompatible types for comparison: {go_print(first)} and {go_print(other)}"
            )
        if first == other:
            return True
    return False


def _ordered(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        ka, kb = _basic_kind(a), _basic_kind(b)
        numeric = {"int", "float"}
        if ka != kb and not (ka in numeric and kb in numeric):
            raise GoFuncError(f"incompatible types for comparison: {go_print(a)} and {go_print(b)}")
        if ka in ("bool", "nil"):
            raise GoFuncError(f"invalid type for comparison: {go_print(a)}")
        return op(a, b)

    return compare


def _and(*args: Any) -> Any:
    for a in args:
        if not truth(a):
            return a
    return args[-1]


def _or(*args: Any) -> Any:
    for a in args:
        if truth(a):
            return a
    return args[-1]


def _index(item: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(item, Mapping):
            item = item.get(key)
        elif isinstance(item, list | tuple | str):
            if not isinstance(key, int) or not 0 <= key < len(item):
                raise GoFuncError(f"index out of range: {key}")
            item = item[key]
        else:
            raise GoFuncError(f"can't index item of type {type(item).__name__}")
    return item


def _len(item: Any) -> int:
    if isinstance(item, str | list | tuple | Mapping):
        return len(item)
    raise GoFuncError(f"len of type {type(item).__name__}")


_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d+))?([a-zA-Z%])")


def _printf(fmt: str, *args: Any) -> str:
    """Go's fmt.Sprintf for the verbs templates use: %s %d %v %q %f %g %x %t %%."""
    remaining = list(args)

    def one(match: re.Match[str]) -> str:
        flags, width, prec, verb = match.groups()
        if verb == "%":
            return "%"
        if not remaining:
            return f"%!{verb}(MISSING)"
        value = remaining.pop(0)
        if verb in "sv":
            text = _strval(value) if verb == "s" else go_print(value)
        elif verb == "q":
            text = json.dumps(_strval(value), ensure_ascii=False)
        elif verb == "d":
            text = str(_to_int(value)) if not isinstance(value, str) else f"%!d(string={value})"
        elif verb in "fFeEgG":
            text = f"%{'.' + prec if prec else ''}{verb}" % _to_float(value)
            if verb in "fF" and not prec:
                text = f"{_to_float(value):.6f}"
        elif verb in "xX":
            text = (
                format(_to_int(value), verb)
                if not isinstance(value, str)
                else (value.encode().hex().upper() if verb == "X" else value.encode().hex())
            )
        elif verb == "t":
            text = go_print(value)
        else:
            text = f"%!{verb}({go_print(value)})"
        if width and width != "*":
            pad = int(width)
            fill = "0" if "0" in flags and "-" not in flags and verb in "dfFeEgGxX" else " "
            text = text.ljust(pad) if "-" in flags else text.rjust(pad, fill)
        return text

    out = _VERB.sub(one, fmt)
    if remaining:
        out += "%!(EXTRA " + ", ".join(go_print(v) for v in remaining) + ")"
    return out


def _substr(start: Any, end: Any, s: Any) -> str:
    text, a, b = _strval(s), _to_int(start), _to_int(end)
    if a < 0:
        return text[:b]
    if b < 0 or b > len(text):
        return text[a:]
    return text[a:b]


def _fail(message: Any) -> str:
    raise FailError(_strval(message))


def _to_json(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=go_print)
    # encoding/json escapes these for HTML safety, and sprig's toJson uses it
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _dict(*pairs: Any) -> dict[str, Any]:
    return {
        _strval(pairs[i]): (pairs[i + 1] if i + 1 < len(pairs) else "")
        for i in range(0, len(pairs), 2)
    }


def _list_of(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    raise GoFuncError(f"cannot use {go_print(value)} as a list")


def _base(path: Any) -> str:
    return posixpath.basename(_strval(path).rstrip("/")) or ("/" if _strval(path) else ".")


def _dir(path: Any) -> str:
    return posixpath.dirname(_strval(path).rstrip("/")) or "."


def _int_args(fn: Callable[[list[int]], int]) -> Callable[..., int]:
    return lambda *args: fn([_to_int(a) for a in args])


def _div(a: Any, b: Any) -> int:
    divisor = _to_int(b)
    if divisor == 0:
        raise GoFuncError("integer divide by zero")
    return int(_to_int(a) / divisor)  # Go truncates toward zero


def builtin_funcs(rng: random.Random) -> dict[str, Callable[..., Any]]:
    """The function map a catalog template sees; `rng` feeds randInt."""
    return {
        # text/template built-ins
        "and": _and,
        "or": _or,
        "not": lambda v: not truth(v),
        "eq": _eq,
        "ne": lambda a, b: not _eq(a, b),
        "lt": _ordered(lambda a, b: a < b),
        "le": _ordered(lambda a, b: a <= b),
        "gt": _ordered(lambda a, b: a > b),
        "ge": _ordered(lambda a, b: a >= b),
        "len": _len,
        "index": _index,
        "print": lambda *a: "".join(_strval(x) for x in a),
        "printf": _printf,
        "println": lambda *a: " ".join(go_print(x) for x in a) + "\n",
        # sprig: strings
        "trim": lambda s: _strval(s).strip(),
        "trimAll": lambda cut, s: _strval(s).strip(_strval(cut)),
        "trimPrefix": lambda pre, s: _strval(s).removeprefix(_strval(pre)),
        "trimSuffix": lambda suf, s: _strval(s).removesuffix(_strval(suf)),
        "hasPrefix": lambda pre, s: _strval(s).startswith(_strval(pre)),
        "hasSuffix": lambda suf, s: _strval(s).endswith(_strval(suf)),
        "contains": lambda sub, s: _strval(sub) in _strval(s),
        "lower": lambda s: _strval(s).lower(),
        "upper": lambda s: _strval(s).upper(),
        "replace": lambda old, new, s: _strval(s).replace(_strval(old), _strval(new)),
        "repeat": lambda n, s: _strval(s) * max(_to_int(n), 0),
        "substr": _substr,
        "quote": lambda *a: " ".join(json.dumps(_strval(x)) for x in a if x is not None),
        "squote": lambda *a: " ".join(f"'{_strval(x)}'" for x in a if x is not None),
        "indent": lambda n, s: "\n".join(" " * _to_int(n) + ln for ln in _strval(s).split("\n")),
        "nindent": lambda n, s: (
            "\n" + "\n".join(" " * _to_int(n) + ln for ln in _strval(s).split("\n"))
        ),
        "splitList": lambda sep, s: _strval(s).split(_strval(sep)),
        "join": lambda sep, items: _strval(sep).join(_strval(x) for x in _list_of(items)),
        "regexMatch": lambda rx, s: re.search(_strval(rx), _strval(s)) is not None,
        "b64enc": lambda s: base64.b64encode(_strval(s).encode()).decode(),
        "b64dec": lambda s: base64.b64decode(_strval(s).encode()).decode(errors="replace"),
        "base": _base,
        "dir": _dir,
        "toString": _strval,
        "toJson": _to_json,
        # sprig: numbers
        "int": _to_int,
        "int64": _to_int,
        "float64": _to_float,
        "atoi": _to_int,
        "add": _int_args(sum),
        "add1": lambda a: _to_int(a) + 1,
        "sub": lambda a, b: _to_int(a) - _to_int(b),
        "mul": _int_args(math.prod),
        "div": _div,
        "mod": lambda a, b: _to_int(a) % _to_int(b) if _to_int(b) else 0,
        "max": _int_args(max),
        "min": _int_args(min),
        "randInt": lambda lo, hi: rng.randrange(_to_int(lo), _to_int(hi)),
        # sprig: collections, defaults, flow
        "list": lambda *a: list(a),
        "append": lambda items, v: [*_list_of(items), v],
        "dict": _dict,
        "default": _default,
        "empty": _empty,
        "coalesce": lambda *a: next((x for x in a if truth(x)), None),
        "ternary": lambda yes, no, cond: yes if truth(cond) else no,
        "fail": _fail,
        # sprig: time
        "now": lambda: _Time(time.time()),
        "unixEpoch": lambda t: str(int(t.epoch)) if isinstance(t, _Time) else "0",
    }
