"""Bad input to `kho-agent` is one line on stderr and exit 2 -- and changes nothing on disk.

Every case runs the real CLI (`python -m kho_agent`) in a subprocess against a scratch
directory, with $KHO_AGENT_TWIN unset unless the case sets it. Before and after, the
whole scratch tree (every path, every file's bytes) is snapshotted: a refused command
must not create, truncate or rewrite anything. Cases are grouped by the class of input:
state files, workload specs, CLI options, twin dirs, user-named paths.

Also here: the --twin regression of issue 9 -- with only `--twin ROOT` (no environment
variable), `preserve` must start a holder that acts on that twin, never on this
machine's /dev/liveupdate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from diskstate import snapshot
from twinsupport import running_twin

from kho_agent.holder import HolderClient
from kho_agent.kernel import LiveUpdateError

GOOD_SPEC = {"sessions": [{"name": "vm", "memfds": [{"token": 4097, "size": "1MiB", "seed": 1}]}]}
GOOD_STATE = {"handover_id": "0123456789ab", "phase": "stage",
              "history": [{"phase": "preflight", "t": 1.5}, {"phase": "stage", "t": 2.5}],
              "failure": None, "aborted": False,
              "staged": {"kernel": "/boot/vmlinuz", "sha256": "ab" * 32, "initrd": None,
                         "cmdline": "ro", "target": {"release": "x"}, "running": None,
                         "kexec_loaded": True},
              "preflight": {"ok": True, "checks": [{"name": "kho", "ok": True, "detail": "on",
                                                    "blocking": True}]}}


@dataclass
class Case:
    """One bad input: files to lay out under the scratch dir, argv (`{d}` = scratch dir),
    and what the one stderr line must mention."""

    id: str
    argv: list[str]
    names: list[str]
    files: dict[str, bytes] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def state(obj: object) -> dict[str, bytes]:
    return {"sd/state.json": json.dumps(obj).encode()}


def with_state(**fields: object) -> dict[str, bytes]:
    return state({**GOOD_STATE, **fields})


def spec(obj: object) -> dict[str, bytes]:
    return {"spec.json": json.dumps(obj).encode()}


def memfd(**fields: object) -> dict[str, bytes]:
    return spec({"sessions": [{"name": "vm", "memfds": [{"token": 1, "size": 4096, **fields}]}]})


SD = ["--state-dir", "{d}/sd"]
# Commands that would act on a host (preserve, preflight, stage) get a --twin that is no
# twin: the check under test comes first, and if it ever did not, the command stops at the
# twin check instead of touching this machine (the tests run as root on a real kernel).
NOWHERE = ["--twin", "{d}/nohost"]
PRESERVE = ["preserve", "--spec", "{d}/spec.json", *NOWHERE]

STATE_FILE_CASES = [
    Case("state-truncated", ["status", *SD], ["state.json", "not valid JSON"],
         {"sd/state.json": json.dumps(GOOD_STATE).encode()[:40]}),
    Case("state-empty-file", ["status", *SD], ["state.json", "not valid JSON"],
         {"sd/state.json": b""}),
    Case("state-is-a-list", ["status", *SD], ["state.json", "expected a JSON object"],
         state([GOOD_STATE])),
    Case("state-failure-int", ["report", *SD], ["state.json", "failure"], with_state(failure=5)),
    Case("state-failure-reason-int", ["status", *SD], ["state.json", "failure.reason"],
         with_state(failure={"phase": "stage", "reason": 7})),
    Case("state-aborted-string", ["status", *SD], ["state.json", "aborted"],
         with_state(aborted="yes")),
    Case("state-unknown-phase", ["status", *SD], ["state.json", "phase"],
         with_state(phase="exploded")),
    Case("state-handover-id-int", ["status", *SD], ["state.json", "handover_id"],
         with_state(handover_id=7)),
    Case("state-history-dict", ["report", *SD], ["state.json", "history"],
         with_state(history={"phase": "stage"})),
    Case("state-history-t-string", ["report", *SD], ["state.json", "history[1].t"],
         with_state(history=[{"phase": "preflight", "t": 1.0}, {"phase": "stage", "t": "x"}])),
    Case("state-staged-list", ["report", *SD], ["state.json", "staged"], with_state(staged=[])),
    Case("state-staged-target-str", ["report", *SD], ["state.json", "staged.target"],
         with_state(staged={"target": "7.2"})),
    Case("state-preflight-check-ok-str", ["report", *SD], ["state.json", "preflight.checks[0]"],
         with_state(preflight={"checks": [{"name": "kho", "ok": "yes", "detail": ""}]})),
    Case("state-not-utf8", ["status", *SD], ["state.json", "UTF-8"],
         {"sd/state.json": b'{"phase": "\xff\xfe"}'}),
    Case("state-is-a-directory", ["status", *SD], ["state.json"], dirs=["sd/state.json"]),
    Case("state-deeply-nested", ["status", *SD], ["state.json"],
         {"sd/state.json": b"[" * 100000 + b"]" * 100000}),
    Case("state-bad-for-kexec", ["kexec", *SD], ["state.json", "aborted"],
         with_state(aborted=1)),
    Case("verify-json-corrupt", ["report", *SD], ["verify.json", "not valid JSON"],
         {**state(GOOD_STATE), "sd/verify.json": b'{"journal": '}),
]

SPEC_FILE_CASES = [
    Case("spec-binary", PRESERVE, ["spec.json", "UTF-8"],
         {"spec.json": bytes(range(256)) * 4}),
    Case("spec-latin1", PRESERVE, ["spec.json", "UTF-8"],
         {"spec.json": '{"sessions": [{"name": "caf\u00e9"}]}'.encode("latin-1")}),
    Case("spec-nul-byte", PRESERVE, ["spec.json", "NUL"],
         {"spec.json": b'{"sessions": []}\x00'}),
    Case("spec-truncated", PRESERVE, ["spec.json"],
         {"spec.json": json.dumps(GOOD_SPEC).encode()[:25]}),
    Case("spec-is-a-list", PRESERVE, ["spec.json", "sessions"], spec([GOOD_SPEC])),
    Case("spec-deeply-nested", PRESERVE, ["spec.json", "nested"],
         {"spec.json": b"[" * 100000 + b"]" * 100000}),
    Case("spec-memfds-int", PRESERVE, ["spec.json", "sessions[0].memfds"],
         spec({"sessions": [{"name": "vm", "memfds": 5}]})),
    Case("spec-size-words", PRESERVE, ["spec.json", "memfds[0].size"], memfd(size="lots")),
    Case("spec-size-float", PRESERVE, ["spec.json", "memfds[0].size"], memfd(size=1.5)),
    Case("spec-size-bool", PRESERVE, ["spec.json", "memfds[0].size"], memfd(size=True)),
    Case("spec-adopt-string", PRESERVE, ["spec.json", "memfds[0].adopt"], memfd(adopt="no")),
    Case("spec-token-null", PRESERVE, ["spec.json", "memfds[0].token"], memfd(token=None)),
    Case("spec-seed-string", PRESERVE, ["spec.json", "memfds[0].seed"], memfd(seed="1")),
    Case("spec-name-newline", PRESERVE, ["spec.json", "sessions[0].name"],
         spec({"sessions": [{"name": "a\nb", "memfds": []}]})),
    Case("spec-name-surrogate", PRESERVE, ["spec.json", "sessions[0].name"],
         {"spec.json": b'{"sessions": [{"name": "\\ud800", "memfds": []}]}'}),
    Case("spec-for-preflight", ["preflight", "--spec", "{d}/spec.json", *NOWHERE],
         ["spec.json", "memfds[0].size"], memfd(size=-1)),
]

CLI_OPTION_CASES = [
    Case("cli-no-command", [], ["COMMAND"]),
    Case("cli-unknown-command", ["explode"], ["explode"]),
    Case("cli-unknown-option", ["status", "--bogus", *SD], ["--bogus"]),
    Case("cli-token-not-int", ["release", "--token", "abc", *SD], ["--token", "abc"]),
    Case("cli-token-negative", ["release", "--token", "-1", *SD], ["--token"]),
    Case("cli-page-size-zero", ["inspect", "--memory", "{d}/mem", "--page-size", "0"],
         ["--page-size"], {"mem": b"\0" * 8192}),
    Case("cli-stage-needs-kernel", ["stage", *NOWHERE], ["--kernel"]),
    Case("cli-sha256-not-hex", ["stage", "--kernel", "{d}/vmlinuz", "--sha256", "xyz", *NOWHERE],
         ["--sha256"], {"vmlinuz": b"MZ" + b"\0" * 1024}),
    Case("cli-preserve-needs-spec", ["preserve", *NOWHERE], ["--spec"]),
]

TWIN_DIR_CASES = [
    Case("twin-empty-dir", ["status", "--twin", "{d}/host"], ["{d}/host", "not a twin host root"],
         dirs=["host"]),
    Case("twin-agent-dir-but-no-twin", ["status", "--twin", "{d}/host"], ["not a twin host root"],
         dirs=["host/var/lib/kho-agent"]),
    Case("twin-missing", ["snapshot", "--twin", "{d}/nohost"], ["{d}/nohost"]),
    Case("twin-is-a-file", ["status", "--twin", "{d}/host"], ["{d}/host", "not a directory"],
         {"host": b"x"}),
    Case("twin-empty-string", ["status", "--twin", ""], ["--twin"]),
    Case("twin-env-only", ["status"], ["KHO_AGENT_TWIN", "{d}/host"], dirs=["host"],
         env={"KHO_AGENT_TWIN": "{d}/host"}),
    Case("twin-not-a-twin-preserve", ["preserve", "--spec", "{d}/spec.json", "--twin", "{d}/host"],
         ["not a twin host root"], spec(GOOD_SPEC), dirs=["host"]),
    Case("twin-not-a-twin-inspect", ["inspect", "--twin", "{d}/host"], ["not a twin host root"],
         dirs=["host"]),
]

PATH_CASES = [
    Case("path-state-dir-is-file", ["status", "--state-dir", "{d}/f"], ["--state-dir", "{d}/f"],
         {"f": b"x"}),
    Case("path-state-dir-is-file-report", ["report", "--state-dir", "{d}/f"], ["{d}/f"],
         {"f": b"x"}),
    Case("path-spec-missing", ["preserve", "--spec", "{d}/nope.json", *NOWHERE],
         ["--spec", "{d}/nope.json"]),
    Case("path-spec-is-dir", ["preserve", "--spec", "{d}/specdir", *NOWHERE], ["{d}/specdir"],
         dirs=["specdir"]),
    Case("path-fdt-is-dir", ["inspect", "--memory", "{d}/mem", "--fdt", "{d}/fdtdir"],
         ["--fdt", "{d}/fdtdir"], {"mem": b"\0" * 8192}, ["fdtdir"]),
    Case("path-fdt-missing", ["inspect", "--memory", "{d}/mem", "--fdt", "{d}/nofdt"],
         ["{d}/nofdt"], {"mem": b"\0" * 8192}),
    Case("path-memory-missing", ["inspect", "--memory", "{d}/nomem"], ["{d}/nomem"]),
    Case("path-memory-empty", ["inspect", "--memory", "{d}/mem"], ["{d}/mem", "empty"],
         {"mem": b""}),
    Case("path-kernel-missing", ["stage", "--kernel", "{d}/novmlinuz", *NOWHERE],
         ["--kernel", "{d}/novmlinuz"]),
    Case("path-kernel-is-dir", ["preflight", "--kernel", "{d}/kdir", *NOWHERE],
         ["--kernel", "{d}/kdir"],
         dirs=["kdir"]),
    Case("path-initrd-missing", ["stage", "--kernel", "{d}/vmlinuz", "--initrd", "{d}/noinitrd",
                                 *NOWHERE], ["--initrd", "{d}/noinitrd"], {"vmlinuz": b"MZ"}),
    Case("path-textfile-dir-is-file", ["report", *SD, "--textfile-dir", "{d}/f"],
         ["--textfile-dir", "{d}/f"], {"f": b"x"}),
]

GROUPS = {"state file": STATE_FILE_CASES, "spec file": SPEC_FILE_CASES,
          "cli option": CLI_OPTION_CASES, "twin dir": TWIN_DIR_CASES, "path": PATH_CASES}
ALL = [pytest.param(c, id=f"{group}:{c.id}") for group, cases in GROUPS.items() for c in cases]


def agent_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KHO_AGENT_TWIN", "KHO_FLEET_DEBUG")}
    return {**env, **(extra or {})}


def run_agent(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kho_agent", *argv], capture_output=True,
                          text=True, env=env, cwd=cwd, stdin=subprocess.DEVNULL, timeout=60)


def assert_one_line_input_error(proc: subprocess.CompletedProcess[str], names: list[str]) -> None:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err, proc.stdout)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("kho-agent: "), err
    for n in names:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kho-badin-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_there_are_enough_cases() -> None:
    assert len(ALL) >= 25
    assert all(len(cases) >= 5 for cases in GROUPS.values())


@pytest.mark.parametrize("case", ALL)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, scratch: Path) -> None:
    def sub(s: str) -> str:
        return s.replace("{d}", str(scratch))
    (scratch / "sd").mkdir()
    for d in case.dirs:
        (scratch / d).mkdir(parents=True, exist_ok=True)
    for rel, data in case.files.items():
        (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
        (scratch / rel).write_bytes(data)
    before = snapshot(scratch)
    proc = run_agent([sub(a) for a in case.argv],
                     agent_env({k: sub(v) for k, v in case.env.items()}), scratch)
    assert_one_line_input_error(proc, [sub(n) for n in case.names])
    assert snapshot(scratch) == before, "a refused command changed the disk"


def test_good_state_and_spec_pass_the_same_checks(scratch: Path) -> None:
    """The fixtures the bad cases mutate are themselves accepted (so each case tests one
    thing): status reads GOOD_STATE, and a bad spec field is the only thing wrong."""
    sd = scratch / "sd"
    sd.mkdir()
    (sd / "state.json").write_text(json.dumps(GOOD_STATE))
    proc = run_agent(["status", "--json", "--state-dir", str(sd)], agent_env(), scratch)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["handover_id"] == GOOD_STATE["handover_id"]
    from kho_agent.workload import load_spec
    (scratch / "spec.json").write_text(json.dumps(GOOD_SPEC))
    assert load_spec(str(scratch / "spec.json")).total_bytes == 1 << 20


def test_status_does_not_create_its_state_dir(scratch: Path) -> None:
    proc = run_agent(["status", "--state-dir", str(scratch / "new" / "sd")], agent_env(), scratch)
    assert proc.returncode == 0, proc.stderr
    assert not (scratch / "new").exists()


def test_internal_error_is_one_line_and_debug_shows_the_traceback(scratch: Path) -> None:
    """A bug (here: a subcommand raising RuntimeError) is an internal error: one line,
    exit 1; KHO_FLEET_DEBUG=1 re-raises it for the traceback."""
    code = ("import sys, kho_agent.cli as c\n"
            "def boom(args):\n"
            "    'Status, broken on purpose.'\n"
            "    raise RuntimeError('boom\\nsecond line')\n"
            "c.cmd_status = boom\n"
            "sys.exit(c.main(['status', '--state-dir', sys.argv[1]]))\n")
    argv = [sys.executable, "-c", code, str(scratch)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=agent_env(), timeout=60)
    assert proc.returncode == 70
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "RuntimeError: boom second line" in lines[0]
    assert "KHO_FLEET_DEBUG=1" in lines[0] and "Traceback" not in proc.stderr
    proc = subprocess.run(argv, capture_output=True, text=True,
                          env=agent_env({"KHO_FLEET_DEBUG": "1"}), timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError" in proc.stderr


# --- issue 9: the twin setting reaches every child process ---------------------------------


@pytest.fixture
def twin_host() -> Iterator[str]:
    """A running twin host's root (128 MiB RAM, short boot delay); stopped after."""
    with running_twin() as root:
        yield root


