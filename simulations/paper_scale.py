"""The GPU paper-scale run: wide ResNet-20 US/EU clients on CIFAR-10, trained and merged.

``python -m simulations.paper_scale --data-dir DIR --out DIR`` trains, for every width of
``--widths`` and normalisation of ``--norms``, one ResNet-20 per region of the US/EU split
(each region holds ``own_fraction`` of its five classes and an equal share of the others)
with the CIFAR-10 recipe: random crop + flip on the device, SGD with Nesterov momentum and a
one-cycle schedule, label smoothing, channels_last and bf16 autocast where the device has
bf16. The whole training set is held on the device. The clients are then merged: naive
averaging, re-basin to the larger client, MergeMany, activation repair (BatchNorm: pooled
per-client statistics; LayerNorm: REPAIR against the aligned clients), and compared with the
logit ensemble and the best client, on the full test set.

Outputs in ``--out``: ``paper_scale.json`` (rewritten after every run), ``paper_scale.md``
and ``paper_scale.png``. After the first epoch of every setting the script prints that
epoch's time and the projected time of the whole run (compute grows with width²). Stopped by
SIGINT (the script's timeout) while the runs train and merge, it still writes the report of
the finished runs, names the ones it did not reach, and exits 130.

Dependencies: torch, torchvision, numpy, scipy, rich, safetensors and typer only (no flwr,
no pydantic), so it runs on a bare GPU machine; ``tests/test_paper_scale.py`` checks that.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from simulations.paper_scale_report import render_report, summarize, write_chart

FORMAT = "rebasin-paper-scale/1"
NORMS = ("batch", "layer")


@dataclass(frozen=True)
class PaperScaleConfig:
    """Settings of a paper-scale run (validated on construction; all land in the JSON)."""

    widths: tuple[float, ...] = (4.0, 8.0)
    norms: tuple[str, ...] = ("batch", "layer")
    seeds: tuple[int, ...] = (0,)
    epochs: int = 20
    batch_size: int = 500
    max_lr: float = 0.2
    label_smoothing: float = 0.1
    weight_decay: float = 5e-4
    own_fraction: float = 0.8
    bf16: str = "auto"
    repair_batches: int = 20
    max_iter: int = 100
    limit_per_class: int | None = None
    test_limit_per_class: int | None = None
    time_budget: float = 480.0

    def __post_init__(self) -> None:
        import math

        def bad(flag: str, value: object, why: str) -> ValueError:
            return ValueError(f"{flag} = {value!r}: {why}")

        if not self.widths or any(not (math.isfinite(w) and w > 0) for w in self.widths):
            raise bad("--widths", list(self.widths), "need one or more finite widths > 0")
        if not self.norms or any(n not in NORMS for n in self.norms):
            raise bad("--norms", list(self.norms), f"each must be one of {NORMS}")
        if (
            not self.seeds
            or any(s < 0 for s in self.seeds)
            or len(set(self.seeds)) < len(self.seeds)
        ):
            raise bad("--seeds", list(self.seeds), "need distinct seeds >= 0")
        for flag, value in (
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--repair-batches", self.repair_batches),
            ("--max-iter", self.max_iter),
        ):
            if value < 1:
                raise bad(flag, value, "must be >= 1")
        if not (math.isfinite(self.max_lr) and self.max_lr > 0):
            raise bad("--max-lr", self.max_lr, "must be finite and > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("--weight-decay", self.weight_decay, "must be finite and >= 0")
        if not 0 < self.own_fraction <= 1:
            raise bad("--own-fraction", self.own_fraction, "must lie in (0, 1]")
        if self.bf16 not in ("auto", "on", "off"):
            raise bad("--bf16", self.bf16, "must be auto, on or off")
        if not (math.isfinite(self.time_budget) and self.time_budget > 0):
            raise bad("--time-budget", self.time_budget, "must be finite and > 0")
        for flag, limit in (
            ("--limit-per-class", self.limit_per_class),
            ("--test-limit-per-class", self.test_limit_per_class),
        ):
            if limit is not None and limit < 1:
                raise bad(flag, limit, "must be >= 1")

    def recipe(self):
        """The CIFAR-10 training recipe of every client."""
        from rebasin.recipe import TrainRecipe

        return TrainRecipe(
            augment=True,
            label_smoothing=self.label_smoothing,
            schedule="onecycle",
            max_lr=self.max_lr,
            nesterov=True,
            channels_last=True,
            bf16=self.bf16,  # type: ignore[arg-type]
        )


def environment(device) -> dict:
    """Where the run happened (versions, CPU, GPU, time)."""
    import torch

    from rebasin.recipe import bf16_supported

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "bf16_supported": bf16_supported(device),
    }


# -------------------------------------------------------------------------------------------
# one run: two clients, trained and merged


def _metrics(model, images, labels, batch_size: int) -> tuple[dict, object]:
    """Test metrics of ``model`` and its logits (CPU)."""
    from rebasin.batches import DeviceBatches
    from rebasin.train import logit_metrics, predict_logits

    logits, _ = predict_logits(model, DeviceBatches(images, labels, batch_size))
    return logit_metrics(logits, labels.cpu(), 10), logits


def run_one(cfg: PaperScaleConfig, width: float, norm: str, seed: int, data: dict, hooks) -> dict:
    """Train the two region clients of one setting and seed; merge and evaluate them all."""
    import numpy as np

    from rebasin.align import align_to_reference
    from rebasin.batches import DeviceBatches
    from rebasin.merge import average, merge_many
    from rebasin.norm import batchnorm_stats, combine_batchnorm_stats, load_batchnorm_stats
    from rebasin.norm import repair as repair_activations
    from rebasin.partition import region_split
    from rebasin.recipe import resolve
    from rebasin.train import logit_metrics, train
    from rebasin.zoo import build_model

    device = data["device"]
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    shards = region_split(data["train_labels_cpu"], 2, cfg.own_fraction, seed)
    sizes = [len(s) for s in shards]
    recipe = cfg.recipe()
    eval_batch = 1000
    clients, train_seconds = [], []
    for i, shard in enumerate(shards):
        idx = torch_index(shard, device)
        model = build_model("resnet20", "cifar10", width=width, norm=norm, seed=1000 * seed + i)  # type: ignore[arg-type]
        model.to(device)
        batches = DeviceBatches(
            train_x[idx],
            train_y[idx],
            cfg.batch_size,
            shuffle=True,
            seed=1000 * seed + i,
            drop_last=len(shard) >= cfg.batch_size,
            on_epoch_end=hooks.epoch_end(width, norm, seed, i),
        )
        start = time.perf_counter()
        train(
            model,
            batches,
            cfg.epochs,
            cfg.max_lr,
            weight_decay=cfg.weight_decay,
            progress=hooks.progress,
            description=f"resnet20 x{width:g} {norm} seed {seed}: region {i}",
            recipe=recipe,
            seed=1000 * seed + i,
        )
        train_seconds.append(time.perf_counter() - start)
        clients.append(model.eval())
    template = clients[0]
    spec = template.permutation_spec()
    states = [m.state_dict() for m in clients]
    largest = int(np.argmax(sizes))
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - start
        return out

    aligned = timed(
        "rebasin",
        lambda: [
            item.state_dict
            for item in align_to_reference(
                spec, states, reference=largest, seed=seed, max_iter=cfg.max_iter
            )
        ],
    )
    merged = {
        "naive": timed("naive", lambda: average(states, sizes)),
        "rebasin": average(aligned, sizes),
        "merge-many": timed(
            "merge-many", lambda: merge_many(spec, states, sizes, seed=seed, max_iter=cfg.max_iter)
        ),
    }

    def load(sd) -> object:
        model = copy.deepcopy(template)
        model.load_state_dict(sd)
        return model.eval()

    models = {name: load(sd) for name, sd in merged.items()}
    loaders = [
        DeviceBatches(train_x[torch_index(s, device)], train_y[torch_index(s, device)], 500,
                      shuffle=True, seed=seed)
        for s in shards
    ]  # fmt: skip
    if norm == "batch":
        for base in ("naive", "rebasin"):
            model = copy.deepcopy(models[base])
            stats = [batchnorm_stats(model, ld, cfg.repair_batches) for ld in loaders]
            models[f"{base}+bn-reset"] = load_batchnorm_stats(model, combine_batchnorm_stats(stats))
    else:
        pooled_idx = torch_index(np.concatenate(shards), device)
        pooled = DeviceBatches(
            train_x[pooled_idx], train_y[pooled_idx], 500, shuffle=True, seed=seed
        )
        # naive + REPAIR is the control: the same repair without matching.
        for base, ends in (("naive", clients), ("rebasin", [load(sd) for sd in aligned])):
            models[f"{base}+repair"] = timed(
                f"{base}+repair",
                lambda base=base, ends=ends: repair_activations(
                    copy.deepcopy(models[base]),
                    ends,
                    pooled,
                    sizes,
                    cfg.repair_batches,
                ),
            )
    client_metrics, logits = [], []
    for m in clients:
        metrics, lg = _metrics(m, test_x, test_y, eval_batch)
        client_metrics.append(metrics)
        logits.append(lg)
    methods = {name: _metrics(m, test_x, test_y, eval_batch)[0] for name, m in models.items()}
    ensemble = sum(w * lg for w, lg in zip(sizes, logits)) / sum(sizes)
    methods["ensemble"] = logit_metrics(ensemble, test_y.cpu(), 10)
    best = max(c["accuracy"] for c in client_metrics)
    used = resolve(recipe, device, "sgd", cfg.max_lr)
    return {
        "width": width,
        "norm": norm,
        "seed": seed,
        "params": sum(p.numel() for p in template.parameters()),
        "shard_sizes": sizes,
        "clients": client_metrics,
        "methods": methods,
        "best_client_accuracy": best,
        "gap_to_best_client": {k: v["accuracy"] - best for k, v in methods.items()},
        "train_seconds": train_seconds,
        "images_per_second": [cfg.epochs * len(s) / t for s, t in zip(shards, train_seconds)],
        "merge_seconds": timings,
        "training": used.as_dict(),
    }


def torch_index(indices, device):
    import torch

    return torch.as_tensor(indices, dtype=torch.int64, device=device)


class Hooks:
    """Progress bars and the time estimate printed after each setting's first epoch."""

    def __init__(self, cfg: PaperScaleConfig, console, progress) -> None:
        self.cfg, self.console, self.progress = cfg, console, progress
        self.start = time.perf_counter()
        self.estimate: float | None = None

    def epoch_end(self, width: float, norm: str, seed: int, client: int):
        def report(epoch: int, seconds: float) -> None:
            if epoch != 0 or client != 0 or seed != self.cfg.seeds[0]:
                return
            cfg = self.cfg
            # Every client trains the same number of epochs on about half the data.
            per_setting = 2 * cfg.epochs * seconds
            total = sum(
                per_setting * (w / width) ** 2 for w in cfg.widths for _ in cfg.norms
            ) * len(cfg.seeds)
            self.estimate = total
            colour = "red" if total > cfg.time_budget else "green"
            self.console.print(
                f"resnet20 x{width:g} {norm}: first epoch {seconds:.1f} s; this setting "
                f"~{per_setting:.0f} s of training; whole run ~[{colour}]{total:.0f} s[/] "
                f"(budget {cfg.time_budget:.0f} s; compute ~ width²; first epoch includes "
                "warm-up)"
            )

        return report


