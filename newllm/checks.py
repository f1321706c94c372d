"""Checks of what a user gives the commands, shared by them: numbers (finite, in range) and the
directories they write (writable, and not someone's files written over by accident).

Each check raises ValueError with a one-line message that names the input, its value and how
to fix it; the commands print it as ``error: ...`` and exit with code 2 before writing anything.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# the largest int a setting or a search space takes: what a C int holds, as torch, tokenizers and
# Optuna's storage do; a count or a size beyond it is a typo, not a plan
INT_MAX = 2**31 - 1


def number_problem(value: object) -> str | None:
    """Why ``value`` cannot be used as a number: a float that is not finite, or an int beyond
    +-INT_MAX; None for anything else (range checks of each setting come after this one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        return f"must be at most {INT_MAX} (2**31 - 1) in size, got {value}"
    return None


def check_writable_dir(path: Path, what: str) -> None:
    """ValueError unless ``path`` is a directory this process can write in, or can be created as
    one: not a file, not below a file, its nearest existing ancestor writable. ``what`` names the
    input in the message (e.g. "--out 'x'")."""
    try:
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{what} is a file, not a directory: give a directory")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ValueError(f"{what}: {_why_not_writable(path)}; give a directory you can write to")
            return
        ancestor = next(p for p in path.absolute().parents if p.exists())
        if not ancestor.is_dir():
            raise ValueError(f"{what} cannot be created: {str(ancestor)!r} is a file, not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"{what} cannot be created in {str(ancestor)!r}: {_why_not_writable(ancestor)}; give "
                             f"a directory you can write to")
    except OSError as e:  # a parent that cannot be looked into
        raise ValueError(f"{what}: {e.strerror} ({e.filename}); give a directory you can write to") from e


def _why_not_writable(path: Path) -> str:
    # access() answers EROFS on a read-only file system, EACCES without permission
    return "it is on a read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "no permission to write in it"


def check_new_out(path: Path, force: bool, flag: str = "--out", replace: bool = False) -> None:
    """ValueError unless ``path`` can take a command's output without writing over anything by
    accident: an existing non-empty directory only with ``--force``. A command that writes into
    ``path`` needs it to be a writable directory (``check_writable_dir``); one that ``replace``s it
    as a whole (a sibling renamed into place) needs its parent writable, and takes an existing
    file too with ``--force``."""
    what = f"{flag} {str(path)!r}"
    if not replace:
        check_writable_dir(path, what)
    else:
        parent = path.absolute().parent
        check_writable_dir(parent, f"{what}: its directory {str(parent)!r}")
        if not force and path.exists() and not path.is_dir():
            raise ValueError(f"{what} is an existing file: give --force to replace it, or another {flag}")
    try:
        non_empty = path.is_dir() and any(path.iterdir())
    except OSError as e:
        raise ValueError(f"{what}: {e.strerror}; give a directory you can read and write") from e
    if non_empty and not force:
        how = "replace it" if replace else "write into it, replacing its files of the same names"
        raise ValueError(f"{what} is a directory that is not empty: give --force to {how}, or another {flag}")


def path_arg(value: str, what: str) -> Path:
    """A path the user gave; ValueError if it is empty, which Path would take for the current
    directory."""
    if not value.strip():
        raise ValueError(f"{what} must not be empty: give a path")
    return Path(value)
