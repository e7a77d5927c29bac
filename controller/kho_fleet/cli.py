"""`kho-fleet` command line: one subcommand per job, `--json` everywhere, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional

from kho_agent.abi.memory import MemoryReadError
from kho_agent.inspect import InspectError, inspect_memory
from kho_agent.physmem import open_memory

if TYPE_CHECKING:
    from .rollout import Rollout, RolloutOptions
    from .statedb import StateDB

from .errors import EXIT_INPUT, EXIT_INTERNAL, Bug, InputError, KhoFleetError
from .sim.faults import ALL_FAULTS

EXIT_UNUSABLE = EXIT_INPUT


class CliError(InputError):
    """A bad command line (or a failure the CLI words itself): one line, exit code attached."""

    def __init__(self, msg: str, code: int = EXIT_INPUT) -> None:
        super().__init__(msg)
        self.exit_code = code


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _port(text: str) -> int:
    """A TCP port 0..65535 (argparse type; 0 picks a free one)."""
    n = _int(text)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: a port is 0..65535 (0 picks a free one)")
    return n


def _check_listen(addr: str, port: int) -> None:
    """Refuse --metrics-addr/--metrics-port that cannot be bound, before anything starts."""
    import socket
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        fam, typ, proto, _, sa = infos[0]
        with socket.socket(fam, typ, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sa)
    except (OSError, UnicodeError) as e:
        raise CliError(f"--metrics-addr {addr} --metrics-port {port}: cannot listen there "
                       f"({getattr(e, 'strerror', None) or e})") from None


def _seconds(text: str) -> float:
    """A positive number of seconds, at most a week (argparse type)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < v <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"{text}: seconds must be > 0 and at most 604800 "
                                         "(a week)")
    return v


def _url(text: str) -> str:
    """An http(s)://host[:port][/path] URL (argparse type), e.g. a Pushgateway's."""
    from urllib.parse import urlsplit
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: not a URL ({e})") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise argparse.ArgumentTypeError(f"{text!r}: not an http:// or https:// URL with a host")
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is 1..65535")
    return text


def check_dir_option(option: str, path: str) -> None:
    """Refuse a directory option naming a file, or a place where it cannot be created.

    Nothing is created: the nearest existing ancestor must be a writable directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{option} {path}: exists and is not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise CliError(f"{option} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CliError(f"{option} {path}: {probe} is not writable")


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

    def error(self, message: str) -> NoReturn:
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

    from .sim.handover import run_sim_handover
    if args.workload_mib < 1 or args.workload_mib > 4096:
        raise CliError(f"--workload-mib {args.workload_mib}: 1..4096")
    faults: list[str] = args.fault or []
    if faults:
        from .sim.faults import FaultError
        from .sim.handover import check_sim_fault
        for text in faults:
            try:
                check_sim_fault(text, args.workload_mib)
            except FaultError as e:
                raise CliError(f"--fault: {e}") from None
    if args.workdir:
        check_dir_option("--workdir", args.workdir)
    work = args.workdir or tempfile.mkdtemp(prefix="kho-sim-")
    res = run_sim_handover(work, fault=faults, workload_mib=args.workload_mib,
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


def _rollout_opts(args: argparse.Namespace) -> RolloutOptions:
    from .rollout import RolloutOptions
    for option, attr in (("--rollouts-dir", "rollouts_dir"), ("--reports-dir", "reports_dir"),
                         ("--sim-dir", "sim_dir")):
        if getattr(args, attr, None) is not None:
            check_dir_option(option, getattr(args, attr))
    return RolloutOptions(rollouts_dir=args.rollouts_dir, reports_dir=args.reports_dir,
                          sim_dir=args.sim_dir, dry_run=getattr(args, "dry_run", False))


def cmd_rollout(args: argparse.Namespace) -> int:
    """Roll the playbook's kernel across the inventory (or --resume ID)."""
    from .rollout import Rollout, RolloutFinished
    opts = _rollout_opts(args)
    if getattr(args, "engine", "embedded") == "temporal":
        return _temporal().rollout(args, opts, _summary)
    if args.metrics_port is not None:
        _check_listen(args.metrics_addr, args.metrics_port)
    if args.resume:
        try:
            ro = Rollout.resume(args.resume, opts)
        except RolloutFinished as e:
            print(json.dumps({"id": args.resume, "finished": True, "message": str(e)})
                  if args.json else f"kho-fleet: {e}")
            return 0
    else:
        if not args.playbook or not args.inventory:
            raise CliError("rollout needs --playbook and --inventory (or --resume ID)")
        ro = Rollout.start(args.playbook, args.inventory, opts)
    return _drive(ro, args)