def _holder_pid(state_dir: str) -> int:
    with HolderClient(state_dir, timeout=10) as h:
        return int(h.call("ping")[0]["pid"])


def test_twin_flag_alone_reaches_the_holder(twin_host: str, tmp_path: Path) -> None:
    """`preserve --twin ROOT` with $KHO_AGENT_TWIN unset: the holder it spawns must open the
    twin's /dev/liveupdate (before issue 9 it opened this machine's)."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(GOOD_SPEC))
    state_dir = os.path.join(twin_host, "var/lib/kho-agent")
    env = agent_env()
    assert "KHO_AGENT_TWIN" not in env
    proc = run_agent(["preserve", "--json", "--spec", str(spec_path), "--twin", twin_host],
                     env, tmp_path)
    try:
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert [(w["session"], w["token"]) for w in out["workloads"]] == [("vm", 4097)]
        # the twin's /dev/liveupdate is held (exclusive open): by the holder, on the twin
        from kho_agent.kernel.twin import TwinKernel
        with pytest.raises(LiveUpdateError) as busy:
            TwinKernel(twin_host).open_liveupdate()
        assert busy.value.errno == 16
        # the holder's own environment carries the twin setting, and its PFNs are the twin's
        pid = _holder_pid(state_dir)
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert environ.get(b"KHO_AGENT_TWIN") == twin_host.encode()
        holder_log = Path(state_dir, "holder.log").read_text()
        assert f"serving {state_dir}" in holder_log and "cannot open" not in holder_log
        # and a later step with the flag alone finds the same holder and the same twin
        snap = run_agent(["snapshot", "--json", "--twin", twin_host], env, tmp_path)
        assert snap.returncode == 0, snap.stderr
    finally:
        try:
            with HolderClient(state_dir, timeout=10) as h:
                h.call("shutdown")
        except Exception:
            pass


def test_kernel_child_env_is_the_one_twin_setting(twin_host: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """get_kernel resolves --twin over $KHO_AGENT_TWIN once; child_env hands it on, and a
    Linux kernel hands on none (a stray variable is dropped, not inherited)."""
    from kho_agent.kernel import get_kernel
    from kho_agent.kernel.linux import LinuxKernel
    monkeypatch.delenv("KHO_AGENT_TWIN", raising=False)
    k = get_kernel(twin_host)
    assert k.kind == "twin" and k.child_env()["KHO_AGENT_TWIN"] == twin_host
    assert k.child_env({"PATH": "/bin"}) == {"PATH": "/bin", "KHO_AGENT_TWIN": twin_host}
    monkeypatch.setenv("KHO_AGENT_TWIN", twin_host)
    assert get_kernel().kind == "twin"
    assert "KHO_AGENT_TWIN" not in LinuxKernel().child_env()


AGENT_SRC = Path(__file__).resolve().parent.parent / "agent" / "kho_agent"
# Spawns that are not agent processes and do not act on a host (a decompressor).
# Spawns that are not the agent's own processes: decompressors (kimage) and the real host's
# systemctl / systemd-analyze queries, which only the Linux backend calls (the twin answers
# those itself) and which never read the twin setting.
NOT_HOST_SPAWNS = {"kimage.py", "systemdhost.py"}


def test_no_spawn_site_names_the_twin_setting_by_hand() -> None:
    """Only the kernel seam reads or writes $KHO_AGENT_TWIN, and every process the agent
    starts gets its environment from Kernel.child_env()."""
    import ast
    for path in sorted(AGENT_SRC.rglob("*.py")):
        rel = path.relative_to(AGENT_SRC).as_posix()
        text = path.read_text()
        if not rel.startswith("kernel/"):
            assert "TWIN_ENV" not in text and '"KHO_AGENT_TWIN"' not in text, rel
        if rel in NOT_HOST_SPAWNS:
            continue
        for func in ast.walk(ast.parse(text)):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in ("Popen", "run", "call", "check_call",
                                               "check_output") \
                        and isinstance(node.func.value, ast.Name) \
                        and node.func.value.id == "subprocess":
                    env = [k.value for k in node.keywords if k.arg == "env"]
                    # env=<kernel>.child_env(), or a name the same function set from it
                    assert env and "child_env(" in (ast.unparse(env[0]) + ast.unparse(func)), \
                        f"{rel}:{node.lineno}: spawn without env=<kernel>.child_env()"


def test_each_command_parses_alone_as_in_the_full_parser(tmp_path: Path) -> None:
    """main() builds only the named command's parser (cli.COMMANDS): the same commands, the
    same options, the same one-line errors as the full parser."""
    from kho_agent.cli import COMMANDS, build_parser
    full = build_parser()
    sub = next(a for a in full._actions if a.dest == "command")
    assert tuple(sub.choices) == COMMANDS                          # type: ignore[attr-defined]
    for name in COMMANDS:
        one = build_parser(name)
        (only,) = [a for a in one._actions if a.dest == "command"]
        assert list(only.choices) == [name]                        # type: ignore[attr-defined]
        opts = sorted(o for a in sub.choices[name]._actions       # type: ignore[attr-defined]
                      for o in a.option_strings)
        assert opts == sorted(o for a in only.choices[name]._actions  # type: ignore[attr-defined]
                              for o in a.option_strings), name
    for argv, name in ((["verify", "--bogus"], "--bogus"), (["bogus"], "'bogus'")):
        assert_one_line_input_error(run_agent(argv, agent_env(), tmp_path), [name])
