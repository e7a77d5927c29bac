"""Fixtures shared by several test files, in one place.

pytest finds these by name; test files never import a fixture from another file (an imported
fixture is an "unused import" redefined by every test parameter of the same name, and the
import order decides which definition wins). Helpers that are plain functions and classes
stay in their support modules (sshd.py, twinsupport.py, test_rollout.py) and are imported.

- `sim`: a temp dir for a sim-twin rollout; every twin started under it is powered off.
- `twin_root`, `twin`: one digital-twin host (kho_fleet.sim) started under /tmp.
- `ssh_lab`: real OpenSSH sshd servers on loopback (sshd.py), one set per test module.

`make test` runs the suite on two pytest-xdist workers with `--dist loadfile`: every file stays
on one worker (module fixtures such as `ssh_lab`, the Temporal dev server and the lab guests are
set up once, and the lab files' steps run in order), and the hook at the end collects the lab
files first, the longest ones. (`--dist loadgroup` with one group for all lab files would be
better, but pytest-xdist 3.8 does not apply the groups under pytest 9: its nodeid suffix no
longer takes.)
"""

from __future__ import annotations

import getpass
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd import SSHD, SSHLab, keygen, require_openssh
from twinsupport import BOOT_DELAY

from kho_fleet.inventory import InventoryError, load_inventory
from kho_fleet.sim.fleet import fleet_down
from kho_fleet.sim.twinkernel import TwinHandle, start_twin


@pytest.fixture()
def sim(tmp_path: Path) -> Iterator[Path]:
    """The temp dir; every sim twin started under it is powered off at the end."""
    yield tmp_path
    inv = tmp_path / "inventory.yaml"
    try:
        fleet_down(load_inventory(str(inv)), str(tmp_path / "sim"))
    except (OSError, InventoryError):
        pass      # a test that broke the inventory on purpose started no twin


@pytest.fixture
def twin_root() -> Iterator[str]:
    """A short host root under /tmp (AF_UNIX paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="twin-", dir="/tmp")
    yield os.path.join(d, "host")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def twin(twin_root: str) -> Iterator[TwinHandle]:
    """A running twin host at `twin_root` (128 MiB RAM, short boot delay); stopped after."""
    h = start_twin(twin_root, boot_delay=BOOT_DELAY, ram_mib=128)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def ssh_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHLab]:
    """A client key, two real sshd servers (`target`, `jump`) and a known_hosts for both.

    Skipped, with the reason printed, when sshd or ssh-keygen is missing.
    """
    require_openssh()
    d = tmp_path_factory.mktemp("sshlab")
    client_key = keygen(d / "id_ed25519", "kho-test-client")
    auth = d / "authorized_keys"
    auth.write_text((d / "id_ed25519.pub").read_text())
    servers: list[SSHD] = []
    try:
        target = SSHD(d, auth, "target").start()
        servers.append(target)
        jump = SSHD(d, auth, "jump").start()
        servers.append(jump)
        kh = d / "known_hosts"
        kh.write_text(target.known_hosts_line + jump.known_hosts_line)
        yield SSHLab(d, getpass.getuser(), client_key, target, jump, kh)
    finally:
        for s in servers:
            s.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The lab files first (stable: pytest's order otherwise), so the longest files start at
    once under `--dist loadfile`."""
    items.sort(key=lambda it: it.get_closest_marker("lab") is None)
