"""The Temporal engine's payload codec: a 100,000-host rollout's plan fits Temporal's 2 MB
payload limit once compressed, every payload comes back as it was, and a corrupt or
expanding payload is refused. Real plans (make_plan on a real inventory and playbook) through
the SDK's own converter; the engine tests (tests/test_temporal_engine.py) run the codec
against a real dev server.
"""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

import pytest
import yaml

pytest.importorskip("temporalio", reason="temporalio (the kho-fleet[temporal] extra) is absent")

from temporalio.api.common.v1 import Payload

from kho_fleet.rollout import RolloutOptions
from kho_fleet.temporal.client import TemporalTarget, make_plan
from kho_fleet.temporal.codec import (
    ENCODING,
    MAX_SIZE,
    MIN_SIZE,
    CodecError,
    data_converter,
    decompress,
)

BLOB_LIMIT = 2 * 1024 * 1024      # Temporal's default limit.blobSize.error


def _plan(tmp: Path, n: int) -> dict:
    inv = tmp / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"all": {
        "vars": {"kho_transport": "sim"},
        "children": {
            "east": {"vars": {"kho_site": "east"}, "hosts": {f"e[000001:{n // 2:06d}]": None}},
            "west": {"vars": {"kho_site": "west"}, "hosts": {f"w[000001:{n // 2:06d}]": None}}}}}))
    pb = tmp / "playbook.yaml"
    pb.write_text(yaml.safe_dump({
        "name": "big", "hosts": "all", "target": {"kernel": "twin:7.2.14-twin"},
        "stages": [{"name": "canary", "hosts": 10},
                   {"name": "rest", "hosts": "rest", "max_parallel": 500}]}, sort_keys=False))
    opts = RolloutOptions(str(tmp / "rollouts"), str(tmp / "reports"), str(tmp / "sim"))
    return make_plan(str(pb), str(inv), opts, TemporalTarget())


def test_a_100000_host_plan_fits_the_payload_limit_compressed(tmp_path: Path) -> None:
    plan = _plan(tmp_path, 100_000)
    assert sum(len(s["hosts"]) for s in plan["stages"]) == 100_000
    conv = data_converter()
    plain = conv.payload_converter.to_payloads([plan])     # JSON, as before the codec
    assert len(plain[0].data) > BLOB_LIMIT                  # what Temporal refused: ~9 MB
    sent = asyncio.run(conv.encode([plan]))
    assert sent[0].metadata["encoding"] == ENCODING
    assert sent[0].ByteSize() < BLOB_LIMIT
    print(f"\n100,000-host plan: {len(plain[0].data) / 1e6:.2f} MB as JSON, "
          f"{sent[0].ByteSize() / 1e6:.2f} MB sent")
    assert asyncio.run(conv.decode(sent, [dict])) == [plan]


def test_small_payloads_pass_unchanged_and_every_value_round_trips() -> None:
    conv = data_converter()
    values = ["h1", {"host": "h1", "step": "preflight"}, list(range(5000)), None, b"x" * MIN_SIZE]
    sent = asyncio.run(conv.encode(values))
    assert [p.metadata.get("encoding") == ENCODING for p in sent] == [
        False, False, True, False, True]
    assert asyncio.run(conv.decode(sent, [str, dict, list, type(None), bytes])) == values


def test_corrupt_and_expanding_payloads_are_refused() -> None:
    with pytest.raises(CodecError, match="corrupt"):
        decompress(Payload(metadata={"encoding": ENCODING}, data=b"not zlib at all"))
    bomb = zlib.compress(b"\0" * (MAX_SIZE + 1), 9)      # ~256 KiB that would expand past it
    with pytest.raises(CodecError, match="expands past"):
        decompress(Payload(metadata={"encoding": ENCODING}, data=bomb))
    truncated = zlib.compress(Payload(data=b"y" * 100000).SerializeToString())[:-10]
    with pytest.raises(CodecError):
        decompress(Payload(metadata={"encoding": ENCODING}, data=truncated))
