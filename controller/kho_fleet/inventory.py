"""The fleet: Ansible's YAML inventory format, read as-is, with kho-fleet's host vars typed.

The format (docs.ansible.com, "How to build your inventory", YAML):

    all:
      vars: {kho_transport: sim}
      hosts: {bastion: {ansible_host: 10.0.0.1}}
      children:
        rack-a:
          hosts: {web[01:03]: , db1: {ansible_port: 2222}}
          vars: {kho_arch: arm64, kho_page_size: 16384}

Top-level keys other than `all` are groups too (children of `all`); `ungrouped` holds the
hosts that are only under `all`. Numeric ranges `name[01:10]`, `name[1:9:2]` expand as in
Ansible (leading zeros keep the width). A host or group may be declared in several places;
its hosts, vars and children merge.

Variable precedence, lowest first (Ansible's order, without `ansible_group_priority`):
`all` vars < parent group vars < child group vars < host vars. Groups at the same depth
apply in name order, so the later name wins. Every var in HOST_VARS is checked where it is
defined, with a message naming file, line, the host or group and the var; unknown `kho_*`
vars are errors. Other vars are kept as-is (for templates and reports), except the few in
IGNORED_VARS, which Ansible honours but kho-fleet does not: they produce a warning.

Relative paths (`ansible_ssh_private_key_file`, `kho_twin_root`) resolve against the
inventory file's directory. Files are checked at load time, before anything touches a host,
and only where this machine uses them: an ssh host's key file must be a readable file, its
`kho_ssh_known_hosts` a readable file (with `kho_ssh_trust: tofu` it may be absent if it can
be created); a sim or local host's `kho_twin_root` must be, or be creatable as, a writable
directory (checked without creating anything), and no two such hosts may share one.

Every count is bounded, so a typo cannot make the controller expand or walk without end
(LIMITS, each named in its message): at most MAX_HOSTS hosts per range and per inventory,
MAX_HOST_ENTRIES host entries (ranges expanded, repeats counted), MAX_GROUPS groups,
MAX_MEMBERSHIPS host-group memberships, MAX_FILE_BYTES of YAML, MAX_YAML_NODES values (YAML
aliases expanded) nested at most MAX_YAML_DEPTH deep. Durations are > 0 and at most
MAX_SECONDS (7 days) unless the var says less.

`YamlDoc` / `load_yaml` are shared with playbook.py: YAML with the line of every key and
value kept, so every validation error can say `file:line: field: problem`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Optional

from .errors import InputError
from .sim.faults import TWIN_FAULTS, FaultError, parse_fault
from .yamldoc import (
    MAX_FILE_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    YamlDoc,
    YPath,
    _kind,
    _short,
    did_you_mean,
    field_name,
    load_yaml,
    one_line,
)

__all__ = ["InventoryError", "HostVar", "HOST_VARS", "IGNORED_VARS", "Host", "Inventory",
           "load_inventory", "expand_host_range", "count_host_range", "YamlDoc", "load_yaml",
           "field_name", "did_you_mean", "MAX_HOSTS", "MAX_HOST_ENTRIES", "MAX_GROUPS",
           "MAX_MEMBERSHIPS", "MAX_FILE_BYTES", "MAX_YAML_NODES", "MAX_YAML_DEPTH",
           "MAX_SECONDS", "dir_problem", "file_problem", "one_line"]

# --- limits (documented in the module docstring and named in every message) ---------------
MAX_HOSTS = 100_000              # hosts per range, and per inventory
MAX_HOST_ENTRIES = 1_000_000     # host entries per inventory, ranges expanded, repeats counted
MAX_GROUPS = 10_000              # groups per inventory
MAX_MEMBERSHIPS = 5_000_000      # (host, group) pairs, ancestors included
MAX_SECONDS = 7 * 24 * 3600      # any duration: 7 days


class InventoryError(InputError, ValueError):
    """A bad inventory; the one-line message starts with `file:line:` (exit 2)."""


# --- the typed host vars ------------------------------------------------------------------

@dataclass(frozen=True)
class HostVar:
    """One host var kho-fleet understands: its type, default and meaning."""

    name: str
    type: str          # str | port | bool | path | abspath | seconds | int | faults | choice | env
    default: Any
    description: str
    choices: tuple = ()
    aliases: tuple = ()            # ((alias, canonical), ...) accepted on input
    range: tuple = ()              # (lowest, highest) allowed, for int and seconds vars


HOST_VARS: tuple[HostVar, ...] = (
    HostVar("ansible_host", "str", None, "address to connect to (default: the host name)"),
    HostVar("ansible_port", "port", 22, "SSH port"),
    HostVar("ansible_user", "str", None, "SSH user (default: ~/.ssh/config, then $USER)"),
    HostVar("ansible_ssh_private_key_file", "path", None,
            "SSH private key (default: ssh-agent and ~/.ssh/config)"),
    HostVar("ansible_become", "bool", False, "run the agent through sudo -n"),
    HostVar("kho_arch", "choice", "x86_64", "CPU architecture of the host",
            ("x86_64", "arm64"), (("amd64", "x86_64"), ("aarch64", "arm64"))),
    HostVar("kho_page_size", "choice", 4096,
            "base page size in bytes; 16384 and 65536 need kho_arch: arm64",
            (4096, 16384, 65536), (("4K", 4096), ("16K", 16384), ("64K", 65536))),
    HostVar("kho_transport", "choice", "ssh",
            "how the controller reaches the host: ssh, sim (a digital twin), local (this machine)",
            ("ssh", "sim", "local")),
    HostVar("kho_twin_root", "path", None,
            "a sim host's twin directory (default: chosen by the controller)"),
    HostVar("kho_agent_dir", "abspath", "/var/lib/kho-agent",
            "where the agent zipapp and its state live on the host"),
    HostVar("kho_python", "str", "python3", "the host's Python 3 interpreter for the agent"),
    HostVar("kho_boot_timeout", "seconds", None,
            "seconds to wait for the host after kexec (default: the playbook's timeouts.boot_s)",
            range=(0, MAX_SECONDS)),
    HostVar("kho_ssh_trust", "choice", "known_hosts",
            "host key policy: known_hosts (must be known) or tofu (trust and record on first use)",
            ("known_hosts", "tofu")),
    HostVar("kho_ssh_known_hosts", "path", None,
            "an extra known_hosts file (e.g. the one `kho-fleet lab up` writes)"),
    HostVar("kho_agent_env", "env", None,
            "environment variables for the agent's runs on the host (a mapping), e.g. the "
            "lab tests' KHO_AGENT_FAULT"),
    HostVar("kho_sim_faults", "faults", (),
            "sim hosts: faults the twin injects (bitflip, lost-page, never-returns, ...; "
            "slow-boot=SECONDS; placed page faults such as bitflip@vm-ram/0x1001:0x5000 or "
            "swap-pages@SESSION/TOKEN:OFFSET,OFFSET); names from kho_fleet.sim.faults"),
    HostVar("kho_sim_ram_mib", "int", 256, "sim hosts: RAM of the twin in MiB (64..65536)",
            range=(64, 65536)),
    HostVar("kho_sim_boot_delay", "seconds", 0.5,
            "sim hosts: seconds a twin takes to boot (at most 3600)", range=(0, 3600)),
    HostVar("kho_sim_release", "str", "7.2.13-twin", "sim hosts: the twin's running release"),
    HostVar("kho_sim_kho", "choice", "kho-v4", "sim hosts: the KHO ABI the twin's kernel speaks",
            ("kho-v2", "kho-v3", "kho-v4")),
    HostVar("kho_site", "str", "default",
            "the site whose workers drive the host (temporal engine)"),
    HostVar("kho_kexec_method", "choice", "auto",
            "how the agent kexecs: auto (systemctl kexec when PID 1 is systemd >= 262, else "
            "kexec -e), systemd, direct; a playbook's kexec_method overrides it",
            ("auto", "systemd", "direct")),
)
_VARS = {v.name: v for v in HOST_VARS}

IGNORED_VARS: dict[str, str] = {
    "ansible_ssh_common_args": "ProxyJump and other ssh options come from ~/.ssh/config",
    "ansible_ssh_extra_args": "ssh options come from ~/.ssh/config",
    "ansible_connection": "use kho_transport",
    "ansible_ssh_host": "use ansible_host",
    "ansible_ssh_port": "use ansible_port",
    "ansible_ssh_user": "use ansible_user",
    "ansible_password": "only keys (agent, ansible_ssh_private_key_file) are used",
    "ansible_ssh_pass": "only keys (agent, ansible_ssh_private_key_file) are used",
    "ansible_become_password": "become is sudo -n (passwordless)",
}
_TWIN_SOCKET = "dev/liveupdate"   # kho_agent.kernel.twinproto.DEV_LIVEUPDATE, under a twin root
_SUN_PATH_MAX = 107                # AF_UNIX sun_path, without the NUL
MAX_SIM_FAULTS = 64                 # kho_sim_faults entries (placed faults may repeat a name)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BOOL_WORDS = {"yes": True, "true": True, "on": True, "1": True,
               "no": False, "false": False, "off": False, "0": False}


def _check_var(var: HostVar, v: Any, base: str) -> Any:
    """The normalized value of `var`, or ValueError with the reason (values quoted short)."""
    t = var.type
    if t == "str":
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"must be a non-empty string, got {_short(v)}")
        if any(c in v for c in "\0\n\r"):
            raise ValueError(f"must be one line without NUL, got {_short(v)}")
        return v
    if t == "port":
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
            raise ValueError(f"must be a port number 1..65535, got {_short(v)}")
        return v
    if t == "bool":
        if isinstance(v, str) and v.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[v.strip().lower()]
        if not isinstance(v, bool):
            raise ValueError(f"must be true or false, got {_short(v)}")
        return v
    if t in ("path", "abspath"):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"must be a path, got {_short(v)}")
        if any(c in v for c in "\0\n\r") or len(v) > 4096:
            raise ValueError(f"must be a path of one line without NUL (at most 4096 "
                             f"characters), got {_short(v)}")
        if t == "abspath":
            if not v.startswith("/"):
                raise ValueError(f"must be an absolute path on the host, got {_short(v)}")
            return os.path.normpath(v)
        return os.path.normpath(os.path.join(base, os.path.expanduser(v)))
    if t == "int":
        lo, hi = var.range or (1, 2 ** 63 - 1)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"must be an integer in {lo}..{hi}, got {_short(v)}")
        return v
    if t == "faults":
        if isinstance(v, str):
            v = [v]
        if (not isinstance(v, (list, tuple)) or len(v) > MAX_SIM_FAULTS
                or not all(isinstance(x, str) and x for x in v)):
            raise ValueError(f"must be a list of fault names (at most {MAX_SIM_FAULTS}), "
                             f"got {_short(v)}")
        for x in v:
            if "@" in x:                # placed: bitflip@SESSION/TOKEN:OFFSET (sim/faults.py)
                try:
                    parse_fault(x, TWIN_FAULTS)
                except FaultError as e:
                    raise ValueError(str(e)) from None
                continue
            name, sep, val = x.partition("=")
            if name not in TWIN_FAULTS:
                raise ValueError(f"unknown fault {_short(name)}" + did_you_mean(name, TWIN_FAULTS)
                                 + " (known: " + ", ".join(TWIN_FAULTS) + ")")
            if sep:
                try:
                    num = float(val)
                except ValueError:
                    num = math.nan
                if not 0 <= num <= MAX_SECONDS:
                    raise ValueError(f"{_short(x)}: the value must be a number in "
                                     f"0..{MAX_SECONDS}")
        return tuple(v)
    if t == "env":
        if not isinstance(v, dict):
            raise ValueError(f"must be a mapping of NAME: value, got {_kind(v)}")
        out = {}
        for k, x in v.items():
            if not isinstance(k, str) or not _ENV_NAME.match(k):
                raise ValueError(f"{_short(k)} is not an environment variable name")
            if isinstance(x, (dict, list)) or x is None or "\0" in str(x):
                raise ValueError(f"{k}: must be a string or number without NUL, got {_kind(x)}")
            out[k] = str(x).lower() if isinstance(x, bool) else str(x)
        return out
    if t == "seconds":
        hi = (var.range or (0, MAX_SECONDS))[1]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= hi:
            raise ValueError(f"must be a positive number of seconds, got {_short(v)} "
                             f"(range: > 0 and at most {hi})")
        return float(v)
    if t == "choice":
        for alias, canon in var.aliases:
            if isinstance(v, str) and v.lower() == str(alias).lower():
                return canon
        for c in var.choices:           # same type too: 4096.0 or True is not 4096
            if type(v) is type(c) and v == c:
                return c
        raise ValueError("must be one of " + ", ".join(str(c) for c in var.choices)
                         + f", got {_short(v)}")
    raise AssertionError(t)


# --- hosts and the inventory --------------------------------------------------------------

def _accessor(name: str) -> property:
    default = _VARS[name].default
    return property(lambda self: self.vars.get(name, default),
                    doc=_VARS[name].description)


@dataclass(frozen=True)
class Host:
    """One inventory host: its groups (declaration order, without `all`), effective vars."""

    name: str
    groups: tuple[str, ...]
    vars: dict[str, Any]
    where: str = field(default="", compare=False)     # "file:line" of its first declaration

    port = _accessor("ansible_port")
    user = _accessor("ansible_user")
    key_file = _accessor("ansible_ssh_private_key_file")
    become = _accessor("ansible_become")
    arch = _accessor("kho_arch")
    page_size = _accessor("kho_page_size")
    transport = _accessor("kho_transport")
    twin_root = _accessor("kho_twin_root")
    agent_dir = _accessor("kho_agent_dir")
    python = _accessor("kho_python")
    boot_timeout = _accessor("kho_boot_timeout")
    ssh_trust = _accessor("kho_ssh_trust")
    ssh_known_hosts = _accessor("kho_ssh_known_hosts")
    agent_env = _accessor("kho_agent_env")
    sim_faults = _accessor("kho_sim_faults")
    sim_ram_mib = _accessor("kho_sim_ram_mib")
    sim_boot_delay = _accessor("kho_sim_boot_delay")
    sim_release = _accessor("kho_sim_release")
    sim_kho = _accessor("kho_sim_kho")
    kexec_method = _accessor("kho_kexec_method")

    @property
    def address(self) -> str:
        """ansible_host, else the inventory name."""
        return self.vars.get("ansible_host") or self.name


@dataclass
class Inventory:
    """Hosts in inventory order, and every group's hosts (through children) in that order."""

    path: str
    hosts: dict[str, Host]
    groups: dict[str, list[str]]
    warnings: list[str] = field(default_factory=list)
    sha256: str = ""

    def host(self, name: str) -> Host:
        """The host called `name` (KeyError if absent)."""
        return self.hosts[name]

    def hosts_matching(self, pattern: str) -> list[Host]:
        """Hosts matching an Ansible-style pattern, in inventory order.

        `all` (or `*`), a group, a host, shell wildcards (`twin-a*`), comma or colon lists
        (union), `&group` (intersection) and `!group` (exclusion), as in Ansible:
        `hosts_matching("rack-a,twin-b1")`, `hosts_matching("all,!rack-b")`.
        """
        include: set[str] = set()
        intersect: list[set[str]] = []
        exclude: set[str] = set()
        parts = [p.strip() for p in re.split(r"[,:]", str(pattern))]
        if not any(parts):
            raise InventoryError(f"{self.path}: empty host pattern {pattern!r}")
        only_modifiers = all(p.startswith(("!", "&")) for p in parts if p)
        if only_modifiers:
            include = set(self.hosts)
        for p in parts:
            if not p:
                continue
            names = self._names(p.lstrip("!&"), pattern)
            if p.startswith("!"):
                exclude |= names
            elif p.startswith("&"):
                intersect.append(names)
            else:
                include |= names
        for s in intersect:
            include &= s
        include -= exclude
        return [h for n, h in self.hosts.items() if n in include]

    def _names(self, word: str, pattern: str) -> set[str]:
        if word in ("all", "*"):
            return set(self.hosts)
        if word in self.groups:
            return set(self.groups[word])
        if word in self.hosts:
            return {word}
        if any(c in word for c in "*?["):
            found = {h for h in self.hosts if fnmatchcase(h, word)}
            for g, members in self.groups.items():
                if fnmatchcase(g, word):
                    found.update(members)
            if found:
                return found
        raise InventoryError(f"{self.path}: host pattern {pattern!r}: no host or group named "
                             f"{word!r}" + did_you_mean(word, [*self.groups, *self.hosts]))


