"""``rebasin compare``: finished ``simulate`` runs side by side, as a width / architecture trend.

A study on trained endpoints is the long runs themselves: each one-shot run (one model, one
width, its seeds) becomes one row. A row holds the model's parameter count, the best and the
lowest client, every merge's accuracy, each merge's gap to the best client (per seed: merge
minus that seed's best client, then mean ± std over the seeds) and the interpolation
barriers. The plot draws the gaps and the barriers against the parameter count, one line per
model family (model and norm), so the trend with width can be read off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import typer

from rebasin.recipe import training_identity
from simulations.results import differing_settings, read_json, read_results, stat, write_json

FORMAT = "rebasin-compare/1"
COMPARE_FILE = "compare.json"
REPORT_FILE = "compare.md"
PLOT_FILE = "trend.png"

# Activation repair: BatchNorm reset for BN models, REPAIR for the others; after re-basin,
# and after naive averaging (the control: repair without matching).
REPAIRED = ("rebasin+bn-reset", "rebasin+repair")
NAIVE_REPAIRED = ("naive+bn-reset", "naive+repair")
# The table's merge columns, in order (a run without one shows a dash).
COLUMNS: dict[str, str] = {
    "naive": "naive",
    "naive-repaired": "naive + repair",
    "rebasin": "re-basin",
    "merge-many": "MergeMany",
    "repaired": "re-basin + repair",
    "ensemble": "ensemble",
    "centralized": "centralised",
}


def parameter_count(experiment: Mapping) -> int:
    """Parameters of the run's model, built from its settings (weights do not matter)."""
    from rebasin.zoo import build_model

    model = build_model(
        experiment["model"],
        experiment["dataset"],
        width=experiment["width"],
        norm=experiment["norm"],
        seed=0,
    )
    return sum(p.numel() for p in model.parameters())


def family(experiment: Mapping) -> str:
    """The model family of a run: the model, and its norm where the model has one."""
    from rebasin.zoo import CONV_MODELS

    model = experiment["model"]
    return f"{model} {experiment['norm']}" if model in CONV_MODELS else model


def precision(runs: Sequence[Mapping]) -> str:
    """What the seeds' training computed in: ``bf16`` (autocast), ``fp32``, or ``mixed``.

    Runs of different families may differ in their recipe, so the table says what each used.
    """
    used = {bool(run.get("training", {}).get("bf16", False)) for run in runs}
    return "mixed" if len(used) > 1 else ("bf16" if used == {True} else "fp32")


def run_row(results: Mapping) -> dict:
    """One row of the comparison from a ``simulate`` run's results (one-shot section)."""
    name = results["name"]
    section = results.get("one_shot")
    if not section or not section.get("runs"):
        raise ValueError(f"run {name!r} has no one-shot runs to compare")
    experiment = results["config"]["experiment"]
    runs = section["runs"]
    held = [run["seed"] for run in runs]
    if held != list(results["seeds"]):
        raise ValueError(
            f"run {name!r} is not finished: it holds seed(s) {', '.join(map(str, held))} of "
            f"{', '.join(map(str, results['seeds']))} (resume it first)"
        )
    best = [max(c["accuracy"] for c in run["clients"]) for run in runs]
    methods: dict[str, dict] = {}
    for method in runs[0]["methods"]:
        values = [run["methods"][method]["accuracy"] for run in runs]
        methods[method] = {
            "accuracy": stat(values),
            "gap": stat(v - b for v, b in zip(values, best, strict=True)),
        }
    for key, names in (("repaired", REPAIRED), ("naive-repaired", NAIVE_REPAIRED)):
        source = next((m for m in names if m in methods), None)
        if source is not None:
            methods[key] = {**methods[source], "method": source}
    curves = section["summary"].get("interpolation", {})
    return {
        "run": name,
        "family": family(experiment),
        "dataset": experiment["dataset"],
        "scenario": results["config"]["scenario"],
        "model": experiment["model"],
        "width": experiment["width"],
        "norm": experiment["norm"],
        "epochs": experiment["epochs"],
        "precision": precision(runs),
        "params": parameter_count(experiment),
        "seeds": [run["seed"] for run in runs],
        "best_client": stat(best),
        "lowest_client": min(c["accuracy"] for run in runs for c in run["clients"]),
        "methods": methods,
        "accuracy_barriers": {m: c["accuracy_barrier"] for m, c in curves.items()},
    }