def load_data(cfg: PaperScaleConfig, data_dir: Path | None, device) -> dict:
    """Both CIFAR-10 splits, moved to ``device`` once."""
    from rebasin.data import load_dataset

    train_set = load_dataset("cifar10", True, data_dir, limit_per_class=cfg.limit_per_class)
    test_set = load_dataset("cifar10", False, data_dir, limit_per_class=cfg.test_limit_per_class)
    return {
        "device": device,
        "train": (train_set.images.to(device), train_set.labels.to(device)),
        "train_labels_cpu": train_set.labels,
        "test": (test_set.images.to(device), test_set.labels.to(device)),
        "train_examples": len(train_set),
        "test_examples": len(test_set),
    }


def run_paper_scale(
    cfg: PaperScaleConfig, data_dir: Path | None, out: Path, device, *, command: str = ""
) -> dict:
    """Every width x norm x seed; write the JSON after each run and the report at the end."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    data = load_data(cfg, data_dir, device)
    results: dict = {
        "format": FORMAT,
        "command": command,
        "environment": environment(device),
        "config": {**asdict(cfg), "recipe": cfg.recipe().as_dict()},
        "data": {
            "train_examples": data["train_examples"],
            "test_examples": data["test_examples"],
            "data_dir": str(data_dir) if data_dir is not None else None,
        },
        "data_seconds": time.perf_counter() - start,
        "runs": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        hooks = Hooks(cfg, console, progress)
        planned = [(w, n, s) for w in cfg.widths for n in cfg.norms for s in cfg.seeds]
        try:
            for width, norm, seed in planned:
                run = run_one(cfg, width, norm, seed, data, hooks)
                results["runs"].append(run)
                results["estimated_seconds"] = hooks.estimate
                results["wall_seconds"] = time.perf_counter() - start
                _write_json(results, out / "paper_scale.json")
                console.print(_run_line(run))
        except KeyboardInterrupt:
            # The script's timeout sends SIGINT: report what finished instead of nothing.
            left = planned[len(results["runs"]) :]
            results["interrupted"] = {
                "after_seconds": time.perf_counter() - start,
                "not_run": [{"width": w, "norm": n, "seed": s} for w, n, s in left],
            }
            console.print(
                f"[red]interrupted[/] after {len(results['runs'])} of {len(planned)} runs; "
                "writing the report of the finished ones"
            )
    results["summary"] = summarize(results["runs"])
    results["wall_seconds"] = time.perf_counter() - start
    _write_json(results, out / "paper_scale.json")
    written = json.loads((out / "paper_scale.json").read_text())
    if not written["runs"]:
        for stale in (out / "paper_scale.md", out / "paper_scale.png"):  # an earlier run's
            stale.unlink(missing_ok=True)
        console.print(f"no run finished; {out / 'paper_scale.json'} says what was planned")
        return written
    (out / "paper_scale.md").write_text(render_report(written))
    write_chart(written, out / "paper_scale.png")
    console.print(f"results in {out} after {written['wall_seconds']:.0f} s")
    return written


def _write_json(results: dict, path: Path) -> None:
    from simulations.results import sanitize

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sanitize(results), indent=2, allow_nan=False))
    os.replace(tmp, path)


def _run_line(run: dict) -> str:
    parts = ", ".join(f"{k} {100 * v['accuracy']:.2f}%" for k, v in run["methods"].items())
    clients = ", ".join(f"{100 * c['accuracy']:.2f}%" for c in run["clients"])
    return (
        f"resnet20 x{run['width']:g} {run['norm']} seed {run['seed']}: clients {clients}; {parts}"
    )


# -------------------------------------------------------------------------------------------
# command line

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    data_dir: Annotated[
        Path | None,
        typer.Option(envvar="REBASIN_DATA_DIR", help="folder with cifar10-jpeg.tar.gz (or more)"),
    ] = None,
    out: Annotated[Path, typer.Option(help="results directory")] = Path("results/paper-scale"),
    widths: Annotated[list[float], typer.Option(help="ResNet-20 widths")] = [4.0, 8.0],  # noqa: B006
    norms: Annotated[list[str], typer.Option(help="batch and/or layer")] = ["batch", "layer"],  # noqa: B006
    seeds: Annotated[list[int], typer.Option(help="seeds")] = [0],  # noqa: B006
    epochs: Annotated[int, typer.Option(help="epochs per client")] = 20,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 500,
    max_lr: Annotated[float, typer.Option(help="one-cycle peak learning rate")] = 0.2,
    label_smoothing: Annotated[float, typer.Option(help="label smoothing")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="weight decay")] = 5e-4,
    own_fraction: Annotated[float, typer.Option(help="share of its own classes per region")] = 0.8,
    bf16: Annotated[str, typer.Option(help="bf16 autocast: auto, on, off")] = "auto",
    device: Annotated[str, typer.Option(help="cuda or cpu (default: cuda if present)")] = "",
    limit_per_class: Annotated[int | None, typer.Option(help="training images per class")] = None,
    test_limit_per_class: Annotated[int | None, typer.Option(help="test images per class")] = None,
    time_budget: Annotated[float, typer.Option(help="seconds; the estimate warns above")] = 480.0,
) -> None:
    """Train wide ResNet-20 US/EU clients on CIFAR-10 and merge them (see the module doc)."""
    import torch

    try:
        cfg = PaperScaleConfig(
            widths=tuple(widths),
            norms=tuple(norms),
            seeds=tuple(seeds),
            epochs=epochs,
            batch_size=batch_size,
            max_lr=max_lr,
            label_smoothing=label_smoothing,
            weight_decay=weight_decay,
            own_fraction=own_fraction,
            bf16=bf16,
            limit_per_class=limit_per_class,
            test_limit_per_class=test_limit_per_class,
            time_budget=time_budget,
        )
        cfg.recipe()  # label smoothing and the rest are checked by TrainRecipe
    except ValueError as exc:
        typer.secho(f"Error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        typer.secho("Error: --device = 'cuda': no CUDA device here", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    command = "python -m simulations.paper_scale " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        written = run_paper_scale(cfg, data_dir, out, torch.device(name), command=command)
    except FileNotFoundError as exc:
        typer.secho(f"Error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    if "interrupted" in written:
        raise typer.Exit(130)  # as an interrupted command: the results are partial


if __name__ == "__main__":
    app()
