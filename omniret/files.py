"""Every file omniret writes goes through this module, so that a kill, an exception or a full disk never leaves a
torn file where a good one was.

- `atomic_path(path)` / `atomic_open(path)`: the writer writes a temporary file beside `path` (same directory, so
  the rename cannot cross file systems); when it finishes, the file is fsynced, renamed over `path` (os.replace is
  atomic on POSIX) and the directory is fsynced. If the writer fails (OSError ENOSPC, KeyboardInterrupt, anything)
  the temporary file is removed and `path` keeps its old content.
- `replace_directory(path, write, manifest)`: the same for a directory of files (an index bundle): the new one is
  built beside it, the old one moved aside, the new one renamed in place, and only then the old one deleted. An
  existing directory without our manifest file is refused, never deleted.
- `RunLock(directory)`: an exclusive, non-blocking lock (fcntl.flock) so that two processes never write one run.
- `append_jsonl` / `read_jsonl_log`: the append-only logs (metrics.jsonl); a line torn by a kill is dropped on read.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, List

from omniret.errors import InputError, RunLockedError

__all__ = ["atomic_path", "atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_torch_save", "atomic_savez", "replace_directory", "RunLock", "append_jsonl", "read_jsonl_log",
           "fsync_dir", "interrupted_replacements", "dumps_lines", "load_safetensors"]


def fsync_dir(directory) -> None:
    """Make a rename in `directory` durable (some file systems cannot open a directory: then it is skipped)."""
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


def _temp_beside(path: Path) -> Path:
    # the same suffix at the end: writers that pick the format from it (np.savez, savefig) keep working
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_path(path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that takes a file name (safetensors, FAISS, savefig).
    When the block ends normally the file is fsynced and renamed over `path`; when it raises (KeyboardInterrupt
    included) the temporary file is removed and `path` is untouched. `durable=False` skips the fsyncs, for many
    small files that can be made again (a killed process still leaves whole files; a power cut may not)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        if exc.errno is None:
            raise
        # the same error (ENOSPC, EACCES ...) naming the file the user asked for, not our temporary name
        raise OSError(exc.errno, exc.strerror, str(path)) from exc  # (OSError picks the subclass by errno)
    except BaseException:
        _remove(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **open_kwargs):
    """`open(path, mode)` whose result appears at `path` only once the block has finished without error."""
    if not mode.startswith("w"):
        raise ValueError(f"mode must be a write mode ('w', 'wb', ...), got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


def publish_directory_once(root, fill: Callable[[str], None], prefix: str = ".tmp-") -> None:
    """Build a directory that is written once and then only read (a data cache): `fill(tmp)` writes into a temporary
    directory beside `root`, which is then renamed to `root`. An interrupted or failed build leaves no half
    directory; when another process published `root` first, its copy is kept and ours is removed."""
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        fill(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path, obj: Any, **dump_kwargs) -> None:
    atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def atomic_torch_save(obj: Any, path) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_savez(path, **arrays) -> None:
    """np.savez to `path` (written to a file object, so numpy adds no second .npz suffix)."""
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def replace_directory(path, write: Callable[[Path], None], manifest: str, what: str = "an output of ours") -> None:
    """Build a directory output with `write(tmp_dir)`, then swap it in for `path`.

    `path`, when it exists, must be a directory holding `manifest` (one we wrote): anything else (a file, the
    current directory, a user's folder) raises InputError and is left alone. The old directory is moved aside
    before the new one is renamed in place and is deleted only after that; a kill in between leaves it beside
    `path` as `.<name>.old-<pid>` (the error of a later load says so)."""
    path = Path(path)
    target = path.absolute()
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise InputError(f"{path}: exists and is not a directory; refusing to replace it "
                             "(remove it or choose another output path)")
        if not (path / manifest).is_file():
            raise InputError(f"{path}: exists and is not {what} (no {manifest}); refusing to replace it "
                             "(remove it or choose another output path)")
        if target == Path.cwd().absolute():
            raise InputError(f"{path}: is the current directory; choose another output path")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    aside = parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    moved_aside = False
    try:
        write(tmp)
        fsync_dir(tmp)
        if target.exists():
            os.rename(target, aside)
            moved_aside = True
        os.rename(tmp, target)
        fsync_dir(parent)
    except BaseException:
        if moved_aside and not target.exists():
            os.rename(aside, target)  # put the old one back
            moved_aside = False
        _remove(tmp)
        raise
    if moved_aside:
        shutil.rmtree(aside, ignore_errors=True)


def interrupted_replacements(path) -> List[Path]:
    """Old copies that a killed `replace_directory` left beside `path` (for an error message)."""
    target = Path(path).absolute()
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.glob(f".{target.name}.old-*") if p.is_dir())


class RunLock:
    """An exclusive lock on a run directory, held while the run writes it.

        with RunLock(output_dir):
            ...

    fcntl.flock on `<directory>/.lock`, non-blocking: a second holder gets a RunLockedError naming the PID of the
    first. The kernel drops the lock when its holder exits, even on kill -9, so a stale lock file never blocks."""

    FILE = ".lock"

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / self.FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.directory}: another process (PID {holder}) is running in this directory; "
                                 "wait for it to finish or use another output directory") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def append_jsonl(path, record: dict) -> None:
    """Append one record to an append-only log in a single write (a kill tears at most the last line, which
    `read_jsonl_log` drops)."""
    line = json.dumps(record) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl_log(path) -> List[dict]:
    """The records of an append-only jsonl log. A last line torn by a kill mid-append (no newline, not valid
    JSON) is dropped with a warning naming the file; a bad line anywhere else raises InputError naming the file
    and line (the log was edited or damaged, and rewriting it would lose records)."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if n == len(lines):  # the last line, with no newline after it: a torn append
                warnings.warn(f"{path}: dropped a torn last line (a write was interrupted)", stacklevel=2)
                break
            raise InputError(f"{path}:{n}: not a JSON record ({exc}); fix or remove the line") from None
        records.append(record)
    return records


def dumps_lines(records) -> str:
    """Records as jsonl text (one JSON object a line)."""
    buf = io.StringIO()
    for r in records:
        buf.write(json.dumps(r) + "\n")
    return buf.getvalue()


def load_safetensors(path) -> dict:
    """The tensors of a safetensors file; a damaged or foreign file raises InputError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc}); save the model again") from None
