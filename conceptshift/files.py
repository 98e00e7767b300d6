"""Reading user data and writing results atomically, as strict JSON.

Input rules (CSV): UTF-8 (a byte-order mark is accepted), a header row of distinct column names,
every data row with as many fields as the header, numbers in plain ASCII decimal or scientific
notation (``-1.5``, ``2e-3``; not ``1_000``, non-ASCII digits, ``nan`` or ``inf``).

Output rule (JSON): never NaN or Infinity. A non-finite float is written as ``null`` and, where the
top level is an object, listed by its key path under ``"non_finite"``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?[0-9]+")
NON_FINITE_KEY = "non_finite"


def parse_number(text: str) -> float:
    """A finite float from plain ASCII decimal or scientific notation.

    Raises:
      ValueError: with a short reason ("is not a number", "is not finite", "overflows float64",
        "underflows float64").
    """
    text = text.strip()
    if _NON_FINITE.fullmatch(text):
        raise ValueError(f"{text!r} is not finite")
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{text!r} is not a number")
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text!r} overflows float64")
    if v == 0.0 and any(c in "123456789" for c in text.split("e")[0].split("E")[0]):
        raise ValueError(f"{text!r} underflows float64 (it would be read as 0)")
    return v


def parse_integer(text: str) -> int:
    """An int from plain ASCII digits with an optional sign (not ``1_000``, ``1e3`` or ``٣``)."""
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{text!r} is not an integer")
    return int(text)


def read_csv_columns(path, columns: list[str]) -> dict[str, np.ndarray]:
    """Reads the named numeric columns of a CSV file with a header row (rules: module docs).

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file, and the line and column where there is one: a missing or
        duplicated column, a row with another number of fields than the header, an empty,
        non-numeric or non-finite cell, text that is not UTF-8, no data rows.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a data file")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    name = path.name
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise ValueError(f"{path} is empty") from None
            seen: set[str] = set()
            for h in header:
                if h and h in seen:
                    raise ValueError(f"{name} line 1: column {h!r} appears twice in the header")
                seen.add(h)
            missing = [c for c in columns if c not in seen]
            if missing:
                raise ValueError(f"column(s) {', '.join(map(repr, missing))} not in {name}; "
                                 f"available: {', '.join(h for h in header if h)}")
            idx = [header.index(c) for c in columns]
            for row in reader:
                if all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{name} line {reader.line_num}: {len(row)} fields, but the "
                                     f"header has {len(header)}")
                values = []
                for c, j in zip(columns, idx, strict=True):
                    try:
                        values.append(parse_number(row[j]))
                    except ValueError as err:
                        raise ValueError(f"{name} line {reader.line_num}, column {c!r}: {err}") from None
                rows.append(values)
        except csv.Error as err:
            raise ValueError(f"{name} line {reader.line_num}: {err}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{name} is not UTF-8 text ({err.reason}); save it as UTF-8") from None
    if not rows:
        raise ValueError(f"{path} has a header but no data rows")
    arr = np.asarray(rows, dtype=np.float64)
    return {c: arr[:, i] for i, c in enumerate(columns)}


def check_out_dir(path, flag: str = "--out") -> Path:
    """Checks, before any work, that ``path`` is a folder or can be created as one.

    Raises:
      ValueError: ``path`` (or a folder above it) is a file, or the nearest existing folder above
        it is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {probe} is not writable")
    return path


def _plain(obj, where: str, bad: list[str]):
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}.{k}" if where else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v, where, bad) for v in obj]
    if obj is None or isinstance(obj, str | bool):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic | np.ndarray) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        return _plain(arr.tolist() if arr.ndim else arr.item(), where, bad)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        if (where or "$") not in bad:
            bad.append(where or "$")
        return None
    raise TypeError(f"cannot write {type(obj).__name__} as JSON (at {where or 'the top level'})")


def non_finite_keys(obj) -> list[str]:
    """Dotted key paths of ``obj`` (list positions dropped) that hold NaN or +-inf values."""
    bad: list[str] = []
    _plain(obj, "", bad)
    return bad


def to_strict_json(obj):
    """``obj`` as plain JSON values: numpy/JAX scalars and arrays become numbers and lists, tuples
    lists, paths strings and NaN/+-inf ``None``; a top-level dict with such values gets the key
    ``"non_finite"`` listing their key paths."""
    bad: list[str] = []
    out = _plain(obj, "", bad)
    if bad and isinstance(out, dict):
        out[NON_FINITE_KEY] = bad
    return out


def dumps_strict(obj, **kw) -> str:
    """``json.dumps`` of :func:`to_strict_json` (``allow_nan=False``: never NaN or Infinity)."""
    return json.dumps(to_strict_json(obj), allow_nan=False, **kw)


def loads_strict(text: str):
    """``json.loads`` that refuses NaN and Infinity (which the standard allows nowhere)."""
    def refuse(name):
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(text, parse_constant=refuse)


def write_atomic(path, text: str) -> None:
    """Writes text to path through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path, obj) -> None:
    """Writes ``obj`` as strict JSON (:func:`dumps_strict`) atomically."""
    write_atomic(path, dumps_strict(obj, indent=2) + "\n")
