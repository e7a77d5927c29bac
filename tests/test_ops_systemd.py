"""deploy/systemd: `systemd-analyze verify` on the units in a temporary root (stand-in
/usr/bin/python3, this machine's own unit directory), deliberately broken copies that must
fail, the ordering the handover needs, and the kho-agent command lines against the real CLI.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from kho_agent.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
UNITS_DIR = REPO / "deploy" / "systemd"
UNITS = ("kho-agent-verify.service", "kho-workloads.target", "kho-agent-report.path",
         "kho-agent-report.service", "kho-agent-holder.service")
SYSTEM_UNITS = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                     if (p / "local-fs.target").exists()), None)
ANALYZE = shutil.which("systemd-analyze")


def read_unit(name: str, text: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]} (keys may repeat, as systemd allows)."""
    out: dict[str, list[tuple[str, str]]] = {}
    section = None
    for raw in (text if text is not None else (UNITS_DIR / name).read_text()).splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, [])
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"{name}: bad line {raw!r}"
        out[section].append((key.strip(), value.strip()))
    return out


def values(unit: dict, section: str, key: str) -> list[str]:
    """Every value of `key` in `section`, space-separated lists split."""
    return [w for k, v in unit.get(section, []) if k == key for w in v.split()]


def exec_start(unit: dict) -> list[str]:
    (cmd,) = [v for k, v in unit["Service"] if k == "ExecStart"]
    return shlex.split(cmd)


def _skip_reason() -> str | None:
    if ANALYZE is None:
        return "systemd-analyze not installed (Debian package systemd)"
    if SYSTEM_UNITS is None:
        return "no systemd unit directory (/usr/lib/systemd/system) to verify against"
    return None


needs_analyze = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """A root for `systemd-analyze verify --root`: the units, the host's unit directory,
    and a stand-in /usr/bin/python3 (the units' only executable)."""
    r = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, r / "usr/lib/systemd/system", symlinks=True)
    (r / "etc/systemd/system").mkdir(parents=True)
    for u in UNITS:
        shutil.copyfile(UNITS_DIR / u, r / "etc/systemd/system" / u)
    py = r / "usr/bin/python3"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\nexit 0\n")
    py.chmod(0o755)
    return r


def verify(root: Path, *units: str) -> tuple[int, str]:
    """rc and diagnostics of `systemd-analyze verify` (warnings count as diagnostics)."""
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    r = subprocess.run([ANALYZE, "verify", "--man=no", f"--root={root}", *units],
                       capture_output=True, text=True, timeout=60, env=env)
    return r.returncode, (r.stdout + r.stderr).strip()


def _local_systemd() -> int:
    """This machine's systemd major version (0 if unknown)."""
    try:
        r = subprocess.run([ANALYZE or "systemd-analyze", "--version"], capture_output=True,
                           text=True, timeout=30)
        return int(r.stdout.split()[1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 0


@needs_analyze
def test_units_verify_clean(root: Path) -> None:
    rc, out = verify(root, *UNITS)
    if _local_systemd() < 254:
        # FileDescriptorStorePreserve= (kho-agent-holder.service) is systemd >= 254; the
        # hosts that use the unit run >= 262. An older systemd-analyze warns about that key
        # only: anything else is still a finding.
        out = "\n".join(ln for ln in out.splitlines()
                        if "Unknown key 'FileDescriptorStorePreserve'" not in ln)
    assert rc == 0 and out == "", out


def test_holder_unit_is_the_one_the_agent_installs() -> None:
    """deploy/systemd/kho-agent-holder.service and what the agent writes where none is
    installed (systemdhost.holder_unit_text) have the same settings."""
    from kho_agent.systemdhost import HOLDER_FDSTORE_MAX, holder_unit_text
    deployed = read_unit("kho-agent-holder.service")
    assert deployed == read_unit("kho-agent-holder.service", holder_unit_text())
    assert values(deployed, "Service", "Type") == ["notify"]
    assert values(deployed, "Service", "FileDescriptorStorePreserve") == ["yes"]
    assert values(deployed, "Service", "FileDescriptorStoreMax") == [str(HOLDER_FDSTORE_MAX)]
    assert "shutdown.target" in values(deployed, "Unit", "Conflicts")   # stopped at kexec
    args = build_parser().parse_args(exec_start(deployed)[2:])
    assert args.command == "holder" and args.state_dir == "/var/lib/kho-agent/state"


@needs_analyze
@pytest.mark.parametrize("unit,old,new,expect", [
    ("kho-agent-verify.service", "Before=", "Bfore=", "Unknown key"),
    ("kho-agent-verify.service", "Type=oneshot", "Type=one-shot", "service type"),
    ("kho-agent-verify.service", "/usr/bin/python3", "/usr/bin/python9", "not executable"),
    ("kho-agent-verify.service", "Wants=sys-kernel-debug.mount", "Requires=kho-nope.mount",
     "not found"),
    ("kho-agent-report.path", "PathChanged=/var/lib", "PathChanged=var/lib", "not absolute"),
    ("kho-agent-report.service", "[Service]", "[Servce]", "Unknown section"),
])
def test_broken_units_fail(root: Path, unit: str, old: str, new: str, expect: str) -> None:
    f = root / "etc/systemd/system" / unit
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new, 1))
    rc, out = verify(root, unit)
    assert rc != 0 or out, f"systemd-analyze accepted a broken {unit}"
    assert expect in out, out


@needs_analyze
def test_a_missing_interpreter_fails(root: Path) -> None:
    (root / "usr/bin/python3").unlink()
    rc, out = verify(root, "kho-agent-verify.service")
    assert rc != 0 and "/usr/bin/python3" in out, out


