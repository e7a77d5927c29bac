"""`make demo`: build an example handover memory image and inspect it like a real dump.

Until the simulated fleet lands, the demo is the foundation end to end: the outgoing
kernel's KHO/LUO state written byte-exact into an ELF core, then `kho-fleet inspect`.
"""

from __future__ import annotations

import os
import sys

from kho_agent.physmem import write_elf_core

from .cli import main as cli_main
from .sim.memimage import MemfdSpec, build_handover_image


def main() -> int:
    out = os.environ.get("KHO_DEMO_DIR", "demo-out")
    os.makedirs(out, exist_ok=True)
    mem, facts = build_handover_image(
        sessions=[("vm-ram", [MemfdSpec(0x1001, 8 << 20, seed=1),
                              MemfdSpec(0x1002, 3 << 20, seed=2)]),
                  ("cache", [MemfdSpec(0x2001, 1 << 20, seed=3)])])
    core = os.path.join(out, "outgoing-kernel.core")
    write_elf_core(core, mem.iter_pages())
    print(f"demo: wrote {core}: the outgoing kernel's RAM with KHO {facts.compatible}, "
          f"{len(facts.memfd_pfns)} preserved memfds, root FDT at 0x{facts.fdt_phys:x}\n")
    rc = cli_main(["inspect", "--memory", core])
    print(f"\ndemo: JSON form: kho-fleet inspect --memory {core} --json")
    return rc


if __name__ == "__main__":
    sys.exit(main())
