"""Reading user data and writing results atomically."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def read_csv_columns(path, columns: list[str]) -> dict[str, np.ndarray]:
    """Reads the named numeric columns of a CSV file with a header row.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a column is missing, a cell is empty, non-numeric or NaN, or there are no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path} is empty") from None
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"column(s) {', '.join(map(repr, missing))} not in {path.name}; "
                f"available: {', '.join(header)}"
            )
        idx = [header.index(c) for c in columns]
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            values = []
            for c, j in zip(columns, idx, strict=True):
                cell = row[j].strip() if j < len(row) else ""
                try:
                    v = float(cell)
                except ValueError:
                    raise ValueError(
                        f"{path.name} line {line_no}, column {c!r}: {cell!r} is not a number"
                    ) from None
                if not np.isfinite(v):
                    raise ValueError(
                        f"{path.name} line {line_no}, column {c!r}: {cell!r} is not finite"
                    )
                values.append(v)
            rows.append(values)
    if not rows:
        raise ValueError(f"{path} has a header but no data rows")
    arr = np.asarray(rows, dtype=np.float64)
    return {c: arr[:, i] for i, c in enumerate(columns)}


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
    write_atomic(path, json.dumps(obj, indent=2) + "\n")
