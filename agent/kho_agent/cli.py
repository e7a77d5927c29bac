"""`kho-agent` command line (stdlib only): JSON with --json, one-line errors, exit 2 on bad input.

The handover subcommands (preflight, stage, preserve, snapshot, kexec, verify, report)
build on this; for now it decodes KHO/LUO state from memory like `kho-fleet inspect`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from . import __version__
from .abi.memory import MemoryReadError
from .inspect import InspectError, inspect_memory
from .physmem import open_live_memory, open_memory


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    """Decode KHO/LUO state from this host's memory (or an image) as JSON."""
    fdt = None
    if args.fdt:
        with open(args.fdt, "rb") as f:
            fdt = f.read()
    mem = open_memory(args.memory, args.memory_base) if args.memory else open_live_memory()
    with mem:
        report = inspect_memory(mem, page_size=args.page_size, fdt_blob=fdt,
                                fdt_name=args.fdt or "fdt")
    json.dump(report, sys.stdout, indent=None if args.compact else 1)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kho-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"kho-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ins = sub.add_parser("inspect", help=cmd_inspect.__doc__)
    ins.add_argument("--memory", metavar="PATH",
                     help="memory image; default: this host (/dev/mem, else /proc/kcore)")
    ins.add_argument("--memory-base", type=_int, default=None, metavar="ADDR")
    ins.add_argument("--fdt", metavar="PATH", help="KHO root FDT, e.g. debugfs kho/out/fdt")
    ins.add_argument("--page-size", type=_int, default=4096, metavar="BYTES")
    ins.add_argument("--compact", action="store_true", help="one-line JSON")
    ins.set_defaults(func=cmd_inspect)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InspectError, MemoryReadError) as e:
        print(f"kho-agent: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as e:
        print(f"kho-agent: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
