"""File-system rules every llmopt writer and reader follows.

- **Writes are atomic.** A file is written under a temporary name (``.llmopt-tmp-...``), flushed to
  disk, then renamed over its final name; the directory entry is synced after the rename. A crash
  or an exception at any moment leaves either the old file or the new one, never a truncated one.
- **Reads stay inside the directory.** A file named by a manifest must be a plain name (no
  separators, no ``..``, not absolute) of a regular file whose real path, symlinks resolved, is in the
  directory.
- **Crash points can be paused for tests.** ``LLMOPT_PAUSE_AT=<point>[:<k>]`` stops the process
  (``SIGSTOP``) when it reaches the ``k``-th occurrence (1-based; any when omitted) of a named point,
  after printing ``llmopt: paused at <point>:<k>`` on stderr, so a test can ``kill -9`` it there
  deterministically. Unset (the normal case) it costs one environment lookup per point.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from typing import Optional, Union

__all__ = ["LoadError", "TEMP_PREFIX", "PAUSE_ENV", "pause_point", "new_save_id", "temp_path", "fsync_directory",
           "write_bytes_atomic", "finish_file", "member_path", "read_json_member", "remove_quietly", "CHUNK_BYTES"]

TEMP_PREFIX = ".llmopt-tmp-"
PAUSE_ENV = "LLMOPT_PAUSE_AT"
# Large writes go out in chunks so a pause (and a real crash) can land in the middle of a file.
CHUNK_BYTES = 8 * 2**20

_PathLike = Union[str, os.PathLike]


class LoadError(ValueError, RuntimeError):
    """A saved directory cannot be loaded: the message names the file and what is wrong with it.

    A ``ValueError``; also a ``RuntimeError``, the type ``load_state_dict`` (and llmopt before this
    class existed) raised for a state that does not match the skeleton, so existing handlers still catch it.
    """


def pause_point(point: str, index: Optional[int] = None) -> None:
    """Stop this process here if ``LLMOPT_PAUSE_AT`` names ``point`` (and ``index``, when it gives one).

    Test-only: the crash-safety tests pause a saving subprocess at each named point and ``kill -9`` it.
    """
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, _, wanted = spec.partition(":")
    if name != point or (wanted and str(index) != wanted):
        return
    sys.stderr.write(f"llmopt: paused at {point}:{index}\n")
    sys.stderr.flush()
    if hasattr(signal, "SIGSTOP"):
        os.kill(os.getpid(), signal.SIGSTOP)


def new_save_id() -> str:
    """A fresh random id binding one save's tensor files to its manifest."""
    return uuid.uuid4().hex


def temp_path(directory: _PathLike, save_id: str, final_name: str) -> str:
    """The temporary name ``final_name`` is written under before its rename (hidden, recognisable)."""
    return os.path.join(directory, f"{TEMP_PREFIX}{save_id[:12]}-{final_name}")


def fsync_directory(directory: _PathLike) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finish_file(f) -> None:
    """Flush an open file to disk before it is renamed into place."""
    f.flush()
    os.fsync(f.fileno())


def remove_quietly(path: _PathLike) -> None:
    """Remove a file if it exists (cleanup must not mask the error that caused it)."""
    try:
        os.remove(path)
    except OSError:
        pass


def write_bytes_atomic(path: _PathLike, data: bytes, *, save_id: str, point: Optional[str] = None) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, fsync, rename, directory fsync.

    ``point`` names the crash point reached half-way through the write (see :func:`pause_point`).
    """
    directory, name = os.path.split(os.fspath(path))
    directory = directory or "."
    tmp = temp_path(directory, save_id, name)
    try:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if point:
                f.flush()
                pause_point(point)
            f.write(data[half:])
            finish_file(f)
        if point:
            pause_point(point + "_replace")
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_directory(directory)


def read_json_member(directory: _PathLike, name: str, *, written_by: str) -> object:
    """The parsed JSON file ``name`` of ``directory`` (confined like :func:`member_path`); every problem
    is a :class:`LoadError` (or ``FileNotFoundError``) naming the file. ``written_by`` names the
    function that writes such files, for the messages."""
    directory = os.fspath(directory)
    path = os.path.join(directory, name)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} not found: not a directory written by {written_by}")
    member_path(directory, name, source=directory, what="manifest")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise LoadError(f"{path}: not a JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        what = "is empty" if not raw.strip() else f"is not valid JSON ({exc})"
        raise LoadError(f"{path} {what}: not a manifest written by {written_by}, or a damaged one") from None


def member_path(directory: _PathLike, name: object, *, source: str, what: str = "file") -> str:
    """The path of ``name`` inside ``directory``, refusing anything that could read outside it.

    ``source`` (the manifest's path) and ``what`` go into the error: ``name`` must be a plain file
    name (no directory part, no ``..``, not absolute) of a regular file whose real path, symlinks
    resolved, lies in ``directory``.
    """
    if not isinstance(name, str) or not name:
        raise LoadError(f"{source}: {what} name must be a non-empty string, got {name!r}")
    if (os.path.isabs(name) or name in (".", "..") or "/" in name or "\\" in name
            or (os.altsep and os.altsep in name) or "\0" in name):
        raise LoadError(f"{source}: {what} {name!r} is not a plain file name inside the directory "
                        "(absolute paths, sub-directories and '..' are refused)")
    path = os.path.join(directory, name)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} is missing: the directory written by llmopt is incomplete")
    real_dir = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.dirname(real) != real_dir and not real.startswith(real_dir + os.sep):
        raise LoadError(f"{source}: {what} {name!r} is a link to {real}, outside the directory: refused")
    if not os.path.isfile(real):
        raise LoadError(f"{source}: {what} {name!r} is not a regular file")
    return path

