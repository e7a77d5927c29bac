"""`kho-agent` command line (stdlib only): one subcommand per handover step.

Every subcommand prints JSON with --json (a short human line otherwise) and fails with
one line on stderr: exit 2 for bad input, 1 for a step that failed on this host. Errors
are KhoAgentError (errors.py) and carry their exit code; anything else is a bug, shown as
an internal error (KHO_FLEET_DEBUG=1 re-raises it for the traceback).
"""

from __future__ import annotations

import time

AGENT_START = time.time()     # the agent's own start, for the downtime breakdown

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import TYPE_CHECKING, Any, NoReturn, Optional  # noqa: E402

from . import __version__  # noqa: E402
from .errors import InputError, KhoAgentError, one_line  # noqa: E402

if TYPE_CHECKING:   # imported where used: `--version` and the boot unit's verify start fast
    from .handover import Agent
    from .kernel import Kernel
    from .workload import WorkloadSpec
DEBUG_ENV = "KHO_FLEET_DEBUG"

EXIT_INTERNAL = 70       # a bug in the agent (sysexits EX_SOFTWARE), never caused by input


class UsageError(InputError):
    """Bad input: exit 2."""


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, but python >= 3.14's colour theme (the _colorize module) is
    loaded only when help text is formatted: 3.14's argparse builds a formatter for every
    add_argument, and importing _colorize took 1-2 s of an emulated host's early boot, in
    the blackout. Python < 3.14 never calls _set_color."""

    def _set_color(self, color: bool) -> None:
        self._kho_color = color

    def __getattr__(self, name: str) -> Any:
        if name in ("_theme", "_decolor") and "_kho_color" in self.__dict__:
            super()._set_color(self.__dict__.pop("_kho_color"))    # type: ignore[misc]
            return getattr(self, name)
        raise AttributeError(name)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (UsageError, exit 2) instead of usage text."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kw)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _u64(text: str) -> int:
    """An integer in [0, 2**64) (tokens, physical addresses)."""
    v = _int(text)
    if not 0 <= v < 1 << 64:
        raise argparse.ArgumentTypeError(f"not in 0..2**64-1: {text!r}")
    return v


def _page_size(text: str) -> int:
    """A page size: a power of two from 4096 to 65536 bytes."""
    v = _int(text)
    if v not in (4096, 8192, 16384, 32768, 65536):
        raise argparse.ArgumentTypeError(f"not a page size (4096..65536, a power of 2): {text!r}")
    return v


def _sha256(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError(f"not a sha256 (64 hex digits): {text!r:.80}")
    return text.lower()


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=None if getattr(args, "compact", False) else 1)
        sys.stdout.write("\n")
    else:
        print(human)


def _kernel(args: argparse.Namespace) -> Kernel:
    """The host's kernel from the one twin setting (--twin, else $KHO_AGENT_TWIN)."""
    from .kernel import get_kernel
    return get_kernel(args.twin)


def _state_dir(args: argparse.Namespace) -> Optional[str]:
    """--state-dir, refused (without creating anything) when it names a non-directory."""
    path: Optional[str] = args.state_dir
    if path is None:
        return None
    if not path:
        raise UsageError("--state-dir: empty path")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"--state-dir {path}: not a directory")
    return path


def _agent(args: argparse.Namespace, create: bool = True) -> Agent:
    """The host's Agent; checks the twin setting and --state-dir before touching the disk."""
    from .handover import Agent
    kernel = _kernel(args)
    return Agent(kernel, _state_dir(args), create=create)


def _spec(path: Optional[str]) -> Optional[WorkloadSpec]:
    """The workload spec at `path` (SpecError, exit 2, names the file and field)."""
    if path is None:
        return None
    from .workload import SpecError, load_spec
    try:
        return load_spec(path)
    except SpecError as e:
        raise SpecError(f"--spec {e}") from None


def _input_file(path: Optional[str], option: str) -> Optional[str]:
    """`path` if it names a readable regular file, else UsageError naming the option
    (checked before any step runs, so a mistyped path changes nothing on the host)."""
    if path is None:
        return None
    if not path:
        raise UsageError(f"{option}: empty path")
    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option} {path}: not readable")
    return path


def _read_input(path: str, option: str) -> bytes:
    """The bytes of a user-named file; InputError naming the option and path."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{option} {path}: {e.strerror or e}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    """Decode KHO/LUO state from this host's memory (or an image) as JSON."""
    from .inspect import inspect_memory
    from .physmem import open_live_memory, open_memory
    fdt = _read_input(args.fdt, "--fdt") if args.fdt else None
    if args.memory:
        mem = open_memory(args.memory, args.memory_base)
    elif args.twin is not None or _twin_env_set():
        mem = _kernel(args).open_physmem()
    else:
        mem = open_live_memory()
    with mem:
        report = inspect_memory(mem, page_size=args.page_size, fdt_blob=fdt,
                                fdt_name=args.fdt or "fdt")
    json.dump(report, sys.stdout, indent=None if args.compact else 1)
    sys.stdout.write("\n")
    return 0


