"""bpf(2) from Python: maps, program loading, links, and a small instruction assembler.

No compiler and no kernel headers at run time (neither exists where the proxy runs):
the few programs the proxy needs are assembled here instruction by instruction and
loaded with the bpf system call through ctypes. The constants are the kernel's UAPI
(``include/uapi/linux/bpf.h``), which never changes a published value.

Every descriptor this module returns belongs to the calling process: a link made here
is not pinned, so the kernel detaches it when the last descriptor closes, which is at
the latest when the process exits or is killed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

from ..errors import WakeproxyError

_SYS_BPF = 321  # x86_64; bpf(2) has no libc wrapper
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Commands (enum bpf_cmd)
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM = 0, 1, 2, 3
PROG_LOAD = 5
OBJ_GET_INFO_BY_FD = 15
LINK_CREATE = 28
LINK_GET_FD_BY_ID = 30
LINK_GET_NEXT_ID = 31

# Map types, program types, attach types, link types
MAP_HASH, MAP_ARRAY, MAP_SOCKMAP = 1, 2, 15
PROG_SK_LOOKUP = 30
ATTACH_SK_LOOKUP = 36
LINK_NETNS = 5

# Helpers (enum bpf_func_id)
FN_MAP_LOOKUP_ELEM = 1
FN_SK_RELEASE = 86
FN_SK_ASSIGN = 124

# sk_lookup's verdict
SK_PASS = 1

# The attribute union is at most a few hundred bytes; the kernel accepts a shorter one
# (what it does not see is zero) and refuses a longer one with non-zero tail bytes.
_ATTR_SIZE = 128
_LOG_SIZE = 1 << 16


class BpfError(WakeproxyError):
    """A bpf(2) call failed: which one, its errno and, for a load, the verifier's log."""

    def __init__(self, what: str, code: int, log: str = "") -> None:
        self.what = what
        self.errno = code
        self.log = log
        text = f"{what}: {os.strerror(code)} (errno {code})"
        if log:
            text += f"; verifier log: {log.strip()[-600:]}"
        super().__init__(text)


def _call(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str, log: str = "") -> int:
    result = _libc.syscall(_SYS_BPF, cmd, attr, len(attr))
    if result < 0:
        raise BpfError(what, ctypes.get_errno(), log)
    return int(result)


def _attr(fmt: str, *values: object) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    return attr


def _address(buffer: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buffer)


# ---- maps


def map_create(kind: int, key_size: int, value_size: int, entries: int, name: str) -> int:
    """A new map's descriptor (owned by the caller: close it, or it goes with the process)."""
    attr = _attr("=IIIIIII16s", kind, key_size, value_size, entries, 0, 0, 0, name.encode()[:15])
    return _call(MAP_CREATE, attr, f"creating the {name} map")


def map_update(fd: int, key: bytes, value: bytes, what: str) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value)
    _call(MAP_UPDATE_ELEM, _attr("=I4xQQQ", fd, _address(k), _address(v), 0), what)


def map_delete(fd: int, key: bytes, *, missing: tuple[int, ...] = (errno.ENOENT,)) -> bool:
    """Delete ``key``; False when it was not there (the errnos ``missing`` names: a
    SOCKMAP answers EINVAL for an empty slot)."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _call(MAP_DELETE_ELEM, _attr("=I4xQ", fd, _address(k)), "deleting a map entry")
    except BpfError as exc:
        if exc.errno in missing:
            return False
        raise
    return True


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value at ``key``, or None when there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _call(MAP_LOOKUP_ELEM, _attr("=I4xQQ", fd, _address(k), _address(v)), "a map lookup")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


# ---- programs and links


_LOAD_ATTEMPTS = 10


def prog_load(kind: int, attach: int, code: bytes, name: str) -> int:
    """Load a program; a refusal raises BpfError with the verifier's log."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    attr = _attr(
        "=IIQQIIQII16sII",
        kind,
        len(code) // 8,
        _address(insns),
        _address(license_),
        1,  # log level: the verifier explains a refusal
        _LOG_SIZE,
        _address(log),
        0,
        0,
        name.encode()[:15],
        0,
        attach,
    )
    # The verifier gives up with EAGAIN when a signal arrives while it works (a child's
    # SIGCHLD will do): try again, as libbpf does; a real refusal is another errno.
    left = _LOAD_ATTEMPTS
    while True:
        left -= 1
        try:
            return _call(PROG_LOAD, attr, f"loading the {name} program")
        except BpfError as exc:
            if exc.errno != errno.EAGAIN or left == 0:
                text = log.value.decode(errors="replace")
                raise BpfError(exc.what, exc.errno, text) from None


def link_create(prog_fd: int, target_fd: int, attach: int, what: str) -> int:
    return _call(LINK_CREATE, _attr("=IIII", prog_fd, target_fd, attach, 0), what)


class LinkInfo(NamedTuple):
    id: int
    kind: int
    prog_id: int
    netns_ino: int  # for a netns link (LINK_NETNS), the namespace's inode; else 0
    attach: int


