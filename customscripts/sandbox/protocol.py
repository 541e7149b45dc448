"""Pipe framing between supervisor, zygote and child.

Why: the child is hostile, so everything it sends is length-prefixed JSON with a hard size cap, parsed
by the supervisor without ever unpickling. Supervisor->child uses the same framing, plus one binary
form for columnar read replies (market data, metrics): parsing 1,200 floats from JSON costs more
than the whole rest of a small script, so numeric columns travel as raw float64 bytes that the child
maps with numpy.frombuffer. Only the trusted side ever produces binary frames; the supervisor never
parses anything but size-capped JSON from the child.
Zygote<->supervisor control uses SOCK_SEQPACKET datagrams that can carry fds.

Binary frame payload (after the usual 4-byte length): b"\0" + 4-byte JSON length + JSON + raw bytes.
The data gateway answers market and metric reads in the same layout when asked for
COLUMNS_MEDIA_TYPE (`columns_payload`: head `{..., "f64": [[name, n], ...]}` + native float64
columns), so the supervisor re-heads a reply for the child without parsing a single number.

This module runs inside the sandbox too: stdlib only.
"""

from __future__ import annotations

import array
import json
import math
import socket
import struct
from typing import Any

HEADER = struct.Struct("!I")
MAX_CONTROL_PACKET = 64 * 1024
# the two control packets sent once per execution are fixed binary structs (less work in the zygote,
# whose every write after a fork is a copy-on-write fault); everything else is JSON
SPAWN = struct.Struct("=cId")      # b"S", tag, cpu seconds          supervisor -> zygote
SPAWNED = struct.Struct("=cIi")    # b"P", tag, pid (+ fds)           zygote -> supervisor
BINARY_TAG = b"\0"
COLUMNS_MEDIA_TYPE = "application/vnd.customscripts.columns"


class ProtocolError(Exception):
    """The peer broke framing (oversized frame, bad JSON, EOF mid-frame)."""


class PeerClosed(ProtocolError):
    """Clean EOF at a frame boundary."""


MAX_FRAME_DEPTH = 32  # arrays/objects nested deeper than this in a child's frame are a protocol error


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf without ever naming a constant
        raise ValueError(f"non-finite number {text[:40]} is not allowed")
    return value


def _depth_within(obj: Any, limit: int) -> bool:
    """Whether no array/object in `obj` is nested deeper than `limit` (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


def loads_strict(data: bytes | bytearray) -> Any:
    """Parse JSON from an untrusted peer: finite numbers only, at most MAX_FRAME_DEPTH levels deep.
    Anything else (NaN, Infinity, 1e999, deep nesting, bad UTF-8) raises ProtocolError - never
    RecursionError or a value that defeats a comparison later."""
    try:
        obj = json.loads(data, parse_constant=_no_constants, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"bad frame: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not _depth_within(obj, MAX_FRAME_DEPTH):
        raise ProtocolError(f"bad frame: nested deeper than {MAX_FRAME_DEPTH} levels")
    return obj


def dumps(obj: Any, *, allow_nan: bool = False) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=allow_nan).encode()


def send_frame(sock: socket.socket, obj: Any, *, allow_nan: bool = False) -> None:
    data = dumps(obj, allow_nan=allow_nan)
    sock.sendall(HEADER.pack(len(data)) + data)


def send_raw_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(HEADER.pack(len(data)) + data)


def frame(obj: Any, *, allow_nan: bool = False) -> bytes:
    """A complete JSON frame (header included), e.g. to cache and resend."""
    data = dumps(obj, allow_nan=allow_nan)
    return HEADER.pack(len(data)) + data


def binary_payload(obj: Any, blob: bytes) -> bytes:
    """A binary frame's payload (no frame length): tag, JSON head (NaN allowed), raw bytes."""
    head = dumps(obj, allow_nan=True)
    return BINARY_TAG + HEADER.pack(len(head)) + head + blob


