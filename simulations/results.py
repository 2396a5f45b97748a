"""Results of a ``simulate`` run: per-seed metrics, their mean/std summaries, and the JSON file.

Everything the report and the plots show is computed here, once, and stored in
``results.json``; the report and the plots only read that file, so their numbers are the
file's numbers.

Statistics over seeds are :func:`stat` dictionaries ``{"mean", "std", "n", "values"}``:
``std`` is the sample standard deviation (``ddof=1``) over the ``n`` seeds, and 0 for a
single seed. Undefined values (a class absent from the test set) are stored as ``null`` and
left out of the statistics.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
FORMAT = "rebasin-simulate/1"


# -------------------------------------------------------------------------------------------
# statistics


def stat(values: Iterable[float | None]) -> dict:
    """Mean and sample standard deviation of the defined ``values``.

    Returns
    -------
    dict
        ``{"mean", "std", "n", "values"}``; ``mean``/``std`` are ``None`` when no value is
        defined, ``std`` is 0 for one value. ``values`` keeps every input (``None`` for
        undefined ones), in order.
    """
    kept = [_clean(v) for v in values]
    defined = [v for v in kept if v is not None]
    if not defined:
        return {"mean": None, "std": None, "n": 0, "values": kept}
    arr = np.asarray(defined, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": len(defined), "values": kept}


def series_stat(series: Sequence[Sequence[float | None]]) -> dict:
    """Pointwise :func:`stat` of equally long series: ``{"mean": [...], "std": [...]}``."""
    lengths = {len(s) for s in series}
    if len(lengths) != 1:
        raise ValueError(f"series must have one length, got lengths {sorted(lengths)}")
    points = [stat(column) for column in zip(*series)]
    return {"mean": [p["mean"] for p in points], "std": [p["std"] for p in points]}


def _clean(value: Any) -> float | None:
    """A finite float, or ``None`` for ``None``/NaN/inf (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def sanitize(data: Any) -> Any:
    """``data`` with every NaN/inf float replaced by ``None`` and numpy scalars made plain."""
    if isinstance(data, Mapping):
        return {str(k): sanitize(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [sanitize(v) for v in data]
    if isinstance(data, np.ndarray):
        return sanitize(data.tolist())
    if isinstance(data, bool | np.bool_):
        return bool(data)
    if isinstance(data, int | np.integer):
        return int(data)
    if isinstance(data, float | np.floating):
        return _clean(data)
    return data


# -------------------------------------------------------------------------------------------
# class groups (regions)


def differing_settings(a: object, b: object, prefix: str = "") -> list[str]:
    """Dotted names of the settings where the JSON-like ``a`` and ``b`` differ, sorted.

    A key that one side lacks counts as ``None`` there (a setting added later, left unset).
    """
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            name
            for key in sorted({*a, *b})
            for name in differing_settings(a.get(key), b.get(key), f"{prefix}{key}.")
        ]
    return [] if a == b else [prefix.rstrip(".")]


def class_homes(shard_class_counts: Sequence[Sequence[int]]) -> list[int]:
    """For every class, the client holding most of its training examples (lowest on ties).

    For the region split this is the region that owns the class.
    """
    counts = np.asarray(shard_class_counts)
    if counts.ndim != 2 or counts.shape[0] < 1:
        raise ValueError(f"shard_class_counts must be (clients, classes), got {counts.shape}")
    return [int(i) for i in counts.argmax(axis=0)]


def group_accuracy(
    per_class: Sequence[float | None], homes: Sequence[int], group: int
) -> float | None:
    """Mean per-class accuracy over the classes whose home is ``group`` (``None``: no class)."""
    values = [float(a) for a, h in zip(per_class, homes) if h == group and _clean(a) is not None]
    return float(np.mean(values)) if values else None


def group_names(scenario: str, num_clients: int) -> list[str]:
    """Display names of the class groups: the regions for ``us-eu``, else the clients."""
    from rebasin.partition import region_names

    if scenario == "us-eu":
        return region_names(num_clients)
    return [f"client {i}" for i in range(num_clients)]


# -------------------------------------------------------------------------------------------
# summaries


def _model_rows(run: Mapping) -> dict[str, Mapping]:
    """Every evaluated model of a one-shot run by display name: clients first, then methods."""
    rows: dict[str, Mapping] = {f"client {i}": m for i, m in enumerate(run["clients"])}
    rows.update(run["methods"])
    return rows


def summarize_oneshot(runs: Sequence[Mapping], num_clients: int) -> dict:
    """Mean/std over seeds of every one-shot metric.

    Returns
    -------
    dict
        ``methods``/``clients``: ``{name: {"accuracy", "loss"}}`` stats; ``best_client``:
        the best single client's accuracy per seed; ``group_accuracy``: ``{model: [stat per
        class group]}`` (groups by :func:`class_homes` of each seed); ``per_class``:
        ``{model: {"mean", "std"}}`` per class; ``interpolation``: per curve, pointwise
        accuracy/loss and the barriers; ``merge_seconds``: per merge method.
    """
    if not runs:
        raise ValueError("no one-shot runs to summarize")
    names = list(_model_rows(runs[0]))
    for run in runs[1:]:
        if list(_model_rows(run)) != names:
            raise ValueError(
                f"seeds evaluated different models: {names} vs {list(_model_rows(run))}"
            )
    homes = [class_homes(run["shard_class_counts"]) for run in runs]
    summary: dict = {
        "models": names,
        "methods": {},
        "clients": {},
        "best_client": {
            "accuracy": stat(max(c["accuracy"] for c in run["clients"]) for run in runs)
        },
        "shard_sizes": [stat(run["shard_sizes"][i] for run in runs) for i in range(num_clients)],
        "class_homes": homes,
        "group_accuracy": {},
        "per_class": {},
    }
    for name in names:
        per_seed = [_model_rows(run)[name] for run in runs]
        entry = {
            "accuracy": stat(m["accuracy"] for m in per_seed),
            "loss": stat(m["loss"] for m in per_seed),
        }
        summary["clients" if name.startswith("client ") else "methods"][name] = entry
        summary["per_class"][name] = series_stat([m["per_class_accuracy"] for m in per_seed])
        summary["group_accuracy"][name] = [
            stat(group_accuracy(m["per_class_accuracy"], h, g) for m, h in zip(per_seed, homes))
            for g in range(num_clients)
        ]
    if all("interpolation" in run for run in runs):
        summary["interpolation"] = {
            curve: {
                "lambdas": runs[0]["interpolation"][curve]["lambdas"],
                "accuracy": series_stat([run["interpolation"][curve]["accuracy"] for run in runs]),
                "loss": series_stat([run["interpolation"][curve]["loss"] for run in runs]),
                "accuracy_barrier": stat(
                    run["interpolation"][curve]["accuracy_barrier"] for run in runs
                ),
                "loss_barrier": stat(run["interpolation"][curve]["loss_barrier"] for run in runs),
            }
            for curve in runs[0]["interpolation"]
        }
    summary["merge_seconds"] = {
        method: stat(run["merge_seconds"][method] for run in runs)
        for method in runs[0]["merge_seconds"]
    }
    summary["wall_seconds"] = stat(run["wall_seconds"] for run in runs)
    return summary


def summarize_multiround(runs: Sequence[Mapping], num_clients: int) -> dict:
    """Mean/std over seeds of every multi-round metric, per strategy.

    Returns
    -------
    dict
        ``rounds``; per strategy: ``server_accuracy``/``server_loss``/``client_accuracy``/
        ``client_loss``/``train_loss`` pointwise per round, ``final_accuracy``/``final_loss``
        stats, ``final_per_class``, ``final_group_accuracy`` and ``wall_seconds``.
    """
    if not runs:
        raise ValueError("no multi-round runs to summarize")
    homes = [class_homes(run["shard_class_counts"]) for run in runs]
    summary: dict = {"rounds": runs[0]["rounds"], "class_homes": homes, "strategies": {}}
    for name in runs[0]["strategies"]:
        per_seed = [run["strategies"][name] for run in runs]
        finals = [s["final"] for s in per_seed]
        summary["strategies"][name] = {
            "server_accuracy": series_stat([s["server"]["accuracy"] for s in per_seed]),
            "server_loss": series_stat([s["server"]["loss"] for s in per_seed]),
            "client_accuracy": series_stat([s["clients"]["accuracy"] for s in per_seed]),
            "client_loss": series_stat([s["clients"]["loss"] for s in per_seed]),
            "train_loss": series_stat([s["train_loss"] for s in per_seed]),
            "final_accuracy": stat(f["accuracy"] for f in finals),
            "final_loss": stat(f["loss"] for f in finals),
            "final_per_class": series_stat([f["per_class_accuracy"] for f in finals]),
            "final_group_accuracy": [
                stat(group_accuracy(f["per_class_accuracy"], h, g) for f, h in zip(finals, homes))
                for g in range(num_clients)
            ],
            "wall_seconds": stat(s["wall_seconds"] for s in per_seed),
        }
    return summary


# -------------------------------------------------------------------------------------------
# environment and files


def code_version(root: Path | None = None) -> dict | None:
    """The git commit of the checkout this code runs from, and whether it had local changes.

    Local changes: tracked files changed outside ``docs/`` (where results are committed).

    ``None`` where the code is not a git checkout of its own (an installed wheel): a
    surrounding repository's commit (a venv inside another project) would be wrong. A
    resumed run keeps each session's environment, so its seeds can be told apart by code.
    """
    import subprocess

    root = (root or Path(__file__).resolve().parents[1]).resolve()

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        # Results under docs/ change as a resumed run writes them: they are not code.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"))
        return {"commit": git("rev-parse", "HEAD"), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Where the run happened: versions, CPU, threads, time, code (for the report's header)."""
    import flwr
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "code": code_version(),
    }


def results_header(
    file_format: str, out_dir: Path, command: str, config: Any, data_dir: str | Path | None
) -> dict:
    """The first fields of a results file, the same for ``simulate`` and ``study``.

    Parameters
    ----------
    file_format
        The file's ``format`` tag.
    out_dir
        Results directory; its name is the run's ``name``.
    command
        The command line.
    config
        The run's pydantic settings (with ``seeds``), stored as JSON data.
    data_dir
        Data directory as given (``None``: the default).

    Returns
    -------
    dict
        ``format``, ``name``, ``command``, ``environment``, ``config``, ``seeds`` and
        ``data_dir``, in this order.
    """
    return {
        "format": file_format,
        "name": out_dir.name,
        "command": command,
        "environment": environment(),
        "config": config.model_dump(mode="json"),
        "seeds": list(config.seeds),
        "data_dir": str(data_dir) if data_dir is not None else None,
    }


def write_json(data: Mapping, out_dir: Path, filename: str) -> Path:
    """Write ``data`` as ``out_dir/filename`` (strict JSON: no NaN); return the path.

    The file is replaced at once (written beside it, then renamed), so a reader never sees
    half of it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    text = json.dumps(sanitize(data), indent=2, allow_nan=False)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path


def read_json(out_dir: Path, filename: str, file_format: str, kind: str = "file") -> dict:
    """Read ``out_dir/filename``, a JSON file whose ``format`` must be ``file_format``.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If it is not JSON or its format differs, naming the file as ``a <file_format> <kind>``.
    """
    path = out_dir / filename
    if not path.is_file():
        raise FileNotFoundError(f"no {filename} in {out_dir}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a {file_format} {kind} (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != file_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a {file_format} {kind} (format {found!r})")
    return data


def write_results(results: Mapping, out_dir: Path) -> Path:
    """Write ``results`` as ``out_dir/results.json`` (strict JSON: no NaN); return the path."""
    return write_json(results, out_dir, RESULTS_FILE)


def read_results(out_dir: Path) -> dict:
    """Read ``out_dir/results.json``; ``FileNotFoundError``/``ValueError`` name the file."""
    return read_json(out_dir, RESULTS_FILE, FORMAT, "results file")
