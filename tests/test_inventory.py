"""Inventory: Ansible YAML as-is, var precedence, ranges, patterns, typed vars, file:line errors."""

from __future__ import annotations

import os
import textwrap

import pytest

from kho_fleet.inventory import HOST_VARS, InventoryError, expand_host_range, load_inventory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text: str, name: str = "inv.yaml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(p)


def fails(tmp_path, text: str, prefix: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as ei:
        load_inventory(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:{prefix}"), msg
    assert "\n" not in msg
    return msg


PRECEDENCE = """
all:
  vars: {x: all, y: all, z: all, w: all, kho_python: python3.11}
  hosts:
    solo:
  children:
    parent:
      vars: {x: parent, y: parent, z: parent}
      hosts:
        p1:
      children:
        child:
          vars: {x: child, y: child}
          hosts:
            c1: {x: host}
            c2:
    zeta:
      vars: {y: zeta}
      hosts: {c2: , z1: }
    alpha:
      vars: {y: alpha, w: alpha}
      hosts: {z1: {kho_boot_timeout: 90}}
"""


def test_precedence_host_child_parent_all(tmp_path) -> None:
    inv = load_inventory(write(tmp_path, PRECEDENCE))
    v = {n: h.vars for n, h in inv.hosts.items()}
    assert v["c1"]["x"] == "host" and v["c1"]["y"] == "child" and v["c1"]["z"] == "parent"
    assert v["c1"]["w"] == "all" and v["c1"]["kho_python"] == "python3.11"
    assert v["p1"]["x"] == "parent" and v["solo"]["x"] == "all"
    # c2: child (depth 2) beats zeta (depth 1) although zeta is declared later
    assert v["c2"]["y"] == "child"
    # z1: alpha and zeta at the same depth -> name order, the later name (zeta) wins
    assert v["z1"]["y"] == "zeta" and v["z1"]["w"] == "alpha"
    assert inv.hosts["z1"].boot_timeout == 90.0


def test_groups_and_order(tmp_path) -> None:
    inv = load_inventory(write(tmp_path, PRECEDENCE))
    assert list(inv.hosts) == ["solo", "p1", "c1", "c2", "z1"]
    assert inv.groups["all"] == ["solo", "p1", "c1", "c2", "z1"]
    assert inv.groups["parent"] == ["p1", "c1", "c2"]
    assert inv.groups["child"] == ["c1", "c2"]
    assert inv.groups["zeta"] == ["c2", "z1"]
    assert inv.groups["ungrouped"] == ["solo"]
    assert inv.hosts["c2"].groups == ("parent", "child", "zeta")
    assert inv.hosts["solo"].groups == ()
    assert len(inv.sha256) == 64


def test_host_declared_twice_merges_and_later_wins(tmp_path) -> None:
    inv = load_inventory(write(tmp_path, """
        all:
          hosts:
            h1: {ansible_port: 2200, a: 1}
          children:
            g:
              hosts:
                h1: {ansible_port: 2201}
        """))
    h = inv.hosts["h1"]
    assert h.port == 2201 and h.vars["a"] == 1 and h.groups == ("g",)


def test_top_level_groups_are_children_of_all(tmp_path) -> None:
    inv = load_inventory(write(tmp_path, """
        all:
          vars: {kho_transport: sim}
        web:
          hosts: {w1: }
        """))
    assert inv.hosts["w1"].transport == "sim" and inv.groups["web"] == ["w1"]


def test_typed_accessors_and_defaults(tmp_path) -> None:
    inv = load_inventory(write(tmp_path, """
        all:
          hosts:
            plain:
            arm:
              ansible_host: 10.0.0.5
              ansible_port: "2222"
              ansible_user: ops
              ansible_ssh_private_key_file: keys/id_ed25519
              ansible_become: "yes"
              kho_arch: aarch64
              kho_page_size: 64K
              kho_transport: local
              kho_twin_root: twins/arm
              kho_agent_dir: /srv/agent/
              kho_python: /usr/bin/python3
              kho_boot_timeout: 45
              kho_ssh_trust: tofu
        """))
    p, a = inv.hosts["plain"], inv.hosts["arm"]
    assert (p.address, p.port, p.user, p.key_file, p.become) == ("plain", 22, None, None, False)
    assert (p.arch, p.page_size, p.transport, p.twin_root) == ("x86_64", 4096, "ssh", None)
    assert (p.agent_dir, p.python, p.boot_timeout, p.ssh_trust) == (
        "/var/lib/kho-agent", "python3", None, "known_hosts")
    assert (a.address, a.port, a.user, a.become) == ("10.0.0.5", 2222, "ops", True)
    assert a.key_file == str(tmp_path / "keys" / "id_ed25519")      # relative to the inventory
    assert a.twin_root == str(tmp_path / "twins" / "arm")
    assert (a.arch, a.page_size, a.transport) == ("arm64", 65536, "local")
    assert (a.agent_dir, a.python, a.boot_timeout, a.ssh_trust) == (
        "/srv/agent", "/usr/bin/python3", 45.0, "tofu")
    names = [v.name for v in HOST_VARS]
    assert len(names) == len(set(names)) and all(v.description for v in HOST_VARS)


def test_agent_env_is_a_string_mapping(tmp_path) -> None:
    """kho_agent_env: values become strings; absent means no extra environment."""
    inv = load_inventory(write(tmp_path, """
        all:
          hosts:
            h1: {kho_agent_env: {KHO_AGENT_FAULT: exit-after-retrieve=2, N: 3, B: true}}
            h2:
        """))
    assert inv.hosts["h1"].agent_env == {"KHO_AGENT_FAULT": "exit-after-retrieve=2",
                                         "N": "3", "B": "true"}
    assert inv.hosts["h2"].agent_env is None


def test_ranges() -> None:
    assert expand_host_range("web[01:03]") == ["web01", "web02", "web03"]
    assert expand_host_range("n[1:10:4].lab") == ["n1.lab", "n5.lab", "n9.lab"]
    assert expand_host_range("r[1:2]-h[0:1]") == ["r1-h0", "r1-h1", "r2-h0", "r2-h1"]
    assert expand_host_range("plain") == ["plain"]
    for bad in ("web[3:1]", "web[a:c]", "web[1:2"):
        with pytest.raises(ValueError):
            expand_host_range(bad)


def test_ranges_in_inventory(tmp_path) -> None:
    inv = load_inventory(write(tmp_path, """
        all:
          children:
            rack:
              hosts:
                twin-[08:10]: {kho_transport: sim}
        """))
    assert list(inv.hosts) == ["twin-08", "twin-09", "twin-10"]
    assert all(h.transport == "sim" for h in inv.hosts.values())


def test_hosts_matching(tmp_path) -> None:
    inv = load_inventory(write(tmp_path, PRECEDENCE))

    def names(p: str) -> list[str]:
        return [h.name for h in inv.hosts_matching(p)]

    assert names("all") == names("*") == list(inv.hosts)
    assert names("child") == ["c1", "c2"]
    assert names("z1") == ["z1"]
    assert names("z1,child,c1") == ["c1", "c2", "z1"]          # inventory order, no repeats
    assert names("parent,!child") == ["p1"]
    assert names("parent:&zeta") == ["c2"]
    assert names("!parent") == ["solo", "z1"]
    assert names("c*") == ["c1", "c2"]
    with pytest.raises(InventoryError,
                       match=r"no host or group named 'chlid' \(did you mean 'child'\?\)"):
        inv.hosts_matching("chlid")
    with pytest.raises(InventoryError, match="empty host pattern"):
        inv.hosts_matching(" , ")


def test_ignored_vars_warn(tmp_path) -> None:
    path = write(tmp_path, """
        all:
          vars:
            ansible_ssh_common_args: -o ProxyJump=bastion
          hosts: {h: }
        """)
    inv = load_inventory(path)
    assert inv.warnings == [(f"{path}:3: group 'all': ansible_ssh_common_args: not honoured by "
                             "kho-fleet; ProxyJump and other ssh options come from ~/.ssh/config")]


@pytest.mark.parametrize("text, prefix", [
    ("all:\n  hosts: {a: 1\n", "3:1: YAML syntax error: expected ',' or '}'"),
    ("- a\n- b\n", "1: expected a mapping of groups"),
    ("", "1: expected a mapping of groups"),
    ("all:\n  host:\n    h1:\n", "2: group 'all': host: unknown key (did you mean 'hosts'?)"),
    ("all:\n  hosts: [h1, h2]\n", "2: group 'all': hosts: expected a mapping of host names"),
    ("all:\n  vars: [1]\n", "2: group 'all': vars: expected a mapping"),
    ("all:\n  children: [g]\n", "2: group 'all': children: expected a mapping of groups"),
    ("all:\n  hosts:\n    h1:\n      kho_pagesize: 4096\n",
     "4: host 'h1': kho_pagesize: unknown kho_* var (did you mean 'kho_page_size'?)"),
    ("all:\n  hosts:\n    h1:\n      kho_page_size: 12345\n",
     "4: host 'h1': kho_page_size: must be one of 4096, 16384, 65536, got 12345"),
    ("all:\n  children:\n    g:\n      vars:\n        kho_arch: sparc\n      hosts: {h: }\n",
     "5: group 'g': kho_arch: must be one of x86_64, arm64, got 'sparc'"),
    ("all:\n  vars:\n    kho_page_size: 16384\n  hosts:\n    h1:\n",
     "3: host 'h1': kho_page_size: 16384 needs kho_arch: arm64 (kho_arch is x86_64)"),
    ("all:\n  hosts:\n    h1: {ansible_port: 70000}\n",
     "3: host 'h1': ansible_port: must be a port number 1..65535, got 70000"),
    ("all:\n  hosts:\n    h1: {ansible_become: maybe}\n",
     "3: host 'h1': ansible_become: must be true or false, got 'maybe'"),
    ("all:\n  hosts:\n    h1: {kho_agent_dir: var/lib}\n",
     "3: host 'h1': kho_agent_dir: must be an absolute path on the host"),
    ("all:\n  hosts:\n    h1: {kho_boot_timeout: -1}\n",
     "3: host 'h1': kho_boot_timeout: must be a positive number of seconds"),
    ("all:\n  hosts:\n    h1: {kho_transport: telnet}\n",
     "3: host 'h1': kho_transport: must be one of ssh, sim, local"),
    ("all:\n  hosts:\n    h1: {kho_ssh_trust: yolo}\n",
     "3: host 'h1': kho_ssh_trust: must be one of known_hosts, tofu"),
    ("all:\n  hosts:\n    h1: {kho_agent_env: [A=1]}\n",
     "3: host 'h1': kho_agent_env: must be a mapping of NAME: value, got a list"),
    ("all:\n  hosts:\n    h1: {kho_agent_env: {1A: x}}\n",
     "3: host 'h1': kho_agent_env: '1A' is not an environment variable name"),
    ("all:\n  hosts:\n    h1: {kho_agent_env: {A: [1]}}\n",
     "3: host 'h1': kho_agent_env: A: must be a string or number without NUL, got a list"),
    ("all:\n  hosts:\n    h1:\n    h1:\n", "4: all.hosts.h1: duplicate key (first on line 3)"),
    ("all:\n  hosts:\n    web[3:1]:\n", "3: host 'web[3:1]': bad host range"),
    ("all:\n  hosts:\n    'a b':\n", "3: host 'a b': host names may use letters"),
    ("all:\n  hosts:\n    h1: [1]\n", "3: host 'h1': expected a mapping of host vars"),
    ("all:\n  children:\n    g:\n      hosts: {g: }\n", "4: host 'g': the name is also a group"),
    (("all:\n  children:\n    a:\n      children:\n        b:\n          children:\n"
      "            a:\n"), "3: group 'a': is its own descendant"),
    ("all:\n  children:\n    all:\n", "3: group 'all': `all` cannot be a child group"),
])
def test_errors_name_file_line_field(tmp_path, text: str, prefix: str) -> None:
    fails(tmp_path, text, prefix)


def test_syntax_error_has_column(tmp_path) -> None:
    msg = fails(tmp_path, "all:\n  hosts:\n    h1: {a: 1\n", "4:1: YAML syntax error:")
    assert msg.count("\n") == 0


def test_missing_file() -> None:
    with pytest.raises(InventoryError, match="^/nonexistent/inv.yaml: No such file"):
        load_inventory("/nonexistent/inv.yaml")


def test_yaml_anchors_and_merge_keys(tmp_path) -> None:
    inv = load_inventory(write(tmp_path, """
        all:
          hosts:
            h1: &base {kho_arch: arm64, kho_page_size: 16384, ansible_user: a}
            h2:
              <<: *base
              ansible_user: b
        """))
    assert inv.hosts["h2"].page_size == 16384 and inv.hosts["h2"].user == "b"
    assert inv.hosts["h1"].user == "a"


@pytest.mark.parametrize("name", ["sim", "lab", "example-hardware"])
def test_sample_inventories_load(name: str) -> None:
    # example-hardware names a key file of another machine: its local files are not checked
    inv = load_inventory(os.path.join(REPO, "inventory", f"{name}.yaml"),
                         check_files=name != "example-hardware")
    assert inv.warnings == []
    if name == "sim":
        assert inv.groups["rack-a"] == ["twin-a1", "twin-a2", "twin-a3", "twin-a4"]
        assert inv.groups["rack-b"] == ["twin-b1", "twin-b2", "twin-b3", "twin-b4"]
        assert {h.transport for h in inv.hosts.values()} == {"sim"}
    elif name == "lab":
        assert inv.hosts == {}
    else:
        arm = [h for h in inv.hosts.values() if h.arch == "arm64"]
        assert arm and all(h.page_size == 16384 for h in arm)
        assert any(h.arch == "x86_64" for h in inv.hosts.values())
