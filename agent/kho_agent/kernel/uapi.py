"""/dev/liveupdate ioctl numbers and argument layouts (Linux 7.2).

Mirrors include/uapi/linux/liveupdate.h of linux-source-7.2 (the Live Update Orchestrator's
userspace interface). Every command is `_IO(LIVEUPDATE_IOCTL_TYPE, nr)`: no size or
direction is encoded in the number; instead each argument struct starts with `__u32 size`
= sizeof(struct), and the kernel (kernel/liveupdate/luo_core.c, luo_session.c) copies it with
copy_struct_from_user(): smaller than `offsetofend(last field)` is EINVAL, larger with
non-zero tail bytes is E2BIG.

    LIVEUPDATE_IOCTL_TYPE            0xBA
    LIVEUPDATE_SESSION_NAME_LENGTH   64 (including the NUL)
    on /dev/liveupdate:   CREATE_SESSION  nr 0x00   RETRIEVE_SESSION nr 0x01
    on a session fd:      PRESERVE_FD     nr 0x40   RETRIEVE_FD      nr 0x41
                          FINISH          nr 0x42   GET_NAME         nr 0x43

Layouts (native byte order; field @ offset; total size):

    liveupdate_ioctl_create_session    size@0 u32, fd@4 s32, name@8 u8[64]            72
    liveupdate_ioctl_retrieve_session  same as create_session                         72
    liveupdate_session_preserve_fd     size@0 u32, fd@4 s32, token@8 __aligned_u64    16
    liveupdate_session_retrieve_fd     same as preserve_fd (fd is the output)         16
    liveupdate_session_finish          size@0 u32, reserved@4 u32                      8
    liveupdate_session_get_name        size@0 u32, reserved@4 u32, name@8 u8[64]      72

tests/test_linux_backend.py checks every number and size here against the header, compiled
with gcc. KHO exists on x86_64 and arm64 only (ARCH_SUPPORTS_KEXEC_HANDOVER), both of which use
the generic _IOC encoding (dir << 30 | size << 16 | type << 8 | nr).
"""

from __future__ import annotations

import struct

__all__ = [
    "LIVEUPDATE_IOCTL_TYPE", "LIVEUPDATE_SESSION_NAME_LENGTH", "LIVEUPDATE_DEVICE",
    "LIVEUPDATE_IOCTL_CREATE_SESSION", "LIVEUPDATE_IOCTL_RETRIEVE_SESSION",
    "LIVEUPDATE_SESSION_PRESERVE_FD", "LIVEUPDATE_SESSION_RETRIEVE_FD",
    "LIVEUPDATE_SESSION_FINISH", "LIVEUPDATE_SESSION_GET_NAME",
    "CREATE_SESSION", "RETRIEVE_SESSION", "PRESERVE_FD", "RETRIEVE_FD", "FINISH", "GET_NAME",
    "IOCTL_NAMES", "io", "encode_name", "decode_name",
    "pack_session_arg", "unpack_session_fd", "pack_fd_token", "unpack_fd",
    "pack_finish", "pack_get_name", "unpack_get_name",
]

LIVEUPDATE_DEVICE = "/dev/liveupdate"
LIVEUPDATE_IOCTL_TYPE = 0xBA
LIVEUPDATE_SESSION_NAME_LENGTH = 64

# enum { LIVEUPDATE_CMD_BASE = 0x00, ... } and enum { LIVEUPDATE_CMD_SESSION_BASE = 0x40, ... }
LIVEUPDATE_CMD_CREATE_SESSION = 0x00
LIVEUPDATE_CMD_RETRIEVE_SESSION = 0x01
LIVEUPDATE_CMD_SESSION_PRESERVE_FD = 0x40
LIVEUPDATE_CMD_SESSION_RETRIEVE_FD = 0x41
LIVEUPDATE_CMD_SESSION_FINISH = 0x42
LIVEUPDATE_CMD_SESSION_GET_NAME = 0x43

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0


def io(type_: int, nr: int) -> int:
    """_IO(type, nr) in the generic encoding (include/uapi/asm-generic/ioctl.h)."""
    return (_IOC_NONE << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) \
        | (0 << _IOC_SIZESHIFT)