def link_info(fd: int) -> LinkInfo:
    info = ctypes.create_string_buffer(64)
    attr = _attr("=IIQ", fd, len(info), _address(info))
    _call(OBJ_GET_INFO_BY_FD, attr, "reading a link's info")
    kind, link_id, prog_id = struct.unpack_from("=III", info, 0)
    # The union after the first three fields is 8-byte aligned: netns_ino, attach_type.
    netns_ino, attach = struct.unpack_from("=II", info, 16)
    return LinkInfo(link_id, kind, prog_id, netns_ino if kind == LINK_NETNS else 0, attach)


def links() -> Iterator[LinkInfo]:
    """Every BPF link in the kernel (the list ``bpftool link`` shows); needs CAP_SYS_ADMIN."""
    current = 0
    while True:
        attr = _attr("=II", current, 0)
        try:
            _call(LINK_GET_NEXT_ID, attr, "listing links")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:  # the end of the list
                return
            raise
        current = struct.unpack_from("=I", attr, 4)[0]
        try:
            fd = _call(LINK_GET_FD_BY_ID, _attr("=I", current), "opening a link")
        except BpfError:
            continue  # gone since it was listed
        try:
            yield link_info(fd)
        finally:
            os.close(fd)


# ---- an assembler for the handful of instructions the proxy's programs use

# Registers
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

_INSN = struct.Struct("<BBhi")
_PSEUDO_MAP_FD = 1


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, (src << 4) | dst, off, imm)


def _s32(value: int) -> int:
    """An unsigned 32-bit constant as the signed immediate the encoding holds."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class Asm:
    """Instructions with named jump targets, resolved by ``code()``."""

    def __init__(self) -> None:
        self._insns: list[bytes | tuple[int, int, int, int, str]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._insns)

    def mov(self, dst: int, src: int) -> None:
        self._insns.append(_insn(0xBF, dst, src))  # BPF_ALU64 | BPF_MOV | BPF_X

    def mov_imm(self, dst: int, imm: int) -> None:
        self._insns.append(_insn(0xB7, dst, imm=imm))  # BPF_ALU64 | BPF_MOV | BPF_K

    def add_imm(self, dst: int, imm: int) -> None:
        self._insns.append(_insn(0x07, dst, imm=imm))  # BPF_ALU64 | BPF_ADD | BPF_K

    def load32(self, dst: int, src: int, off: int) -> None:
        self._insns.append(_insn(0x61, dst, src, off))  # BPF_LDX | BPF_MEM | BPF_W

    def load64(self, dst: int, src: int, off: int) -> None:
        self._insns.append(_insn(0x79, dst, src, off))  # BPF_LDX | BPF_MEM | BPF_DW

    def store32(self, dst: int, off: int, src: int) -> None:
        self._insns.append(_insn(0x63, dst, src, off))  # BPF_STX | BPF_MEM | BPF_W

    def store32_imm(self, dst: int, off: int, imm: int) -> None:
        self._insns.append(_insn(0x62, dst, off=off, imm=_s32(imm)))  # BPF_ST | BPF_MEM | BPF_W

    def atomic_add64(self, dst: int, off: int, src: int) -> None:
        # BPF_STX | BPF_ATOMIC | BPF_DW, imm BPF_ADD: lock *(u64 *)(dst + off) += src
        self._insns.append(_insn(0xDB, dst, src, off, 0x00))

    def map_fd(self, dst: int, fd: int) -> None:
        # BPF_LD | BPF_IMM | BPF_DW, two slots: the loader turns the fd into the map.
        self._insns.append(_insn(0x18, dst, _PSEUDO_MAP_FD, imm=fd))
        self._insns.append(_insn(0))

    def call(self, helper: int) -> None:
        self._insns.append(_insn(0x85, imm=helper))  # BPF_JMP | BPF_CALL

    def exit(self) -> None:
        self._insns.append(_insn(0x95))  # BPF_JMP | BPF_EXIT

    def jump_if_not32(self, reg: int, imm: int, target: str) -> None:
        """Jump unless the register's low 32 bits equal ``imm`` (BPF_JMP32 | BPF_JNE | BPF_K)."""
        self._insns.append((0x56, reg, 0, _s32(imm), target))

    def jump_if_zero(self, reg: int, target: str) -> None:
        self._insns.append((0x15, reg, 0, 0, target))  # BPF_JMP | BPF_JEQ | BPF_K

    def jump_if_nonzero(self, reg: int, target: str) -> None:
        self._insns.append((0x55, reg, 0, 0, target))  # BPF_JMP | BPF_JNE | BPF_K

    def jump(self, target: str) -> None:
        self._insns.append((0x05, 0, 0, 0, target))  # BPF_JMP | BPF_JA

    def code(self) -> bytes:
        out = []
        for index, insn in enumerate(self._insns):
            if isinstance(insn, bytes):
                out.append(insn)
                continue
            opcode, dst, src, imm, target = insn
            # Offsets count instructions from the one after the jump.
            out.append(_insn(opcode, dst, src, self._labels[target] - index - 1, imm))
        return b"".join(out)
