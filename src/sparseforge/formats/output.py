"""Where sparseforge writes: output directories that never destroy an input, atomic replacement, scratch
folders that a later run can recognise and clean up, and one-line errors when the disk is full.

Rules (the README's promise, tested in tests/test_data_safety.py):
- An output may not be an input (the model read, the offload scratch), lie inside one, or contain one, with or
  without --overwrite.
- --overwrite replaces only an empty directory or one that is recognisably an earlier sparseforge output
  (an artifact with sparseforge.json, or a `sparseforge run` folder with results.json); anything else is refused.
- Everything is written into a temporary sibling named `.NAME.sparseforge-tmp-PID-XXXX` and renamed into place at
  the end. A run killed before the rename (even by SIGKILL) leaves that folder behind; the next run that writes
  to the same place removes such folders whose process is gone, and says so in one line.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Iterable, Iterator

from sparseforge.errors import EnvironmentFailure, UserInputError

log = logging.getLogger(__name__)

ARTIFACT_MARKER = "sparseforge.json"
RUN_MARKER = "results.json"
SCRATCH_TAG = "sparseforge"  # every temporary name sparseforge creates contains ".sparseforge-<kind>-<pid>-"
# errno values that mean "the storage is full", not "the input is wrong".
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large", "os error 28", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the storage is full: an OSError with such an errno, or a library's wrapped I/O error
    (safetensors raises SafetensorError('... No space left on device (os error 28)'))."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    return not isinstance(exc, OSError) and any(t in str(exc) for t in _DISK_FULL_TEXT)


def scratch_prefix(name: str, kind: str) -> str:
    """A temporary name that says who made it (sparseforge), what for, and which process owns it."""
    return f".{name}.{SCRATCH_TAG}-{kind}-{os.getpid()}-"


def _owner_pid(entry: str) -> int | None:
    marker = f".{SCRATCH_TAG}-"
    if marker not in entry:
        return None
    rest = entry.split(marker, 1)[1].split("-")
    return int(rest[1]) if len(rest) >= 3 and rest[1].isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_scratch(directory: pathlib.Path, name: str | None = None, say=None) -> list[str]:
    """Remove temporary folders/files that sparseforge left in `directory` (for target `name`, or any) and whose
    owning process has exited. Returns their names; `say` (default: stderr) gets one line if any went."""
    if not directory.is_dir():
        return []
    removed = []
    for entry in os.listdir(directory):
        if name is not None and not entry.startswith((f".{name}.{SCRATCH_TAG}-", f".probe.{SCRATCH_TAG}-")):
            continue
        pid = _owner_pid(entry)
        if pid is None or _alive(pid):
            continue
        target = directory / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                target.unlink()
        removed.append(entry)
    if removed:
        line = (f"sparseforge: removed {len(removed)} temporary folder(s) left in '{directory}' by an interrupted earlier run "
                f"({', '.join(sorted(removed)[:3])}{', ...' if len(removed) > 3 else ''})")
        (say or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
    return removed


def _real(path: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(os.path.realpath(os.path.expanduser(str(path))))


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]], flag: str = "--out") -> None:
    """Refuse an output that is an input, lies inside one, or contains one. `inputs` are (what, path) pairs;
    paths that do not exist locally (hub ids) are skipped."""
    target = _real(out)
    for what, path in inputs:
        if path is None or not os.path.exists(os.path.expanduser(str(path))):
            continue
        source = _real(path)
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise UserInputError(
            f"{flag} '{out}' {relation} the {what} '{path}', which writing it would destroy; choose an {flag} outside it"
        )


def is_sparseforge_output(path: pathlib.Path) -> bool:
    """An empty directory, an artifact (sparseforge.json) or a `sparseforge run` folder (results.json)."""
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    return not entries or ARTIFACT_MARKER in entries or RUN_MARKER in entries


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                     flag: str = "--out", needed_bytes: int | None = None) -> pathlib.Path:
    """Fail early (before any long work) when `path` cannot be written as a new artifact directory (or, with
    `needed_bytes`, when its disk has less free space than that)."""
    path = pathlib.Path(path).expanduser()
    check_not_an_input(path, inputs, flag)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output path '{path}' is a file, not a directory; choose another {flag}")
    if path.exists() and not overwrite:
        raise UserInputError(f"output directory '{path}' already exists; choose a new {flag} or pass --overwrite")
    if path.exists() and not is_sparseforge_output(path):
        raise UserInputError(
            f"'{path}' is not empty and not an earlier sparseforge output (no {ARTIFACT_MARKER} or {RUN_MARKER}); "
            f"--overwrite replaces only those, so choose another {flag}"
        )
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    try:  # a real write probe: os.access says yes to root even on read-only mounts
        if not probe.is_dir():
            raise NotADirectoryError
        os.rmdir(tempfile.mkdtemp(prefix=scratch_prefix("probe", "probe"), dir=probe))
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise disk_full(probe, exc) from None
        raise UserInputError(f"cannot write to '{path.parent}' ('{probe}' is not a writable directory); choose a writable {flag}") from None
    free = free_bytes(probe)
    if needed_bytes and free is not None and free < needed_bytes:
        raise disk_full(probe, None, needed_bytes)
    return path


def weights_bytes(model_path: str | os.PathLike) -> int | None:
    """Bytes of a local checkpoint's safetensors files: about what writing it again takes (None for a hub id)."""
    directory = pathlib.Path(model_path)
    if not directory.is_dir():
        return None
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: pathlib.Path) -> None:
    """Give `root` and everything below it the modes the user's umask asks for. Temporary directories and
    files (mkdtemp, mkstemp, some writers) are private; an artifact should be as readable as any file the user
    writes."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def free_bytes(directory: pathlib.Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def disk_full(directory: pathlib.Path, exc: OSError | None = None, needed: int | None = None) -> EnvironmentFailure:
    free = free_bytes(directory)
    need = f"; about {needed / 1e6:.1f} MB needed" if needed else ""
    have = f", {free / 1e6:.1f} MB free" if free is not None else ""
    why = f" ({getattr(exc, 'strerror', None) or 'No space left on device'})" if exc is not None else ""
    return EnvironmentFailure(
        f"not enough space to write in '{directory}'{why}{need}{have}; nothing was written: free some space or "
        "choose an output on another disk"
    )


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                     needed_bytes: int | None = None) -> Iterator[pathlib.Path]:
    """Yield a temporary directory; on success it replaces `path`, on error it is removed (and so are any
    parent directories this call created), leaving what was there before untouched. `needed_bytes`, when known,
    is checked against the free space first, and a full disk becomes an EnvironmentFailure."""
    path = check_output_dir(path, overwrite, inputs)
    created = []
    probe = path.parent
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise disk_full(probe, exc, needed_bytes) from None
        raise UserInputError(f"cannot create '{path.parent}' ({exc.strerror}); choose a writable --out") from None
    remove_stale_scratch(path.parent, path.name)
    free = free_bytes(path.parent)
    try:
        if needed_bytes and free is not None and free < needed_bytes:
            raise disk_full(path.parent, None, needed_bytes)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=scratch_prefix(path.name, "tmp"), dir=path.parent))
    except BaseException as exc:
        _remove_created(created)
        if is_disk_full(exc):
            raise disk_full(path.parent, exc, needed_bytes) from None
        raise
    try:
        yield tmp
        apply_umask(tmp)
        if path.exists():
            backup = pathlib.Path(tempfile.mkdtemp(prefix=scratch_prefix(path.name, "old"), dir=path.parent))
            os.replace(path, backup / "old")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(backup / "old", path)
                raise
            finally:
                shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        if is_disk_full(exc):
            raise disk_full(path.parent, exc, needed_bytes) from None
        raise


def _remove_created(created: list[pathlib.Path]) -> None:
    for directory in created:  # innermost first
        try:
            directory.rmdir()
        except OSError:
            break


def write_text_atomic(path: str | os.PathLike, text: str, flag: str = "--json") -> pathlib.Path:
    """Atomic single-file write: a temporary sibling, then rename; mode as the umask allows."""
    target = pathlib.Path(path)
    if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise UserInputError(f"cannot write '{target}' (a directory, or its directory is missing or not writable); choose another {flag} path")
    remove_stale_scratch(target.parent, target.name, say=lambda line: log.info(line))
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(target.name, "tmp"), dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(exc):
            raise disk_full(target.parent, exc) from None
        raise
    return target
