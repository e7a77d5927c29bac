"""zlib compression of large Temporal payloads, for the client and every worker alike.

Why: the rollout's plan is one payload of about 93 bytes per host (every host's name, site
and step timeouts), and batch inputs and results land in the rollout's history at about
0.33 KB per host. Temporal refuses payloads over 2 MB (`limit.blobSize.error`) and warns
at 10 MB of history, so without compression one rollout stopped at about 20,000 hosts.
These payloads are highly repetitive (host names, the same timeouts) and shrink 10-30x.

Only payloads of at least MIN_SIZE bytes are compressed; small ones (most activity inputs)
pass through unchanged, so the per-host CPU stays where docs/scale.md measured it.
Decompression is bounded (MAX_SIZE): a payload that would expand past it is refused.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import temporalio.converter
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter, PayloadCodec

__all__ = ["ENCODING", "MIN_SIZE", "MAX_SIZE", "CodecError", "ZlibCodec", "data_converter"]

ENCODING = b"binary/zlib"       # metadata "encoding" of a compressed payload
MIN_SIZE = 4096                 # bytes: smaller payloads are sent as they are
MAX_SIZE = 256 << 20            # bytes: the most one compressed payload may expand to


class CodecError(ValueError):
    """A compressed payload that is corrupt or expands past MAX_SIZE."""


def compress(p: Payload) -> Payload:
    """`p` itself when small, else `p` serialised and zlib-compressed (level 6)."""
    if len(p.data) < MIN_SIZE:
        return p
    return Payload(metadata={"encoding": ENCODING},
                   data=zlib.compress(p.SerializeToString(), 6))


def decompress(p: Payload) -> Payload:
    """The payload `compress` was given; any other payload is returned as it is."""
    if p.metadata.get("encoding") != ENCODING:
        return p
    d = zlib.decompressobj()
    try:
        raw = d.decompress(p.data, MAX_SIZE)
    except zlib.error as e:
        raise CodecError(f"corrupt compressed Temporal payload: {e}") from None
    if d.unconsumed_tail or not d.eof:
        raise CodecError(f"compressed Temporal payload expands past {MAX_SIZE} bytes, "
                         "or is truncated")
    return Payload.FromString(raw)


class ZlibCodec(PayloadCodec):
    """The PayloadCodec over `compress` / `decompress`."""

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [compress(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [decompress(p) for p in payloads]


def data_converter() -> DataConverter:
    """The SDK's default converter with ZlibCodec: what the client and the workers use."""
    return dataclasses.replace(temporalio.converter.default(), payload_codec=ZlibCodec())