_RANGE = re.compile(r"\[([0-9]+):([0-9]+)(?::([0-9]+))?\]")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def count_host_range(name: str, limit: int = MAX_HOSTS) -> int:
    """How many names `name` expands to, without expanding it; ValueError if bad or > `limit`.

    Every range and the product of all of a name's ranges must be at most `limit`."""
    total = 1
    rest = name
    while True:
        m = _RANGE.search(rest)
        if not m:
            if "[" in rest or "]" in rest:
                raise ValueError(f"bad host range {_short(name)} (numeric only, like web[01:10])")
            return total
        if max(len(m.group(1)), len(m.group(2)), len(m.group(3) or "")) > 18:
            raise ValueError(f"bad host range {_short(m.group(0))}: at most {limit} hosts per "
                             "range")
        lo, hi, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        if hi < lo or step < 1:
            raise ValueError(f"bad host range {_short(m.group(0))}: end before start or step < 1")
        n = (hi - lo) // step + 1
        if n > limit:
            raise ValueError(f"host range {_short(m.group(0))} has {n} hosts: at most {limit} "
                             "hosts per range")
        total *= n
        if total > limit:
            raise ValueError(f"{_short(name)} expands to more than {limit} hosts: at most "
                             f"{limit} hosts per range")
        if "[" in rest[:m.start()] or "]" in rest[:m.start()]:
            raise ValueError(f"bad host range {_short(name)} (numeric only, like web[01:10])")
        rest = rest[m.end():]


