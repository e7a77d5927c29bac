"""`kho-fleet` command line: one subcommand per job, `--json` everywhere, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

from kho_agent.abi.memory import MemoryReadError
from kho_agent.inspect import InspectError, inspect_memory
from kho_agent.physmem import open_memory

EXIT_UNUSABLE = 2


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code attached."""

    def __init__(self, msg: str, code: int = EXIT_UNUSABLE) -> None:
        super().__init__(msg)
        self.code = code


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    """Decode KHO/LUO state from a memory image (ELF core, raw, /dev/mem, /proc/kcore)."""
    fdt_blob = None
    if args.fdt:
        try:
            with open(args.fdt, "rb") as f:
                fdt_blob = f.read()
        except OSError as e:
            raise CliError(f"--fdt {args.fdt}: {e.strerror}") from None
    try:
        mem = open_memory(args.memory, args.memory_base)
    except MemoryReadError as e:
        raise CliError(f"--memory {e}") from None
    with mem:
        try:
            report = inspect_memory(mem, page_size=args.page_size, fdt_blob=fdt_blob,
                                    fdt_name=args.fdt or "fdt")
        except InspectError as e:
            raise CliError(f"inspect {args.memory}: {e}") from None
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        from .inspect_view import render
        render(report, Console())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit code EXIT_UNUSABLE."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(EXIT_UNUSABLE, f"{self.prog}: error: {message}\n")


def cmd_build_agent(args: argparse.Namespace) -> int:
    """Pack the stdlib-only agent into one zipapp (kho-agent.pyz) for the hosts."""
    from .agentbuild import build_agent
    path, digest = build_agent(args.out)
    if args.json:
        json.dump({"path": os.path.abspath(path), "sha256": digest}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"{path}  sha256 {digest}")
    return 0


def cmd_sim_handover(args: argparse.Namespace) -> int:
    """One full handover on a fresh digital-twin host, through the real agent."""
    import tempfile

    from .sim.handover import AGENT_FAULTS, TWIN_FAULTS, run_sim_handover
    if args.fault and args.fault not in TWIN_FAULTS + AGENT_FAULTS:
        raise CliError(f"--fault {args.fault!r}: known faults are "
                       + ", ".join(TWIN_FAULTS + AGENT_FAULTS))
    if args.workload_mib < 1 or args.workload_mib > 4096:
        raise CliError(f"--workload-mib {args.workload_mib}: 1..4096")
    work = args.workdir or tempfile.mkdtemp(prefix="kho-sim-")
    res = run_sim_handover(work, fault=args.fault, workload_mib=args.workload_mib,
                           boot_timeout=args.boot_timeout)
    rep = res.report
    if args.json:
        json.dump(rep, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        from .report_view import render_handover
        render_handover(rep, Console())
        if args.workdir or args.keep:
            print(f"twin host kept at {res.root}")
    if not args.workdir and not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0 if rep.get("result") == "success" else 1


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kho-fleet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ins = sub.add_parser("inspect", help="decode KHO/LUO state from a memory image",
                         description=cmd_inspect.__doc__)
    ins.add_argument("--memory", required=True, metavar="PATH",
                     help="ELF core (QEMU dump-guest-memory, vmcore), raw image, "
                          "/proc/kcore or /dev/mem")
    ins.add_argument("--memory-base", type=_int, default=None, metavar="ADDR",
                     help="physical address of a raw image's first byte (default 0)")
    ins.add_argument("--fdt", metavar="PATH",
                     help="KHO root FDT (e.g. a copy of debugfs kho/out/fdt); may be truncated")
    ins.add_argument("--page-size", type=_int, default=4096, metavar="BYTES",
                     help="4096 (default), 16384 or 65536")
    ins.add_argument("--json", action="store_true", help="print the JSON report")
    ins.set_defaults(func=cmd_inspect)

    ba = sub.add_parser("build-agent", help=cmd_build_agent.__doc__.splitlines()[0])
    ba.add_argument("--out", default="build/kho-agent.pyz", metavar="PATH")
    ba.add_argument("--json", action="store_true")
    ba.set_defaults(func=cmd_build_agent)

    sim = sub.add_parser("sim", help="the digital-twin fleet").add_subparsers(
        dest="sim_command", required=True, metavar="COMMAND")
    sh = sim.add_parser("handover", help=cmd_sim_handover.__doc__.splitlines()[0],
                        description=cmd_sim_handover.__doc__)
    sh.add_argument("--fault", metavar="NAME", help="inject a fault (kexec-load-fails, "
                    "never-returns, slow-boot, bitflip, lost-page, abi-mismatch, "
                    "kill-agent-before-finish, abi-mismatch-image)")
    sh.add_argument("--workload-mib", type=_int, default=64, metavar="N")
    sh.add_argument("--boot-timeout", type=float, default=30.0, metavar="SECONDS")
    sh.add_argument("--workdir", metavar="DIR", help="keep the twin host here")
    sh.add_argument("--keep", action="store_true", help="keep the temporary twin host")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_sim_handover)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as e:
        print(f"kho-fleet: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("kho-fleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - last resort: one line, never a traceback
        if os.environ.get("KHO_FLEET_DEBUG"):
            raise
        print(f"kho-fleet: internal error: {type(e).__name__}: {e} "
              "(set KHO_FLEET_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
