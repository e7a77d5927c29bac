"""`kho-fleet inspect` end to end on generated memory images (tests/imagegen.py): the JSON
report (schema in kho_agent/inspect.py), the human view, root-FDT discovery (scan, --fdt,
truncated --fdt), and one-line exit-2 errors for unusable input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import imagegen
import pytest

from kho_agent.abi.encode.radix import coalesce
from kho_agent.inspect import SCHEMA, InspectError, inspect_memory
from kho_agent.physmem import open_memory
from kho_fleet.cli import main

CLI = [sys.executable, "-m", "kho_fleet.cli", "inspect"]
MEM_PAGES = {4096: 1024, 16384: 512, 65536: 256}


def run(*args, timeout=60):
    """The CLI as a subprocess: (returncode, stdout, stderr)."""
    p = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "KHO_FLEET_DEBUG": ""})
    return p.returncode, p.stdout, p.stderr


def cli_json(capsys, *args):
    """The CLI in-process with --json: the parsed report."""
    rc = main(["inspect", "--json", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    return json.loads(out)


def assert_one_line_error(rc, out, err, *needles):
    assert rc == 2, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kho-fleet") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


class Image:
    def __init__(self, tmp, page_size, compatible="kho-v4", base=0, **kw):
        self.mem, self.facts = imagegen.build_image(page_size, compatible,
                                                    mem_pages=MEM_PAGES[page_size], base=base,
                                                    **kw)
        self.page_size = page_size
        self.raw = str(tmp / f"mem-{page_size}-{compatible}-{base:x}.raw")
        self.elf = str(tmp / f"mem-{page_size}-{compatible}-{base:x}.elf")
        imagegen.write_raw(self.mem, self.raw)
        imagegen.write_elf(self.mem, self.elf)


@pytest.fixture(scope="module")
def img4k(tmp_path_factory):
    return Image(tmp_path_factory.mktemp("img4k"), 4096)


def check_report(r, img, path, fmt):
    f = img.facts
    ps = img.page_size
    assert r["schema"] == SCHEMA
    assert r["memory"]["path"] == path and r["memory"]["format"] == fmt
    k = r["kho"]
    assert k["compatible"] == f["compatible"] and k["page_size"] == ps
    assert k["depth"] == f["geometry"].depth
    assert k["memory_map_root"] == f["radix_root"]
    rad = r["radix"]
    assert rad["intact"] is True and rad["errors"] == []
    assert rad["root"] == f["radix_root"] and rad["nodes"] == len(f["node_pages"])
    assert rad["blocks"] == coalesce(f["blocks"], ps)
    assert sum(rad["pages_by_order"].values()) == len(f["blocks"])
    assert rad["preserved_bytes"] == sum(ps << o for _, o in f["blocks"])
    subs = {s["name"]: s for s in r["subtrees"]}
    assert [s["name"] for s in r["subtrees"]] == ["LUO", "kexec-metadata"]
    assert subs["LUO"]["phys"] == f["luo"]["phys"] and subs["LUO"]["preserved"] is True
    assert subs["kexec-metadata"]["phys"] == f["metadata"]["phys"]
    assert subs["kexec-metadata"]["size"] == 73 and subs["kexec-metadata"]["preserved"]
    md = r["kexec_metadata"]
    assert md["error"] is None and md["version"] == 1
    assert (md["previous_release"], md["kexec_count"]) == (f["metadata"]["release"],
                                                            f["metadata"]["count"])
    luo = r["luo"]
    assert luo["error"] is None and luo["errors"] == [] and luo["compatible"] == "luo-v5"
    assert luo["liveupdate_num"] == f["luo"]["liveupdate_num"] and luo["phys"] == f["luo"]["phys"]
    files = [(s["name"], fi) for s in luo["sessions"] for fi in s["files"]]
    assert len(files) == len(f["memfds"])
    for (sname, fi), want in zip(files, f["memfds"]):
        assert (sname, fi["token"], fi["compatible"], fi["data"]) == (
            want["session"], want["token"], "memfd-v2", want["ser_pa"])
        m = fi["memfd"]
        assert m["size"] == want["size"] and m["nr_folios"] == len(want["pfns"])
        assert [x[0] for x in m["folios"]] == want["pfns"]
        assert [x[1] for x in m["folios"]] == list(range(len(want["pfns"])))
        assert all(x[2] == want["folio_flags"] for x in m["folios"])
        assert m["errors"] == [] and m["pfns_in_radix"] is True
        assert m["pfns_missing_from_radix"] == []


@pytest.mark.parametrize("fmt", ["raw", "elf"])
def test_json_report(capsys, img4k, fmt):
    path = getattr(img4k, fmt)
    r = cli_json(capsys, "--memory", path)
    check_report(r, img4k, path, {"raw": "raw image", "elf": "ELF core"}[fmt])
    assert r["kho"]["root_fdt_source"].startswith("memory scan")
    assert r["kho"]["root_fdt_phys"] == img4k.facts["fdt_phys"]
    if fmt == "elf":
        assert len(r["memory"]["ranges"]) == 2          # imagegen leaves a hole


@pytest.mark.parametrize("page_size", [16384, 65536])
def test_json_other_page_sizes(capsys, tmp_path, page_size):
    img = Image(tmp_path, page_size)
    for path, fmt in ((img.raw, "raw image"), (img.elf, "ELF core")):
        r = cli_json(capsys, "--memory", path, "--page-size", page_size)
        check_report(r, img, path, fmt)


@pytest.mark.parametrize("page_size,compat", [(4096, "kho-v2"), (4096, "kho-v3"),
                                              (65536, "kho-v3")])
def test_json_older_abis(capsys, tmp_path, page_size, compat):
    img = Image(tmp_path, page_size, compat)
    r = cli_json(capsys, "--memory", img.raw, "--page-size", page_size)
    if compat == "kho-v2":                # no blob-size: reported as null
        assert {s["size"] for s in r["subtrees"]} == {None}
        assert r["kexec_metadata"]["error"] is None and r["luo"]["error"] is None
    else:
        check_report(r, img, img.raw, "raw image")


def test_memory_base(capsys, tmp_path):
    img = Image(tmp_path, 4096, base=0x40000000)
    r = cli_json(capsys, "--memory", img.raw, "--memory-base", "0x40000000")
    check_report(r, img, img.raw, "raw image")
    assert r["memory"]["ranges"] == [[0x40000000, 0x40000000 + img.facts["size"]]]
    r = cli_json(capsys, "--memory", img.elf)
    check_report(r, img, img.elf, "ELF core")
    # without the base the FDT is still found, but its pointers miss the image
    rc = main(["inspect", "--json", "--memory", img.raw])
    out, err = capsys.readouterr()
    if rc == 0:
        assert json.loads(out)["radix"]["intact"] is False
    else:
        assert rc == 2 and len(err.splitlines()) == 1


def test_dropped_folio_page(capsys, tmp_path):
    img = Image(tmp_path, 4096)
    victim = img.facts["memfds"][0]
    pfn = victim["pfns"][1]
    b = img.facts["builder"]
    b.remove(pfn * 4096, 0)
    imagegen.rewrite_tree(img.mem, img.facts)
    imagegen.write_raw(img.mem, img.raw)
    r = cli_json(capsys, "--memory", img.raw)
    assert r["radix"]["intact"] is True
    files = [fi for s in r["luo"]["sessions"] for fi in s["files"]]
    assert files[0]["memfd"]["pfns_in_radix"] is False
    assert files[0]["memfd"]["pfns_missing_from_radix"] == [pfn]
    assert all(fi["memfd"]["pfns_in_radix"] for fi in files[1:])


def test_human_output(img4k):
    for path in (img4k.raw, img4k.elf):
        rc, out, err = run("--memory", path)
        assert rc == 0 and err == ""
        assert "kho-v4" in out and "luo-v5" in out and "intact" in out
        assert "7.2.13-kho" in out and "vm-state" in out


def test_human_output_damaged(tmp_path):
    img = Image(tmp_path, 4096)
    victim = img.facts["memfds"][0]["pfns"][0]
    img.facts["builder"].remove(victim * 4096, 0)
    imagegen.rewrite_tree(img.mem, img.facts)
    imagegen.write_raw(img.mem, img.raw)
    rc, out, err = run("--memory", img.raw)
    assert rc == 0 and "PFNs missing" in out


def test_subprocess_json(img4k):
    rc, out, err = run("--memory", img4k.elf, "--json")
    assert rc == 0 and err == ""
    check_report(json.loads(out), img4k, img4k.elf, "ELF core")


def test_fdt_file_full(capsys, img4k, tmp_path):
    fdt = tmp_path / "fdt"
    fdt.write_bytes(img4k.facts["fdt"])
    r = cli_json(capsys, "--memory", img4k.raw, "--fdt", fdt)
    check_report(r, img4k, img4k.raw, "raw image")
    assert r["kho"]["root_fdt_source"] == f"file {fdt}" and r["kho"]["root_fdt_phys"] is None


def test_fdt_file_truncated_finds_complete_copy(capsys, img4k, tmp_path):
    """debugfs kho/out/fdt keeps the size the FDT had when it was created (before LUO)."""
    fdt = tmp_path / "fdt"
    cut = len(img4k.facts["fdt_before_luo"])
    assert cut < len(img4k.facts["fdt"])
    fdt.write_bytes(img4k.facts["fdt"][:cut])
    r = cli_json(capsys, "--memory", img4k.raw, "--fdt", fdt)
    check_report(r, img4k, img4k.raw, "raw image")
    assert "complete copy" in r["kho"]["root_fdt_source"]
    assert r["kho"]["root_fdt_phys"] == img4k.facts["fdt_phys"]
    assert any("truncated" in n for n in r["kho"]["notes"])


def test_fdt_file_truncated_without_copy(capsys, tmp_path):
    img = Image(tmp_path, 4096)
    img.mem.write(img.facts["fdt_phys"], bytes(4096))        # no FDT left in memory
    imagegen.write_raw(img.mem, img.raw)
    fdt = tmp_path / "fdt"
    fdt.write_bytes(img.facts["fdt"][:len(img.facts["fdt_before_luo"])])
    r = cli_json(capsys, "--memory", img.raw, "--fdt", fdt)
    assert "truncated; recovered" in r["kho"]["root_fdt_source"]
    assert r["kho"]["compatible"] == "kho-v4" and r["radix"]["intact"]
    assert r["kho"]["memory_map_root"] == img.facts["radix_root"]
    # (the FDT page itself is no longer in use but is still marked preserved)
    assert r["luo"]["error"] is None and len(r["luo"]["sessions"]) == 2


def test_stale_fdt_copy_loses_to_intact_one(capsys, tmp_path):
    img = Image(tmp_path, 4096)
    from kho_agent.abi.encode.kho import encode_kho_fdt
    stale = img.mem.base + 200 * 4096                  # an unused page
    img.mem.write(stale, encode_kho_fdt("kho-v4", stale + 4096 * 3))
    img.mem.write(stale + 4096 * 3, b"\x01" * 4096)    # its "tree root" is garbage
    imagegen.write_raw(img.mem, img.raw)
    r = cli_json(capsys, "--memory", img.raw)
    assert r["kho"]["root_fdt_phys"] == img.facts["fdt_phys"] and r["radix"]["intact"]
    assert any(f"0x{stale:x}" in n for n in r["kho"]["notes"])


def test_tree_overwritten_by_new_kernel(capsys, tmp_path):
    """In the new kernel the node pages are free memory: garbage there is reported."""
    img = Image(tmp_path, 4096)
    nodes = img.facts["node_pages"]
    rng = random.Random(1)
    for pa in nodes[len(nodes) // 2:]:
        img.mem.write(pa, rng.randbytes(4096))
    imagegen.write_raw(img.mem, img.raw)
    r = cli_json(capsys, "--memory", img.raw)
    assert r["radix"]["intact"] is False and r["radix"]["errors"]
    rc, out, err = run("--memory", img.raw)
    assert rc == 0 and "NOT intact" in out


def test_luo_blob_gone(capsys, tmp_path):
    img = Image(tmp_path, 4096)
    img.mem.write(img.facts["luo"]["phys"], b"\xff" * 32)
    imagegen.write_raw(img.mem, img.raw)
    r = cli_json(capsys, "--memory", img.raw)
    assert r["luo"]["error"] and "unsupported LUO ABI" in r["luo"]["error"]
    assert r["luo"]["sessions"] == [] and r["kexec_metadata"]["error"] is None


def test_absurd_blob_sizes_do_not_become_reads(capsys, tmp_path):
    """blob-size is untrusted (the FDT may be garbage in the new kernel): the kernel reads
    only sizeof(struct) after checking blob-size >= sizeof, so must inspect."""
    from kho_agent.abi.encode.kho import encode_kho_fdt
    from kho_agent.abi.kho import KhoSubtree
    img = Image(tmp_path, 4096)
    f = img.facts
    fdt = encode_kho_fdt("kho-v4", f["radix_root"], [
        KhoSubtree("kexec-metadata", f["metadata"]["phys"], 1 << 40),
        KhoSubtree("LUO", f["luo"]["phys"], 1 << 40)])
    img.mem.write(f["fdt_phys"], fdt.ljust(4096, b"\0"))
    imagegen.write_raw(img.mem, img.raw)
    r = cli_json(capsys, "--memory", img.raw)
    assert r["kexec_metadata"]["error"] is None
    assert r["kexec_metadata"]["previous_release"] == f["metadata"]["release"]
    assert r["luo"]["error"] is None and len(r["luo"]["sessions"]) == 2


def test_inspect_memory_api_errors(img4k):
    with open_memory(img4k.raw) as mem:
        with pytest.raises(InspectError, match="8192"):
            inspect_memory(mem, page_size=8192)
        with pytest.raises(InspectError, match="kho-v9"):
            inspect_memory(mem, fdt_blob=img4k.facts["fdt"].replace(b"kho-v4", b"kho-v9"))
        with pytest.raises(InspectError, match="not a KHO FDT"):
            inspect_memory(mem, fdt_blob=b"\xd0\x0d\xfe\xed" + bytes(60))


# --- unusable input: exit 2, one line on stderr, no traceback --------------------------------

def test_error_garbage_file(tmp_path):
    p = tmp_path / "garbage"
    p.write_bytes(random.Random(7).randbytes(1 << 20))
    assert_one_line_error(*run("--memory", p), "no KHO root FDT")


def test_error_empty_file(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    assert_one_line_error(*run("--memory", p), "empty file")


def test_error_missing_file(tmp_path):
    assert_one_line_error(*run("--memory", tmp_path / "nope"), "No such file")
    assert_one_line_error(*run("--memory", tmp_path), "--memory")


def test_error_missing_fdt_file(img4k, tmp_path):
    assert_one_line_error(*run("--memory", img4k.raw, "--fdt", tmp_path / "nope"), "--fdt")


def test_error_garbage_fdt_file(img4k, tmp_path):
    p = tmp_path / "fdt"
    p.write_bytes(b"not an fdt at all" * 10)
    assert_one_line_error(*run("--memory", img4k.raw, "--fdt", p), "not a KHO FDT")


def test_error_unknown_abi_in_memory(tmp_path):
    img = Image(tmp_path, 4096)
    page = img.mem.read(img.facts["fdt_phys"], 4096)
    img.mem.write(img.facts["fdt_phys"], page.replace(b"kho-v4", b"kho-v9"))
    imagegen.write_raw(img.mem, img.raw)
    assert_one_line_error(*run("--memory", img.raw), "kho-v9")


def test_error_unknown_abi_fdt_file(img4k, tmp_path):
    p = tmp_path / "fdt"
    p.write_bytes(img4k.facts["fdt"].replace(b"kho-v4", b"kho-v9"))
    assert_one_line_error(*run("--memory", img4k.raw, "--fdt", p), "kho-v9")


def test_error_unsupported_page_size(img4k):
    assert_one_line_error(*run("--memory", img4k.raw, "--page-size", 8192), "8192")


def test_error_elf_with_memory_base(img4k):
    assert_one_line_error(*run("--memory", img4k.elf, "--memory-base", 0x1000),
                          "--memory-base")


def test_error_non_integer_page_size(img4k):
    """The CLI promises one-line errors; argparse's usage text must not break that."""
    assert_one_line_error(*run("--memory", img4k.raw, "--page-size", "abc"), "abc")


def test_wrong_page_size_does_not_crash(img4k):
    for ps in (16384, 65536):
        rc, out, err = run("--memory", img4k.raw, "--page-size", ps, "--json")
        assert "Traceback" not in err
        if rc == 0:
            json.loads(out)
        else:
            assert_one_line_error(rc, out, err)