def compare_runs(results: Sequence[Mapping]) -> dict:
    """The comparison of ``results`` (each a ``simulate`` results file's data).

    Runs of one family (model and norm) form the trend with width, so they must differ in
    nothing but the width (and whether they trained the centralised baseline): the same data,
    training, merging and seeds.

    Raises
    ------
    ValueError
        If there are fewer than two runs, if they differ in data set or scenario (their
        numbers would not be comparable), or if two runs of a family differ in more than the
        width, naming the runs and the settings.
    """
    if len(results) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(results)}")
    names = [r["name"] for r in results]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"two runs are named {twice[0]!r} (a run is named by its folder): compare runs of "
            "distinct folder names"
        )
    rows = []
    for r in results:
        try:
            rows.append(run_row(r))
        except KeyError as exc:
            raise ValueError(
                f"run {r.get('name')!r} lacks {exc} (not a complete rebasin-simulate/1 run)"
            ) from None
    first, first_data = rows[0], shared_settings(results[0])
    for row, result in zip(rows[1:], results[1:], strict=True):
        data = shared_settings(result)
        differ = differing_settings(first_data, data)
        if differ:
            key = differ[0]
            raise ValueError(
                f"run {row['run']!r} has {key} {data.get(key)!r}, but {first['run']!r} has "
                f"{first_data.get(key)!r}: compare runs of one data set, split and seeds"
            )
    _check_families(results, rows)
    rows.sort(key=lambda r: (r["family"], r["params"]))
    return {
        "format": FORMAT,
        "runs": [r["name"] for r in results],
        "rows": rows,
        "trends": trends(rows),
    }


# The settings every compared run shares (the rows are measured on the same test set, the
# same split and the same seeds); within a family, all settings but the width are shared.
SHARED_DATA = (
    "dataset",
    "partition",
    "num_clients",
    "own_fraction",
    "alpha",
    "classes_per_client",
    "limit_per_class",
    "test_limit_per_class",
)


def shared_settings(results: Mapping) -> dict:
    """The data, split and seed settings of a run (see :data:`SHARED_DATA`)."""
    config = results["config"]
    out = {key: config["experiment"].get(key) for key in SHARED_DATA}
    return {**out, "scenario": config["scenario"], "seeds": config["seeds"]}


def _check_families(results: Sequence[Mapping], rows: Sequence[Mapping]) -> None:
    """Within a family, every pair of runs differs in the width alone."""

    def settings(r: Mapping) -> dict:
        config = {**r["config"], "experiment": dict(r["config"]["experiment"])}
        config["experiment"].pop("width")
        # The centralised baseline is one more row; it changes none of the others.
        config["experiment"].pop("centralized")
        # What training used, not only what was asked ("bf16 auto" is fp32 on one CPU and
        # bf16 on another); whether the CPU supported bf16 alone does not matter.
        config["training"] = [
            training_identity(run.get("training", {})) for run in r["one_shot"]["runs"]
        ]
        return config

    seen: dict[str, tuple[Mapping, Mapping]] = {}
    widths: dict[str, dict[float, str]] = {}
    for result, row in zip(results, rows, strict=True):
        at = widths.setdefault(row["family"], {})
        if row["width"] in at:
            raise ValueError(
                f"runs {at[row['width']]!r} and {row['run']!r} are the same experiment "
                f"({row['family']} at width {row['width']})"
            )
        at[row["width"]] = row["run"]
        if row["family"] not in seen:
            seen[row["family"]] = (result, row)
            continue
        other, other_row = seen[row["family"]]
        differ = differing_settings(settings(other), settings(result))
        if differ:
            raise ValueError(
                f"runs {other_row['run']!r} and {row['run']!r} are both {row['family']} but "
                f"differ in {', '.join(differ)}: a family's runs may differ in width only"
            )


def trends(rows: Sequence[Mapping]) -> list[dict]:
    """Per family with two or more sizes: the repaired re-basin gap at the smallest and largest."""
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        sized = [r for r in rows if r["family"] == family and "repaired" in r["methods"]]
        if len(sized) < 2:
            continue
        small, large = sized[0], sized[-1]
        out.append(
            {
                "family": family,
                "from": {"run": small["run"], "params": small["params"]},
                "to": {"run": large["run"], "params": large["params"]},
                "gap_from": small["methods"]["repaired"]["gap"]["mean"],
                "gap_to": large["methods"]["repaired"]["gap"]["mean"],
            }
        )
    return out


def repaired_barrier(row: Mapping) -> dict | None:
    """The accuracy barrier of the repaired re-basin path, where the run measured it."""
    method = row["methods"].get("repaired", {}).get("method")
    return row["accuracy_barriers"].get(method) if method else None


def _points(entry: Mapping | None) -> str:
    """A gap stat (fractions) in points, signed, two decimals."""
    if entry is None or entry.get("mean") is None:
        return "—"
    return f"{100 * entry['mean']:+.2f} ± {100 * entry['std']:.2f}"


