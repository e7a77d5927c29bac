#!/usr/bin/env python3
"""Blackout of an agent handover vs a raw `systemctl kexec`, on one sid lab guest (issue 11).

One guest (`kho-fleet lab up 1 --suite sid`, Linux 7.2.13 kho-v4, systemd 262.1) with the
test probe service (an 8 MiB memfd in its FD store, FileDescriptorStorePreserve=yes,
ordered after kho-workloads.target like any workload; tests/test_lab_systemd.py), then:
- N raw round trips, no agent (kho-agent-verify.service removed): `kexec -s -l` the other
  kernel, a stamp, `systemctl kexec`; blackout = stamp -> the probe got its memfd back;
- N agent handovers (kexec_method systemd, 20 MiB of workloads), the agent's steps over
  SSH as the controller runs them, the boot unit installed: blackout = the report's
  kexec_exec -> restored (by kho-agent-verify.service); also stamp -> probe back.
All times on the guest's clock; kernel start = now - /proc/uptime. Prints each blackout
split and the ratio agent/raw (target <= 1.10), with the machine's load.

usage: bench/lab_downtime.py [--rounds N] [--cache DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / p) for p in ("agent", "controller", "tests")]

from labsupport import KERNEL_A, KERNEL_B, REPO, kho_fleet_cli  # type: ignore  # noqa: E402
from test_lab_systemd import PROBE, PROBE_PY, PROBE_UNIT, PYZ, WORKLOADS  # type: ignore  # noqa: E402

from kho_fleet.lab.fleet import LabFleet  # noqa: E402

STATE = "/var/lib/kho-agent/state"
VERIFY_UNIT = "/etc/systemd/system/kho-agent-verify.service"


class Guest:
    def __init__(self, fleet: LabFleet) -> None:
        self.fleet = fleet

    def run(self, cmd: str, timeout: float = 300.0, stdin: bytes | None = None,
            check: bool = True) -> tuple[int, str, str]:
        g = self.fleet.guest(self.fleet.record("lab-1"))
        try:
            return g.run(cmd, timeout=timeout, stdin=stdin, check=check)
        finally:
            g.stop()

    def out(self, cmd: str, **kw: Any) -> str:
        return self.run(cmd, **kw)[1]

    def boot_id(self) -> str | None:
        try:
            return self.out("cat /proc/sys/kernel/random/boot_id", timeout=20).strip()
        except Exception:
            return None

    def wait_new_boot(self, old: str, timeout: float = 900.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            b = self.boot_id()
            if b is not None and b != old:
                return
            time.sleep(2)
        raise SystemExit(f"guest did not come back within {timeout:.0f}s")

    def kernel_start(self) -> float:
        now, up = self.out("date +%s.%N; cut -d' ' -f1 /proc/uptime").split()
        return float(now) - float(up)

    def probe(self, timeout: float = 300.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            rc, out, _ = self.run("cat /run/kho-probe.json", check=False)
            if rc == 0 and out.strip():
                return json.loads(out)
            if time.monotonic() > end:
                raise SystemExit("the probe did not start")
            time.sleep(2)

    def agent(self, *args: str, timeout: float = 600.0) -> tuple[int, Any, str]:
        line = " ".join(["python3", PYZ, *args, "--json", "--state-dir", STATE])
        rc, out, err = self.run(line, timeout=timeout, check=False)
        try:
            return rc, json.loads(out) if out.strip() else None, err.strip()
        except ValueError:
            return rc, None, err.strip()


def install(g: Guest, work: Path) -> None:
    from kho_fleet.agentbuild import build_agent
    pyz, _ = build_agent(str(work / "kho-agent.pyz"))
    g.run(f"mkdir -p {STATE}")
    g.run(f"cat > {PYZ}", stdin=Path(pyz).read_bytes())
    g.run("cat > /root/kho-probe.py", stdin=PROBE_PY.encode())
    g.run(f"cat > /etc/systemd/system/{PROBE}", stdin=PROBE_UNIT.encode())
    g.run("cat > /root/spec.json", stdin=json.dumps(WORKLOADS).encode())
    for unit in sorted((REPO / "deploy/systemd").iterdir()):
        g.run(f"cat > /etc/systemd/system/{unit.name}", stdin=unit.read_bytes())
    g.run(f"cp {VERIFY_UNIT} /root/kho-agent-verify.service.saved")
    g.run(f"systemctl daemon-reload && systemctl enable {PROBE} kho-workloads.target "
          f"kho-agent-verify.service && systemctl start {PROBE}")


def boot_kernel(i: int) -> str:
    """The kexec target of round i: lab-b, then back to 7.2.13, alternating."""
    return f"/boot/{(KERNEL_B if i % 2 == 0 else KERNEL_A).name}"


def raw_round(g: Guest, i: int) -> dict:
    old = g.boot_id() or ""
    g.run(f"kexec -s -l {boot_kernel(i)} --reuse-cmdline")
    g.run("nohup sh -c 'sleep 0.5; date +%s.%N > /root/raw-kexec; sync; systemctl kexec' "
          ">/dev/null 2>&1 &")
    g.wait_new_boot(old)
    p = g.probe()
    t0 = float(g.out("cat /root/raw-kexec"))
    k = g.kernel_start()
    assert p["mode"] == "back" and p["sha256"] == p["want"], p
    return {"blackout_s": round(p["t"] - t0, 3), "kexec_to_kernel_s": round(k - t0, 3),
            "kernel_to_probe_s": round(p["t"] - k, 3)}


def agent_round(g: Guest, i: int) -> dict:
    old = g.boot_id() or ""
    k = boot_kernel(i)
    for step in (("preflight", "--kernel", k, "--spec", "/root/spec.json",
                  "--kexec-method", "systemd"),
                 ("stage", "--kernel", k), ("preserve", "--spec", "/root/spec.json"),
                 ("snapshot",), ("kexec", "--yes", "--kexec-method", "systemd")):
        rc, _, err = g.agent(*step)
        if rc != 0:
            raise SystemExit(f"agent {step[0]}: rc {rc}: {err}")
    g.wait_new_boot(old)
    rc, rep, err = g.agent("verify", "--collect")
    if rc == 3:
        rc, rep, err = g.agent("verify")
    if rc != 0 or rep is None:
        raise SystemExit(f"verify: rc {rc}: {err}")
    g.agent("release")
    p = g.probe()
    assert p["mode"] == "back" and p["sha256"] == p["want"], p
    d, st = rep["downtime"], rep["stamps"]
    return {"blackout_s": d["blackout_s"], "kexec_to_kernel_s": d["kexec_to_kernel_s"],
            "kernel_to_agent_s": d["kernel_to_agent_s"],
            "agent_to_restored_s": d["agent_to_restored_s"],
            "systemd_shutdown_s": d.get("systemd_shutdown_s"),
            "probe_back_s": round(p["t"] - st["kexec_exec"], 3),
            "verified_by": (rep.get("boot") or {}).get("verified_by"),
            "result": rep["result"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default=os.environ.get("KHO_LAB_SID_CACHE", ".lab/cache"))
    ap.add_argument("--workdir", default=f"/tmp/kho-lab-downtime-{os.getpid()}")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    guests = work / "guests"
    load0 = os.getloadavg()
    up = kho_fleet_cli("lab", "up", "1", "--suite", "sid", "--kernel", KERNEL_A,
                       "--extra-kernel", KERNEL_B, "--workdir", guests, "--inventory",
                       work / "lab.yaml", "--cache", a.cache, "--boot-timeout", "900",
                       "--json", timeout=1800)
    if up.returncode != 0:
        print(f"lab up: {up.stderr.strip()}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "raw": [], "agent": []}
    try:
        g = Guest(LabFleet(guests))
        install(g, work)
        g.run(f"rm -f {VERIFY_UNIT} && systemctl daemon-reload")    # raw: no agent at all
        for i in range(a.rounds):
            out["raw"].append(raw_round(g, i))
            print(f"raw   {i + 1}: {out['raw'][-1]}", flush=True)
        g.run(f"cp /root/kho-agent-verify.service.saved {VERIFY_UNIT} && "
              "systemctl daemon-reload")
        for i in range(a.rounds):
            out["agent"].append(agent_round(g, a.rounds + i))
            print(f"agent {i + 1}: {out['agent'][-1]}", flush=True)
    finally:
        out["loadavg"] = {"start": load0, "end": os.getloadavg()}
        kho_fleet_cli("lab", "down", "--workdir", guests, "--json", timeout=300)
    raw = statistics.mean(r["blackout_s"] for r in out["raw"])
    agent = statistics.mean(r["blackout_s"] for r in out["agent"])
    probe = statistics.mean(r["probe_back_s"] for r in out["agent"])
    out["ratio_agent_raw"] = round(agent / raw, 3)
    out["ratio_probe_back"] = round(probe / raw, 3)
    print(json.dumps(out, indent=1))
    print(f"mean blackout: raw {raw:.2f}s, agent {agent:.2f}s (kexec -> restored by the boot "
          f"unit) -> ratio {agent / raw:.2f} (target <= 1.10); probe back after an agent "
          f"handover {probe:.2f}s -> {probe / raw:.2f}; load {load0[0]:.1f} -> "
          f"{out['loadavg']['end'][0]:.1f}")
    (work / "lab_downtime.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
