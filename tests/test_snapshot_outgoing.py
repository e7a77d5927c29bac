"""Which KHO root FDT in physical memory is the running kernel's outgoing one.

After a KHO boot there is no debugfs kho/out/fdt: the agent scans RAM for KHO FDTs and must
skip this boot's incoming FDT. The incoming tree's node pages are freed soon after boot, and
the new kernel's outgoing tree may take the very page its root was on: two FDTs then name the
same radix root (the lab's "outgoing KHO root FDT not found in memory" after several
handovers on one guest). Real bytes: generated memory images (tests/imagegen.py) written to a
file and read through the agent's RawImage.
"""

from __future__ import annotations

from pathlib import Path

import imagegen

from kho_agent.abi.encode.kho import encode_kho_fdt
from kho_agent.abi.kho import KhoSubtree, decode_kho_fdt
from kho_agent.physmem import RawImage
from kho_agent.snapshot import pick_outgoing_fdt

PS = 4096


def _image_with_incoming_on_the_same_root(tmp_path: Path) -> tuple[str, dict, bytes, int]:
    """An image whose outgoing FDT (facts["fdt_phys"]) names radix root R, plus the previous
    kernel's FDT -- this boot's incoming one -- at another page naming the same R (its own
    kexec-metadata elsewhere, so its bytes differ)."""
    mem, facts = imagegen.build_image(PS, "kho-v4", mem_pages=1024)
    incoming_pa = mem.alloc_page()
    old_md = mem.alloc_page()
    incoming = encode_kho_fdt("kho-v4", facts["radix_root"],
                              [KhoSubtree("kexec-metadata", old_md, facts["metadata"]["size"])])
    mem.write(incoming_pa, incoming.ljust(PS, b"\0"))
    path = str(tmp_path / "mem.raw")
    imagegen.write_raw(mem, path)
    return path, facts, incoming, incoming_pa


def test_incoming_fdt_naming_the_same_root_is_skipped_by_its_bytes(tmp_path: Path) -> None:
    path, facts, incoming, incoming_pa = _image_with_incoming_on_the_same_root(tmp_path)
    assert incoming_pa != facts["fdt_phys"]
    with RawImage(path) as mem:
        # the incoming blob as the boot protocol gives it: a page-rounded read
        found = pick_outgoing_fdt(mem, PS, incoming=incoming.ljust(PS, b"\0"))
        assert found is not None, "the outgoing FDT was skipped with the incoming one"
        root, phys = found
        assert phys == facts["fdt_phys"]
        assert root.memory_map_root == facts["radix_root"]
        assert root.subtrees == decode_kho_fdt(facts["fdt"]).subtrees   # metadata and LUO


def test_without_an_incoming_fdt_the_intact_tree_with_the_most_nodes_wins(tmp_path: Path) -> None:
    path, facts, _incoming, incoming_pa = _image_with_incoming_on_the_same_root(tmp_path)
    with RawImage(path) as mem:
        found = pick_outgoing_fdt(mem, PS)
        assert found is not None
        # both walk the same intact tree: the lower address wins, deterministically
        assert found[1] == min(incoming_pa, facts["fdt_phys"])


def test_want_selects_by_root_and_a_wrong_root_finds_nothing(tmp_path: Path) -> None:
    path, facts, incoming, _ = _image_with_incoming_on_the_same_root(tmp_path)
    with RawImage(path) as mem:
        found = pick_outgoing_fdt(mem, PS, want=facts["radix_root"], incoming=incoming)
        assert found is not None and found[1] == facts["fdt_phys"]
        assert pick_outgoing_fdt(mem, PS, want=facts["radix_root"] + PS) is None
