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
inventory file's directory.

`YamlDoc` / `load_yaml` are shared with playbook.py: YAML with the line of every key and
value kept, so every validation error can say `file:line: field: problem`.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, NoReturn, Optional

import yaml

__all__ = ["InventoryError", "HostVar", "HOST_VARS", "IGNORED_VARS", "Host", "Inventory",
           "load_inventory", "expand_host_range", "YamlDoc", "load_yaml", "field_name",
           "did_you_mean"]


class InventoryError(ValueError):
    """A bad inventory; the one-line message starts with `file:line:`."""


# --- YAML with line numbers ---------------------------------------------------------------

YPath = tuple  # keys (str/int/...) of mappings and int indices of sequences, from the root


@dataclass
class YamlDoc:
    """A decoded YAML file plus the 1-based line of every key and value, by path."""

    path: str                              # as given: used verbatim in messages
    data: Any
    error: type = ValueError
    value_lines: dict = field(default_factory=dict, repr=False)
    key_lines: dict = field(default_factory=dict, repr=False)

    def line(self, path: YPath, key: bool = False) -> int:
        """The line of `path`'s key (or value); an absent path falls back to its parent's key."""
        p = tuple(path)
        while p:
            if key and p in self.key_lines:
                return self.key_lines[p]
            if p in self.value_lines:
                return self.value_lines[p]
            p, key = p[:-1], True
        return self.value_lines.get((), 1)

    def fail(self, path: YPath, msg: str, *, key: bool = False,
             what: Optional[str] = None) -> NoReturn:
        """Raise `file:line: what: msg`; `what` defaults to the dotted field path."""
        what = field_name(path) if what is None else what
        prefix = f"{self.path}:{self.line(path, key)}: "
        raise self.error(prefix + (f"{what}: {msg}" if what else msg))

    def mapping(self, path: YPath, value: Any, allowed: "list[str] | tuple[str, ...]",
                required: tuple[str, ...] = (), what: Optional[str] = None) -> dict:
        """Check `value` is a mapping (None = {}) with only `allowed` keys and all `required`."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_kind(value)}", what=what)
        for k in value:
            if k not in allowed:
                name = field_name(tuple(path) + (k,)) if what is None else f"{what}: {k}"
                self.fail(tuple(path) + (k,), "unknown key" + did_you_mean(str(k), allowed),
                          key=True, what=name)
        for k in required:
            if value.get(k) is None:
                name = field_name(tuple(path) + (k,)) if what is None else f"{what}: {k}"
                self.fail(tuple(path) + (k,), "required", what=name)
        return value


def field_name(path: YPath) -> str:
    """("stages", 1, "max_parallel") -> "stages[1].max_parallel"."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) and not isinstance(p, bool) else (
            f".{p}" if out else str(p))
    return out


def did_you_mean(word: str, choices: Any) -> str:
    """' (did you mean 'x'?)' for a near miss among `choices`, else ''."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"{v!r}", bool: f"{v!r}"}.get(
        type(v), repr(v))


def load_yaml(path: str, error: type = ValueError) -> YamlDoc:
    """Parse one YAML document, keeping lines; syntax errors raise `error('file:line:col: ...')`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise error(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: YAML error: {str(e).splitlines()[0]}") from None
    doc = YamlDoc(path, None, error)
    if root is None:
        return doc
    doc.value_lines[()] = root.start_mark.line + 1
    doc.data = _Builder(doc).build(root, ())
    return doc


class _Builder:
    """Composed nodes -> plain Python values, recording marks; duplicate keys are errors."""

    def __init__(self, doc: YamlDoc) -> None:
        self.doc = doc
        self.ctor = yaml.SafeLoader("")
        self.active: set[int] = set()

    def build(self, node: yaml.Node, path: YPath) -> Any:
        if id(node) in self.active:
            self.doc.fail(path, "recursive YAML alias")
        self.doc.value_lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.ctor.construct_object(node, deep=True)
            except yaml.YAMLError as e:
                self.doc.fail(path, f"bad value: {getattr(e, 'problem', None) or e}")
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(n, path + (i,)) for i, n in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self.active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: YPath) -> dict:
        out: dict = {}
        merged: dict = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":       # `<<: *defaults`
                sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
                for src in reversed(sources):                 # earlier sources win
                    if not isinstance(src, yaml.MappingNode):
                        self.doc.fail(path, "`<<` merges mappings only")
                    merged.update(self._mapping(src, path))
                continue
            if not isinstance(knode, yaml.ScalarNode):
                self.doc.fail(path, "mapping keys must be plain scalars")
            key = self.build(knode, path + ("<key>",))
            if key is None:
                key = ""
            kpath = path + (key,)
            if key in out:
                raise self.doc.error(f"{self.doc.path}:{knode.start_mark.line + 1}: "
                                     f"{field_name(kpath)}: duplicate key (first on line "
                                     f"{self.doc.key_lines[kpath]})")
            self.doc.key_lines[kpath] = knode.start_mark.line + 1
            out[key] = self.build(vnode, kpath)
        for k, v in merged.items():
            out.setdefault(k, v)
        return out