def test_verify_runs_early_after_a_handover_and_before_workloads() -> None:
    u = read_unit("kho-agent-verify.service")
    assert values(u, "Service", "Type") == ["oneshot"]
    assert values(u, "Service", "RemainAfterExit") == ["yes"]
    assert values(u, "Service", "KillMode") == ["process"]      # the holder keeps the memfds
    assert "kho-workloads.target" in values(u, "Unit", "Before")
    # early: no wait for local-fs.target, only the mounts it needs (bootrestore.py)
    assert {"systemd-remount-fs.service", "sys-kernel-debug.mount"} <= set(values(u, "Unit",
                                                                                  "After"))
    assert "local-fs.target" not in values(u, "Unit", "After")
    assert values(u, "Unit", "RequiresMountsFor") == ["/var/lib/kho-agent"]
    assert "/sys/kernel/debug/kho/in/fdt" in values(u, "Unit", "ConditionPathExists")
    assert values(u, "Unit", "DefaultDependencies") == ["no"]
    assert "shutdown.target" in values(u, "Unit", "Conflicts")
    assert values(u, "Install", "WantedBy") == ["kho-workloads.target"]
    argv = exec_start(u)
    assert argv[:3] == ["/usr/bin/python3", "/var/lib/kho-agent/kho-agent.pyz", "verify"]
    t = read_unit("kho-workloads.target")
    assert "kho-agent-verify.service" in values(t, "Unit", "After")
    assert "kho-agent-verify.service" in values(t, "Unit", "Wants")
    assert values(t, "Install", "WantedBy") == ["multi-user.target"]


def test_report_refreshes_the_node_exporter_textfile() -> None:
    p = read_unit("kho-agent-report.path")
    (watched,) = values(p, "Path", "PathChanged")
    assert values(p, "Path", "Unit") == ["kho-agent-report.service"]
    s = read_unit("kho-agent-report.service")
    argv = exec_start(s)
    assert argv[:3] == ["/usr/bin/python3", "/var/lib/kho-agent/kho-agent.pyz", "report"]
    args = build_parser().parse_args(argv[2:])
    assert args.textfile_dir == "/var/lib/prometheus/node-exporter"
    # the path unit watches the verify result in the state dir the report reads
    assert watched == os.path.join(args.state_dir, "verify.json")
    assert watched in values(s, "Unit", "ConditionPathExists")


def test_kho_agent_command_lines_parse_with_the_real_cli() -> None:
    verify_args = build_parser().parse_args(exec_start(read_unit("kho-agent-verify.service"))[2:])
    report_args = build_parser().parse_args(exec_start(read_unit("kho-agent-report.service"))[2:])
    assert verify_args.command == "verify" and report_args.command == "report"
    # the same state directory as the controller's steps (inventory kho_agent_dir + /state)
    assert verify_args.state_dir == report_args.state_dir == "/var/lib/kho-agent/state"


def _boot_dropin() -> tuple[list[str], str]:
    """The argv and drop-in text `stage` writes for the boot unit (holderstart.point_boot_unit)
    on a host whose agent runs from /var/lib/kho-agent/store/X/kho-agent.pyz's copy."""
    from kho_agent.systemdhost import VERIFY_UNIT, holder_dropin_text
    copy = "/var/lib/kho-agent/store/ab/kho-agent.pyz.d/0123456789abcdef"
    argv = ["/usr/bin/python3", "-S", "-m", "kho_agent", "verify", "--at-boot", "--json",
            "--compact", "--state-dir", "/var/lib/kho-agent/state"]
    return argv, holder_dropin_text(argv, {"PYTHONPATH": copy, "KHO_FLEET_DEBUG": "a b%c"},
                                    VERIFY_UNIT)


@needs_analyze
def test_the_boot_unit_drop_in_verifies_clean(root: Path) -> None:
    """The drop-in that points kho-agent-verify.service at the staging agent's byte-compiled
    copy is valid systemd with the deployed unit, and replaces its command line."""
    argv, text = _boot_dropin()
    d = root / "etc/systemd/system/kho-agent-verify.service.d"
    d.mkdir()
    (d / "50-kho-agent-paths.conf").write_text(text)
    rc, out = verify(root, "kho-agent-verify.service")
    assert rc == 0 and out == "", out
    u = read_unit("x", text)
    assert [v for k, v in u["Service"] if k == "ExecStart"][0] == ""      # reset first
    (cmd,) = [v for k, v in u["Service"] if k == "ExecStart"][1:]
    assert shlex.split(cmd) == argv
    args = build_parser().parse_args(argv[4:])
    assert args.command == "verify" and args.at_boot
    assert args.state_dir == "/var/lib/kho-agent/state"
    assert 'Environment="KHO_FLEET_DEBUG=a b%%c"' in text          # % is a specifier


def test_point_unit_leaves_hosts_without_the_unit_alone(tmp_path: Path) -> None:
    from kho_agent.systemdhost import VERIFY_UNIT, linux_point_unit
    line = linux_point_unit(VERIFY_UNIT, ["/usr/bin/python3"], {}, unit_dirs=[str(tmp_path)])
    assert line == f"{VERIFY_UNIT} is not installed: nothing to point"


def test_both_boot_time_units_run_with_a_larger_share() -> None:
    """The blackout waits for the verify and the holder early in a boot: both get more CPU
    and I/O weight and a higher priority than the services starting beside them."""
    for name in ("kho-agent-verify.service", "kho-agent-holder.service"):
        u = read_unit(name)
        assert values(u, "Service", "CPUWeight") == ["1000"], name
        assert values(u, "Service", "IOWeight") == ["1000"], name
        assert values(u, "Service", "Nice") == ["-10"], name
