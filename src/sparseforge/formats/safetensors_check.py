"""Check a safetensors file's structure before any library reads it, so a truncated download or a corrupt file
ends in one line that names the file, not in a traceback from deep inside a loader.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to its dtype, shape
and [start, end) byte offsets into the data that follows (plus an optional "__metadata__" of strings). The check
reads only the header and the file size, so it costs the same for a 16 MB and a 16 GB file. It cannot see flipped
bits inside the tensor data (the format has no checksum): those load as different numbers.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

from sparseforge.errors import UserInputError

# Bytes per element of every dtype the format defines.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


def _bad(path: pathlib.Path, problem: str) -> UserInputError:
    return UserInputError(
        f"'{path}' is not a valid safetensors file ({problem}); it is corrupt or incomplete: download or save it again"
    )


def check_safetensors(path: str | os.PathLike) -> dict:
    """Validate the file's header against its size; return the header. Raises UserInputError naming the file."""
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise _bad(path, f"header length {n} does not fit in a file of {size} bytes")
            raw = fh.read(n)
    except OSError as exc:
        raise UserInputError(f"cannot read '{path}' ({exc.strerror}); check the path and its permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    data_size = size - 8 - n
    spans = []
    for name, spec in header.items():
        if name == "__metadata__":
            if spec is not None and not (isinstance(spec, dict) and all(isinstance(v, str) for v in spec.values())):
                raise _bad(path, "__metadata__ is not a map of strings")
            continue
        if not isinstance(spec, dict):
            raise _bad(path, f"entry '{name}' is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise _bad(path, f"tensor '{name}' has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _bad(path, f"tensor '{name}' has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _bad(path, f"tensor '{name}' has malformed data_offsets {offsets!r}")
        start, end = offsets
        expected = math.ceil(math.prod(shape) * DTYPE_BYTES[dtype])
        if not 0 <= start <= end or end - start != expected:
            raise _bad(path, f"tensor '{name}' spans bytes {start}..{end}, but dtype {dtype} and shape {shape} need {expected}")
        if end > data_size:
            raise _bad(path, f"tensor '{name}' ends at byte {end} of a data section of only {data_size} bytes (truncated)")
        spans.append((start, end))
    spans.sort()
    position = 0
    for start, end in spans:
        if start != position:
            raise _bad(path, f"tensor data is not contiguous at byte {position}")
        position = end
    if position != data_size:
        raise _bad(path, f"the tensors cover {position} bytes of a {data_size}-byte data section")
    return header


def check_safetensors_dir(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Check every *.safetensors file directly in `directory`; return them sorted."""
    files = sorted(pathlib.Path(directory).glob("*.safetensors"))
    for f in files:
        check_safetensors(f)
    return files
