"""Files fastgpt writes appear whole or not at all, with the permissions a plain ``open()`` gives.

:func:`atomic_write` writes to a temporary file in the destination's folder, flushes and fsyncs
it, then renames it over the destination, so a crash or Ctrl-C never leaves half a checkpoint,
comparison file or token shard behind. ``mkstemp`` creates its file as 0600; the temporary file
is given the process's umask permissions first, so what fastgpt writes is as readable as any
other file the user creates.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

TEMPORARY_SUFFIX = ".tmp"


def file_mode() -> int:
    """The permissions a plain ``open()`` would give a new file (mkstemp's are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` is replaced only when the block
    finishes; on any error the old file (if any) is untouched and the temporary file is gone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, file_mode())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files that killed writes of ``path`` left in its folder.

    A write that is SIGKILLed between mkstemp and the rename cannot clean up after itself, so
    the next run writing the same file does it. Returns what was removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in path.parent.glob(f"{temporary_prefix(path)}*{TEMPORARY_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def content_digest(path: str | Path) -> str:
    """A digest of what a data path holds: sha256 of a file's bytes, or of a dataset folder's
    ``meta.json`` (which records its shards, token counts, sources and tokenizer)."""
    import hashlib
    path = Path(path)
    target = path / "meta.json" if path.is_dir() else path
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
