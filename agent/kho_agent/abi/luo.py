"""Live Update Orchestrator state (`luo-v5`): sessions, their files, and FLBs.

Mirrors include/linux/kho/abi/luo.h and kernel/liveupdate/luo_{core,session,file,flb}.c:
the KHO subtree "LUO" holds struct luo_ser {char compatible[8]; u64 liveupdate_num;
u64 sessions_pa; u64 flbs_pa} (packed). sessions_pa heads a block chain of
luo_session_ser {char name[64]; u64 files; u64 count}, each `files` a chain of
luo_file_ser {char compatible[48]; u64 data; u64 token}. flbs_pa points at one page:
luo_flb_header_ser {u64 pgcnt; u64 count} + luo_flb_ser {char name[48]; u64 data; u64 count}.

Sessions are serialised only at kexec time: in the running kernel sessions_pa is 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from . import memfd as memfd_abi
from .block import read_block_chain
from .memory import MemoryReadError, Reader
from .versions import LUO_VERSIONS

__all__ = ["NODE_NAME", "LUO_SER", "SESSION_SER", "FILE_SER", "FLB_HEADER", "FLB_SER",
           "LuoFile", "LuoSession", "LuoFlb", "LuoState", "decode_luo_ser", "read_luo"]

NODE_NAME = "LUO"                         # LUO_KHO_ENTRY_NAME
LUO_SER = struct.Struct("<8sQQQ")         # 32 bytes
SESSION_SER = struct.Struct("<64sQQ")     # 80 bytes
FILE_SER = struct.Struct("<48sQQ")        # 64 bytes
FLB_HEADER = struct.Struct("<QQ")
FLB_SER = struct.Struct("<48sQQ")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass
class LuoFile:
    """A preserved file: handler `compatible`, user `token`, handler `data` (phys)."""

    compatible: str
    data: int
    token: int
    memfd: Optional[memfd_abi.Memfd] = None

    def to_json(self) -> dict[str, Any]:
        return {"compatible": self.compatible, "token": self.token, "data": self.data,
                "memfd": self.memfd.to_json() if self.memfd else None}


@dataclass
class LuoSession:
    """A serialised session: name and its files."""

    name: str
    files_pa: int
    count: int
    files: list[LuoFile] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "files_pa": self.files_pa, "count": self.count,
                "files": [f.to_json() for f in self.files]}


@dataclass
class LuoFlb:
    """A preserved global object (File-Lifecycle-Bound) and how many files use it."""

    name: str
    data: int
    count: int


@dataclass
class LuoState:
    """Everything decodable from a luo_ser blob; `errors` says what was not."""

    compatible: str
    liveupdate_num: int
    sessions_pa: int
    flbs_pa: int
    sessions: list[LuoSession] = field(default_factory=list)
    flbs: list[LuoFlb] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "compatible": self.compatible, "liveupdate_num": self.liveupdate_num,
            "sessions_pa": self.sessions_pa, "flbs_pa": self.flbs_pa,
            "sessions": [s.to_json() for s in self.sessions],
            "flbs": [{"name": f.name, "data": f.data, "count": f.count} for f in self.flbs],
            "errors": list(self.errors), "notes": list(self.notes),
        }


def decode_luo_ser(blob: bytes) -> LuoState:
    """Decode struct luo_ser; unknown compatibles raise ValueError naming them."""
    if len(blob) < LUO_SER.size:
        raise ValueError(f"LUO state is too small ({len(blob)} < {LUO_SER.size})")
    compat, num, sessions_pa, flbs_pa = LUO_SER.unpack_from(blob, 0)
    name = _cstr(compat)
    if name not in LUO_VERSIONS:
        shown = name if name and name.isprintable() and "\ufffd" not in name else compat.hex()
        raise ValueError(f"unsupported LUO ABI {shown!r} (this build knows "
                         f"{', '.join(LUO_VERSIONS)})")
    return LuoState(name, num, sessions_pa, flbs_pa)


def read_luo(read: Reader, phys: int, size: int, page_size: int) -> LuoState:
    """Decode the LUO blob at `phys` and follow sessions, files, memfds and FLBs."""
    if size and size < LUO_SER.size:      # luo_core.c: the blob must hold struct luo_ser
        raise ValueError(f"LUO state is too small ({size} < {LUO_SER.size})")
    st = decode_luo_ser(read(phys, LUO_SER.size))
    if st.sessions_pa == 0:
        st.notes.append("no sessions serialised (LUO writes them at kexec time)")
    else:
        chain = read_block_chain(read, st.sessions_pa, SESSION_SER.size, page_size,
                                 what="session")
        st.errors += chain.errors
        for raw in chain.entries:
            name, files_pa, count = SESSION_SER.unpack(raw)
            sess = LuoSession(_cstr(name), files_pa, count)
            st.sessions.append(sess)
            fchain = read_block_chain(read, files_pa, FILE_SER.size, page_size,
                                      what=f"session {sess.name!r} file")
            st.errors += fchain.errors
            if not fchain.errors and len(fchain.entries) != count:
                st.errors.append(f"session {sess.name!r}: {len(fchain.entries)} files "
                                 f"serialised, count says {count}")
            for fraw in fchain.entries:
                fcompat, data, token = FILE_SER.unpack(fraw)
                f = LuoFile(_cstr(fcompat), data, token)
                if f.compatible == memfd_abi.COMPATIBLE:
                    try:
                        f.memfd = memfd_abi.read_memfd(read, data, page_size)
                        st.errors += [f"memfd token {token}: {e}" for e in f.memfd.errors]
                    except (MemoryReadError, ValueError) as e:
                        st.errors.append(f"memfd token {token}: {e}")
                sess.files.append(f)
    if st.flbs_pa:
        _read_flbs(read, st, page_size)
    return st


def _read_flbs(read: Reader, st: LuoState, page_size: int) -> None:
    try:
        head = read(st.flbs_pa, FLB_HEADER.size)
        pgcnt, count = FLB_HEADER.unpack(head)
        room = (pgcnt * page_size - FLB_HEADER.size) // FLB_SER.size
        if pgcnt == 0 or pgcnt > 1024 or count > room:
            st.errors.append(f"FLB header 0x{st.flbs_pa:x}: pgcnt {pgcnt}, count {count} invalid")
            return
        raw = read(st.flbs_pa + FLB_HEADER.size, count * FLB_SER.size)
    except MemoryReadError as e:
        st.errors.append(f"FLB header 0x{st.flbs_pa:x}: unreadable ({e})")
        return
    for i in range(count):
        name, data, n = FLB_SER.unpack_from(raw, i * FLB_SER.size)
        st.flbs.append(LuoFlb(_cstr(name), data, n))
