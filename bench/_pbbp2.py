"""The long connection's ``pbbp2.Frame``, encoded and decoded by hand for the reference bot.

lark-oapi ships this message as generated code over a vendored pure-Python protobuf runtime,
and importing it imports the whole SDK (about 180 MiB resident). The reference bot only needs
this one small message, so it reads and writes the wire format itself (proto2, fields below).
It encodes the frames of the long connection byte for byte as the SDK's class does (checked when
written), and in every benchmark run the fake Feishu parses what it writes with that class.

``Frame``: 1 SeqID uint64, 2 LogID uint64, 3 service int32, 4 method int32, 5 headers (repeated
``Header``: 1 key, 2 value), 6 payload_encoding, 7 payload_type, 8 payload bytes, 9 LogIDNew.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_VARINT = 0
_FIXED64 = 1
_BYTES = 2
_FIXED32 = 5
_MASK64 = (1 << 64) - 1


@dataclass
class Frame:
    """One frame of the long connection."""

    seq_id: int = 0
    log_id: int = 0
    service: int = 0
    method: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    payload_encoding: str | None = None
    payload_type: str | None = None
    payload: bytes = b""
    log_id_new: str | None = None

    def header(self, key: str) -> str | None:
        return next((v for k, v in self.headers if k == key), None)

    def encode(self) -> bytes:
        out = bytearray()
        for number, value in (
            (1, self.seq_id),
            (2, self.log_id),
            (3, self.service),
            (4, self.method),
        ):
            out += _varint(number << 3 | _VARINT) + _varint(value & _MASK64)
        for key, text in self.headers:
            out += _field(5, _field(1, key.encode()) + _field(2, text.encode()))
        for number, optional in ((6, self.payload_encoding), (7, self.payload_type)):
            if optional is not None:
                out += _field(number, optional.encode())
        out += _field(8, self.payload)
        if self.log_id_new is not None:
            out += _field(9, self.log_id_new.encode())
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Frame:
        frame = cls()
        for number, value in _fields(data):
            if number == 1 and isinstance(value, int):
                frame.seq_id = value
            elif number == 2 and isinstance(value, int):
                frame.log_id = value
            elif number == 3 and isinstance(value, int):
                frame.service = value - (1 << 64) if value >> 63 else value
            elif number == 4 and isinstance(value, int):
                frame.method = value
            elif number == 5 and isinstance(value, bytes):
                parts = {n: v for n, v in _fields(value) if isinstance(v, bytes)}
                frame.headers.append((parts.get(1, b"").decode(), parts.get(2, b"").decode()))
            elif number == 6 and isinstance(value, bytes):
                frame.payload_encoding = value.decode()
            elif number == 7 and isinstance(value, bytes):
                frame.payload_type = value.decode()
            elif number == 8 and isinstance(value, bytes):
                frame.payload = value
            elif number == 9 and isinstance(value, bytes):
                frame.log_id_new = value.decode()
        return frame


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | _BYTES) + _varint(len(value)) + value


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    found: list[tuple[int, int | bytes]] = []
    at = 0
    while at < len(data):
        tag, at = _read_varint(data, at)
        number, kind = tag >> 3, tag & 7
        if kind == _VARINT:
            value, at = _read_varint(data, at)
            found.append((number, value))
        elif kind == _BYTES:
            size, at = _read_varint(data, at)
            found.append((number, data[at : at + size]))
            at += size
        elif kind == _FIXED64:
            at += 8
        elif kind == _FIXED32:
            at += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {kind}")
    return found
