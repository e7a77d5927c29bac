"""Agent records without a kernel: workload specs, fill patterns, PFN runs, reports, .prom."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kho_agent.report import build_report, prom_text
from kho_agent.state import AgentState
from kho_agent.workload import (
    SpecError,
    fill_pattern,
    hash_fd,
    load_spec,
    make_memfd,
    parse_size,
    parse_spec,
    pfn_runs,
    runs_to_pfns,
)


def test_sizes() -> None:
    assert parse_size("64MiB", "x") == 64 << 20
    assert parse_size("1G", "x") == 1 << 30
    assert parse_size(4096, "x") == 4096
    with pytest.raises(SpecError, match="w.size: not a size"):
        parse_size("lots", "w.size")


def test_spec_errors_name_the_field(tmp_path) -> None:
    good = {"sessions": [{"name": "vm", "memfds": [{"token": "0x1001", "size": "1MiB"}]}]}
    spec = parse_spec(good)
    assert spec.sessions[0].memfds[0].token == 0x1001 and spec.total_bytes == 1 << 20
    bad = [({"sessions": [{"name": "kho-agent", "memfds": []}]}, r"sessions\[0\]\.name"),
           ({"sessions": [{"name": "a", "memfds": [{"size": 1}]}]}, r"memfds\[0\]\.token"),
           ({"sessions": [{"name": "a", "memfds": [{"token": 1}]}]}, r"memfds\[0\]\.size"),
           ({"sessions": [{"name": "a", "memfds": [{"token": 1, "size": 1},
                                                  {"token": 1, "size": 1}]}]}, "used twice"),
           ([], "sessions")]
    for raw, match in bad:
        with pytest.raises(SpecError, match=match):
            parse_spec(raw, "spec.json")
    p = tmp_path / "w.json"
    p.write_text("{not json")
    with pytest.raises(SpecError, match="w.json"):
        load_spec(str(p))


def test_fill_pattern_is_deterministic_and_page_stamped() -> None:
    a = fill_pattern(7, 1, 3 * 4096 + 100)
    assert a == fill_pattern(7, 1, 3 * 4096 + 100) and len(a) == 3 * 4096 + 100
    assert a != fill_pattern(7, 2, len(a)) and a != fill_pattern(8, 1, len(a))
    assert int.from_bytes(a[4096 * 2 + 8:4096 * 2 + 16], "little") == 2   # page index stamp


def test_memfd_hash_matches_hashlib() -> None:
    data = fill_pattern(1, 1, 1 << 20)
    fd = make_memfd("t", data)
    try:
        assert hash_fd(fd) == hashlib.sha256(data).hexdigest()
        assert os.fstat(fd).st_size == len(data)
    finally:
        os.close(fd)


def test_pfn_runs_round_trip() -> None:
    pfns = [5, 6, 7, 100, 3, 4]
    assert pfn_runs(pfns) == [[5, 3], [100, 1], [3, 2]]
    assert runs_to_pfns(pfn_runs(pfns)) == pfns


def _verify(sha_after: str = "aa", pfns_after=None, present: bool = True) -> dict:
    return {
        "journal": {"handover_id": "h1", "host": "n1",
                    "stamps": {"kexec_exec": 100.0},
                    "kernel_from": {"release": "7.2.13", "kho": "kho-v4"},
                    "workloads": [{"session": "vm", "token": 1, "size": 4096, "sha256": "aa",
                                   "pfn_runs": [[10, 1]]}],
                    "snapshot": {"root": 1, "blocks": [[0, 0, 1]], "pages_by_order": {"0": 1},
                                 "bytes": 4096, "nodes": 6, "intact": True}},
        "incoming": {"present": present, "root": 1, "intact": False, "valid_nodes": 1,
                     "errors": ["reused"], "metadata": {"previous_release": "7.2.13",
                                                         "kexec_count": 1, "version": 1}},
        "results": [{"session": "vm", "token": 1, "sha256": sha_after,
                     "pfn_runs": pfns_after or [[10, 1]]}],
        "kernel_boot_time": 103.0, "agent_start": 105.0, "t_restored": 105.5,
        "release": "7.2.13-lab-b", "running": {"kho": "kho-v4"},
    }


def test_report_success_and_downtime() -> None:
    rep = build_report(_verify(), AgentState(handover_id="h1", phase="verify"))
    assert rep["result"] == "success" and rep["failure"] is None
    assert rep["workloads"][0]["verified"] and rep["workloads"][0]["pfns_identical"]
    assert rep["downtime"] == {"blackout_s": 5.5, "kexec_to_kernel_s": 3.0,
                               "kernel_to_agent_s": 2.0, "agent_to_restored_s": 0.5,
                               "restored_s": 5.5, "verified_s": None}
    assert rep["kernel"]["from"]["release"] == "7.2.13"
    assert rep["kernel"]["to"]["release"] == "7.2.13-lab-b"
    json.dumps(rep)


@pytest.mark.parametrize("kw,why", [({"sha_after": "bb"}, "sha256 differs"),
                                    ({"pfns_after": [[11, 1]]}, "PFNs differ")])
def test_report_failures(kw: dict, why: str) -> None:
    rep = build_report(_verify(**kw), AgentState(handover_id="h1", phase="verify"))
    assert rep["result"] == "failed" and rep["failure"]["phase"] == "verify"
    assert why in rep["failure"]["reason"]


def test_report_no_incoming_state_is_a_boot_failure() -> None:
    rep = build_report(_verify(present=False), AgentState(handover_id="h1"))
    assert rep["result"] == "failed" and rep["failure"]["phase"] == "boot"


def test_prom_textfile_parses() -> None:
    rep = build_report(_verify(), AgentState(handover_id="h1", phase="verify"))
    fams = {f.name: f for f in text_string_to_metric_families(prom_text(rep))}
    assert fams["kho_agent_handover_success"].samples[0].value == 1
    spans = {s.labels["span"]: s.value for s in fams["kho_agent_handover_downtime_seconds"].samples}
    assert spans["blackout"] == 5.5
    assert fams["kho_agent_radix_tree_intact"].samples[0].value == 0
    assert fams["kho_agent_kexec_count"].samples[0].value == 1