def expand_host_range(name: str, limit: int = MAX_HOSTS) -> list[str]:
    """Ansible numeric ranges: "web[01:03]" -> web01, web02, web03; "n[1:9:4]" -> n1, n5, n9.

    At most `limit` names: a bigger range is refused (ValueError) before anything is built."""
    count_host_range(name, limit)
    m = _RANGE.search(name)
    if not m:
        return [name]
    lo, hi, step = m.group(1), m.group(2), int(m.group(3) or 1)
    width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
    head, tail = name[:m.start()], name[m.end():]
    out: list[str] = []
    for i in range(int(lo), int(hi) + 1, step):
        out.extend(head + str(i).zfill(width) + t for t in expand_host_range(tail))
    return out


@dataclass
class _Group:
    order: int
    line: int
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    vars: dict[str, tuple[Any, str, str]] = field(default_factory=dict)  # -> (value, where, owner)


@dataclass
class _HostDecl:
    order: int
    where: str
    direct: list[str] = field(default_factory=list)
    vars: dict[str, tuple[Any, str, str]] = field(default_factory=dict)


class _Loader:
    """One pass over the document, depth-first in file order, then merging."""

    def __init__(self, doc: YamlDoc, check_files: bool = True) -> None:
        self.doc = doc
        self.check_files = check_files
        self.base = os.path.dirname(os.path.abspath(doc.path))
        self.groups: dict[str, _Group] = {}
        self.hosts: dict[str, _HostDecl] = {}
        self.warnings: list[str] = []
        self.entries = 0
        self.checked: dict[tuple[str, str], Optional[str]] = {}   # (kind, path) -> problem

    def run(self) -> Inventory:
        doc = self.doc
        top = doc.data
        if not isinstance(top, dict):
            doc.fail((), "expected a mapping of groups, like `all: {hosts: ..., children: ...}`"
                     if top is None else f"expected a mapping of groups, got {_kind(top)}",
                     what="")
        self._group("all", (), None)
        for name, body in top.items():
            self._group(str(name), (name,), body)
            if str(name) != "all":
                self._link("all", str(name))
        self._check_names()
        depth = self._depths()
        members = self._members()
        order = sorted(self.hosts, key=lambda h: self.hosts[h].order)
        hosts: dict[str, Host] = {}
        roots: dict[str, str] = {}
        for h in order:
            hosts[h] = host = self._host(h, members[h], depth)
            if host.twin_root and host.transport in ("sim", "local"):
                other = roots.setdefault(os.path.normcase(host.twin_root), h)
                if other != h:          # two twins in one directory would corrupt each other
                    _, where, owner = self._merged_var(h, members[h], depth, "kho_twin_root")
                    raise InventoryError(one_line(
                        f"{where}: {owner}: kho_twin_root: {host.twin_root}: also the twin "
                        f"root of host {other!r} (host {h!r}); every twin needs its own"))
        groups: dict[str, list[str]] = {
            g: [] for g in sorted(self.groups, key=lambda g: self.groups[g].order)}
        for h in order:
            for g in members[h]:
                groups[g].append(h)
        groups["ungrouped"] = [h for h in order if self.hosts[h].direct == ["all"]
                               or set(self.hosts[h].direct) <= {"all", "ungrouped"}]
        return Inventory(doc.path, hosts, groups, self.warnings)

    def _where(self, path: YPath, key: bool = False) -> str:
        return f"{self.doc.path}:{self.doc.line(path, key)}"

    def _group(self, name: str, path: YPath, body: Any) -> None:
        doc = self.doc
        if not _NAME.match(name):
            doc.fail(path, "group names may use letters, digits, '_', '-' and '.' only",
                     key=True, what=f"group {name!r}")
        g = self.groups.get(name)
        if g is None:
            if len(self.groups) >= MAX_GROUPS:
                doc.fail(path, f"too many groups (at most {MAX_GROUPS} per inventory)", key=True,
                         what=f"group {name!r}")
            g = self.groups[name] = _Group(len(self.groups), doc.line(path, True))
        body = doc.mapping(path, body, ("hosts", "vars", "children"),
                           what=f"group {name!r}")
        hosts = body.get("hosts")
        if hosts is not None and not isinstance(hosts, dict):
            doc.fail(path + ("hosts",), f"expected a mapping of host names, got {_kind(hosts)}",
                     what=f"group {name!r}: hosts")
        for hname, hvars in (hosts or {}).items():
            self._hosts(name, path + ("hosts", hname), str(hname), hvars)
        gvars = body.get("vars")
        if gvars is not None and not isinstance(gvars, dict):
            doc.fail(path + ("vars",), f"expected a mapping, got {_kind(gvars)}",
                     what=f"group {name!r}: vars")
        for k, v in (gvars or {}).items():
            g.vars[str(k)] = self._var(f"group {name!r}", path + ("vars", k), str(k), v)
        children = body.get("children")
        if children is not None and not isinstance(children, dict):
            doc.fail(path + ("children",), f"expected a mapping of groups, got {_kind(children)}",
                     what=f"group {name!r}: children")
        for cname, cbody in (children or {}).items():
            if str(cname) == "all":
                doc.fail(path + ("children", cname), "`all` cannot be a child group",
                         key=True, what=f"group {name!r}")
            self._group(str(cname), path + ("children", cname), cbody)
            self._link(name, str(cname))

    def _link(self, parent: str, child: str) -> None:
        if child not in self.groups[parent].children:
            self.groups[parent].children.append(child)

    def _hosts(self, group: str, path: YPath, pattern: str, hvars: Any) -> None:
        doc = self.doc
        what = f"host {_short(pattern)}"
        try:
            n = count_host_range(pattern)
        except ValueError as e:
            doc.fail(path, str(e), key=True, what=what)
        self.entries += n
        if self.entries > MAX_HOST_ENTRIES:
            doc.fail(path, f"too many host entries (at most {MAX_HOST_ENTRIES} per inventory, "
                           "ranges expanded)", key=True, what=what)
        if n > 1 and len(self.hosts) + n > MAX_HOSTS:
            new = sum(1 for h in expand_host_range(pattern) if h not in self.hosts)
            if len(self.hosts) + new > MAX_HOSTS:
                doc.fail(path, f"the inventory would have {len(self.hosts) + new} hosts: at "
                               f"most {MAX_HOSTS} hosts per inventory", key=True, what=what)
        for hname in expand_host_range(pattern):
            if not _NAME.match(hname):
                doc.fail(path, "host names may use letters, digits, '_', '-' and '.' only "
                               "(put addresses in ansible_host)", key=True, what=f"host {hname!r}")
            decl = self.hosts.get(hname)
            if decl is None:
                if len(self.hosts) >= MAX_HOSTS:
                    doc.fail(path, f"at most {MAX_HOSTS} hosts per inventory", key=True,
                             what=f"host {hname!r}")
                decl = self.hosts[hname] = _HostDecl(len(self.hosts), self._where(path, True))
            if group not in decl.direct:
                decl.direct.append(group)
            self.groups[group].hosts.append(hname)
            if hvars is not None and not isinstance(hvars, dict):
                doc.fail(path, f"expected a mapping of host vars, got {_kind(hvars)}",
                         what=f"host {hname!r}")
            for k, v in (hvars or {}).items():
                decl.vars[str(k)] = self._var(f"host {hname!r}", path + (k,), str(k), v)

    def _var(self, owner: str, path: YPath, name: str, value: Any) -> tuple[Any, str, str]:
        doc = self.doc
        where = self._where(path)
        if name in IGNORED_VARS:
            self.warnings.append(f"{self._where(path, True)}: {owner}: {name}: not honoured "
                                 f"by kho-fleet; {IGNORED_VARS[name]}")
            return value, where, owner
        var = _VARS.get(name)
        if var is None:
            if name.startswith("kho_"):
                doc.fail(path, "unknown kho_* var" + did_you_mean(name, _VARS), key=True,
                         what=f"{owner}: {name}")
            return value, where, owner
        try:
            return _check_var(var, value, self.base), where, owner
        except ValueError as e:
            doc.fail(path, str(e), what=f"{owner}: {name}")

    def _check_names(self) -> None:
        for h, decl in self.hosts.items():
            if h in self.groups:
                raise InventoryError(f"{decl.where}: host {h!r}: the name is also a group "
                                     f"(line {self.groups[h].line}); patterns would be ambiguous")

    def _depths(self) -> dict[str, int]:
        """Longest path from `all`; a cycle among children is an error.

        One depth-first pass (each group expanded once) for cycles and a topological order,
        then longest paths along that order: linear in groups + links, whatever the shape."""
        state: dict[str, int] = {}   # 1 = on the stack, 2 = done
        post: list[str] = []
        stack: list[tuple[str, int]] = [("all", 0)]
        while stack:
            g, i = stack.pop()
            if i == 0:
                if state.get(g) == 1:
                    raise InventoryError(f"{self.doc.path}:{self.groups[g].line}: group {g!r}: "
                                         "is its own descendant (children form a cycle)")
                if state.get(g) == 2:
                    continue
                state[g] = 1
            kids = self.groups[g].children
            if i < len(kids):
                stack.append((g, i + 1))
                stack.append((kids[i], 0))
            else:
                state[g] = 2
                post.append(g)
        depth: dict[str, int] = {g: 0 for g in post}
        for g in reversed(post):                      # parents before children
            for c in self.groups[g].children:
                depth[c] = max(depth[c], depth[g] + 1)
        return depth

    def _members(self) -> dict[str, set[str]]:
        """Every group each host is in: its direct groups and all their ancestors."""
        parents: dict[str, set[str]] = {g: set() for g in self.groups}
        for g, grp in self.groups.items():
            for c in grp.children:
                parents[c].add(g)
        ancestors: dict[str, frozenset[str]] = {}

        def up(g0: str) -> frozenset[str]:
            if g0 not in ancestors:
                seen: set[str] = set()
                todo = [g0]
                while todo:
                    g = todo.pop()
                    if g not in seen:
                        seen.add(g)
                        todo.extend(parents[g])
                ancestors[g0] = frozenset(seen)
            return ancestors[g0]

        out: dict[str, set[str]] = {}
        total = 0
        for h, decl in self.hosts.items():
            seen = {"all"}
            for g in decl.direct:
                seen |= up(g)
            total += len(seen)
            if total > MAX_MEMBERSHIPS:
                raise InventoryError(f"{decl.where}: host {h!r}: too many host-group "
                                     f"memberships (at most {MAX_MEMBERSHIPS} per inventory, "
                                     "parent groups included)")
            out[h] = seen
        return out

    def _merged(self, name: str, groups: set[str],
                depth: dict[str, int]) -> dict[str, tuple[Any, str, str]]:
        """The host's vars by precedence: name -> (value, where defined, owner)."""
        merged: dict[str, tuple[Any, str, str]] = {}
        for g in sorted(groups, key=lambda g: (depth.get(g, 1), g)):
            merged.update(self.groups[g].vars)
        merged.update(self.hosts[name].vars)
        return merged

    def _merged_var(self, name: str, groups: set[str], depth: dict[str, int],
                    var: str) -> tuple[Any, str, str]:
        return self._merged(name, groups, depth)[var]

    def _host(self, name: str, groups: set[str], depth: dict[str, int]) -> Host:
        merged = self._merged(name, groups, depth)
        values = {k: v for k, (v, _, _) in merged.items()}
        arch = values.get("kho_arch", _VARS["kho_arch"].default)
        ps = values.get("kho_page_size", _VARS["kho_page_size"].default)
        if ps != 4096 and arch != "arm64":
            raise InventoryError(f"{merged['kho_page_size'][1]}: host {name!r}: kho_page_size: "
                                 f"{ps} needs kho_arch: arm64 (kho_arch is {arch})")
        ordered = tuple(g for g in sorted(groups, key=lambda g: self.groups[g].order)
                        if g != "all")
        host = Host(name, ordered, values, self.hosts[name].where)
        if self.check_files:
            self._check_files(host, merged)
        return host

    def _check_files(self, host: Host, merged: dict[str, tuple[Any, str, str]]) -> None:
        """The local files and directories `host` will use exist (or can be created).

        Only what this machine touches: an ssh host's key and known_hosts files, a sim or
        local host's twin root (a twin root behind ssh lives on the far machine)."""
        checks: list[tuple[str, str]] = []
        if host.transport == "ssh":
            checks.append(("ansible_ssh_private_key_file", "file"))
            checks.append(("kho_ssh_known_hosts",
                           "file-or-creatable" if host.ssh_trust == "tofu" else "file"))
        else:
            checks.append(("kho_twin_root", "dir"))
        for var, kind in checks:
            if var not in merged:
                continue
            value, where, owner = merged[var]
            key = (kind, value)
            if key not in self.checked:
                self.checked[key] = (file_problem(value) if kind == "file" else
                                     dir_problem(value, must_be_dir=(kind == "dir")))
                sock = os.path.join(os.path.abspath(value), _TWIN_SOCKET)
                if kind == "dir" and not self.checked[key] and len(sock) > _SUN_PATH_MAX:
                    self.checked[key] = (f"too long: the twin's socket {_TWIN_SOCKET} under "
                                         f"it would be {len(sock)} characters, AF_UNIX allows "
                                         f"at most {_SUN_PATH_MAX}")
            problem = self.checked[key]
            if problem:
                via = "" if owner == f"host {host.name!r}" else f" (host {host.name!r})"
                raise InventoryError(one_line(f"{where}: {owner}: {var}: {value}: {problem}"
                                              f"{via}"))