# --- the typed host vars ------------------------------------------------------------------

@dataclass(frozen=True)
class HostVar:
    """One host var kho-fleet understands: its type, default and meaning."""

    name: str
    type: str                      # str | port | bool | path | abspath | seconds | int | strlist | choice | env
    default: Any
    description: str
    choices: tuple = ()
    aliases: tuple = ()            # ((alias, canonical), ...) accepted on input


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
            "seconds to wait for the host after kexec (default: the playbook's timeouts.boot_s)"),
    HostVar("kho_ssh_trust", "choice", "known_hosts",
            "host key policy: known_hosts (must be known) or tofu (trust and record on first use)",
            ("known_hosts", "tofu")),
    HostVar("kho_ssh_known_hosts", "path", None,
            "an extra known_hosts file (e.g. the one `kho-fleet lab up` writes)"),
    HostVar("kho_agent_env", "env", None,
            "environment variables for the agent's runs on the host (a mapping), e.g. the "
            "lab tests' KHO_AGENT_FAULT"),
    HostVar("kho_sim_faults", "strlist", (),
            "sim hosts: faults the twin injects (bitflip, lost-page, never-returns, ...)"),
    HostVar("kho_sim_ram_mib", "int", 256, "sim hosts: RAM of the twin in MiB (>= 64)"),
    HostVar("kho_sim_boot_delay", "seconds", 0.5, "sim hosts: seconds a twin takes to boot"),
    HostVar("kho_sim_release", "str", "7.2.13-twin", "sim hosts: the twin's running release"),
    HostVar("kho_sim_kho", "choice", "kho-v4", "sim hosts: the KHO ABI the twin's kernel speaks",
            ("kho-v2", "kho-v3", "kho-v4")),
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
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BOOL_WORDS = {"yes": True, "true": True, "on": True, "1": True,
               "no": False, "false": False, "off": False, "0": False}


def _check_var(var: HostVar, v: Any, base: str) -> Any:
    """The normalized value of `var`, or ValueError with the reason."""
    t = var.type
    if t == "str":
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"must be a non-empty string, got {v!r}")
        return v
    if t == "port":
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
            raise ValueError(f"must be a port number 1..65535, got {v!r}")
        return v
    if t == "bool":
        if isinstance(v, str) and v.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[v.strip().lower()]
        if not isinstance(v, bool):
            raise ValueError(f"must be true or false, got {v!r}")
        return v
    if t in ("path", "abspath"):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"must be a path, got {v!r}")
        if t == "abspath":
            if not v.startswith("/"):
                raise ValueError(f"must be an absolute path on the host, got {v!r}")
            return os.path.normpath(v)
        return os.path.normpath(os.path.join(base, os.path.expanduser(v)))
    if t == "int":
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"must be a positive integer, got {v!r}")
        return v
    if t == "strlist":
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
            raise ValueError(f"must be a list of names, got {v!r}")
        return tuple(v)
    if t == "env":
        if not isinstance(v, dict):
            raise ValueError(f"must be a mapping of NAME: value, got {_kind(v)}")
        out = {}
        for k, x in v.items():
            if not isinstance(k, str) or not _ENV_NAME.match(k):
                raise ValueError(f"{k!r} is not an environment variable name")
            if isinstance(x, (dict, list)) or x is None or "\0" in str(x):
                raise ValueError(f"{k}: must be a string or number without NUL, got {_kind(x)}")
            out[k] = str(x).lower() if isinstance(x, bool) else str(x)
        return out
    if t == "seconds":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"must be a positive number of seconds, got {v!r}")
        return float(v)
    if t == "choice":
        for alias, canon in var.aliases:
            if v == alias or (isinstance(v, str) and v.lower() == str(alias).lower()):
                return canon
        if v in var.choices and not isinstance(v, bool):
            return v
        raise ValueError("must be one of " + ", ".join(str(c) for c in var.choices)
                         + f", got {v!r}")
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


def expand_host_range(name: str) -> list[str]:
    """Ansible numeric ranges: "web[01:03]" -> web01, web02, web03; "n[1:9:4]" -> n1, n5, n9."""
    m = _RANGE.search(name)
    if not m:
        if "[" in name or "]" in name:
            raise ValueError(f"bad host range {name!r} (numeric only, like web[01:10])")
        return [name]
    lo, hi, step = m.group(1), m.group(2), int(m.group(3) or 1)
    if int(hi) < int(lo) or step < 1:
        raise ValueError(f"bad host range {m.group(0)!r}: end before start or step < 1")
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
    vars: dict[str, tuple[Any, str]] = field(default_factory=dict)   # name -> (value, where)


@dataclass
class _HostDecl:
    order: int
    where: str
    direct: list[str] = field(default_factory=list)
    vars: dict[str, tuple[Any, str]] = field(default_factory=dict)


