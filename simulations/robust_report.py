"""``rebasin robust``'s summary (in ``results.json``), ``report.md`` and ``robust.png``.

The summary is computed from the per-seed runs once and stored; the report and the plot only
read the file. Statistics are :func:`simulations.results.stat` (mean, sample std over seeds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from simulations.report import pct, provenance_lines, table
from simulations.results import series_stat, stat
from simulations.robust import ATTACKS, STRATEGIES, STRATEGY_LABELS, VARIANTS

PLOT_FILE = "robust.png"
REPORT_FILE = "report.md"
STRATEGY_COLORS = {
    "fedavg": "tab:red",
    "fedmedian": "tab:blue",
    "krum": "tab:green",
    "trimmed-mean": "tab:purple",
}


def summarize(runs: Sequence[Mapping]) -> dict:
    """Per mode: honest clients' accuracy and, per (attack, strategy, variant), the test
    accuracy and loss, the share of units alignment moved per round, and the drops.

    Raises
    ------
    ValueError
        If the seeds of one mode ran different cells.
    """
    summary: dict = {}
    for mode in dict.fromkeys(run["mode"] for run in runs):
        of_mode = [run for run in runs if run["mode"] == mode]
        layout = _layout(of_mode[0]["cells"])
        for run in of_mode[1:]:
            if _layout(run["cells"]) != layout:
                raise ValueError(f"{mode}: seeds ran different cells")
        entry: dict = {"seeds": [run["seed"] for run in of_mode], "cells": {}}
        if "honest" in of_mode[0]:
            entry["honest_mean"] = stat(
                sum(c["accuracy"] for c in run["honest"]) / len(run["honest"]) for run in of_mode
            )
            entry["honest_best"] = stat(
                max(c["accuracy"] for c in run["honest"]) for run in of_mode
            )
        for kind, strategies in of_mode[0]["cells"].items():
            entry["cells"][kind] = {}
            for name, variants in strategies.items():
                entry["cells"][kind][name] = {}
                for variant in variants:
                    cells = [run["cells"][kind][name][variant] for run in of_mode]
                    entry["cells"][kind][name][variant] = {
                        "accuracy": stat(c["accuracy"] for c in cells),
                        "loss": stat(c["loss"] for c in cells),
                        "moved_honest": series_stat([c["moved_honest"] for c in cells]),
                        "moved_hostile": series_stat([c["moved_hostile"] for c in cells]),
                        "dropped": sum(len(d) for c in cells for d in c["dropped"]),
                        "kept_previous": sum(sum(c["kept_previous"]) for c in cells),
                    }
        entry["wall_seconds"] = stat(run["wall_seconds"] for run in of_mode)
        summary[mode] = entry
    return summary


def _layout(cells: Mapping) -> list[tuple[str, str, str]]:
    return [(k, s, v) for k, ss in cells.items() for s, vs in ss.items() for v in vs]


def _ordered(keys, order: Sequence[str]) -> list[str]:
    return [k for k in order if k in keys]


def row_label(name: str, variant: str) -> str:
    label = STRATEGY_LABELS.get(name, name)
    return f"{label} + re-basin" if variant == "aligned" else label


# ------------------------------------------------------------------------------------------
# report


def render_report(results: Mapping, plot: Path | str | None = None) -> str:
    """The Markdown report of a results file's data."""
    cfg = results["config"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = [
        f"# Robust aggregation with hostile clients `{results['name']}`",
        "",
        *provenance_lines(results),
        f"- Clients: {2 * cfg['clients_per_region']} honest (US/EU region split, own fraction "
        f"{cfg['own_fraction']}, {cfg['clients_per_region']} disjoint shards per region) and "
        f"{cfg['hostile']} hostile (scale {cfg['scale']:g} for `scaled`)",
        "- Data: MNIST, "
        + (
            f"first {cfg['limit_per_class']} training examples per class"
            if cfg["limit_per_class"]
            else "full training set"
        )
        + ", "
        + (
            f"first {cfg['test_limit_per_class']} test examples per class"
            if cfg["test_limit_per_class"]
            else "full test set (10,000)"
        ),
        f"- Model: MLP width {cfg['width']:g} (3 hidden layers of {int(512 * cfg['width'])}); "
        f"SGD lr {cfg['lr']:g}, batch {cfg['batch_size']}, weight decay {cfg['weight_decay']:g}",
        f"- Seeds: {seeds} (cells: test accuracy in %, mean ± sample std over the seeds)",
        "",
    ]
    summary = results.get("summary", {})
    if "one-shot" in summary:
        lines += [
            "## One-shot (independent starts)",
            "",
            f"Every honest client trains {cfg['epochs']} epoch(s) from its own initialisation; "
            f"one aggregation. Aligned: re-basin to reference `{cfg['reference']}`"
            + (
                " (the reply with the most examples; hostile clients claim their victim's "
                "count and reply last, so a tie goes to the honest client)."
                if cfg["reference"] == "largest"
                else "."
            ),
            "",
            *_mode_section(summary["one-shot"], rounds=False),
        ]
    if "rounds" in summary:
        lines += [
            f"## {cfg['rounds']} rounds (shared start)",
            "",
            f"All clients start from one initial model; each round the honest clients train "
            f"{cfg['local_epochs']} local epoch(s) from the global model and the hostile ones "
            "attack. Aligned: re-basin to the global model sent.",
            "",
            *_mode_section(summary["rounds"], rounds=True),
        ]
    lines += [
        "## Definitions",
        "",
        "Hostile client j copies one honest client's model h (and its number of examples); "
        "b is the global model it was sent (rounds) or zero (one-shot).",
        "",
        "- `none`: no hostile replies (the server's settings stay those for the hostile count)",
        f"- `scaled`: b + {cfg['scale']:g} (h - b)",
        "- `sign-flip`: b - (h - b)",
        "- `noise`: h + Gaussian noise with each tensor's own standard deviation in h",
        "- Krum: `num_malicious_nodes` = hostile count; FedTrimmedAvg: trims the hostile "
        "count from each end",
        "- units moved: share of hidden units that the aligned strategy's permutations "
        "moved, mean over the honest clients (0: matching kept the identity; the `largest` "
        "reference itself counts as 0)",
        "- Krum returns one reply's model; permuting a model does not change its function, so "
        "alignment can only change which model Krum picks",
    ]
    if plot is not None:
        lines += ["", f"![accuracy per attack]({Path(plot).name})"]
    return "\n".join(lines) + "\n"


def _mode_section(entry: Mapping, rounds: bool) -> list[str]:
    attacks = _ordered(entry["cells"], ATTACKS)
    first = entry["cells"][attacks[0]]
    names = _ordered(first, STRATEGIES)
    rows = [
        [row_label(name, variant)]
        + [pct(entry["cells"][kind][name][variant]["accuracy"]) for kind in attacks]
        for name in names
        for variant in VARIANTS
    ]
    lines = [table(["strategy", *attacks], rows), ""]
    if "honest_mean" in entry:
        lines += [
            f"Honest clients alone: mean {pct(entry['honest_mean'])}, best "
            f"{pct(entry['honest_best'])}.",
            "",
        ]
    what = "per round, " if rounds else ""
    for who in ("honest", "hostile"):
        moved_rows = []
        for name in names:
            row = [row_label(name, "aligned")]
            for kind in attacks:
                series = entry["cells"][kind][name]["aligned"][f"moved_{who}"]
                row.append(" / ".join(_share(series, p) for p in range(len(series["mean"]))))
            moved_rows.append(row)
        lines += [
            f"Units moved by alignment, {who} clients ({what}%, mean over the seeds):",
            "",
            table(["strategy", *attacks], moved_rows),
            "",
        ]
    drops = [
        f"{row_label(name, variant)} under `{kind}`: {cell['dropped']} replies dropped, "
        f"{cell['kept_previous']} rounds kept the previous model"
        for kind in attacks
        for name in names
        for variant in VARIANTS
        if (cell := entry["cells"][kind][name][variant])["dropped"] or cell["kept_previous"]
    ]
    lines += (
        (["Dropped replies (over all seeds):", ""] + [f"- {d}" for d in drops])
        if drops
        else ["No reply was dropped and no round kept the previous model."]
    )
    return [*lines, ""]


def _share(series: Mapping, index: int) -> str:
    mean = series["mean"][index]
    return "—" if mean is None else f"{100 * mean:.1f}"


def write_report(results: Mapping, out_dir: Path, plot: Path | str | None = None) -> Path:
    """Write ``out_dir/report.md``; return its path."""
    path = Path(out_dir) / REPORT_FILE
    path.write_text(render_report(results, plot))
    return path


# ------------------------------------------------------------------------------------------
# plot


def write_plot(results: Mapping, out_dir: Path) -> Path:
    """``robust.png``: test accuracy per attack, one panel per mode; a bar per strategy,
    light for unaligned and solid for aligned, ±1 std error bars."""
    import numpy as np

    from simulations.plots import plt, save_figure

    summary = results["summary"]
    modes = list(summary)
    fig, axes = plt.subplots(len(modes), 1, figsize=(10, 3.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        cells = summary[mode]["cells"]
        attacks = _ordered(cells, ATTACKS)
        bars = [(n, v) for n in _ordered(cells[attacks[0]], STRATEGIES) for v in VARIANTS]
        width = 0.8 / len(bars)
        x = np.arange(len(attacks))
        for b, (name, variant) in enumerate(bars):
            stats = [cells[kind][name][variant]["accuracy"] for kind in attacks]
            mean = [100 * (s["mean"] or 0.0) for s in stats]
            std = [100 * (s["std"] or 0.0) for s in stats]
            ax.bar(
                x - 0.4 + (b + 0.5) * width,
                mean,
                width,
                yerr=std,
                capsize=2,
                color=STRATEGY_COLORS.get(name, "tab:gray"),
                alpha=1.0 if variant == "aligned" else 0.35,
                hatch=None if variant == "aligned" else "//",
                label=row_label(name, variant),
            )
        ax.set_xticks(x, attacks)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(mode, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    seeds = len(results["seeds"])
    return save_figure(
        fig,
        Path(out_dir) / PLOT_FILE,
        title=f"MNIST MLP, {results['config']['hostile']} hostile clients, mean ± std over "
        f"{seeds} seed(s)",
        rect=(0, 0.09 / len(modes), 1, 1),
    )