def _drive(ro: Rollout, args: argparse.Namespace) -> int:
    from .metrics import MetricsError, RolloutMetrics
    target = ro.pb.target.twin_release or os.path.basename(ro.pb.target.kernel)
    ro.metrics = RolloutMetrics(ro.id, ro.pb.name, target)
    server = None
    if args.metrics_port is not None:
        try:
            server = ro.metrics.serve(args.metrics_port, args.metrics_addr)
        except (MetricsError, OSError) as e:
            ro.halt(f"metrics not served: {e}")
            raise CliError(f"--metrics-port {args.metrics_port}: {e}") from None
    if not args.json:
        print(f"rollout {ro.id}: {ro.pb.name} ({len(ro.db.hosts())} hosts, "
              f"state {ro.db.path})" + (", dry run" if ro.opts.dry_run else ""), file=sys.stderr)
    try:
        if args.json or not sys.stderr.isatty():
            fleet = ro.run()
        else:
            from .progress import RolloutProgress
            stages = [(s.name, [h.name for h in ro.db.hosts(stage=i)])
                      for i, s in enumerate(ro.pb.stages)]
            with RolloutProgress(stages) as ui:
                ro.opts.progress = ui
                fleet = ro.run()
        if args.pushgateway:
            try:
                ro.metrics.push(args.pushgateway)
            except MetricsError as e:
                print(f"kho-fleet: warning: {e}", file=sys.stderr)
    finally:
        if server is not None:
            server.shutdown()
    row = ro.db.rollout()
    if args.json:
        json.dump(fleet, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _summary(fleet, ro.reports)
    return 0 if row.status == "completed" and not fleet.get("failures") else 1


def _summary(fleet: dict, reports: str) -> None:
    r = fleet["rollout"]
    print(f"rollout {r['id']}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else ""))
    for st in fleet["stages"]:
        print(f"  stage {st['name']}: {st['status']}, {st['succeeded']}/{st['hosts']} hosts ok")
    for f in fleet.get("failures", []):
        print(f"  FAILED {f['host']} ({f['stage']}) in {f['phase']}: {f['reason']}")
    print(f"reports: {os.path.join(reports, 'fleet.html')} (also fleet.md, fleet.json, hosts/)")


def cmd_preflight(args: argparse.Namespace) -> int:
    """Preflight every host of the playbook (a dry run: nothing is staged or kexec'd)."""
    args.dry_run = True
    args.resume = None
    return cmd_rollout(args)


def _open_db(args: argparse.Namespace) -> StateDB:
    from .statedb import StateDB, list_rollouts
    check_dir_option("--rollouts-dir", args.rollouts_dir)
    rid = args.id
    if rid is not None and (not rid or "/" in rid or rid.startswith(".")):
        raise CliError(f"{rid!r} is not a rollout id")
    if rid is None:
        rows = list_rollouts(args.rollouts_dir)
        if not rows:
            raise CliError(f"no rollouts in {args.rollouts_dir}")
        rid = max(rows, key=lambda r: r.created).id
    path = os.path.join(args.rollouts_dir, rid)
    if not os.path.exists(os.path.join(path, "state.db")):
        raise CliError(f"no rollout {rid!r} in {args.rollouts_dir}")
    return StateDB.open(path)


def _temporal() -> Any:
    """The Temporal engine's commands, or one line saying how to install them."""
    try:
        from .temporal import commands
    except ImportError as e:
        raise CliError(f"--engine temporal needs the temporal extra: pip install "
                       f"'kho-fleet[temporal]' ({e})") from None
    return commands


def cmd_status(args: argparse.Namespace) -> int:
    """A rollout's status, stages and hosts (default: the newest rollout)."""
    if args.engine == "temporal":
        return _temporal().status(args, _show_status)
    return _show_status(_open_db(args), args)


def _show_status(db: Any, args: argparse.Namespace, waiting: Optional[dict] = None) -> int:
    """Print a rollout's status from `db` (a StateDB, or a Temporal rollout's Snapshot)."""
    r = db.rollout()
    mode = (r.options or {}).get("mode", "unrecorded")
    data = {"rollout": {"id": r.id, "status": r.status, "reason": r.reason, "mode": mode,
                        "playbook": r.playbook_path, "inventory": r.inventory_path},
            "stages": [{"name": s.name, "status": s.status, "gate": s.gate} for s in db.stages()],
            "hosts": [{"name": h.name, "stage": h.stage_idx, "state": h.state, "error": h.error,
                       "downtime_s": h.downtime_s} for h in db.hosts()],
            "counts": db.counts()}
    if waiting is not None:                      # the temporal engine: hosts without a worker
        data["rollout"]["engine"] = "temporal"
        for h in data["hosts"]:
            h["waiting"] = waiting.get(h["name"])
    if args.json:
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"rollout {r.id}: {r.status}" + (f" ({r.reason})" if r.reason else "")
              + (" [dry run]" if mode == "dry-run" else ""))
        for s in data["stages"]:
            print(f"  stage {s['name']}: {s['status']}")
        for h in data["hosts"]:
            print(f"    {h['name']:<16} {h['state']:<16} {h.get('waiting') or h['error'] or ''}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """(Re)write a rollout's fleet report (JSON, Markdown, HTML) and print where."""
    from .fleetreport import build_fleet_report, write_fleet_report
    if args.engine == "temporal":
        return _temporal().report(args, _summary)
    db = _open_db(args)
    fleet = build_fleet_report(db)
    out = os.path.join(args.reports_dir, db.rollout().id)
    write_fleet_report(out, fleet)
    if args.json:
        json.dump(fleet, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _summary(fleet, out)
    return 0


def cmd_abort(args: argparse.Namespace) -> int:
    """Abort a rollout: no host is kexec'd after this; hosts already past kexec finish."""
    if args.engine == "temporal":
        return _temporal().abort(args)
    db = _open_db(args)
    if db.rollout().final:
        raise CliError(f"rollout {db.rollout().id} is already {db.rollout().status}")
    db.set_status("aborted", args.reason or "aborted by operator")
    db.log("aborted", args.reason or "by operator")
    print(json.dumps({"id": db.rollout().id, "status": "aborted"}) if args.json
          else f"rollout {db.rollout().id}: aborted")
    return 0


def cmd_sim_fleet(args: argparse.Namespace) -> int:
    """Power the inventory's digital-twin hosts on (up), off (down), or show them (status)."""
    from dataclasses import asdict

    from .inventory import load_inventory
    from .rollout import DEFAULT_SIM_DIR
    from .sim.fleet import fleet_down, fleet_up, twin_status
    from .sim.twinkernel import TwinError
    args.sim_dir = args.sim_dir or DEFAULT_SIM_DIR
    check_dir_option("--sim-dir", args.sim_dir)
    inv = load_inventory(args.inventory, check_files=args.sim_command == "up")
    try:
        if args.sim_command == "up":
            out = fleet_up(inv, args.sim_dir)
        elif args.sim_command == "down":
            out = fleet_down(inv, args.sim_dir)
        else:
            out = [twin_status(h, args.sim_dir) for h in inv.hosts.values() if h.transport == "sim"]
    except TwinError as e:
        raise CliError(str(e)) from None
    if args.json:
        json.dump([asdict(s) for s in out], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for s in out:
            print(f"{s.host:<16} {s.state:<8} {s.release or '-':<16} "
                  f"boots {s.boot_count or 0}  {s.root}")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    """The QEMU lab (kho_fleet.labcmd): its failures become one-line CliErrors."""
    from .labcmd import LabCliError, run
    try:
        return run(args)
    except LabCliError as e:
        raise CliError(str(e)) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def cmd_worker(args: argparse.Namespace) -> int:
    """Run host steps for one site of Temporal rollouts (kho-fleet[temporal])."""
    check_dir_option("--work-dir", args.work_dir)
    if not 1 <= args.max_concurrent <= 4096:
        raise CliError(f"--max-concurrent {args.max_concurrent}: 1..4096")
    return _temporal().worker(args)


def _engine_args(p: argparse.ArgumentParser, engine: bool = True) -> None:
    """--engine, --temporal-address, --namespace (the temporal engine's; docs/scale.md)."""
    if engine:
        p.add_argument("--engine", choices=("embedded", "temporal"), default="embedded",
                       help="embedded (SQLite in this process, the default) or temporal")
    p.add_argument("--temporal-address", metavar="HOST:PORT",
                   default=os.environ.get("KHO_FLEET_TEMPORAL_ADDRESS", "127.0.0.1:7233"),
                   help="the Temporal frontend (default $KHO_FLEET_TEMPORAL_ADDRESS or "
                        "127.0.0.1:7233)")
    p.add_argument("--namespace", default="default", metavar="NS",
                   help="the Temporal namespace (default: default)")


def _summary_line(func: Callable[..., object]) -> str:
    """The first line of a command function's docstring (its help text)."""
    return (func.__doc__ or func.__name__).splitlines()[0]


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

    ba = sub.add_parser("build-agent", help=_summary_line(cmd_build_agent))
    ba.add_argument("--out", default="build/kho-agent.pyz", metavar="PATH")
    ba.add_argument("--json", action="store_true")
    ba.set_defaults(func=cmd_build_agent)

    dirs = _Parser(add_help=False)
    dirs.add_argument("--rollouts-dir", default="rollouts", metavar="DIR",
                      help="rollout state (one SQLite file per rollout)")
    dirs.add_argument("--reports-dir", default="reports", metavar="DIR")
    dirs.add_argument("--sim-dir", default=None, metavar="DIR",
                      help="twin hosts' state (default .sim; a resumed rollout keeps its own)")
    dirs.add_argument("--json", action="store_true")

    for name, func in (("rollout", cmd_rollout), ("preflight", cmd_preflight)):
        ro = sub.add_parser(name, parents=[dirs], help=_summary_line(func),
                            description=func.__doc__)
        ro.add_argument("--playbook", metavar="FILE")
        ro.add_argument("--inventory", metavar="FILE")
        if name == "rollout":
            ro.add_argument("--resume", metavar="ID", help="resume a halted or crashed rollout")
            ro.add_argument("--dry-run", action="store_true", help="preflight only")
        ro.add_argument("--metrics-port", type=_port, metavar="PORT",
                        help="serve Prometheus metrics while running")
        ro.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR")
        ro.add_argument("--pushgateway", type=_url, metavar="URL",
                        help="push the metrics here at the end")
        if name == "rollout":
            _engine_args(ro)
            ro.add_argument("--worker-wait", type=_seconds, metavar="SECONDS",
                            help="temporal: fail a host step no worker of its site takes "
                                 "within this time (default 600)")
        ro.set_defaults(func=func)
    for name, func in (("status", cmd_status), ("report", cmd_report), ("abort", cmd_abort)):
        sp = sub.add_parser(name, parents=[dirs], help=_summary_line(func),
                            description=func.__doc__)
        sp.add_argument("id", nargs="?", metavar="ID", help="rollout id (default: the newest)")
        if name == "abort":
            sp.add_argument("--reason", metavar="TEXT")
        _engine_args(sp)
        sp.set_defaults(func=func)

    wk = sub.add_parser("worker", help=_summary_line(cmd_worker),
                        description=cmd_worker.__doc__)
    wk.add_argument("--site", default="default", metavar="NAME",
                    help="run the steps of the hosts whose kho_site is NAME")
    wk.add_argument("--work-dir", default=".kho-worker", metavar="DIR",
                    help="where the worker builds each rollout's artifacts")
    wk.add_argument("--max-concurrent", type=_int, default=64, metavar="N",
                    help="host steps run at once")
    _engine_args(wk, engine=False)
    wk.set_defaults(func=cmd_worker, engine="temporal")

    sim = sub.add_parser("sim", help="the digital-twin fleet").add_subparsers(
        dest="sim_command", required=True, metavar="COMMAND")
    for name in ("up", "down", "status"):
        sf = sim.add_parser(name, parents=[dirs], help=cmd_sim_fleet.__doc__)
        sf.add_argument("--inventory", default="inventory/sim.yaml", metavar="FILE")
        sf.set_defaults(func=cmd_sim_fleet)
    sh = sim.add_parser("handover", help=_summary_line(cmd_sim_handover),
                        description=cmd_sim_handover.__doc__)
    sh.add_argument("--fault", action="append", metavar="NAME[@SESSION/TOKEN:OFFSET]",
                    help=f"inject a fault ({', '.join(ALL_FAULTS)}); page faults may name "
                    "their place, e.g. bitflip@vm-ram/0x1001:0x5000; repeat for several")
    sh.add_argument("--workload-mib", type=_int, default=64, metavar="N")
    sh.add_argument("--boot-timeout", type=_seconds, default=30.0, metavar="SECONDS")
    sh.add_argument("--workdir", metavar="DIR", help="keep the twin host here")
    sh.add_argument("--keep", action="store_true", help="keep the temporary twin host")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_sim_handover)

    from .labcmd import add_lab_parser
    add_lab_parser(sub).set_defaults(func=cmd_lab)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    rc = _main(argv)
    if argv is None and "temporalio.client" in sys.modules:
        # temporalio's Rust threads can abort CPython's finalization (SIGABRT after the work
        # is done: temporalio/sdk-python#300): the program skips the teardown
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(rc)
    return rc


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except Bug as e:
        if os.environ.get("KHO_FLEET_DEBUG"):
            raise
        print(f"kho-fleet: internal error (a bug, please report it): {type(e).__name__}: "
              f"{_one_line(e)} (set KHO_FLEET_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    except KhoFleetError as e:
        print(f"kho-fleet: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kho-fleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if os.environ.get("KHO_FLEET_DEBUG"):
            raise
        print(f"kho-fleet: internal error (a bug, please report it): {type(e).__name__}: "
              f"{_one_line(e)} "
              "(set KHO_FLEET_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