def render(data: Mapping, sources: Sequence[Mapping]) -> str:
    """``compare.md``: the accuracy table, the gap table, the trends, where each run came from."""
    from simulations.report import pct, table

    rows = data["rows"]
    lines = ["# Comparison of one-shot runs", ""]
    head = ["run", "params", "epochs", "precision", "seeds", "best client", "lowest client"]
    body = []
    for r in rows:
        cells = [r["run"], f"{r['params']:,}", str(r["epochs"]), r["precision"]]
        cells.append(" ".join(map(str, r["seeds"])))
        cells += [pct(r["best_client"]), f"{100 * r['lowest_client']:.2f}"]
        cells += [pct(r["methods"].get(m, {}).get("accuracy")) for m in COLUMNS]
        body.append(cells)
    lines.append(table(head + list(COLUMNS.values()), body))
    lines += [
        "",
        "Test accuracy (%), mean ± sample std over the seeds; `lowest client`: the lowest "
        "client accuracy in any seed; `+ repair`: BatchNorm reset for BN models, REPAIR for "
        "the others.",
        "",
        "## Gap to the best client (points; per seed, merge minus best client)",
        "",
    ]
    gap_rows = [
        [r["run"], f"{r['params']:,}"]
        + [_points(r["methods"].get(m, {}).get("gap")) for m in COLUMNS]
        + [pct(r["accuracy_barriers"].get(m)) for m in ("naive", "rebasin")]
        + [pct(repaired_barrier(r))]
        for r in rows
    ]
    barrier_heads = ["naive barrier", "re-basin barrier", "re-basin + repair barrier"]
    lines.append(table(["run", "params"] + list(COLUMNS.values()) + barrier_heads, gap_rows))
    lines += [
        "",
        "Barriers: the largest drop of test accuracy along the interpolation path below the "
        "endpoints' mean (points; client 0 to client 1, naive, after re-basin, and after "
        "re-basin with the repair where the run measured that path).",
    ]
    if data["trends"]:
        lines += ["", "## Trend", ""]
        for t in data["trends"]:
            lines.append(
                f"- {t['family']}: re-basin + repair is {100 * t['gap_from']:+.2f} points from "
                f"the best client at {t['from']['params']:,} parameters and "
                f"{100 * t['gap_to']:+.2f} at {t['to']['params']:,}."
            )
    lines += ["", "## Runs", ""]
    for results in sources:
        env = results["environment"]
        lines.append(
            f"- `{results['name']}`: `{results.get('command') or '(API)'}` — {env['date']}, "
            f"{env['cpu'] or 'unknown CPU'}, {env['torch_threads']} thread(s), "
            f"wall {results.get('wall_seconds', 0.0):.0f} s"
        )
    return "\n".join(lines) + "\n"


def plot_trend(data: Mapping, path: Path) -> Path:
    """Gap to the best client and re-basin barrier against parameters: one colour per family,
    one line style per method (so a family's lines read together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulations.plots import save_figure

    fig, (gap_ax, bar_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for index, family in enumerate(dict.fromkeys(r["family"] for r in data["rows"])):
        color = f"C{index % 10}"
        rows = [r for r in data["rows"] if r["family"] == family]
        params = [r["params"] for r in rows]
        for method, style in (("repaired", "-o"), ("naive-repaired", ":x")):
            stats = [r["methods"].get(method, {}).get("gap") for r in rows]
            if all(s is not None for s in stats):
                means = [100 * s["mean"] for s in stats]
                stds = [100 * s["std"] for s in stats]
                label = f"{family}: {COLUMNS[method]}"
                gap_ax.errorbar(
                    params, means, yerr=stds, fmt=style, color=color, capsize=3, label=label
                )
        for label, style, barriers in (
            (family, "--s", [r["accuracy_barriers"].get("rebasin") for r in rows]),
            (f"{family}: + repair", "-o", [repaired_barrier(r) for r in rows]),
        ):
            if all(b is not None and b.get("mean") is not None for b in barriers):
                means = [100 * b["mean"] for b in barriers]
                stds = [100 * b["std"] for b in barriers]
                bar_ax.errorbar(
                    params, means, yerr=stds, fmt=style, color=color, capsize=3, label=label
                )
    gap_ax.axhline(0.0, color="grey", lw=0.8)
    gap_ax.set(xscale="log", xlabel="parameters", ylabel="merged - best client (points)")
    bar_ax.set(xscale="log", xlabel="parameters", ylabel="re-basin accuracy barrier (points)")
    for ax in (gap_ax, bar_ax):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, "one-shot merge against model size")


def write_compare(run_dirs: Sequence[Path], out_dir: Path) -> dict:
    """Compare the runs in ``run_dirs``; write compare.json, compare.md and trend.png."""
    sources = [read_results(Path(d)) for d in run_dirs]
    data = compare_runs(sources)
    write_json(data, out_dir, COMPARE_FILE)
    (out_dir / REPORT_FILE).write_text(render(read_compare(out_dir), sources))
    plot_trend(data, out_dir / PLOT_FILE)
    return data


def read_compare(out_dir: Path) -> dict:
    """Read ``out_dir/compare.json`` (its format checked)."""
    return read_json(out_dir, COMPARE_FILE, FORMAT, "comparison")


def register(app: typer.Typer) -> None:
    """Add the ``compare`` command to ``app``."""

    @app.command()
    def compare(
        runs: Annotated[list[Path], typer.Argument(help="simulate results directories")],
        out: Annotated[Path, typer.Option(help="where compare.json/.md and trend.png go")] = Path(
            "results/compare"
        ),
    ) -> None:
        """Put finished simulate runs side by side: gap to the best client against size."""
        from simulations.cli import fail

        try:
            write_compare(runs, out)
        except FileNotFoundError as exc:
            raise fail(str(exc), code=1) from None
        except ValueError as exc:
            raise fail(str(exc)) from None
        typer.echo(f"wrote {out / REPORT_FILE} and {out / PLOT_FILE}")
