"""Run ``rebasin robust``: both modes, every seed, every (attack, strategy, variant) cell.

One-shot (per seed): the honest clients train once, each from its own initialisation
(client ``i`` from seed ``1000 * seed + i``); every attack then builds its hostile models
from those, and every strategy aggregates the same replies, unaligned and aligned (to the
``reference``: ``largest`` or ``merge-many``, since there is no trained global model).

Rounds (per seed): every (attack, strategy, variant) is its own federated run of ``rounds``
rounds from one shared initial model (seed ``1000 * seed + 999``); honest client ``i``
trains ``local_epochs`` from the current global model with loader seed
``1000 * seed + 100 * round + i``, and the aligned strategies align to the global model sent.
Round 1 starts from the same model in every run, so its honest models are trained once.

Hostile client ``j`` (node ``FIRST_NODE_ID + N_honest + j``) copies honest client
:func:`simulations.robust.victim` (as if it held the same data: it saves training) and
reports that client's number of examples; honest replies come first, hostile ones last.
The ``noise`` attack draws from a generator seeded ``(seed, round, j)``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from rich.progress import Progress

from rebasin.data import LabeledData, load_dataset
from rebasin.spec import StateDict
from rebasin.train import evaluate, train
from rebasin.zoo import build_model
from simulations.local_grid import FIRST_NODE_ID, server_identity
from simulations.robust import (
    FORMAT,
    VARIANTS,
    RobustConfig,
    aggregate,
    attack,
    honest_names,
    make_strategy,
    split_honest,
    victim,
)

logger = logging.getLogger(__name__)

Models = list[tuple[int, StateDict, int]]  # (node id, model, num-examples)


class _Setup:
    """Data, shards and the model template of one seed."""

    def __init__(
        self, cfg: RobustConfig, seed: int, train_set: LabeledData, test_set: LabeledData
    ) -> None:
        self.cfg, self.seed, self.test = cfg, seed, test_set
        shards = split_honest(train_set.labels, cfg.clients_per_region, cfg.own_fraction, seed)
        sizes = [len(s) for s in shards]
        if min(sizes) == 0:
            raise ValueError(f"an honest client got no examples (shard sizes {sizes})")
        self.shards = [train_set.subset(s) for s in shards]
        self.sizes = sizes
        self.class_counts = [s.class_counts().tolist() for s in self.shards]
        self.template = self.fresh(1000 * seed + 999)

    def fresh(self, init_seed: int) -> torch.nn.Module:
        return build_model("mlp", "mnist", width=self.cfg.width, seed=init_seed)

    def fit(
        self,
        start: Mapping[str, torch.Tensor] | int,
        i: int,
        epochs: int,
        loader_seed: int,
        progress: Progress | None,
        what: str,
    ) -> StateDict:
        """Honest client ``i`` trained from ``start`` (a model, or an init seed)."""
        if isinstance(start, int):
            model = self.fresh(start)
        else:
            model = copy.deepcopy(self.template)
            model.load_state_dict(start)
        data = self.shards[i].loader(self.cfg.batch_size, shuffle=True, seed=loader_seed)
        train(
            model,
            data,
            epochs,
            self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            progress=progress,
            description=f"seed {self.seed}: {what}",
        )
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        model = copy.deepcopy(self.template)
        model.load_state_dict(state_dict)
        result = evaluate(model, self.test.loader(1000))
        return {"accuracy": result.accuracy, "loss": result.loss}

    def replies(
        self,
        honest: Sequence[StateDict],
        kind: str,
        base: Mapping[str, torch.Tensor] | None,
        server_round: int,
    ) -> Models:
        """Honest replies, then the hostile ones of attack ``kind``."""
        cfg = self.cfg
        out: Models = [
            (FIRST_NODE_ID + i, sd, n) for i, (sd, n) in enumerate(zip(honest, self.sizes))
        ]
        if kind == "none":
            return out
        for j in range(cfg.hostile):
            v = victim(j, cfg.num_honest, cfg.hostile)
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000 + server_round) * 1_000 + j
            )
            hostile = attack(kind, honest[v], base, scale=cfg.scale, generator=generator)
            out.append((FIRST_NODE_ID + cfg.num_honest + j, hostile, self.sizes[v]))
        return out


def _cell(setup: _Setup, merged: StateDict, infos: list[dict]) -> dict:
    """One (attack, strategy, variant) result: test metrics and per-round alignment info."""
    honest_ids = {str(FIRST_NODE_ID + i) for i in range(setup.cfg.num_honest)}

    def mean_moved(info: dict, honest: bool) -> float | None:
        values = [m for k, m in info["moved"].items() if (k in honest_ids) == honest]
        return sum(values) / len(values) if values else None

    return {
        **setup.evaluate(merged),
        "kept_previous": [i["kept_previous"] for i in infos],
        "dropped": [i["dropped"] for i in infos],
        "moved_honest": [mean_moved(i, True) for i in infos],
        "moved_hostile": [mean_moved(i, False) for i in infos],
    }


def run_oneshot(setup: _Setup, progress: Progress | None, advance: Callable[[], None]) -> dict:
    """One seed of the one-shot mode."""
    cfg, seed = setup.cfg, setup.seed
    names = honest_names(cfg.clients_per_region)
    honest = [
        setup.fit(1000 * seed + i, i, cfg.epochs, 1000 * seed + i, progress, f"one-shot {n}")
        for i, n in enumerate(names)
    ]
    # No global model here: the untrained template only checks the replies' keys and
    # shapes and is the aligned strategies' magnitude yardstick (never their reference).
    yardstick = setup.template.state_dict()
    cells: dict = {}
    for kind in cfg.attacks:
        models = setup.replies(honest, kind, None, 1)
        cells[kind] = {}
        for name in cfg.strategies:
            cells[kind][name] = {}
            for variant in VARIANTS:
                strategy = make_strategy(
                    name,
                    variant == "aligned",
                    cfg,
                    setup.template,
                    reference=cfg.reference,
                    seed=seed,
                )
                merged, info = aggregate(strategy, 1, yardstick, models)
                cells[kind][name][variant] = _cell(setup, merged, [info])
                advance()
    return {
        "honest": [{"name": n, **setup.evaluate(sd)} for n, sd in zip(names, honest)],
        "cells": cells,
    }


def run_rounds(setup: _Setup, progress: Progress | None, advance: Callable[[], None]) -> dict:
    """One seed of the rounds mode."""
    cfg, seed = setup.cfg, setup.seed
    start = {k: v.detach().clone() for k, v in setup.template.state_dict().items()}
    first_round = [
        setup.fit(start, i, cfg.local_epochs, 1000 * seed + 100 + i, progress, f"round 1 {i}")
        for i in range(cfg.num_honest)
    ]
    cells: dict = {}
    for kind in cfg.attacks:
        cells[kind] = {}
        for name in cfg.strategies:
            cells[kind][name] = {}
            for variant in VARIANTS:
                strategy = make_strategy(
                    name, variant == "aligned", cfg, setup.template, reference="global", seed=seed
                )
                global_model, infos = start, []
                for r in range(1, cfg.rounds + 1):
                    honest = (
                        first_round
                        if r == 1
                        else [
                            setup.fit(
                                global_model,
                                i,
                                cfg.local_epochs,
                                1000 * seed + 100 * r + i,
                                None,
                                f"round {r}",
                            )
                            for i in range(cfg.num_honest)
                        ]
                    )
                    models = setup.replies(honest, kind, global_model, r)
                    global_model, info = aggregate(strategy, r, global_model, models)
                    infos.append(info)
                    advance()
                cells[kind][name][variant] = _cell(setup, global_model, infos)
    return {"cells": cells}


def run_robust(
    cfg: RobustConfig,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    progress: Progress | None = None,
    command: str = "",
    on_seed: Callable[[str, int, dict], None] | None = None,
) -> dict:
    """Run every mode and seed of ``cfg``; write ``results.json``, ``report.md`` and
    ``robust.png`` into ``out_dir``. ``results.json`` is rewritten after every seed."""
    from simulations.results import read_json, results_header, write_json
    from simulations.robust_report import summarize, write_plot, write_report

    out = Path(out_dir)
    results = results_header(FORMAT, out, command, cfg, data_dir)
    train_set = load_dataset("mnist", True, data_dir, limit_per_class=cfg.limit_per_class)
    test_set = load_dataset("mnist", False, data_dir, limit_per_class=cfg.test_limit_per_class)
    cells = len(cfg.attacks) * len(cfg.strategies) * len(VARIANTS)
    results["runs"] = []
    start = time.perf_counter()
    with server_identity(run_id=1):
        for mode in cfg.modes:
            for seed in cfg.seeds:
                steps = cells * (cfg.rounds if mode == "rounds" else 1)
                task = progress.add_task(f"seed {seed}: {mode}", total=steps) if progress else None

                def advance(task=task) -> None:
                    if task is not None:
                        progress.advance(task)  # type: ignore[union-attr]

                t0 = time.perf_counter()
                setup = _Setup(cfg, seed, train_set, test_set)
                run = (run_oneshot if mode == "one-shot" else run_rounds)(setup, progress, advance)
                run = {
                    "mode": mode,
                    "seed": seed,
                    "shard_sizes": setup.sizes,
                    "shard_class_counts": setup.class_counts,
                    **run,
                    "wall_seconds": time.perf_counter() - t0,
                }
                results["runs"].append(run)
                results["summary"] = summarize(results["runs"])
                results["wall_seconds"] = time.perf_counter() - start
                write_json(results, out, "results.json")
                if progress is not None and task is not None:
                    progress.remove_task(task)
                if on_seed is not None:
                    on_seed(mode, seed, run)
    written = read_json(out, "results.json", FORMAT, "robust results file")
    plot = write_plot(written, out)
    write_report(written, out, plot)
    return written