def binary_frame(obj: Any, blob: bytes) -> bytes:
    """A complete binary frame: JSON head (NaN allowed) + raw bytes. Trusted side -> child only."""
    payload = binary_payload(obj, blob)
    return HEADER.pack(len(payload)) + payload


def f64_bytes(col: Any) -> bytes | None:
    """A numeric column as native float64 bytes (None -> NaN, as numpy would); None if not numeric."""
    if isinstance(col, list | tuple):
        try:
            return array.array("d", col).tobytes()
        except (TypeError, OverflowError):
            try:
                return array.array("d", [math.nan if v is None else v for v in col]).tobytes()
            except (TypeError, OverflowError):
                return None
    if getattr(col, "ndim", None) == 1 and hasattr(col, "astype"):  # a numpy array (trusted side)
        try:
            return bytes(col.astype("float64").tobytes())
        except (TypeError, ValueError):
            return None
    return None


def pack_columns(columns: dict) -> tuple[list[list[Any]], bytes] | None:
    """Numeric `columns` ({name: numbers}) as their "f64" spec [[name, n], ...] and the float64 bytes
    of all of them in that order; None when a column is not purely numeric."""
    spec, parts = [], []
    for name, col in columns.items():
        raw = f64_bytes(col)
        if raw is None or not isinstance(name, str):
            return None
        spec.append([name, len(raw) // 8])
        parts.append(raw)
    return spec, b"".join(parts)


def columns_payload(head: dict, columns: dict) -> bytes | None:
    """`head` plus numeric `columns` as a binary payload whose JSON head is `head` with the "f64" spec;
    None when a column is not purely numeric (then it goes as JSON)."""
    packed = pack_columns(columns)
    if packed is None:
        return None
    try:
        return binary_payload({**head, "f64": packed[0]}, packed[1])
    except (TypeError, ValueError):
        return None


def split_binary(data: bytearray) -> tuple[Any, memoryview] | None:
    """(JSON head, raw bytes) of a binary frame payload, or None if it is a plain JSON frame."""
    if not data or data[0] != 0:
        return None
    (n,) = HEADER.unpack_from(data, 1)
    start = 1 + HEADER.size
    view = memoryview(data)
    return json.loads(view[start:start + n].tobytes()), view[start + n:]


def _recv_exact(sock: socket.socket, n: int, *, at_boundary: bool) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if not k:
            if at_boundary and not got:
                raise PeerClosed("peer closed")
            raise ProtocolError("peer closed mid-frame")
        got += k
    return buf


def recv_frame_bytes(sock: socket.socket, max_bytes: int) -> bytearray:
    """One frame's payload (a fresh, writable buffer)."""
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size, at_boundary=True))
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")
    return _recv_exact(sock, length, at_boundary=False)


def recv_frame(sock: socket.socket, max_bytes: int, *, trusted: bool = False) -> Any:
    """Receive one JSON frame. From an untrusted peer (the default) it is parsed by loads_strict;
    `trusted=True` is for frames the supervisor sent (NaN allowed: market data has gaps)."""
    data = recv_frame_bytes(sock, max_bytes)
    if not trusted:
        return loads_strict(data)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"bad frame: {exc}") from exc


def send_packet(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    """One SEQPACKET message, optionally carrying fds (SCM_RIGHTS)."""
    data = dumps(obj)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def recv_packet(sock: socket.socket, max_fds: int = 4) -> tuple[Any, list[int]]:
    """Receive one SEQPACKET message and any fds it carries; raises PeerClosed on EOF."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(MAX_CONTROL_PACKET, socket.CMSG_SPACE(max_fds * fds.itemsize))
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if not msg and not fds:
        raise PeerClosed("control peer closed")
    if len(msg) == SPAWNED.size and msg[:1] == b"P":
        _, tag, pid = SPAWNED.unpack(msg)
        return {"op": "spawned", "tag": tag, "pid": pid}, list(fds)
    try:
        return loads_strict(msg), list(fds)
    except ProtocolError:
        for fd in fds:
            import os

            os.close(fd)
        raise