class _Loader:
    """One pass over the document, depth-first in file order, then merging."""

    def __init__(self, doc: YamlDoc) -> None:
        self.doc = doc
        self.base = os.path.dirname(os.path.abspath(doc.path))
        self.groups: dict[str, _Group] = {}
        self.hosts: dict[str, _HostDecl] = {}
        self.warnings: list[str] = []

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
        for h in order:
            hosts[h] = self._host(h, members[h], depth)
        groups = {g: [h for h in order if g in members[h]]
                  for g in sorted(self.groups, key=lambda g: self.groups[g].order)}
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
        try:
            names = expand_host_range(pattern)
        except ValueError as e:
            doc.fail(path, str(e), key=True, what=f"host {pattern!r}")
        for hname in names:
            if not _NAME.match(hname):
                doc.fail(path, "host names may use letters, digits, '_', '-' and '.' only "
                               "(put addresses in ansible_host)", key=True, what=f"host {hname!r}")
            decl = self.hosts.get(hname)
            if decl is None:
                decl = self.hosts[hname] = _HostDecl(len(self.hosts), self._where(path, True))
            if group not in decl.direct:
                decl.direct.append(group)
            self.groups[group].hosts.append(hname)
            if hvars is not None and not isinstance(hvars, dict):
                doc.fail(path, f"expected a mapping of host vars, got {_kind(hvars)}",
                         what=f"host {hname!r}")
            for k, v in (hvars or {}).items():
                decl.vars[str(k)] = self._var(f"host {hname!r}", path + (k,), str(k), v)

    def _var(self, owner: str, path: YPath, name: str, value: Any) -> tuple[Any, str]:
        doc = self.doc
        where = self._where(path)
        if name in IGNORED_VARS:
            self.warnings.append(f"{self._where(path, True)}: {owner}: {name}: not honoured "
                                 f"by kho-fleet; {IGNORED_VARS[name]}")
            return value, where
        var = _VARS.get(name)
        if var is None:
            if name.startswith("kho_"):
                doc.fail(path, "unknown kho_* var" + did_you_mean(name, _VARS), key=True,
                         what=f"{owner}: {name}")
            return value, where
        try:
            return _check_var(var, value, self.base), where
        except ValueError as e:
            doc.fail(path, str(e), what=f"{owner}: {name}")

    def _check_names(self) -> None:
        for h, decl in self.hosts.items():
            if h in self.groups:
                raise InventoryError(f"{decl.where}: host {h!r}: the name is also a group "
                                     f"(line {self.groups[h].line}); patterns would be ambiguous")

    def _depths(self) -> dict[str, int]:
        """Longest path from `all`; a cycle among children is an error."""
        depth: dict[str, int] = {}
        state: dict[str, int] = {}   # 1 = on the stack, 2 = done

        stack: list[tuple[str, int, int]] = [("all", 0, 0)]
        while stack:
            g, d, i = stack.pop()
            if i == 0:
                if state.get(g) == 1:
                    raise InventoryError(f"{self.doc.path}:{self.groups[g].line}: group {g!r}: "
                                         "is its own descendant (children form a cycle)")
                depth[g] = max(depth.get(g, 0), d)
                state[g] = 1
            kids = self.groups[g].children
            if i < len(kids):
                stack.append((g, d, i + 1))
                stack.append((kids[i], d + 1, 0))
            else:
                state[g] = 2
        return depth

    def _members(self) -> dict[str, set[str]]:
        """Every group each host is in: its direct groups and all their ancestors."""
        parents: dict[str, set[str]] = {g: set() for g in self.groups}
        for g, grp in self.groups.items():
            for c in grp.children:
                parents[c].add(g)
        out: dict[str, set[str]] = {}
        for h, decl in self.hosts.items():
            seen: set[str] = set()
            todo = list(decl.direct)
            while todo:
                g = todo.pop()
                if g not in seen:
                    seen.add(g)
                    todo.extend(parents[g])
            seen.add("all")
            out[h] = seen
        return out

    def _host(self, name: str, groups: set[str], depth: dict[str, int]) -> Host:
        merged: dict[str, tuple[Any, str]] = {}
        for g in sorted(groups, key=lambda g: (depth.get(g, 1), g)):
            merged.update(self.groups[g].vars)
        merged.update(self.hosts[name].vars)
        values = {k: v for k, (v, _) in merged.items()}
        arch = values.get("kho_arch", _VARS["kho_arch"].default)
        ps = values.get("kho_page_size", _VARS["kho_page_size"].default)
        if ps != 4096 and arch != "arm64":
            raise InventoryError(f"{merged['kho_page_size'][1]}: host {name!r}: kho_page_size: "
                                 f"{ps} needs kho_arch: arm64 (kho_arch is {arch})")
        ordered = tuple(g for g in sorted(groups, key=lambda g: self.groups[g].order)
                        if g != "all")
        return Host(name, ordered, values, self.hosts[name].where)


def load_inventory(path: str) -> Inventory:
    """Read and check an Ansible YAML inventory; InventoryError('file:line: ...') if bad."""
    doc = load_yaml(path, InventoryError)
    inv = _Loader(doc).run()
    with open(path, "rb") as f:
        inv.sha256 = hashlib.sha256(f.read()).hexdigest()
    return inv

