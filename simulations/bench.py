"""Benchmarks: weight matching (engine against the textbook matcher) and server merges.

Every speed figure is a ratio against a baseline timed in the same run, on the same inputs:
the engine against ``reference_weight_matching`` (same seed, so the same permutations and
objective: checked here too), and merges of N clients against naive averaging.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from safetensors.torch import load_file, save_file

from rebasin.matching import reference_weight_matching, weight_matching
from rebasin.merge import average, merge_many, merge_to_reference
from rebasin.models import MLP, ResNet20
from rebasin.permute import apply_permutation, random_perms
from rebasin.spec import PermutationSpec, StateDict

console = Console()


@dataclass
class MatchTiming:
    """One matching benchmark row (seconds are medians over repeats)."""

    model: str
    weights: str
    seed: int
    engine_s: float
    reference_s: float
    speedup: float
    sweeps: int
    engine_s_per_sweep: float
    objective: float
    identical: bool
    engine_products: int
    reference_products: int
    engine_solves: int
    reference_solves: int


@dataclass
class MergeTiming:
    """One server-merge benchmark row."""

    model: str
    method: str
    clients: int
    seconds: float
    seconds_per_client: float
    peak_extra_mib: float
    ratio_to_naive: float


def _model(name: str, width: float) -> torch.nn.Module:
    return MLP(width=width) if name == "mlp" else ResNet20(width=width)


def random_pair(name: str, width: float, seed: int) -> tuple[StateDict, StateDict]:
    """Two independently initialised models (different seeds)."""
    out = []
    for s in (2 * seed, 2 * seed + 1):
        torch.manual_seed(s)
        out.append(_model(name, width).state_dict())
    return out[0], out[1]


def trained_pair(
    name: str, width: float, data_dir: str | None, cache: Path, steps: int, progress: Progress
) -> tuple[StateDict, StateDict]:
    """Two models trained from different seeds on the two halves of a US/EU split.

    MLP: MNIST; ResNet-20: CIFAR-10. ``steps`` SGD steps of batch 128 each (cached).
    """
    from rebasin.data import load_dataset
    from rebasin.partition import region_split
    from rebasin.train import train

    paths = [cache / f"{name}-x{width:g}-steps{steps}-{i}.safetensors" for i in (0, 1)]
    if all(p.exists() for p in paths):
        return load_file(paths[0]), load_file(paths[1])
    dataset = "mnist" if name == "mlp" else "cifar10"
    data = load_dataset(dataset, True, data_dir)
    shards = region_split(data.labels, 2, 0.8, seed=0)
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for i, shard in enumerate(shards):
        torch.manual_seed(100 + i)
        model = _model(name, width)
        rng = np.random.default_rng(i)
        idx = rng.choice(shard, size=min(len(shard), steps * 128), replace=False)
        loader = data.subset(idx).loader(128, shuffle=True, seed=i)
        train(
            model, loader, 1, 0.05, progress=progress, description=f"train {name} x{width:g} #{i}"
        )
        save_file(model.state_dict(), str(paths[i]))
        out.append(model.state_dict())
    return out[0], out[1]


def _to(state_dict: StateDict, device: str) -> StateDict:
    return {k: v.to(device) for k, v in state_dict.items()}


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def bench_matching(
    spec: PermutationSpec,
    a: StateDict,
    b: StateDict,
    model: str,
    weights: str,
    seed: int,
    repeats: int,
) -> MatchTiming:
    """Time the engine and the textbook matcher on the same pair and seed."""
    fast_s, fast = _median_time(lambda: weight_matching(spec, a, b, seed=seed), repeats)
    slow_s, slow = _median_time(lambda: reference_weight_matching(spec, a, b, seed=seed), repeats)
    identical = fast.objective == slow.objective and all(
        torch.equal(fast.perms[p], slow.perms[p]) for p in fast.perms
    )
    return MatchTiming(
        model,
        weights,
        seed,
        fast_s,
        slow_s,
        slow_s / fast_s,
        fast.sweeps,
        fast_s / fast.sweeps,
        fast.objective[-1],
        identical,
        fast.products,
        slow.products,
        fast.solves,
        slow.solves,
    )


class PeakRss:
    """Peak resident memory above the level at entry, sampled every millisecond (Linux)."""

    def __enter__(self) -> PeakRss:
        # Hand memory freed earlier back to the OS first, so that reuse is seen as growth.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def client_models(spec: PermutationSpec, base: StateDict, n: int, seed: int) -> list[StateDict]:
    """``n`` clients: the base model plus noise, each under its own random permutation."""
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        noisy = {
            k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in base.items()
        }
        out.append(apply_permutation(spec, random_perms(spec, base, seed * 1000 + i), noisy))
    return out


def bench_merge(model: str, clients: list[int], seed: int) -> list[MergeTiming]:
    """Server merge of N clients: naive average, re-basin to a reference, MergeMany."""
    net = _model(model, 1.0)
    spec = net.permutation_spec()
    rows = []
    for n in clients:
        states = client_models(spec, net.state_dict(), n, seed)
        weights = [float(100 + i) for i in range(n)]
        methods = {
            "naive": partial(average, states, weights),
            "rebasin": partial(merge_to_reference, spec, states, weights, reference=0, seed=seed),
            "merge-many": partial(merge_many, spec, states, weights, seed=seed),
        }
        naive_s = None
        for method, fn in methods.items():
            if method == "merge-many" and n > 8:
                continue  # MergeMany holds every aligned copy and runs many rounds: only small N
            with PeakRss() as mem:
                start = time.perf_counter()
                fn()
                seconds = time.perf_counter() - start
            naive_s = seconds if method == "naive" else naive_s
            rows.append(
                MergeTiming(
                    model, method, n, seconds, seconds / n, mem.extra_mib, seconds / naive_s
                )
            )
    return rows


def environment() -> dict:
    """Where and when the benchmark ran."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_benchmark(
    out: Path,
    widths: list[float],
    trained_widths: list[float],
    seeds: list[int],
    clients: list[int],
    repeats: int,
    train_steps: int,
    data_dir: str | None,
    device: str = "cpu",
    mlp_width: float = 1.0,
    trained_mlp: bool = True,
) -> dict:
    """Run every benchmark, print tables, write ``bench.json`` and ``bench.md`` in ``out``.

        Matching runs on ``device`` (the weights are moved there); merges run on the CPU. Only
    the trained cases read data: with ``trained_mlp=False`` and no ``trained_widths`` the
    benchmark needs no data set (a GPU machine without one).
    """
    out.mkdir(parents=True, exist_ok=True)
    match_rows: list[MatchTiming] = []
    with Progress(console=console, transient=True) as progress:
        cases = [("mlp", mlp_width, "random")]
        cases += [("mlp", mlp_width, "trained")] if trained_mlp else []
        cases += [("resnet20", w, "random") for w in widths]
        cases += [("resnet20", w, "trained") for w in trained_widths]
        task = progress.add_task("matching", total=len(cases) * len(seeds))
        for name, width, kind in cases:
            spec = _model(name, width).permutation_spec()
            label = f"mlp 3x{round(512 * width)}" if name == "mlp" else f"resnet20 x{width:g}"
            if kind == "trained":
                a, b = trained_pair(name, width, data_dir, out / "weights", train_steps, progress)
            for seed in seeds:
                if kind == "random":
                    a, b = random_pair(name, width, seed)
                a, b = _to(a, device), _to(b, device)
                match_rows.append(bench_matching(spec, a, b, label, kind, seed, repeats))
                progress.advance(task)
        merge_rows = []
        for name in ("mlp", "resnet20"):
            merge_rows += bench_merge(name, clients, seed=seeds[0])
    result = {
        "environment": environment(),
        "settings": {
            "device": device,
            "mlp_width": mlp_width,
            "trained_mlp": trained_mlp,
            "widths": widths,
            "trained_widths": trained_widths,
            "seeds": seeds,
            "clients": clients,
            "repeats": repeats,
            "train_steps": train_steps,
        },
        "matching": [asdict(r) for r in match_rows],
        "merge": [asdict(r) for r in merge_rows],
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown(result))
    _print(result)
    return result


