"""`kho-agent` command line (stdlib only): one subcommand per handover step.

Every subcommand prints JSON with --json (a short human line otherwise) and fails with
one line on stderr: exit 2 for bad input, 1 for a step that failed on this host.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional, Sequence

from . import __version__
from .abi.memory import MemoryReadError
from .inspect import InspectError, inspect_memory
from .physmem import open_live_memory, open_memory

AGENT_START = time.time()     # the agent's own start, for the downtime breakdown


class UsageError(Exception):
    """Bad input: exit 2."""


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=None if getattr(args, "compact", False) else 1)
        sys.stdout.write("\n")
    else:
        print(human)


def _agent(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .handover import Agent
    from .kernel import get_kernel
    return Agent(get_kernel(args.twin), args.state_dir)


def _spec(path: Optional[str]):  # type: ignore[no-untyped-def]
    if path is None:
        return None
    from .workload import SpecError, load_spec
    try:
        return load_spec(path)
    except SpecError as e:
        raise UsageError(str(e)) from None


def cmd_inspect(args: argparse.Namespace) -> int:
    """Decode KHO/LUO state from this host's memory (or an image) as JSON."""
    fdt = None
    if args.fdt:
        with open(args.fdt, "rb") as f:
            fdt = f.read()
    if args.memory:
        mem = open_memory(args.memory, args.memory_base)
    elif args.twin:
        from .kernel import get_kernel
        mem = get_kernel(args.twin).open_physmem()
    else:
        mem = open_live_memory()
    with mem:
        report = inspect_memory(mem, page_size=args.page_size, fdt_blob=fdt,
                                fdt_name=args.fdt or "fdt")
    json.dump(report, sys.stdout, indent=None if args.compact else 1)
    sys.stdout.write("\n")
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    """Check KHO, LUO, kexec, debugfs, memory access, scratch and the staged kernel's ABI."""
    from .handover import AgentError
    agent = _agent(args)
    try:
        res = agent.preflight(kernel_image=args.kernel, initrd=args.initrd, spec=_spec(args.spec),
                              page_size=args.page_size, allow_unknown_abi=args.allow_unknown_abi)
    except AgentError:
        res = agent.state.preflight or {}
        _emit(args, res, "\n".join(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}"
                                   for c in res.get("checks", [])))
        if not args.json:
            raise
        return 1
    _emit(args, res, "\n".join(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}"
                               for c in res["checks"]))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """sha256-verify and load the target kernel with kexec_file_load."""
    res = _agent(args).stage(args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                             sha256=args.sha256, allow_unknown_abi=args.allow_unknown_abi)
    _emit(args, res, f"staged {res['kernel']} ({(res.get('target') or {}).get('release')}); "
                     f"kexec_loaded={int(res['kexec_loaded'])}")
    return 0


