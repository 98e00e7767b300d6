"""Reading integer token sequences for the mixture-of-HMMs family."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

MAX_TOKENS = 2**20  # largest vocabulary: token ids are 0 .. MAX_TOKENS - 1
_TOKEN = re.compile(r"-?[0-9]+")


def read_sequences(path) -> tuple[np.ndarray, np.ndarray]:
    """Reads token sequences; returns (tokens (N, T) int64 padded with 0, lengths (N,) int64).

    Two formats:
      - ``.npy``: an integer array (N, T); entries equal to -1 at the end of a row are padding (a
        row's length is the position of its first -1; no token may follow a -1).
      - anything else: a text file with one sequence per line, tokens as whitespace-separated
        non-negative integers (plain ASCII digits); lines may have different lengths; blank lines and
        lines starting with ``#`` are skipped. UTF-8, a byte-order mark is accepted.

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file and line (or row): a token that is not an integer in
        0 .. MAX_TOKENS - 1, an empty sequence, or no sequences.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a data file")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{path.name}: not a numeric .npy array ({err})") from None
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{path.name}: not a .npy array")
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"{path.name}: expected an integer array of shape (N, T), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(
                    arr == np.round(arr)) and np.all(np.abs(arr) < MAX_TOKENS):
                arr = arr.astype(np.int64)
            else:
                raise ValueError(f"{path.name}: tokens must be integers, got dtype {arr.dtype}")
        if (arr >= MAX_TOKENS).any():
            i, t = np.argwhere(arr >= MAX_TOKENS)[0]
            raise ValueError(f"{path.name}: row {i}, position {t}: token {arr[i, t]} is above the "
                             f"largest supported token {MAX_TOKENS - 1}")
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
    with path.open(encoding="utf-8-sig") as fh:
        line_no = 0
        try:
            for line_no, line in enumerate(fh, start=1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                row = []
                for tok in text.replace(",", " ").split():
                    if not _TOKEN.fullmatch(tok):
                        raise ValueError(f"{path.name} line {line_no}: {tok!r} is not an integer token")
                    v = int(tok)
                    if v < 0:
                        raise ValueError(f"{path.name} line {line_no}: {v} is negative (tokens are >= 0)")
                    if v >= MAX_TOKENS:
                        raise ValueError(f"{path.name} line {line_no}: token {v} is above the largest "
                                         f"supported token {MAX_TOKENS - 1}")
                    row.append(v)
                rows.append(row)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path.name} near line {line_no + 1}: not UTF-8 text ({err.reason})") from None
    if not rows:
        raise ValueError(f"{path} has no sequences")
    lengths = np.array([len(r) for r in rows], np.int64)
    x = np.zeros((len(rows), int(lengths.max())), np.int64)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r
    return x, lengths