def _kexec_method_args(sp: argparse.ArgumentParser) -> None:
    """--kexec-method and --allow-fdstore-loss (kho_agent.systemdhost)."""
    sp.add_argument("--kexec-method", choices=("auto", "systemd", "direct"), default="auto",
                    help="systemctl kexec (systemd >= 262 carries FD stores through LUO) or "
                         "kexec -e; auto picks (default auto)")
    sp.add_argument("--allow-fdstore-loss", action="store_true",
                    help="let a direct kexec lose other units' preserved FD stores")


def cmd_preflight(args: argparse.Namespace) -> int:
    """Check KHO, LUO, kexec, debugfs, memory access, scratch and the staged kernel's ABI."""
    from .handover import AgentError
    _input_file(args.kernel, "--kernel")
    _input_file(args.initrd, "--initrd")
    spec = _spec(args.spec)
    agent = _agent(args)
    try:
        res = agent.preflight(kernel_image=args.kernel, initrd=args.initrd, spec=spec,
                              page_size=args.page_size, allow_unknown_abi=args.allow_unknown_abi,
                              kexec_method=args.kexec_method,
                              allow_fdstore_loss=args.allow_fdstore_loss)
    except AgentError:
        res = agent.state.preflight or {}
        _emit(args, res, "\n".join(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}"
                                   for c in res.get("checks", [])))
        raise                  # the checks went to stdout; main() prints the one-line reason
    _emit(args, res, "\n".join(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}"
                               for c in res["checks"]))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """sha256-verify and load the target kernel with kexec_file_load."""
    _input_file(args.kernel, "--kernel")
    _input_file(args.initrd, "--initrd")
    res = _agent(args).stage(args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                             sha256=args.sha256, allow_unknown_abi=args.allow_unknown_abi)
    _emit(args, res, f"staged {res['kernel']} ({(res.get('target') or {}).get('release')}); "
                     f"kexec_loaded={int(res['kexec_loaded'])}")
    return 0