def cmd_preserve(args: argparse.Namespace) -> int:
    """Start the holder and preserve the spec's memfds through /dev/liveupdate."""
    spec = _spec(args.spec)
    res = _agent(args).preserve(spec)
    _emit(args, res, f"preserved {len(res['workloads'])} memfd(s), "
                     f"{sum(w['size'] for w in res['workloads']) >> 20} MiB")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Walk the outgoing radix tree through physical memory and store it."""
    res = _agent(args).snapshot()
    _emit(args, res, f"snapshot: root 0x{res['root']:x}, {res['nodes']} nodes, "
                     f"{res['bytes'] >> 20} MiB preserved, intact={res['intact']}")
    return 0


def cmd_kexec(args: argparse.Namespace) -> int:
    """Seal the journal and kexec into the staged kernel (needs --yes)."""
    res = _agent(args).kexec(yes=args.yes)
    _emit(args, res, f"kexec -e started ({res['agent_kexec_s'] * 1e3:.1f} ms after the request)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """After boot: incoming state, retrieve + verify every workload, FINISH, measure downtime."""
    rep = _agent(args).verify(agent_start=AGENT_START)
    _emit(args, rep, f"handover {rep['handover_id']}: {rep['result']}"
                     + (f" ({rep['failure']['phase']}: {rep['failure']['reason']})"
                        if rep["failure"] else ""))
    return 0 if rep["result"] == "success" else 1


def cmd_report(args: argparse.Namespace) -> int:
    """Write and print the handover report (+ node_exporter textfile)."""
    rep = _agent(args).report(args.textfile_dir)
    _emit(args, rep, f"handover {rep['handover_id']}: {rep['result']}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Close retrieved memfds held for workloads (all, or one session/token)."""
    res = _agent(args).release(args.session, args.token)
    _emit(args, res, f"released {len(res['released'])} memfd(s)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """This host's handover state."""
    from dataclasses import asdict
    agent = _agent(args)
    _emit(args, asdict(agent.state), f"handover {agent.state.handover_id}: phase {agent.state.phase}")
    return 0


def cmd_holder(args: argparse.Namespace) -> int:
    """(internal) Run the holder process."""
    from .holder import run_holder
    from .kernel import get_kernel
    return run_holder(get_kernel(args.twin), args.state_dir or get_kernel(args.twin).state_dir())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kho-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"kho-agent {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--compact", action="store_true", help="one-line JSON")
    common.add_argument("--state-dir", metavar="DIR", help="default /var/lib/kho-agent")
    common.add_argument("--twin", metavar="ROOT", help="act on the digital-twin host at ROOT "
                        "(default: $KHO_AGENT_TWIN, else this Linux host)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, **kw: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=func.__doc__.splitlines()[0],
                            description=func.__doc__, **kw)
        sp.set_defaults(func=func)
        return sp

    ins = add("inspect", cmd_inspect)
    ins.add_argument("--memory", metavar="PATH",
                     help="memory image; default: this host (/dev/mem, else /proc/kcore)")
    ins.add_argument("--memory-base", type=_int, default=None, metavar="ADDR")
    ins.add_argument("--fdt", metavar="PATH", help="KHO root FDT, e.g. debugfs kho/out/fdt")
    ins.add_argument("--page-size", type=_int, default=4096, metavar="BYTES")

    for name, func in (("preflight", cmd_preflight), ("stage", cmd_stage)):
        sp = add(name, func)
        sp.add_argument("--kernel", metavar="IMAGE", required=name == "stage")
        sp.add_argument("--initrd", metavar="PATH")
        sp.add_argument("--allow-unknown-abi", action="store_true",
                        help="proceed when the KHO ABI of a kernel cannot be determined")
        if name == "preflight":
            sp.add_argument("--spec", metavar="FILE", help="workload spec (memory check)")
            sp.add_argument("--page-size", type=_int, metavar="BYTES",
                            help="expected page size (from the inventory)")
        else:
            sp.add_argument("--cmdline", default="reuse", metavar="reuse|STRING")
            sp.add_argument("--sha256", metavar="HEX", help="expected sha256 of the kernel")
    add("preserve", cmd_preserve).add_argument("--spec", required=True, metavar="FILE",
                                               help="workloads (JSON, or YAML with PyYAML)")
    add("snapshot", cmd_snapshot)
    add("kexec", cmd_kexec).add_argument("--yes", action="store_true",
                                         help="really kexec into the staged kernel")
    add("verify", cmd_verify)
    add("report", cmd_report).add_argument("--textfile-dir", metavar="DIR",
                                           help="also write kho-agent.prom here (node_exporter)")
    rel = add("release", cmd_release)
    rel.add_argument("--session")
    rel.add_argument("--token", type=_int)
    add("status", cmd_status)
    add("holder", cmd_holder)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .handover import AgentError
    from .holder import HolderError
    from .kernel import KernelError, LiveUpdateError
    try:
        return args.func(args)
    except (UsageError, InspectError, MemoryReadError) as e:
        print(f"kho-agent: error: {e}", file=sys.stderr)
        return 2
    except AgentError as e:
        print(f"kho-agent: {e.phase}: {e}", file=sys.stderr)
        return 1
    except (HolderError, KernelError, LiveUpdateError) as e:
        print(f"kho-agent: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except OSError as e:
        print(f"kho-agent: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