def file_problem(path: str) -> Optional[str]:
    """Why `path` is not a readable regular file, or None if it is."""
    try:
        st = os.stat(path)
    except NotADirectoryError:
        return "a parent of it is not a directory"
    except OSError as e:
        return (e.strerror or str(e)).lower()
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable"
    return None


def dir_problem(path: str, must_be_dir: bool = True) -> Optional[str]:
    """Why `path` cannot be used as a writable directory (or, with must_be_dir=False, a file
    to create or update); None if it can. Nothing is created: the nearest existing ancestor
    must be a directory this process may write in."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        return "cannot be created: a parent of it is not a directory"
    except OSError as e:
        return (e.strerror or str(e)).lower()
    if st is not None:
        if must_be_dir and not stat.S_ISDIR(st.st_mode):
            return "exists and is not a directory"
        if not must_be_dir and not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        mode = os.W_OK | os.X_OK if must_be_dir else os.R_OK | os.W_OK
        if not os.access(path, mode):
            return "not writable"
        return None
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            pst = os.stat(parent)
        except FileNotFoundError:
            if parent == os.path.dirname(parent):
                return "no existing parent directory"
            parent = os.path.dirname(parent)
            continue
        except OSError as e:
            return f"cannot be created: {parent}: {(e.strerror or str(e)).lower()}"
        if not stat.S_ISDIR(pst.st_mode):
            return f"cannot be created: {parent} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot be created: {parent} is not writable"
        return None


def load_inventory(path: str, check_files: bool = True) -> Inventory:
    """Read and check an Ansible YAML inventory; InventoryError('file:line: ...') if bad.

    `check_files=False` skips the local file checks (key, known_hosts, twin root): for
    reading an inventory meant for another machine, never before a rollout."""
    doc = load_yaml(path, InventoryError)
    inv = _Loader(doc, check_files).run()
    try:
        with open(path, "rb") as f:
            inv.sha256 = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise InventoryError(one_line(f"{path}: {e.strerror or e}")) from None
    return inv

