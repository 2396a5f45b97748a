"""PNG plots of a ``simulate`` run, drawn from its ``results.json`` (matplotlib, Agg backend).

* ``interpolation.png``: test accuracy and loss along the straight path from client 0's model
  to client 1's, naive and after re-basin (and with BatchNorm statistics reset), mean over
  seeds with a +-1 std band.
* ``per_class.png``: per-class test accuracy of each client's model and of the merged models,
  classes grouped by the region (client) that holds most of their training data.
* ``rounds.png``: the global model's test accuracy and loss per round for each strategy.
* ``per_class_rounds.png``: per-class accuracy of each strategy's final global model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display, also under a test runner
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from simulations.results import group_names  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 100
CURVE_STYLE = {
    "naive": {"color": "tab:red", "label": "naive averaging"},
    "rebasin": {"color": "tab:blue", "label": "re-basin"},
    "rebasin-stream": {"color": "tab:orange", "label": "re-basin, residual stream + MLP only"},
    "rebasin+bn-reset": {"color": "tab:green", "label": "re-basin + BN reset"},
}
# Bar colours of the per-class plot: merged models as in the curves, clients in muted tones.
MODEL_COLORS = {
    "naive": "tab:red",
    "rebasin": "tab:blue",
    "merge-many": "tab:cyan",
    "rebasin-stream": "tab:orange",
    "rebasin+bn-reset": "tab:green",
    "rebasin+repair": "tab:green",
    "naive+repair": "tab:olive",
    "ensemble": "tab:purple",
    "centralized": "black",
    "FedAvg": "tab:red",
    "ReBasinFedAvg": "tab:blue",
}
CLIENT_COLORS = ("tab:gray", "tab:brown", "tab:olive", "tab:pink", "tab:orange")
STRATEGY_STYLE = {
    "fedavg": {"color": "tab:red", "label": "FedAvg"},
    "rebasin": {"color": "tab:blue", "label": "ReBasinFedAvg"},
}


def class_labels(dataset: str) -> list[str]:
    """Axis labels of the ten classes."""
    if dataset == "cifar10":
        from rebasin.data import CIFAR10_CLASSES

        return list(CIFAR10_CLASSES)
    return [str(c) for c in range(10)]


def save_figure(
    fig: Figure,
    path: Path,
    title: str | None = None,
    rect: tuple[float, float, float, float] | None = None,
) -> Path:
    """Lay out ``fig``, write it to ``path`` and close it; return ``path``.

    Parameters
    ----------
    fig
        The finished figure.
    path
        The PNG file to write.
    title
        The figure's title above all panels (``None``: none).
    rect
        The part of the figure the panels may fill, as ``tight_layout`` takes it (``None``:
        all of it).
    """
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=rect)
    fig.savefig(path)
    plt.close(fig)
    return path


def _none_to_nan(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _plot_accuracy_and_loss(
    lines: Sequence[tuple[Mapping, np.ndarray, Mapping, Mapping]],
    xlabel: str,
    title: str,
    path: Path,
    xticks: np.ndarray | None = None,
) -> Path:
    """Test accuracy (left) and loss (right), each line a mean over seeds with a +-1 std band.

    Parameters
    ----------
    lines
        Per line ``(style, x, accuracy, loss)``: the style's ``color`` and ``label``, the x
        values, and pointwise ``{"mean": [...], "std": [...]}`` stats of accuracy in [0, 1]
        (drawn in percent) and of loss.
    xlabel, title
        Both panels' x-axis label, and the figure's title.
    path
        The PNG file to write.
    xticks
        Tick positions of both x axes (default: matplotlib's).
    """
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=DPI)
    for style, x, accuracy, loss in lines:
        for ax, data, scale in ((ax_acc, accuracy, 100.0), (ax_loss, loss, 1.0)):
            mean = _none_to_nan(data["mean"]) * scale
            std = _none_to_nan(data["std"]) * scale
            ax.plot(x, mean, marker="o", ms=3, color=style["color"], label=style["label"])
            ax.fill_between(x, mean - std, mean + std, color=style["color"], alpha=0.15)
    for ax, ylabel in ((ax_acc, "test accuracy (%)"), (ax_loss, "test loss")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xticks is not None:
            ax.set_xticks(xticks)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    return save_figure(fig, path, title)


def plot_interpolation(summary: Mapping, path: Path, names: Sequence[str]) -> Path:
    """Accuracy and loss along the path between the first two clients' models."""
    lines = [
        (
            CURVE_STYLE.get(curve, {"color": None, "label": curve}),
            np.asarray(data["lambdas"]),
            data["accuracy"],
            data["loss"],
        )
        for curve, data in summary["interpolation"].items()
    ]
    return _plot_accuracy_and_loss(
        lines,
        f"λ  (0: {names[0]} model, 1: {names[1]} model)",
        "Interpolating between two client models",
        path,
    )


def plot_per_class(
    per_class: Mapping[str, Sequence[float | None]],
    homes: Sequence[int],
    groups: Sequence[str],
    classes: Sequence[str],
    title: str,
    path: Path,
) -> Path:
    """Grouped bars: per-class accuracy of each model, classes sorted by their home group."""
    order = sorted(range(len(homes)), key=lambda c: (homes[c], c))
    models = list(per_class)
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(order) + 2), 3.6), dpi=DPI)
    x = np.arange(len(order))
    lowest = 100.0
    for j, name in enumerate(models):
        values = _none_to_nan(per_class[name])[order] * 100.0
        if np.isfinite(values).any():
            lowest = min(lowest, float(np.nanmin(values)))
        color = MODEL_COLORS.get(name)
        if color is None:
            client = int(name.split()[1]) if name.startswith("client ") else j
            color = CLIENT_COLORS[client % len(CLIENT_COLORS)]
        offset = (j - (len(models) - 1) / 2) * width
        ax.bar(x + offset, values, width, label=name, color=color)
    ax.set_xticks(x, [classes[c] for c in order], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    # Zoom in when every bar is high (MNIST), so that the differences show.
    bottom = 0.0 if lowest < 50 else 10.0 * np.floor((lowest - 5.0) / 10.0)
    ax.set_ylim(bottom, 100.0 + 0.09 * (100.0 - bottom))
    # Region bands: a separator between groups and the group's name above its classes.
    start = 0
    for g in sorted(set(homes)):
        count = sum(1 for h in homes if h == g)
        if start:
            ax.axvline(start - 0.5, color="black", lw=0.8)
        label_y = 100.0 + 0.02 * (100.0 - bottom)
        ax.text(start - 0.5 + count / 2, label_y, f"{groups[g]} classes", ha="center", fontsize=8)
        start += count
    ax.legend(fontsize=7, ncol=min(len(models), 5), loc="lower center", bbox_to_anchor=(0.5, -0.4))
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_rounds(summary: Mapping, path: Path) -> Path:
    """The global model's test accuracy and loss per round, one line per strategy."""
    rounds = np.asarray(summary["rounds"])
    lines = [
        (
            STRATEGY_STYLE.get(name, {"color": None, "label": name}),
            rounds,
            data["server_accuracy"],
            data["server_loss"],
        )
        for name, data in summary["strategies"].items()
    ]
    return _plot_accuracy_and_loss(
        lines, "round (0: initial model)", "Global model after each round", path, xticks=rounds
    )


def _per_class_source(section: Mapping, key_of_run) -> tuple[dict | None, list[int], str]:
    """Per-class values to plot: mean over seeds when every seed has the same class homes,
    else the first seed's (client identities differ between seeds' Dirichlet splits)."""
    homes = section["summary"]["class_homes"]
    if all(h == homes[0] for h in homes):
        return None, homes[0], f"mean over {len(homes)} seed(s)"
    return key_of_run(section["runs"][0]), homes[0], f"seed {section['runs'][0]['seed']}"


def _client_label(name: str, groups: Sequence[str]) -> str:
    """``client 0 (us)`` for a client whose group has a name of its own, else ``name``."""
    if not name.startswith("client "):
        return name
    group = groups[int(name.split()[1])]
    return name if group == name else f"{name} ({group})"


def write_plots(results: Mapping, out_dir: Path) -> list[Path]:
    """Draw every plot the results allow into ``out_dir``; return the files written."""
    config = results["config"]
    scenario = config["scenario"]
    k = config["experiment"]["num_clients"]
    groups = group_names(scenario, k)
    classes = class_labels(config["experiment"]["dataset"])
    written: list[Path] = []
    if "one_shot" in results:
        section = results["one_shot"]
        summary = section["summary"]
        if "interpolation" in summary:
            written.append(plot_interpolation(summary, out_dir / "interpolation.png", groups))
        shown = [n for n in summary["models"] if n.startswith("client ")] + [
            n
            for n in ("naive", "rebasin", "rebasin+bn-reset", "rebasin+repair", "ensemble")
            if n in summary["models"]
        ]
        first, homes, what = _per_class_source(
            section,
            lambda run: {
                **{f"client {i}": c["per_class_accuracy"] for i, c in enumerate(run["clients"])},
                **{n: m["per_class_accuracy"] for n, m in run["methods"].items()},
            },
        )
        values = first or {n: summary["per_class"][n]["mean"] for n in shown}
        labelled = {_client_label(n, groups): values[n] for n in shown}
        written.append(
            plot_per_class(
                labelled,
                homes,
                groups,
                classes,
                f"One-shot: per-class accuracy ({what})",
                out_dir / "per_class.png",
            )
        )
    if "multi_round" in results:
        section = results["multi_round"]
        summary = section["summary"]
        written.append(plot_rounds(summary, out_dir / "rounds.png"))
        first, homes, what = _per_class_source(
            section,
            lambda run: {n: s["final"]["per_class_accuracy"] for n, s in run["strategies"].items()},
        )
        values = first or {
            n: s["final_per_class"]["mean"] for n, s in summary["strategies"].items()
        }
        labelled = {STRATEGY_STYLE.get(n, {"label": n})["label"]: v for n, v in values.items()}
        written.append(
            plot_per_class(
                labelled,
                homes,
                groups,
                classes,
                f"Multi-round: final global model per class ({what})",
                out_dir / "per_class_rounds.png",
            )
        )
    for path in written:
        logger.info("plot written: %s", path)
    return written
