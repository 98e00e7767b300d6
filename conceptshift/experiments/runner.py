"""A small sweep runner: configuration from defaults, a TOML file and ``--set name=value``; one JSON
file per finished cell, written atomically, so that a killed sweep resumes without redoing cells.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

from ..io import write_json_atomic


def _parse_value(name: str, text: str, default):
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, list):
            kind = type(default[0]) if default else float
            return [kind(v) for v in text.split(",") if v.strip()]
        if default is None:
            return float(text) if text.strip().lower() != "none" else None
        return text
    except ValueError:
        raise ValueError(
            f"--set {name}={text}: expected {type(default).__name__}"
            + (" values separated by commas" if isinstance(default, list) else "")
        ) from None


def load_config(defaults: dict, config_file=None, overrides: Iterable[str] = ()) -> dict:
    """defaults <- TOML file <- ``name=value`` overrides; unknown names are an error."""
    cfg = dict(defaults)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from None
        for k, v in data.items():
            if k not in defaults:
                raise ValueError(f"{path}: unknown knob {k!r}; known: {', '.join(sorted(defaults))}")
            cfg[k] = v
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects name=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if k not in defaults:
            raise ValueError(f"--set: unknown knob {k!r}; known: {', '.join(sorted(defaults))}")
        cfg[k] = _parse_value(k, v, defaults[k])
    return cfg


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict:
    import jax
    import numpy as np
    import numpyro
    import optax

    from .. import __version__

    return {"conceptshift": __version__, "jax": jax.__version__, "numpyro": numpyro.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "x64": bool(jax.config.jax_enable_x64)}


class Sweep:
    """Runs named cells into ``out/cells/NAME.json``; finished cells are read back, not recomputed.

    The folder remembers the configuration it was started with; resuming with another configuration
    is refused (start a new folder), so results of different settings are never mixed.
    """

    def __init__(self, out_dir, cfg: dict, experiment: str):
        self.out = Path(out_dir)
        self.cells_dir = self.out / "cells"
        self.cfg = cfg
        self.out.mkdir(parents=True, exist_ok=True)
        marker = self.out / "sweep.json"
        fingerprint = {"experiment": experiment, "config": cfg, "hash": config_hash(cfg)}
        if marker.is_file():
            old = json.loads(marker.read_text())
            if old.get("hash") != fingerprint["hash"] or old.get("experiment") != experiment:
                raise ValueError(
                    f"{self.out} holds a sweep of {old.get('experiment')} with another configuration; "
                    f"use a new --out folder (or delete {marker})"
                )
        else:
            write_json_atomic(marker, fingerprint)
        self.cells_dir.mkdir(exist_ok=True)
        self.computed: list[str] = []
        self.reused: list[str] = []

    def path(self, name: str) -> Path:
        return self.cells_dir / f"{name}.json"

    def run(self, cells: list[tuple[str, object]], fn: Callable[[object], dict], *,
            progress: bool = True) -> dict[str, dict]:
        """Runs ``fn(cell)`` for each (name, cell) not already finished; returns name -> result."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        results: dict[str, dict] = {}
        todo = []
        for name, cell in cells:
            p = self.path(name)
            if p.is_file():
                results[name] = json.loads(p.read_text())
                self.reused.append(name)
            else:
                todo.append((name, cell))
        cols = [TextColumn("[progress.description]{task.description}"), BarColumn(),
                TextColumn("{task.completed}/{task.total} cells"), TimeElapsedColumn()]
        with Progress(*cols, disable=not progress, transient=False) as bar:
            task = bar.add_task("sweep", total=len(cells), completed=len(cells) - len(todo))
            for name, cell in todo:
                bar.update(task, description=f"cell {name}")
                res = fn(cell)
                write_json_atomic(self.path(name), res)
                results[name] = res
                self.computed.append(name)
                bar.advance(task)
        return results

    def finish(self, results: dict, plot: Callable[[dict, Path], None], figure: str) -> dict:
        """Adds the sweep's bookkeeping to ``results``, draws the figure and writes results.json,
        both atomically."""
        path = self.out / figure
        results.update(cells_computed=self.computed, cells_reused=self.reused, figures=[str(path)])
        plot(results, path)
        write_json_atomic(self.out / "results.json", results)
        return results
