"""Atomic file output and line-numbered JSONL input.

Every file the toolkit writes goes through `atomic_write`: a crash or a full disk leaves either the
old file or the new one, never half of one, which is what makes runs resumable.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from alignment.errors import UserError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(f"{path}: cannot write here ({err.strerror})") from err
    try:
        # mkstemp makes the file 0600 whatever the umask; give it the mode open() would have, so
        # outputs in a shared run folder are as readable as the user's umask says.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise UserError(f"{path}: write failed ({err.strerror})") from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask. os.umask can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# A \uD800-\uDFFF escape: valid JSON, but a lone surrogate cannot be written back as UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; rename it to `path` only if the block succeeds.

    The temp name is unique per call (`mkdtemp`), so two processes never write into one folder,
    and it starts with `.` and ends with `.tmp`, so a resumed run knows what to clean up. The
    folder gets the permissions the umask gives a new folder (mkdtemp's are private).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(0o777 & ~current_umask())
    except OSError as err:
        raise UserError(f"{path}: cannot write here ({err.strerror})") from err
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{path}: write failed ({err.strerror})") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; errors name the file and line.

    Lines are decoded one by one so that a stray byte that is not UTF-8 is reported with its line
    number instead of surfacing as a UnicodeDecodeError from deep inside the file iterator.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start})"
                ) from err
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as err:
                # ValueError covers JSONDecodeError and integers over Python's 4300-digit limit;
                # RecursionError, arrays nested thousands deep.
                reason = err.msg if isinstance(err, json.JSONDecodeError) else _first_line(err)
                raise UserError(f"{path}:{lineno}: malformed JSON ({reason})") from err
            if _SURROGATE_ESCAPE.search(line) and not _encodable(obj):
                raise UserError(f"{path}:{lineno}: a string holds a lone UTF-16 surrogate escape")
            if not isinstance(obj, dict):
                raise UserError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj


def _encodable(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically as JSONL; return how many were written."""
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as err:
        raise UserError(f"--shard must look like i/n, got {text!r}") from err
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return index, count