def cmd_preserve(args: argparse.Namespace) -> int:
    """Start the holder and preserve the spec's memfds through /dev/liveupdate."""
    spec = _spec(args.spec)
    if spec is None:                       # argparse requires --spec; keep mypy honest
        raise UsageError("preserve needs --spec FILE")
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
    res = _agent(args).kexec(yes=args.yes, kexec_method=args.kexec_method,
                             allow_fdstore_loss=args.allow_fdstore_loss)
    _emit(args, res, f"{res.get('command', 'kexec -e')} started "
                     f"({res['agent_kexec_s'] * 1e3:.1f} ms after the request)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """After boot: incoming state, retrieve + verify every workload, FINISH, measure downtime."""
    agent = _agent(args)
    if args.at_boot and not agent.handover_in_flight():
        # a boot after a kexec nobody asked this agent for (a plain `systemctl kexec`):
        # the boot unit has nothing to do, and must not hold the workloads back
        why = f"no handover in flight on this host (phase {agent.state.phase})"
        _emit(args, {"result": "none", "reason": why}, f"verify --at-boot: {why}")
        return 0
    rep = agent.verify(agent_start=AGENT_START,
                              release_before_verify=args.release_before_verify,
                              at_boot=args.at_boot, collect=args.collect)
    line = (f"handover {rep['handover_id']}: {rep['result']}"
            + (f" ({rep['failure']['phase']}: {rep['failure']['reason']})"
               if rep["failure"] else ""))
    _emit(args, rep, line)
    if rep["result"] == "success":
        return 0
    print(f"kho-agent: verify: {one_line(line)}", file=sys.stderr)    # failed on this host
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    """Write and print the handover report (+ node_exporter textfile)."""
    if args.textfile_dir is not None:
        if not args.textfile_dir:
            raise UsageError("--textfile-dir: empty path")
        if os.path.lexists(args.textfile_dir) and not os.path.isdir(args.textfile_dir):
            raise UsageError(f"--textfile-dir {args.textfile_dir}: not a directory")
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
    agent = _agent(args, create=False)       # status only reads: it creates nothing
    st = agent.state
    _emit(args, asdict(st), f"handover {st.handover_id}: phase {st.phase}")
    return 0


def cmd_early(args: argparse.Namespace) -> int:
    """After a kexec, before any unit: read the incoming tree and kpageflags only."""
    rec = _agent(args).early(args.by)
    tree = rec["tree"]
    _emit(args, rec, f"tree read {tree.get('read_s_after_kernel_start')} s after kernel "
                     f"start: {tree.get('blocks_held')} of {tree.get('blocks_total')} "
                     "snapshot blocks held")
    return 0


def cmd_holder(args: argparse.Namespace) -> int:
    """(internal) Run the holder process."""
    from .holder import run_holder
    kernel = _kernel(args)
    return run_holder(kernel, _state_dir(args) or kernel.state_dir())


COMMANDS = ("inspect", "preflight", "stage", "preserve", "snapshot", "kexec", "verify",
            "early", "report", "release", "status", "holder")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or (`only`) of that one: each step runs one, and
    argparse takes seconds to build them all on an emulated host early in a boot."""
    p = _Parser(prog="kho-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"kho-agent {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--compact", action="store_true", help="one-line JSON")
    common.add_argument("--state-dir", metavar="DIR", help="default /var/lib/kho-agent")
    common.add_argument("--twin", metavar="ROOT", help="act on the digital-twin host at ROOT "
                        "(default: $KHO_AGENT_TWIN, else this Linux host)")
    # prog given: argparse would format a usage line for it (and load 3.14's colours)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", prog=p.prog)

    def want(*names: str) -> bool:
        return only is None or only in names

    def add(name: str, func: Any, **kw: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=func.__doc__.splitlines()[0],
                            description=func.__doc__, **kw)
        sp.set_defaults(func=func)
        return sp

    if want("inspect"):
        ins = add("inspect", cmd_inspect)
        ins.add_argument("--memory", metavar="PATH",
                         help="memory image; default: this host (/dev/mem, else /proc/kcore)")
        ins.add_argument("--memory-base", type=_u64, default=None, metavar="ADDR")
        ins.add_argument("--fdt", metavar="PATH", help="KHO root FDT, e.g. debugfs kho/out/fdt")
        ins.add_argument("--page-size", type=_page_size, default=4096, metavar="BYTES")

    for name, func in (("preflight", cmd_preflight), ("stage", cmd_stage)):
        if not want(name):
            continue
        sp = add(name, func)
        sp.add_argument("--kernel", metavar="IMAGE", required=name == "stage")
        sp.add_argument("--initrd", metavar="PATH")
        sp.add_argument("--allow-unknown-abi", action="store_true",
                        help="proceed when the KHO ABI of a kernel cannot be determined")
        if name == "preflight":
            sp.add_argument("--spec", metavar="FILE", help="workload spec (memory check)")
            sp.add_argument("--page-size", type=_page_size, metavar="BYTES",
                            help="expected page size (from the inventory)")
            _kexec_method_args(sp)
        else:
            sp.add_argument("--cmdline", default="reuse", metavar="reuse|STRING")
            sp.add_argument("--sha256", type=_sha256, metavar="HEX",
                            help="expected sha256 of the kernel")
    if want("preserve"):
        add("preserve", cmd_preserve).add_argument(
            "--spec", required=True, metavar="FILE", help="workloads (JSON, or YAML with PyYAML)")
    if want("snapshot"):
        add("snapshot", cmd_snapshot)
    if want("kexec"):
        kx = add("kexec", cmd_kexec)
        kx.add_argument("--yes", action="store_true", help="really kexec into the staged kernel")
        _kexec_method_args(kx)
    if want("verify"):
        vf = add("verify", cmd_verify)
        vf.add_argument(
            "--release-before-verify", action="store_true",
            help="hand retrieved memfds back to waiting workloads before checking their bytes")
        vf.add_argument("--at-boot", action="store_true",
                        help="run by kho-agent-verify.service early in the boot (the report "
                             "says who verified)")
        vf.add_argument("--collect", action="store_true",
                        help="only return the result of a verify that ran in this boot (waits "
                             "for one still running); exit 3 when none ran")
    if want("early"):
        add("early", cmd_early).add_argument(
            "--by", default="initramfs", metavar="WHO",
            help="what ran it, for the report (default: initramfs)")
    if want("report"):
        add("report", cmd_report).add_argument(
            "--textfile-dir", metavar="DIR", help="also write kho-agent.prom here (node_exporter)")
    if want("release"):
        rel = add("release", cmd_release)
        rel.add_argument("--session")
        rel.add_argument("--token", type=_u64)
    if want("status"):
        add("status", cmd_status)
    if want("holder"):
        add("holder", cmd_holder)
    return p


def _twin_env_set() -> bool:
    from .kernel import twin_setting
    return twin_setting(None)[0] is not None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one subcommand; every error is one line on stderr (see the module docstring)."""
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        only = words[0] if words and words[0] in COMMANDS else None
        args = build_parser(only).parse_args(words)
        return int(args.func(args))
    except KhoAgentError as e:
        print(f"kho-agent: {e.headline()}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        return 0
    except OSError as e:
        if e.filename is None:             # not a path anyone named: a failure on this host
            print(f"kho-agent: error: {one_line(e.strerror or e)}", file=sys.stderr)
            return 1
        print(f"kho-agent: error: {e.filename}: {one_line(e.strerror or e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kho-agent: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"kho-agent: internal error (a bug, please report it): {type(e).__name__}: "
              f"{one_line(e)} (set {DEBUG_ENV}=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
