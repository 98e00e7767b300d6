"""A small sweep runner: configuration from defaults, a TOML file and ``--set name=value``; one JSON
file per finished cell, written atomically, so that a killed sweep resumes without redoing cells.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

from .._validation import MAX_INT, MAX_SEED
from ..files import (
    NON_FINITE_KEY,
    check_out_dir,
    dumps_strict,
    loads_strict,
    parse_integer,
    parse_number,
    write_json_atomic,
)

# lower (and upper) bounds of knobs that several experiments share; an experiment's validate()
# adds the checks that involve several knobs. Lists are checked element by element.
KNOB_BOUNDS = {
    "seed": (0, MAX_SEED), "n_components": (1, None), "n_features": (1, None), "degree": (1, 10),
    "replicates": (2, None), "n_test": (1, None), "restarts": (1, None), "max_iter": (1, None),
    "tol": (0, None), "lam": (0, None), "n_demos": (0, None), "n_grid": (1, None), "k_grid": (1, None),
    "m_grid": (0, None), "n_draws": (1, None), "n": (1, None), "n_x": (2, None), "n_quad": (8, None),
    "mc_draws": (1000, None), "x_range": (0, None), "n_states": (1, None), "n_tokens": (2, None),
    "length": (1, None), "svi_steps": (1, None), "svi_lr": (0, None), "num_chains": (2, None),
    "num_warmup": (1, None), "num_samples": (1, None), "n_boot": (1, None),
    "separation": (0, None), "noise": (0, None), "weak_noise": (0, None), "shift": (0, None),
    "weak_bias": (0, None), "weak_shift": (0, None), "gate_separation": (0, None),
    "n_classes": (2, None), "anchor_mass": (0, 1), "hdi_prob": (0, 1), "lam_grid": (0, None),
    "weak_swap": (0, None), "swap_grid": (0, None), "pi_p": (0, 1), "pi_q": (0, 1),
    "target_scale": (0, None), "strong_drift": (0, None), "fit_degree": (0, 10),
    "noise_df": (0, None), "level": (0, 1),
}


def _parse_value(name: str, text: str, default):
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return parse_integer(text)
        if isinstance(default, float):
            return parse_number(text)
        if isinstance(default, list) and default and isinstance(default[0], str):
            return [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(default, list):
            kind = parse_integer if default and isinstance(default[0], int) else parse_number
            return [kind(v) for v in text.split(",") if v.strip()]
        if default is None:
            return parse_number(text) if text.strip().lower() != "none" else None
        return text
    except ValueError:
        item = (default[0] if default else 0.0) if isinstance(default, list) else default
        kind = "float" if item is None else type(item).__name__
        raise ValueError(
            f"--set {name}={text}: expected {'finite ' if kind == 'float' else ''}{kind}"
            + (" values separated by commas" if isinstance(default, list) else "")
        ) from None


def _check_value(name: str, value, default, where: str):
    """Type of the default (an int where the default is an int, any finite real where a float, a
    list of those where a list), and the bounds of KNOB_BOUNDS."""
    if isinstance(default, list):
        # an empty default means "not given" (e.g. pi_q: the shift construction): empty allowed
        if not isinstance(value, list) or (not value and default):
            raise ValueError(f"{where}{name} must be a non-empty list, got {value!r}")
        item = default[0] if default else 0.0
        return [_check_value(f"{name}[{i}]", v, item, where) for i, v in enumerate(value)]
    if isinstance(default, bool) or isinstance(default, str):
        if type(value) is not type(default):
            raise ValueError(f"{where}{name} must be a {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}{name} must be an integer, got {value!r}")
    if value is None and default is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}{name} must be a finite number, got {value!r}")
    lo, hi = KNOB_BOUNDS.get(name.split("[")[0], (None, None))
    if isinstance(value, int):  # sizes and counts fit int32 (the seed has its own bound)
        lo, hi = -MAX_INT if lo is None else lo, MAX_INT if hi is None else hi
    if lo is not None and value < lo:
        raise ValueError(f"{where}{name} must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{where}{name} must be <= {hi}, got {value!r}")
    return value


def check_knobs(cfg: dict, defaults: dict) -> dict:
    """Checks every knob's type and range (KNOB_BOUNDS) before anything runs; returns cfg.

    Raises:
      ValueError: naming the knob.
    """
    for k, v in cfg.items():
        if k not in defaults:
            raise ValueError(f"unknown knob {k!r}; known: {', '.join(sorted(defaults))}")
        _check_value(k, v, defaults[k], "")
    return cfg


def load_config(defaults: dict, config_file=None, overrides: Iterable[str] = ()) -> dict:
    """defaults <- TOML file <- ``name=value`` overrides; unknown names, wrong types and values out
    of range (:func:`check_knobs`) are an error."""
    cfg = dict(defaults)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from None
        for k, v in data.items():
            if k not in defaults:
                raise ValueError(f"{path}: unknown knob {k!r}; known: {', '.join(sorted(defaults))}")
            _check_value(k, v, defaults[k], f"{path}: ")
            cfg[k] = v
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects name=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if k not in defaults:
            raise ValueError(f"--set: unknown knob {k!r}; known: {', '.join(sorted(defaults))}")
        cfg[k] = _check_value(k, _parse_value(k, v, defaults[k]), defaults[k], "--set ")
    return cfg


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, allow_nan=False).encode()).hexdigest()[:16]


def versions() -> dict:
    import jax
    import numpy as np
    import numpyro
    import optax

    from .. import __version__

    return {"conceptshift": __version__, "jax": jax.__version__, "numpyro": numpyro.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "x64": bool(jax.config.jax_enable_x64)}


def precision() -> str:
    """The working precision of JAX now: "float64" or "float32"."""
    import jax

    return "float64" if jax.config.jax_enable_x64 else "float32"


CELL_DIGEST = "cell_sha256"  # the key a cell file keeps its content's checksum under


def _digest(result: dict) -> str:
    text = json.dumps(result, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Sweep:
    """Runs named cells into ``out/cells/NAME.json``; finished cells are read back, not recomputed.

    The folder remembers the configuration and the precision it was started with (``sweep.json``,
    written with the first finished cell); resuming with another configuration or precision is
    refused (start a new folder), so results of different settings are never mixed. Every cell file
    holds a checksum of its content; a damaged or wrong-shaped cell is named in a warning on stderr
    and recomputed.
    """

    def __init__(self, out_dir, cfg: dict, experiment: str):
        self.out = check_out_dir(out_dir)
        self.cells_dir = self.out / "cells"
        self.marker = self.out / "sweep.json"
        self.cfg = cfg
        self.fingerprint = {"experiment": experiment, "config": cfg, "hash": config_hash(cfg),
                            "precision": precision()}
        if self.cells_dir.exists() and not self.cells_dir.is_dir():
            raise ValueError(f"{self.cells_dir} is a file, not this sweep's cells folder; use a new "
                             f"--out folder (or remove it)")
        self.claimed = self.marker.exists()
        if self.claimed:
            self._check_marker()
        self.computed: list[str] = []
        self.reused: list[str] = []

    def _check_marker(self) -> None:
        try:
            old = json.loads(self.marker.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.marker} is damaged ({' '.join(str(err).split())}); use a new "
                             f"--out folder (or delete it)") from None
        if not isinstance(old, dict):
            raise ValueError(f"{self.marker} is damaged (not a JSON object); use a new --out folder")
        new = self.fingerprint
        if old.get("hash") != new["hash"] or old.get("experiment") != new["experiment"]:
            raise ValueError(
                f"{self.out} holds a sweep of {old.get('experiment')} with another configuration; "
                f"use a new --out folder (or delete {self.marker})"
            )
        if old.get("precision", new["precision"]) != new["precision"]:  # absent: an older folder
            raise ValueError(
                f"{self.out} holds a {old['precision']} sweep and this run computes in "
                f"{new['precision']}; resume it {'with' if old['precision'] == 'float64' else 'without'}"
                f" --float64, or use a new --out folder"
            )

    def _claim(self) -> None:
        """Writes sweep.json (with the first finished cell, so that a run refused before any cell
        leaves nothing that would refuse the corrected command)."""
        if not self.claimed:
            write_json_atomic(self.marker, self.fingerprint)
            self.claimed = True
        self.cells_dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.cells_dir / f"{name}.json"

    def read_cell(self, name: str) -> dict | None:
        """A finished cell's result, or None when it is absent; a damaged or wrong-shaped cell
        (invalid JSON, not a non-empty object, checksum not matching) is reported on stderr and
        treated as absent."""
        p = self.path(name)
        if not p.exists():
            return None
        try:
            data = loads_strict(p.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            digest = data.pop(CELL_DIGEST, None)
            nonfinite = data.pop(NON_FINITE_KEY, None)
            if not data:
                raise ValueError("no results")
            if digest is not None and digest != _digest(data):
                raise ValueError("its content does not match its checksum")
        except (OSError, ValueError) as err:
            sys.stderr.write(f"warning: damaged cell {p} ({' '.join(str(err).split())}); "
                             f"recomputing it\n")
            return None
        return _restore_non_finite(data, nonfinite)

    def write_cell(self, name: str, result: dict) -> dict:
        """Writes a cell (strict JSON plus its checksum) atomically; returns it as read back."""
        if not isinstance(result, dict) or not result:
            raise TypeError(f"cell {name}: a cell function must return a non-empty dict")
        self._claim()
        data = loads_strict(dumps_strict(result))
        nonfinite = data.pop(NON_FINITE_KEY, None)
        data[CELL_DIGEST] = _digest(data)
        if nonfinite:
            data[NON_FINITE_KEY] = nonfinite
        write_json_atomic(self.path(name), data)
        data.pop(CELL_DIGEST)
        data.pop(NON_FINITE_KEY, None)
        return _restore_non_finite(data, nonfinite)

    def run(self, cells: list[tuple[str, object]], fn: Callable[[object], dict], *,
            progress: bool = True) -> dict[str, dict]:
        """Runs ``fn(cell)`` for each (name, cell) not already finished; returns name -> result
        (as written: non-finite numbers are None)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        results: dict[str, dict] = {}
        todo = []
        for name, cell in cells:
            res = self.read_cell(name)
            if res is not None:
                results[name] = res
                self.reused.append(name)
            else:
                todo.append((name, cell))
        cols = [TextColumn("[progress.description]{task.description}"), BarColumn(),
                TextColumn("{task.completed}/{task.total} cells"), TimeElapsedColumn()]
        with Progress(*cols, disable=not progress, transient=False) as bar:
            task = bar.add_task("sweep", total=len(cells), completed=len(cells) - len(todo))
            for name, cell in todo:
                bar.update(task, description=f"cell {name}")
                results[name] = self.write_cell(name, fn(cell))
                self.computed.append(name)
                bar.advance(task)
        return {name: results[name] for name, _ in cells}

    def finish(self, results: dict, plot: Callable[[dict, Path], None], figure: str) -> dict:
        """Adds the sweep's bookkeeping to ``results``, draws the figure and writes results.json,
        both atomically."""
        self._claim()
        path = self.out / figure
        results.update(cells_computed=self.computed, cells_reused=self.reused, figures=[str(path)])
        plot(results, path)
        write_json_atomic(self.out / "results.json", results)
        return results


def _nan_for_none(tree):
    if isinstance(tree, dict):
        return {k: _nan_for_none(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_nan_for_none(v) for v in tree]
    return math.nan if tree is None else tree


def _restore_non_finite(data: dict, paths) -> dict:
    """The nulls a strict JSON file holds at the key paths of its "non_finite" list, back to NaN
    (cells are trees of numbers: the experiments' summaries skip NaN)."""
    for path in paths or []:
        keys = path.split(".")
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            node[keys[-1]] = _nan_for_none(node[keys[-1]])
    return data
