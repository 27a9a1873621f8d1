"""Point an installed ELF file's run path at its own folder ($ORIGIN), in place.

scripts/llama_bin.py copies a shared build of llama-server (the binary and its lib*.so files) out
of the build tree; the copies must then find each other, not the build dir. Standard library only,
no patchelf: the new path is written over the old one's bytes, so it may not be longer.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path


class RunPathError(Exception):
    """The run path cannot be rewritten; str() names the file."""


# ELF constants (System V ABI): program header types and dynamic tags.
_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 0, 5, 15, 29


def set_origin_runpath(path: Path, new: str = "$ORIGIN") -> bool:
    """Rewrite an ELF64 little-endian file's DT_RUNPATH/DT_RPATH in place to `new`.

    A build tree's binaries search their libraries in the absolute build dir; once copied next
    to each other they must search $ORIGIN. The string is overwritten in place (padded with NULs),
    so `new` must not be longer than the old one. Returns True when something was rewritten;
    False for non-ELF files or files without a run path (static builds).
    """
    data = bytearray(Path(path).read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return False
    strtab_vaddr, paths = None, []
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == _DT_NULL:
            break
        if tag == _DT_STRTAB:
            strtab_vaddr = val
        elif tag in (_DT_RPATH, _DT_RUNPATH):
            paths.append(val)
    if strtab_vaddr is None or not paths:
        return False
    strtab = next((o + strtab_vaddr - v for v, o, n in loads if v <= strtab_vaddr < v + n), None)
    if strtab is None:
        raise RunPathError(f"{path}: string table outside loaded segments")
    changed = False
    for str_off in paths:
        start = strtab + str_off
        end = data.index(b"\0", start)
        old = bytes(data[start:end])
        if old == new.encode():
            continue
        if len(new) > len(old):
            raise RunPathError(f"{path}: run path {old!r} shorter than {new!r}")
        data[start:end] = new.encode().ljust(end - start, b"\0")
        changed = True
    if changed:
        tmp = Path(path).with_name(f".{Path(path).name}.rpath.tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, os.stat(path).st_mode)
        os.replace(tmp, path)
    return changed
