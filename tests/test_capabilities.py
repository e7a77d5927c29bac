"""Preflight tells the truth about the host (issue 12): KHO debugfs, /dev/mem RAM,
/proc/kcore, lockdown, signed-kexec enforcement -- and the report says what was not
checked for want of one, instead of failing or pretending.

Real code against real files: the twin host's root (lockdown written where securityfs
has it), the real Linux backend of this container (no /dev/mem, no /proc/kcore here, or
pointed at files that refuse), real kernel images.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from kho_agent.capabilities import (
    SNAPSHOT_SKIPPED,
    Capabilities,
    kexec_sig_policy,
    parse_kconfig,
    parse_selected,
    pe_signature_size,
)
from kho_agent.kernel.linux import LinuxKernel
from kho_agent.preflight import preflight
from kho_agent.report import HandoverReport
from kho_agent.snapshot import take_snapshot
from kho_fleet.sim.handover import SimResult, drive_handover, run_agent, workload_spec
from kho_fleet.sim.kernelimage import make_kernel_image
from kho_fleet.sim.twinkernel import start_twin

SHARED = Path(__file__).resolve().parents[2] / "shared/lab"
PROD = Path("/work/src/kernels/bzImage-7.3.4-prod")


# --- pure ---------------------------------------------------------------------------------

def test_parse_selected_and_kconfig() -> None:
    assert parse_selected("none [integrity] confidentiality\n") == "integrity"
    assert parse_selected("[none] integrity confidentiality") == "none"
    assert parse_selected("none integrity") is None
    cfg = parse_kconfig("CONFIG_KEXEC_SIG=y\n# CONFIG_KEXEC_SIG_FORCE is not set\n"
                        'CONFIG_LOCALVERSION="-prod"\nnoise\n')
    assert cfg == {"CONFIG_KEXEC_SIG": "y", "CONFIG_KEXEC_SIG_FORCE": "n",
                   "CONFIG_LOCALVERSION": "-prod"}


@pytest.mark.parametrize("config,lockdown,want,why", [
    ({"CONFIG_KEXEC_SIG": "n"}, "integrity", False, "CONFIG_KEXEC_SIG is not set"),
    ({"CONFIG_KEXEC_SIG": "y", "CONFIG_KEXEC_SIG_FORCE": "y"}, None, True, "FORCE=y"),
    ({"CONFIG_KEXEC_SIG": "y"}, "integrity", True, "lockdown is 'integrity'"),
    ({"CONFIG_KEXEC_SIG": "y"}, "confidentiality", True, "LOCKDOWN_KEXEC"),
    ({"CONFIG_KEXEC_SIG": "y"}, "none", False, "FORCE is not set"),
    ({"CONFIG_KEXEC_SIG": "y", "CONFIG_IMA_ARCH_POLICY": "y"}, "none", None, "Secure Boot"),
    (None, "integrity", True, "lockdown"),
    (None, None, None, "no kernel config readable"),
    (None, "none", None, "no kernel config readable"),
])
def test_kexec_sig_policy(config, lockdown, want, why) -> None:
    got, reason = kexec_sig_policy(config, lockdown)
    assert got is want and why in reason, (got, reason)


def test_pe_signature_size_of_real_images() -> None:
    images = [p for p in (PROD, SHARED / "bzImage-7.2.13-kho", SHARED / "arm64/Image-7.2.13-kho")
              if p.is_file()]
    if not images:
        pytest.skip("no lab kernel images here")
    for p in images:
        head = p.read_bytes()[:4096]
        assert pe_signature_size(head) == 0, p          # the lab's kernels are unsigned
        # the same header with a certificate table (IMAGE_DIRECTORY_ENTRY_SECURITY)
        pe = struct.unpack_from("<I", head, 0x3C)[0]
        entry = pe + 24 + 112 + 4 * 8
        signed = head[:entry] + struct.pack("<II", 0x100000, 0x6E8) + head[entry + 8:]
        assert pe_signature_size(signed) == 0x6E8, p
    assert pe_signature_size(b"\x7fELF" + bytes(4092)) is None
    assert pe_signature_size(b"MZ" + bytes(100)) is None


# --- the real Linux backend of this host --------------------------------------------------

def test_linux_without_physical_memory_skips_the_snapshot(tmp_path: Path) -> None:
    """/dev/mem and /proc/kcore absent (or refusing): preflight says so without failing on
    it, and the snapshot is skipped with the reason instead of failing the handover."""
    k = LinuxKernel(state_dir=str(tmp_path / "state"))
    k.devmem_path = str(tmp_path / "no-mem")
    k.kcore_path = str(tmp_path / "no-kcore")
    k.lockdown_path = str(tmp_path / "lockdown")
    k.boot_dir = str(tmp_path / "boot")
    k.ikconfig_path = str(tmp_path / "config.gz")
    access = k.physmem_access()
    assert access["devmem_ram"][0] is False and "no-mem" in access["devmem_ram"][1]
    assert access["kcore"][0] is False and "no-kcore" in access["kcore"][1]
    res = preflight(k)
    caps = res.capabilities
    assert caps is not None and not caps.devmem_ram and not caps.kcore and caps.lockdown is None
    checks = {c.name: c for c in res.checks}
    assert checks["physmem"].ok is False and checks["physmem"].blocking is False
    assert "physmem" not in {c.name for c in res.failures()}
    assert any(n.startswith(SNAPSHOT_SKIPPED) for n in res.not_checked), res.not_checked
    assert res.running["capabilities"] == caps.to_json()
    snap = take_snapshot(k, {"vm-ram/4097": [1, 2, 3]})
    assert snap["skipped"].startswith(SNAPSHOT_SKIPPED) and snap["root"] is None
    # lockdown and the config in /boot: what they say is what preflight says
    (tmp_path / "lockdown").write_text("none integrity [confidentiality]\n")
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / f"config-{k.release()}").write_text("CONFIG_KEXEC_SIG=y\n")
    caps2 = preflight(k).capabilities
    assert caps2 is not None and caps2.lockdown == "confidentiality"
    assert caps2.kexec_sig_required is True


# --- twin hosts: a locked-down kernel refuses an unsigned target at preflight --------------

def test_locked_down_twin_refuses_an_unsigned_target_at_preflight(tmp_path: Path) -> None:
    image = make_kernel_image(str(tmp_path / "img"), "7.2.14-twin")
    with start_twin(str(tmp_path / "h"), boot_delay=0.1) as twin:
        sec = Path(twin.root) / "sys/kernel/security"
        sec.mkdir(parents=True, exist_ok=True)
        (sec / "lockdown").write_text("none [integrity] confidentiality\n")
        pf = run_agent(twin.root, "preflight", "--kernel", image)
        assert pf["rc"] == 1, pf
        assert pf["stderr"].count("\n") == 0 and "requires signed kexec images" in pf["stderr"]
        checks = {c["name"]: c for c in pf["json"]["checks"]}
        sig = checks["kexec_sig"]
        assert not sig["ok"] and sig["blocking"] and "'integrity'" in sig["detail"]
        assert image in sig["detail"] and "not signed" in sig["detail"]
        caps = pf["json"]["capabilities"]
        assert caps == {"kho_debugfs": True, "devmem_ram": True, "kcore": False,
                        "lockdown": "integrity", "kexec_sig_required": True}
        st = run_agent(twin.root, "stage", "--kernel", image)
        assert st["rc"] == 1 and "requires signed kexec images" in st["stderr"], st
        assert twin.state()["boot_count"] == 1           # nothing was kexec'd
        # lockdown lifted: the same image passes, and the policy is stated, not guessed
        (sec / "lockdown").write_text("[none] integrity confidentiality\n")
        pf = run_agent(twin.root, "preflight", "--kernel", image)
        checks = {c["name"]: c for c in pf["json"]["checks"]}
        assert pf["rc"] == 0, pf
        assert checks["kexec_sig"]["blocking"] is False
        assert pf["json"]["capabilities"]["kexec_sig_required"] is None
        assert any(n.startswith("signed-kexec policy not known")
                   for n in pf["json"]["not_checked"]), pf["json"]["not_checked"]


def test_report_carries_capabilities_and_not_checked(tmp_path: Path) -> None:
    spec = tmp_path / "w.json"
    spec.write_text(json.dumps(workload_spec(4)))
    image = make_kernel_image(str(tmp_path / "img"), "7.2.14-twin")
    with start_twin(str(tmp_path / "h"), boot_delay=0.1) as twin:
        rep = drive_handover(twin, image, str(spec), SimResult({}))
    assert rep["result"] == "success", rep
    assert rep["capabilities"] == {"kho_debugfs": True, "devmem_ram": True, "kcore": False,
                                   "lockdown": None, "kexec_sig_required": None}
    assert [n for n in rep["not_checked"] if n.startswith("signed-kexec policy not known")]
    assert not [n for n in rep["not_checked"] if n.startswith(SNAPSHOT_SKIPPED)]
    back = HandoverReport.from_json(rep)
    assert back.capabilities == Capabilities(True, True, False, None, None)
    assert back.to_json() == rep
    # an old report without the fields still loads
    old = {k: v for k, v in rep.items() if k not in ("capabilities", "not_checked")}
    assert HandoverReport.from_json(old).capabilities is None
