"""The one registry of the simulator's fault names, and the parser of placed faults.

Faults are controller-side only: the twin server (twinserver.py) interprets the twin
faults, `kho-fleet sim handover` (handover.py) also injects the image fault itself, and
the inventory's kho_sim_faults and the CLI's --fault are checked against this list. The
agent never interprets a fault: it passes a name through to the twin's control socket
(TwinKernel.set_fault) and the twin judges it, so the agent zipapp does not carry this.

Page faults may name their place the way the report names workloads:
`bitflip@SESSION/TOKEN:OFFSET` (OFFSET: bytes into the memfd, decimal or 0x-hex; the bit
flipped is in the byte at OFFSET), `zero-page@...`, `drop-folio@...`, `stale-page@...`
(the page containing OFFSET), `swap-pages@SESSION/TOKEN:OFFSET,OFFSET` (the two pages'
bytes trade places). Without a place the twin picks a preserved page at random (seeded),
as the bare names always did. Several faults may be given at once (the inventory's
kho_sim_faults list, repeated --fault options); each placed fault is checked against the
workloads before anything starts (check_placements).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["TWIN_FAULTS", "IMAGE_FAULTS", "ALL_FAULTS", "PLACED_FAULTS", "FaultError",
           "Placement", "Fault", "parse_fault", "check_placement", "check_placements",
           "workload_sizes", "fault_names"]

# Injected by the twin host (TwinConfig.faults, `twinkernel --fault`, the control op
# "fault"); they persist until cleared. Value (NAME=N): slow-boot seconds, and the
# RETRIEVE_FD count for kill-agent-before-finish.
TWIN_FAULTS: tuple[str, ...] = (
    "kexec-load-fails",          # kexec_file_load fails with ENOMEM
    "never-returns",             # the host stays down after kexec -e
    "slow-boot",                 # the next kernel takes longer to come up
    "bitflip",                   # one bit of a preserved page flips across kexec
    "lost-page",                 # one preserved page drops out of the KHO tree
    "abi-mismatch",              # the next kernel speaks another KHO ABI than staged
    "kill-agent-before-finish",  # the /dev/liveupdate holder dies before FINISH
    "zero-page",                 # a preserved page comes back all zeros
    "swap-pages",                # two preserved pages of one memfd trade their bytes
    "drop-folio",                # a preserved folio drops out of the tree (as lost-page)
    "stale-page",                # a page comes back as an old copy: as PRESERVE_FD copied
                                 # it when written since, else a stand-in older version
                                 # (twinserver.stale_copy): never zeros, never the bytes now
)

# Injected by the controller through what it stages (no twin involvement).
IMAGE_FAULTS: tuple[str, ...] = (
    "abi-mismatch-image",        # the staged image speaks kho-v3: stage must refuse it
)

ALL_FAULTS: tuple[str, ...] = TWIN_FAULTS + IMAGE_FAULTS

# The faults that may name a place (@SESSION/TOKEN:OFFSET); swap-pages takes two offsets.
PLACED_FAULTS: tuple[str, ...] = ("bitflip", "zero-page", "swap-pages", "drop-folio",
                                  "stale-page")
_MAX_TEXT = 200


class FaultError(ValueError):
    """A fault text that is not one: the message is one line naming the text."""


@dataclass(frozen=True)
class Placement:
    """Where a page fault strikes: a workload (session, token) and byte offsets in it."""

    session: str
    token: int
    offsets: tuple[int, ...]

    def text(self) -> str:
        return f"{self.session}/{self.token:#x}:" + ",".join(f"{o:#x}" for o in self.offsets)


@dataclass(frozen=True)
class Fault:
    """One parsed fault: NAME, NAME=VALUE or NAME@PLACE."""

    name: str
    value: Optional[float] = None
    place: Optional[Placement] = None


def _int(text: str, what: str, whole: str) -> int:
    try:
        v = int(text.strip(), 0)
    except ValueError:
        raise FaultError(f"fault {whole!r}: {what} {text!r} is not an integer "
                         "(decimal or 0x-hex)") from None
    if v < 0:
        raise FaultError(f"fault {whole!r}: {what} {text!r} is negative")
    return v


def parse_fault(text: str, known: tuple[str, ...] = ALL_FAULTS) -> Fault:
    """NAME, NAME=NUMBER or NAME@SESSION/TOKEN:OFFSET[,OFFSET]; FaultError (one line)."""
    if not isinstance(text, str) or not text or len(text) > _MAX_TEXT:
        raise FaultError(f"fault {str(text)[:60]!r}: expected a fault name "
                         f"(at most {_MAX_TEXT} characters)")
    name, at, place = text.partition("@")
    if at:
        if name not in PLACED_FAULTS:
            raise FaultError(f"fault {text!r}: only {', '.join(PLACED_FAULTS)} take a place "
                             "(@SESSION/TOKEN:OFFSET)")
        session, slash, rest = place.rpartition("/")
        token, colon, offs = rest.partition(":")
        if not slash or not session or not colon or not offs:
            raise FaultError(f"fault {text!r}: expected {name}@SESSION/TOKEN:OFFSET"
                             + (",OFFSET" if name == "swap-pages" else "")
                             + " (e.g. bitflip@vm-ram/0x1001:0x5000)")
        offsets = tuple(_int(o, "offset", text) for o in offs.split(","))
        want = 2 if name == "swap-pages" else 1
        if len(offsets) != want:
            raise FaultError(f"fault {text!r}: {name} takes {want} offset"
                             f"{'s' if want > 1 else ''}, got {len(offsets)}")
        tok = _int(token, "token", text)
        if tok >= 1 << 64:
            raise FaultError(f"fault {text!r}: token {token!r} is not a u64")
        return Fault(name, None, Placement(session, tok, offsets))
    name, eq, val = text.partition("=")
    if name not in known:
        raise FaultError(f"unknown fault {name!r} (known: {', '.join(known)})")
    if not eq:
        return Fault(name)
    try:
        num = float(val)
    except ValueError:
        raise FaultError(f"fault {text!r}: the value must be a number") from None
    if not num >= 0:
        raise FaultError(f"fault {text!r}: the value must be a number >= 0")
    return Fault(name, num)


def check_placement(f: Fault, sizes: Mapping[tuple[str, int], Optional[int]], page_size: int,
                    where: str = "spec") -> None:
    """FaultError unless `f`'s place is in a workload of `sizes` ({(session, token): size};
    None: an adopted memfd, whose size only the host knows): an existing workload, offsets
    inside it, swap-pages on two different pages."""
    p = f.place
    if p is None:
        return
    text = f"{f.name}@{p.text()}"
    if (p.session, p.token) not in sizes:
        have = ", ".join(f"{s}/{t:#x}" for s, t in sorted(sizes)) or "none"
        raise FaultError(f"fault {text!r}: no workload {p.session}/{p.token:#x} in {where} "
                         f"(workloads: {have})")
    size = sizes[(p.session, p.token)]
    for o in p.offsets:
        if size is not None and o >= size:
            raise FaultError(f"fault {text!r}: offset {o:#x} is past the end of "
                             f"{p.session}/{p.token:#x} ({size:#x} bytes)")
    if len(p.offsets) == 2 and p.offsets[0] // page_size == p.offsets[1] // page_size:
        raise FaultError(f"fault {text!r}: both offsets are in the same {page_size}-byte page")


def check_placements(texts: Iterable[str], sizes: Mapping[tuple[str, int], Optional[int]],
                     page_size: int, where: str = "spec") -> None:
    """check_placement for every placed fault of `texts` (a host's kho_sim_faults, or the
    CLI's --fault options); FaultError (one line) at the first bad one."""
    for t in texts:
        check_placement(parse_fault(t), sizes, page_size, where)


def workload_sizes(spec: Any) -> dict[tuple[str, int], Optional[int]]:
    """{(session, token): size} of a kho_agent WorkloadSpec (None for an adopted memfd)."""
    return {(s.name, int(m.token)): (None if m.adopt else int(m.size))
            for s in spec.sessions for m in s.memfds}


def fault_names(texts: list[str]) -> list[str]:
    """The fault names (placements and values stripped) of fault texts."""
    return [parse_fault(t).name for t in texts]
