"""Human rendering of an inspect report (the JSON of kho_agent.inspect) with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render(report: dict[str, Any], console: Console) -> None:
    """Print the summary: ABI, root FDT, subtrees, blocks per order, bytes, LUO, errors."""
    kho, radix = report["kho"], report["radix"]
    mem = report["memory"]
    console.print(f"[bold]KHO[/] {kho['compatible']}  page size {kho['page_size']}  "
                  f"radix depth {kho['depth']}")
    console.print(f"memory: {mem['format']} {mem['path']} ({_size(mem['bytes'])})")
    console.print(f"root FDT: {kho['root_fdt_source']}")
    console.print(f"radix root: 0x{kho['memory_map_root']:x}")
    for n in kho["notes"]:
        console.print(f"  note: {n}", style="yellow")

    t = Table(title="subtrees", title_justify="left")
    for col in ("name", "phys", "size", "preserved"):
        t.add_column(col)
    for s in report["subtrees"]:
        t.add_row(s["name"], f"0x{s['phys']:x}", "-" if s["size"] is None else str(s["size"]),
                  "yes" if s["preserved"] else "[red]no[/]")
    console.print(t)

    md = report["kexec_metadata"]
    if md:
        if md.get("error"):
            console.print(f"kexec-metadata: [red]{md['error']}[/]")
        else:
            console.print(f"kexec-metadata: previous release {md['previous_release']!r}, "
                          f"kexec count {md['kexec_count']}")

    state = "[green]intact[/]" if radix["intact"] else "[red]NOT intact[/]"
    console.print(f"radix tree: {state}, {radix['nodes']} node pages, "
                  f"{len(radix['blocks'])} runs, {_size(radix['preserved_bytes'])} preserved")
    t = Table(title="preserved blocks per order", title_justify="left")
    t.add_column("order", justify="right")
    t.add_column("blocks", justify="right")
    t.add_column("bytes", justify="right")
    for order, n in radix["pages_by_order"].items():
        t.add_row(order, str(n), _size(n * (kho["page_size"] << int(order))))
    console.print(t)
    for e in radix["errors"]:
        console.print(f"  radix error: {e}", style="red")

    luo = report["luo"]
    if luo is None:
        console.print("LUO: no LUO subtree")
    elif luo.get("error"):
        console.print(f"LUO: [red]{luo['error']}[/]")
    else:
        console.print(f"LUO {luo['compatible']}: live update #{luo['liveupdate_num']}, "
                      f"{len(luo['sessions'])} session(s)")
        for n in luo["notes"]:
            console.print(f"  note: {n}", style="yellow")
        for s in luo["sessions"]:
            console.print(f"  session {s['name']!r}: {s['count']} file(s)")
            for f in s["files"]:
                line = f"    {f['compatible']} token 0x{f['token']:x}"
                m = f["memfd"]
                if m:
                    ok = "all in radix" if m.get("pfns_in_radix") else "[red]PFNs missing[/]"
                    line += f": {_size(m['size'])}, {m['nr_folios']} folios, {ok}"
                console.print(line)
        for e in luo["errors"]:
            console.print(f"  LUO error: {e}", style="red")