def _summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (model, weights)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["weights"]), []).append(r)
    out = []
    for (model, weights), rs in groups.items():
        mean = {
            k: float(np.mean([r[k] for r in rs]))
            for k in (
                "engine_s",
                "reference_s",
                "speedup",
                "sweeps",
                "engine_s_per_sweep",
                "objective",
                "engine_products",
                "reference_products",
                "engine_solves",
                "reference_solves",
            )
        }
        out.append(
            {
                "model": model,
                "weights": weights,
                "seeds": len(rs),
                "identical": all(r["identical"] for r in rs),
                **mean,
            }
        )
    return out


def markdown(result: dict) -> str:
    """Both benchmark tables as Markdown, with the environment line."""
    env = result["environment"]
    lines = [
        f"Measured {env['date']} on {env['cpu_count']} CPU cores ({env['machine']}, "
        f"torch {env['torch']}, {env['torch_threads']} threads"
        + (f", GPU {env['cuda']}" if env["cuda"] else ", no GPU")
        + ").",
        "",
        "| model | weights | seeds | engine s | textbook s | speed-up | sweeps | s / sweep "
        "| products engine / textbook | solves engine / textbook | objective | same result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _summarise(result["matching"]):
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['seeds']} | {r['engine_s']:.3f} | "
            f"{r['reference_s']:.3f} | {r['speedup']:.1f}x | {r['sweeps']:.1f} | "
            f"{r['engine_s_per_sweep']:.4f} | "
            f"{r['engine_products']:.0f} / {r['reference_products']:.0f} | "
            f"{r['engine_solves']:.0f} / {r['reference_solves']:.0f} | {r['objective']:.1f} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    lines += [
        "",
        "| model | method | clients | seconds | s / client | peak extra MiB | x naive |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["merge"]:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['clients']} | {r['seconds']:.3f} | "
            f"{r['seconds_per_client']:.4f} | {r['peak_extra_mib']:.0f} | "
            f"{r['ratio_to_naive']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _print(result: dict) -> None:
    table = Table(title="weight matching: engine vs textbook (mean over seeds)")
    for col in ("model", "weights", "engine s", "textbook s", "speed-up", "sweeps", "same"):
        table.add_column(col)
    for r in _summarise(result["matching"]):
        table.add_row(
            r["model"],
            r["weights"],
            f"{r['engine_s']:.3f}",
            f"{r['reference_s']:.3f}",
            f"{r['speedup']:.1f}x",
            f"{r['sweeps']:.1f}",
            str(r["identical"]),
        )
    console.print(table)
    merge = Table(title="server merge of N clients")
    for col in ("model", "method", "N", "seconds", "peak extra MiB"):
        merge.add_column(col)
    for r in result["merge"]:
        merge.add_row(
            r["model"],
            r["method"],
            str(r["clients"]),
            f"{r['seconds']:.3f}",
            f"{r['peak_extra_mib']:.0f}",
        )
    console.print(merge)
