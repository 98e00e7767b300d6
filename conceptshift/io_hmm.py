"""Reading integer token sequences for the mixture-of-HMMs family."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_sequences(path) -> tuple[np.ndarray, np.ndarray]:
    """Reads token sequences; returns (tokens (N, T) int64 padded with 0, lengths (N,) int64).

    Two formats:
      - ``.npy``: an integer array (N, T); entries equal to -1 at the end of a row are padding (a
        row's length is the position of its first -1; no token may follow a -1).
      - anything else: a text file with one sequence per line, tokens as whitespace-separated
        non-negative integers; lines may have different lengths; blank lines and lines starting with
        ``#`` are skipped.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a token is not a non-negative integer, an empty sequence, or no sequences.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path.name}: not a numeric .npy array ({err})") from None
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"{path.name}: expected an integer array of shape (N, T), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(
                    arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise ValueError(f"{path.name}: tokens must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if (arr < -1).any():
            i, t = np.argwhere(arr < -1)[0]
            raise ValueError(f"{path.name}: row {i}, position {t}: {arr[i, t]} is not a token "
                             f"(non-negative integers; -1 pads)")
        pad = arr == -1
        lengths = np.where(pad.any(1), pad.argmax(1), arr.shape[1])
        after = np.arange(arr.shape[1])[None, :] >= lengths[:, None]
        if (after & ~pad).any():
            i = int(np.argwhere(after & ~pad)[0][0])
            raise ValueError(f"{path.name}: row {i} has tokens after its -1 padding")
        if (lengths == 0).any():
            raise ValueError(f"{path.name}: row {int(np.argmax(lengths == 0))} is empty")
        return np.where(after, 0, arr), lengths.astype(np.int64)
    rows: list[list[int]] = []
    with path.open() as fh:
        for line_no, line in enumerate(fh, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            row = []
            for tok in text.replace(",", " ").split():
                try:
                    v = int(tok)
                except ValueError:
                    raise ValueError(f"{path.name} line {line_no}: {tok!r} is not an integer token") from None
                if v < 0:
                    raise ValueError(f"{path.name} line {line_no}: {v} is negative (tokens are >= 0)")
                row.append(v)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no sequences")
    lengths = np.array([len(r) for r in rows], np.int64)
    x = np.zeros((len(rows), int(lengths.max())), np.int64)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r
    return x, lengths