LIVEUPDATE_IOCTL_CREATE_SESSION = io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION)
LIVEUPDATE_IOCTL_RETRIEVE_SESSION = io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION)
LIVEUPDATE_SESSION_PRESERVE_FD = io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD)
LIVEUPDATE_SESSION_RETRIEVE_FD = io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)
LIVEUPDATE_SESSION_FINISH = io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH)
LIVEUPDATE_SESSION_GET_NAME = io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_GET_NAME)

# Argument structs. "=" is native byte order with no implicit padding: every field below is
# at its natural alignment already (token is __aligned_u64 at offset 8).
CREATE_SESSION = struct.Struct("=Ii64s")     # liveupdate_ioctl_create_session
RETRIEVE_SESSION = struct.Struct("=Ii64s")   # liveupdate_ioctl_retrieve_session
PRESERVE_FD = struct.Struct("=IiQ")          # liveupdate_session_preserve_fd
RETRIEVE_FD = struct.Struct("=IiQ")          # liveupdate_session_retrieve_fd
FINISH = struct.Struct("=II")                # liveupdate_session_finish
GET_NAME = struct.Struct("=II64s")           # liveupdate_session_get_name

IOCTL_NAMES = {
    LIVEUPDATE_IOCTL_CREATE_SESSION: "LIVEUPDATE_IOCTL_CREATE_SESSION",
    LIVEUPDATE_IOCTL_RETRIEVE_SESSION: "LIVEUPDATE_IOCTL_RETRIEVE_SESSION",
    LIVEUPDATE_SESSION_PRESERVE_FD: "LIVEUPDATE_SESSION_PRESERVE_FD",
    LIVEUPDATE_SESSION_RETRIEVE_FD: "LIVEUPDATE_SESSION_RETRIEVE_FD",
    LIVEUPDATE_SESSION_FINISH: "LIVEUPDATE_SESSION_FINISH",
    LIVEUPDATE_SESSION_GET_NAME: "LIVEUPDATE_SESSION_GET_NAME",
}


def encode_name(name: str) -> bytes:
    """A session name as the kernel wants it: UTF-8, NUL-terminated, at most 63 bytes.

    Raises ValueError when it does not fit (the kernel would truncate it silently
    in some paths; we refuse instead) or when it is empty or contains a NUL.
    """
    raw = name.encode("utf-8")
    if not raw or b"\0" in raw:
        raise ValueError(f"bad session name {name!r}")
    if len(raw) >= LIVEUPDATE_SESSION_NAME_LENGTH:
        raise ValueError(f"session name {name!r} is {len(raw)} bytes; at most "
                         f"{LIVEUPDATE_SESSION_NAME_LENGTH - 1} fit")
    return raw


def decode_name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def pack_session_arg(name: str) -> bytearray:
    """Argument of CREATE_SESSION / RETRIEVE_SESSION (fd = -1 until the kernel fills it)."""
    return bytearray(CREATE_SESSION.pack(CREATE_SESSION.size, -1, encode_name(name)))


def unpack_session_fd(buf: bytes | bytearray) -> int:
    return CREATE_SESSION.unpack(bytes(buf))[1]


def pack_fd_token(fd: int, token: int) -> bytearray:
    """Argument of PRESERVE_FD (fd in) / RETRIEVE_FD (fd out, pass -1)."""
    if not 0 <= token < 1 << 64:
        raise ValueError(f"token {token} is not a u64")
    return bytearray(PRESERVE_FD.pack(PRESERVE_FD.size, fd, token))


def unpack_fd(buf: bytes | bytearray) -> int:
    return PRESERVE_FD.unpack(bytes(buf))[1]


def pack_finish() -> bytearray:
    return bytearray(FINISH.pack(FINISH.size, 0))


def pack_get_name() -> bytearray:
    return bytearray(GET_NAME.pack(GET_NAME.size, 0, b""))


def unpack_get_name(buf: bytes | bytearray) -> str:
    return decode_name(GET_NAME.unpack(bytes(buf))[2])
