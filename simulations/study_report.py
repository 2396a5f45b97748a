"""Outputs of ``rebasin study``: ``study.json``, its summary over seeds, PNG plots, Markdown.

Everything the summary and the plots show is computed once by :func:`summarize_study` and
stored in ``study.json``; ``summary.md`` and the plots read that file, so their numbers are
the file's numbers.

* ``progress.png``: endpoint accuracy, accuracy barrier and loss barrier against the epoch;
* ``width.png``: the same against the width multiplier (log axis);
* ``architecture.png``: the same per model, as bars.

Every plot has one line (or bar) per method, with error bars of one sample standard
deviation over the seeds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display, also under a test runner
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulations.plots import save_figure  # noqa: E402
from simulations.report import MISSING, num, pct, provenance_lines, table  # noqa: E402
from simulations.results import read_json, stat, write_json  # noqa: E402

logger = logging.getLogger(__name__)

FORMAT = "rebasin-study/1"
STUDY_FILE = "study.json"
SUMMARY_FILE = "summary.md"
# A barrier below this accuracy drop (1 percentage point) counts as "merges" in the rules.
RULE_THRESHOLD = 0.01
BARRIER_KEYS = (
    "accuracy_barrier",
    "loss_barrier",
    "midpoint_accuracy_barrier",
    "midpoint_loss_barrier",
)
METHOD_STYLE = {
    "naive": {"color": "tab:red", "label": "naive", "marker": "o"},
    "rebasin": {"color": "tab:blue", "label": "re-basin", "marker": "s"},
    "naive+bn-reset": {"color": "tab:orange", "label": "naive + BN reset", "marker": "v"},
    "rebasin+bn-reset": {"color": "tab:green", "label": "re-basin + BN reset", "marker": "^"},
}
MODEL_NAMES = {"mlp": "MLP", "vgg": "VGG-11", "resnet20": "ResNet-20"}
DPI = 100


# -------------------------------------------------------------------------------------------
# JSON file


def write_study(results: Mapping, out_dir: Path) -> Path:
    """Write ``results`` as ``out_dir/study.json`` (strict JSON: no NaN); return the path."""
    return write_json(results, out_dir, STUDY_FILE)


def read_study(out_dir: Path) -> dict:
    """Read ``out_dir/study.json``; ``FileNotFoundError``/``ValueError`` name the file."""
    return read_json(out_dir, STUDY_FILE, FORMAT)


# -------------------------------------------------------------------------------------------
# summary over seeds


def summarize_study(points: Sequence[Mapping]) -> dict:
    """Mean/std over seeds of every point, grouped per study.

    Points are grouped by ``(model, width, epoch)`` within their study, in the order first
    seen. Each group holds ``model``, ``width``, ``params``, ``epoch``, ``seeds``,
    ``endpoint_accuracy``/``endpoint_loss`` (per seed the mean of the two models) and per
    method the :func:`~simulations.results.stat` of every barrier. ``rules`` holds
    :func:`merging_from` per study and method.

    Raises
    ------
    ValueError
        If the seeds of one group measured different methods.
    """
    groups: dict[str, dict[tuple, list[Mapping]]] = {}
    for p in points:
        key = (p["model"], p["width"], p["epoch"])
        groups.setdefault(p["study"], {}).setdefault(key, []).append(p)
    summary: dict = {}
    for study, by_key in groups.items():
        rows = []
        for (model, width, epoch), members in by_key.items():
            methods = list(members[0]["methods"])
            if any(list(m["methods"]) != methods for m in members):
                raise ValueError(f"{study} {model} w{width} epoch {epoch}: methods differ by seed")
            rows.append(
                {
                    "model": model,
                    "width": width,
                    "params": members[0]["params"],
                    "epoch": epoch,
                    "seeds": [m["seed"] for m in members],
                    "endpoint_accuracy": stat(
                        float(np.mean([e["accuracy"] for e in m["endpoints"]])) for m in members
                    ),
                    "endpoint_loss": stat(
                        float(np.mean([e["loss"] for e in m["endpoints"]])) for m in members
                    ),
                    "methods": {
                        name: {
                            k: stat(m["methods"][name][k] for m in members) for k in BARRIER_KEYS
                        }
                        for name in methods
                    },
                }
            )
        summary[study] = {"rows": rows}
        axis = "epoch" if study == "progress" else "width" if study == "width" else None
        if axis is not None:
            summary[study]["rules"] = {
                name: merging_from(rows, axis, name) for name in rows[0]["methods"]
            }
    return summary


def merging_from(rows: Sequence[Mapping], axis: str, method: str) -> float | None:
    """The smallest ``axis`` value from which on the method's mean accuracy barrier stays
    below :data:`RULE_THRESHOLD` at every measured larger value; ``None`` if it never does.

    Rows are read per model (the first row's model); a row without the method (no
    BatchNorm) does not count.
    """
    model = rows[0]["model"]
    measured = sorted(
        (r[axis], r["methods"][method]["accuracy_barrier"]["mean"])
        for r in rows
        if r["model"] == model and method in r["methods"]
    )
    found = None
    for value, barrier in reversed(measured):
        if barrier is None or barrier >= RULE_THRESHOLD:
            break
        found = value
    return found


# -------------------------------------------------------------------------------------------
# plots


def _series(rows: Sequence[Mapping], method: str, key: str, scale: float):
    mean = [r["methods"][method][key]["mean"] for r in rows]
    std = [r["methods"][method][key]["std"] for r in rows]
    to_array = lambda v: np.asarray([np.nan if x is None else x for x in v], float)  # noqa: E731
    return to_array(mean) * scale, to_array(std) * scale


def _endpoints(rows: Sequence[Mapping]):
    mean = np.asarray([r["endpoint_accuracy"]["mean"] for r in rows], float) * 100
    std = np.asarray([r["endpoint_accuracy"]["std"] for r in rows], float) * 100
    return mean, std


def _method_names(rows: Sequence[Mapping]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [m for m in r["methods"] if m not in names]
    return names


def plot_lines(rows: Sequence[Mapping], axis: str, title: str, path: Path) -> Path:
    """Endpoint accuracy, accuracy barrier (points) and loss barrier against ``axis``.

    ``axis`` is ``"epoch"`` (a symmetric-log axis, linear below the first positive
    checkpoint) or ``"width"`` (log 2 axis; MLP ticks also name the hidden units).
    """
    rows = sorted(rows, key=lambda r: r[axis])
    x = np.asarray([r[axis] for r in rows], float)
    fig, (ax_end, ax_acc, ax_loss) = plt.subplots(1, 3, figsize=(12, 3.6), dpi=DPI)
    mean, std = _endpoints(rows)
    ax_end.errorbar(x, mean, yerr=std, color="black", marker="o", ms=4, capsize=3)
    for method in _method_names(rows):
        style = METHOD_STYLE.get(method, {"color": None, "label": method, "marker": "x"})
        present = [method in r["methods"] for r in rows]
        if not all(present):
            continue
        for ax, key, scale in (
            (ax_acc, "accuracy_barrier", 100.0),
            (ax_loss, "loss_barrier", 1.0),
        ):
            m, s = _series(rows, method, key, scale)
            ax.errorbar(x, m, yerr=s, capsize=3, ms=4, **style)
    for ax, ylabel in (
        (ax_end, "endpoint test accuracy (%)"),
        (ax_acc, "accuracy barrier (points)"),
        (ax_loss, "loss barrier"),
    ):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if axis == "epoch":
            positive = x[x > 0]
            if len(positive) and positive.min() < 1:
                ax.set_xscale("symlog", linthresh=float(positive.min()))
            ax.set_xticks(x, [f"{v:g}" for v in x], fontsize=7)
            ax.set_xlabel("epoch (0: initialisation)")
        else:
            ax.set_xscale("log", base=2)
            labels = [
                f"{v:g}\n({int(round(512 * v))})" if r["model"] == "mlp" else f"{v:g}"
                for v, r in zip(x, rows)
            ]
            ax.set_xticks(x, labels, fontsize=7)
            ax.minorticks_off()
            mlp = rows[0]["model"] == "mlp"
            ax.set_xlabel("width multiplier (hidden units)" if mlp else "width multiplier")
    # After the scales are set: drawn before, it widens the x limits of its panel.
    ax_acc.axhline(100 * RULE_THRESHOLD, color="gray", ls="--", lw=0.8, label="1 point")
    ax_acc.legend(fontsize=7)
    return save_figure(fig, path, title)


def plot_architectures(rows: Sequence[Mapping], title: str, path: Path) -> Path:
    """Endpoint accuracy and the barriers per model, one bar per method."""
    names = [
        f"{MODEL_NAMES.get(r['model'], r['model'])}\nw{r['width']:.3g}, {r['params'] / 1e3:.0f}k"
        for r in rows
    ]
    x = np.arange(len(rows))
    methods = _method_names(rows)
    bar = 0.8 / len(methods)
    fig, (ax_end, ax_acc, ax_loss) = plt.subplots(1, 3, figsize=(12, 3.6), dpi=DPI)
    mean, std = _endpoints(rows)
    ax_end.bar(x, mean, 0.5, yerr=std, color="gray", capsize=3)
    for j, method in enumerate(methods):
        style = METHOD_STYLE.get(method, {"color": None, "label": method})
        for ax, key, scale in (
            (ax_acc, "accuracy_barrier", 100.0),
            (ax_loss, "loss_barrier", 1.0),
        ):
            values = [
                (i, r["methods"][method][key]) for i, r in enumerate(rows) if method in r["methods"]
            ]
            ax.bar(
                [i + (j - (len(methods) - 1) / 2) * bar for i, _ in values],
                [scale * (s["mean"] if s["mean"] is not None else np.nan) for _, s in values],
                bar,
                yerr=[scale * (s["std"] or 0.0) for _, s in values],
                capsize=3,
                color=style["color"],
                label=style["label"],
            )
    for ax, ylabel in (
        (ax_end, "endpoint test accuracy (%)"),
        (ax_acc, "accuracy barrier (points)"),
        (ax_loss, "loss barrier"),
    ):
        ax.set_xticks(x, names, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    ax_acc.axhline(100 * RULE_THRESHOLD, color="gray", ls="--", lw=0.8, label="1 point")
    # One legend below the panels: inside, it would cover the bars.
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    return save_figure(fig, path, title, rect=(0, 0.06, 1, 1))


def _subject(results: Mapping) -> str:
    config = results["config"]
    return f"{config['dataset'].upper()} US/EU split, {len(results['seeds'])} seed(s)"


def write_plots(results: Mapping, out_dir: Path) -> list[Path]:
    """Draw the plot of every study in the results into ``out_dir``; return the files."""
    summary = results["summary"]
    config = results["config"]
    written = []
    if "progress" in summary:
        rows = summary["progress"]["rows"]
        r = rows[0]
        title = (
            f"Barrier during training: {MODEL_NAMES.get(r['model'], r['model'])} "
            f"w{r['width']:.3g} ({r['params']:,} parameters), {_subject(results)}"
        )
        written.append(plot_lines(rows, "epoch", title, out_dir / "progress.png"))
    if "width" in summary:
        rows = summary["width"]["rows"]
        title = (
            f"Barrier against width: {MODEL_NAMES.get(rows[0]['model'], rows[0]['model'])} "
            f"after {config['epochs']} epoch(s), {_subject(results)}"
        )
        written.append(plot_lines(rows, "width", title, out_dir / "width.png"))
    if "architecture" in summary:
        title = (
            f"Barrier per architecture (~{config['params']:,} parameters) after "
            f"{config['epochs']} epoch(s), {_subject(results)}"
        )
        written.append(
            plot_architectures(summary["architecture"]["rows"], title, out_dir / "architecture.png")
        )
    return written


# -------------------------------------------------------------------------------------------
# Markdown


def _study_table(rows: Sequence[Mapping], first: str) -> str:
    methods = _method_names(rows)
    header = [first, "params", "endpoint acc. (%)"]
    header += [
        f"{METHOD_STYLE.get(m, {'label': m})['label']} acc. barrier (points)" for m in methods
    ]
    header += [f"{METHOD_STYLE.get(m, {'label': m})['label']} loss barrier" for m in methods]
    body = []
    for r in rows:
        if first == "epoch":
            label = f"{r['epoch']:g}"
        elif first == "width":
            label = f"{r['width']:g}" + (
                f" ({round(512 * r['width'])})" if r["model"] == "mlp" else ""
            )
        else:
            label = f"{MODEL_NAMES.get(r['model'], r['model'])} w{r['width']:.3g}"
        cells = [label, f"{r['params']:,}", pct(r["endpoint_accuracy"])]
        cells += [
            pct(r["methods"][m]["accuracy_barrier"]) if m in r["methods"] else MISSING
            for m in methods
        ]
        cells += [
            num(r["methods"][m]["loss_barrier"], 3) if m in r["methods"] else MISSING
            for m in methods
        ]
        body.append(cells)
    return table(header, body)


def _rule_lines(rules: Mapping[str, float | None], axis: str, unit: str) -> list[str]:
    lines = []
    for method, value in rules.items():
        label = METHOD_STYLE.get(method, {"label": method})["label"]
        if value is None:
            lines.append(
                f"- {label}: the mean accuracy barrier is not below 1 point at the largest "
                f"measured {axis}."
            )
        else:
            lines.append(
                f"- {label}: mean accuracy barrier below 1 point from {axis} {value:g}{unit} on "
                "(at every measured value from there)."
            )
    return lines


def _section_body(
    study: Mapping, first: str, plot: str, alt_text: str, plot_names: set[str]
) -> list[str]:
    """A study's section below its heading: the plot if it was drawn, the table, the rules.

    Parameters
    ----------
    study
        The study's summary (``rows``, and ``rules`` for the progress and width studies).
    first
        The table's first column (:func:`_study_table`), also the rules' axis.
    plot, alt_text
        The plot's file name and its Markdown alt text.
    plot_names
        File names of the plots drawn.
    """
    lines = []
    if plot in plot_names:
        lines += [f"![{alt_text}]({plot})", ""]
    lines += [_study_table(study["rows"], first), ""]
    if "rules" in study:
        lines += _rule_lines(study["rules"], first, "")
        lines.append("")
    return lines


def render_summary(results: Mapping, plots: Sequence[Path | str] = ()) -> str:
    """The Markdown summary of a study run (every number from ``results``)."""
    config = results["config"]
    summary = results["summary"]
    plot_names = {Path(p).name for p in plots}
    limit = config["limit_per_class"]
    test_limit = config["test_limit_per_class"]
    lines = [
        f"# Mergeability study `{results['name']}`",
        "",
        *provenance_lines(results, flwr=False),
        f"- Data: {config['dataset']}, {results['data']['train_examples']} training examples"
        + (f" (first {limit} per class)" if limit else "")
        + f", {results['data']['test_examples']} test examples"
        + (f" (first {test_limit} per class)" if test_limit else "")
        + f"; US/EU split, each region holds {100 * config['own_fraction']:g}% of its own "
        f"classes' examples and {100 * (1 - config['own_fraction']):g}% of the other's",
        f"- Training: {config['epochs']} epoch(s), {config['optimizer']} lr {config['lr']:g}"
        + (" (momentum 0.9, one cosine cycle)" if config["optimizer"] == "sgd" else "")
        + f", weight decay {config['weight_decay']:g}, batch {config['batch_size']}; region i "
        "of seed s starts from initialisation seed 1000 s + i",
        f"- Seeds: {', '.join(str(s) for s in results['seeds'])}; cells are mean ± sample std "
        "over the seeds",
        f"- Barrier: on the path (1 - λ) A + λ B for λ in "
        f"{', '.join(f'{x:g}' for x in results['lambdas'])}, the largest drop of test accuracy "
        "below the mean of the endpoints (in percentage points) and the largest rise of test "
        "loss above it; the values at λ = 0.5 alone are in study.json (`midpoint_*`)",
        "- Methods: naive (B as trained), re-basin (B permuted into A's basin by weight "
        f"matching, at most {config['max_iter']} sweeps), naive / re-basin + BN reset (the "
        "same paths, every model on them given BatchNorm statistics pooled from "
        f"{config['repair_batches']} batches of each region; models with BatchNorm only)",
        "",
    ]
    if "progress" in summary:
        r = summary["progress"]["rows"][0]
        lines += [
            f"## Training progress: {MODEL_NAMES.get(r['model'], r['model'])} w{r['width']:.3g}",
            "",
            "Both models measured at checkpoints of one training run (epoch 0: the two "
            "initialisations).",
            "",
        ]
        lines += _section_body(
            summary["progress"],
            "epoch",
            "progress.png",
            "barrier against training progress",
            plot_names,
        )
    if "width" in summary:
        rows = summary["width"]["rows"]
        lines += [
            f"## Width: {MODEL_NAMES.get(rows[0]['model'], rows[0]['model'])}, "
            f"after {config['epochs']} epoch(s)",
            "",
        ]
        if rows[0]["model"] == "mlp":
            lines += ["Width multiplier (hidden units per layer = 512 x width).", ""]
        lines += _section_body(
            summary["width"], "width", "width.png", "barrier against width", plot_names
        )
    if "architecture" in summary:
        lines += [
            f"## Architecture: about {config['params']:,} parameters, after "
            f"{config['epochs']} epoch(s)",
            "",
            "Each model at the width whose parameter count is closest to the target.",
            "",
        ]
        lines += _section_body(
            summary["architecture"],
            "model",
            "architecture.png",
            "barrier per architecture",
            plot_names,
        )
    return "\n".join(lines)


def write_study_outputs(results: Mapping, out_dir: Path) -> list[Path]:
    """Write the plots and ``summary.md`` into ``out_dir``; return every file written."""
    plots = write_plots(results, out_dir)
    path = out_dir / SUMMARY_FILE
    path.write_text(render_summary(results, plots) + "\n")
    return [*plots, path]
