"""YAML with the line of every key and value kept, so every validation error of an input
file (inventory, playbook) can say `file:line: field: problem` in one line.

Bounded: a file is read up to MAX_FILE_BYTES, decoded values (aliases expanded) are
counted up to MAX_YAML_NODES and nesting is limited to MAX_YAML_DEPTH, so a hostile or
mistaken file is refused with a message instead of exhausting the controller.

>>> import tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "x.yaml")
>>> _ = open(p, "w").write("a:\\n  b: [1, 2]\\n")
>>> doc = load_yaml(p)
>>> doc.data, doc.line(("a", "b", 1))
({'a': {'b': [1, 2]}}, 2)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

import yaml

__all__ = ["YamlDoc", "YPath", "load_yaml", "field_name", "one_line", "did_you_mean",
           "MAX_FILE_BYTES", "MAX_YAML_NODES", "MAX_YAML_DEPTH"]

MAX_FILE_BYTES = 16 << 20        # an inventory or playbook file
MAX_YAML_NODES = 1_000_000       # decoded values per file, YAML aliases expanded
MAX_YAML_DEPTH = 100             # nesting of mappings and lists


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
        raise self.error(one_line(prefix + (f"{what}: {msg}" if what else msg)))

    def mapping(self, path: YPath, value: Any, allowed: list[str] | tuple[str, ...],
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


def one_line(msg: str) -> str:
    """`msg` with line breaks escaped, so an error stays one line whatever the input held."""
    return msg.replace("\r", "\\r").replace("\n", "\\n")


def did_you_mean(word: str, choices: Any) -> str:
    """' (did you mean 'x'?)' for a near miss among `choices`, else ''."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"{v!r}", bool: f"{v!r}"}.get(
        type(v), repr(v))


def _short(v: Any, limit: int = 80) -> str:
    """repr(v), cut to `limit` characters (messages quote user values, which may be huge)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def load_yaml(path: str, error: type = ValueError) -> YamlDoc:
    """Parse one YAML document, keeping lines; syntax errors raise `error('file:line:col: ...')`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise error(f"{path}: file too large (at most {MAX_FILE_BYTES} bytes)")
        text = raw.decode("utf-8")
    except OSError as e:
        raise error(one_line(f"{path}: {e.strerror or e}")) from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise error(f"{path}: YAML nested too deeply (at most {MAX_YAML_DEPTH} levels)") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise error(one_line(f"{where}: YAML syntax error: {problem}")) from None
    except yaml.YAMLError as e:
        raise error(one_line(f"{path}: YAML error: {(str(e).splitlines() or [''])[0]}")) from None
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
        self.nodes = 0

    def build(self, node: yaml.Node, path: YPath) -> Any:
        if id(node) in self.active:
            self.doc.fail(path, "recursive YAML alias")
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            self.doc.fail(path, f"too many values (at most {MAX_YAML_NODES}, YAML aliases "
                                "expanded)")
        if len(path) > MAX_YAML_DEPTH:
            self.doc.fail(path, f"nested too deeply (at most {MAX_YAML_DEPTH} levels)", what="")
        self.doc.value_lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.ctor.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError, OverflowError, TypeError) as e:
                self.doc.fail(path, f"bad value: {getattr(e, 'problem', None) or e}")
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(n, path + (i,)) for i, n in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            self.doc.fail(path, f"unexpected YAML node {type(node).__name__}")
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
