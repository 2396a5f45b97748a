"""``report.md``: Markdown tables of a ``simulate`` run, rendered from its ``results.json``.

Every number in the report is a value of the results file, formatted: accuracies in percent
with two decimals (``100 * mean`` and ``100 * std``), losses with four, seconds with two.
Cells read ``mean ± std`` over the seeds (sample standard deviation; 0 for one seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rebasin.zoo import CONV_MODELS
from simulations.results import REPORT_FILE, group_names

MISSING = "—"

# The order and meaning of the one-shot methods (keys of results "methods").
METHOD_NOTES: dict[str, str] = {
    "naive": "weighted average of the client models as they are (FedAvg's merge)",
    "rebasin": "clients permuted into the largest client's basin by weight matching, averaged",
    "merge-many": "re-basin MergeMany: every model matched against the mean of the others",
    "rebasin-stream": "re-basin over the residual stream and MLP units only (attention heads "
    "and the dimensions inside them left in place)",
    "naive+bn-reset": "naive average with BatchNorm statistics pooled from the clients' data",
    "rebasin+bn-reset": "re-basin with BatchNorm statistics pooled from the clients' data",
    "naive+repair": "naive average with REPAIR (activation statistics of the clients as they are)",
    "rebasin+repair": "re-basin with REPAIR (activation statistics of the aligned clients)",
    "ensemble": "average of the clients' logits (keeps every model; an upper bound)",
    "centralized": "one model trained on the pooled data (what the data split forbids)",
}
STRATEGY_NAMES = {"fedavg": "FedAvg", "rebasin": "ReBasinFedAvg"}


def pct(entry: Mapping | None) -> str:
    """``"mean ± std"`` of an accuracy stat in percent, two decimals."""
    if entry is None or entry.get("mean") is None:
        return MISSING
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"


def num(entry: Mapping | None, digits: int = 4) -> str:
    """``"mean ± std"`` of a stat with ``digits`` decimals."""
    if entry is None or entry.get("mean") is None:
        return MISSING
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def point(series: Mapping, index: int, scale: float = 100.0, digits: int = 2) -> str:
    """``"mean ± std"`` of one point of a pointwise series stat."""
    mean, std = series["mean"][index], series["std"][index]
    if mean is None:
        return MISSING
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (first column left-aligned, the others right-aligned)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ordered_methods(methods: Mapping) -> list[str]:
    known = [m for m in METHOD_NOTES if m in methods]
    return known + [m for m in methods if m not in METHOD_NOTES]


def provenance_lines(results: Mapping, *, flwr: bool = True) -> list[str]:
    """The header's command, date and machine lines of a results file.

    Parameters
    ----------
    results
        A results file's data, with ``command``, ``environment`` and ``wall_seconds``.
    flwr
        Whether the machine line names the Flower version too.
    """
    env = results["environment"]
    return [
        f"- Command: `{results['command']}`" if results.get("command") else "- Command: (API)",
        f"- Date: {env['date']}; wall time {results.get('wall_seconds', 0.0):.0f} s",
        f"- Machine: {env['cpu'] or 'unknown CPU'}, {env['cpu_count']} cores, "
        f"{env['torch_threads']} torch thread(s), CUDA {'yes' if env['cuda'] else 'no'}; "
        f"Python {env['python']}, torch {env['torch']}" + (f", flwr {env['flwr']}" if flwr else ""),
        f"- Code: {code_line(env.get('code'))}",
    ]


def code_line(code: Mapping | None) -> str:
    """The commit a run's code came from (``"not recorded"`` for older or installed runs)."""
    if not code:
        return "not recorded (not a git checkout, or an older results file)"
    return f"commit {code['commit'][:12]}" + (" with local changes" if code["dirty"] else "")


def _seeds_line(results: Mapping, seeds: str) -> str:
    """The seeds, and which of them the cells hold while a run is not finished yet."""
    mode = results["config"]["mode"]
    # Every section the run's mode writes; a missing one holds no seed yet ("both" runs
    # every one-shot seed before the first multi-round one).
    sections = [
        s for s, skip in (("one_shot", "multi-round"), ("multi_round", "one-shot")) if mode != skip
    ]
    held = {
        section.replace("_", "-"): [run["seed"] for run in results.get(section, {}).get("runs", [])]
        for section in sections
    }
    if all(seen == list(results["seeds"]) for seen in held.values()):
        return f"- Seeds: {seeds} (cells: mean ± sample std over the seeds)"
    done = "; ".join(
        f"{section} {', '.join(map(str, seen)) or 'none'}" for section, seen in held.items()
    )
    return (
        f"- Seeds: {seeds}; **not finished**: the cells hold only seeds {done} "
        "(mean ± sample std over those; 0 for one seed)"
    )


def _header(results: Mapping) -> list[str]:
    config = results["config"]
    exp = config["experiment"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = [
        f"# Simulation `{results['name']}`",
        "",
        *provenance_lines(results),
        f"- Scenario: **{config['scenario']}** ({exp['partition']} split, "
        f"{exp['num_clients']} clients"
        + (f", own fraction {exp['own_fraction']}" if exp["partition"] == "region" else "")
        + (f", alpha {exp['alpha']}" if exp["partition"] == "dirichlet" else "")
        + (
            f", {exp['classes_per_client']} classes per client"
            if exp["partition"] == "pathological"
            else ""
        )
        + ")",
        f"- Data: {exp['dataset']}"
        + (
            f", first {exp['limit_per_class']} training examples per class"
            if exp["limit_per_class"]
            else ", full training set"
        )
        + (
            f", first {exp['test_limit_per_class']} test examples per class"
            if exp["test_limit_per_class"]
            else ", full test set"
        ),
        f"- Model: {exp['model']} width {exp['width']}"
        + (f", norm {exp['norm']}" if exp["model"] in CONV_MODELS else "")
        + f"; {exp['epochs']} epoch(s), {exp['optimizer']} lr {exp['lr']}, "
        f"batch {exp['batch_size']}"
        + (
            f", weight decay {exp['weight_decay']} (one-shot)"
            if config["mode"] != "multi-round"
            else ""
        ),
        _seeds_line(results, seeds),
    ]
    runs = results.get("one_shot", {}).get("runs", [])
    if runs and "training" in runs[0]:
        # Beside the model line, before the seeds (and the resumed runs' lines after them).
        support = _bf16_support(runs)
        lines.insert(-1, "- One-shot training: " + recipe_line(runs[0]["training"], support))
    for earlier in results.get("earlier_environments", []):
        kept = ", ".join(str(s) for s in earlier["seeds"])
        lines.append(
            f"- Resumed: seed(s) {kept} kept from the run of {earlier['date']} "
            f"({earlier['cpu'] or 'unknown CPU'}, {earlier['torch_threads']} torch thread(s), "
            f"torch {earlier['torch']})"
        )
    if config.get("multi_round") and config["mode"] != "one-shot":
        mr = config["multi_round"]
        lines.append(
            f"- Multi-round: {mr['rounds']} rounds of {exp['epochs']} local epoch(s), strategies "
            + ", ".join(STRATEGY_NAMES.get(s, s) for s in mr["strategies"])
            + f", independent start {'yes' if mr['independent_start'] else 'no'}, "
            f"BatchNorm recalibration {'yes' if mr['bn_recalibration'] else 'no'}; the "
            "ClientApp trains without weight decay"
        )
    return lines


def _bf16_support(runs: Sequence[Mapping]) -> str:
    """Whether the machine had bf16 units, per seed where the seeds trained on different ones.

    ``--resume`` keeps seeds whose training differs only in what the machine supports
    (``rebasin.recipe.MACHINE_FIELDS``), so a run resumed on another CPU can hold both.
    """
    device = runs[0]["training"]["device"]
    seeds: dict[bool, list[str]] = {}
    for run in runs:
        seeds.setdefault(bool(run["training"]["bf16_supported"]), []).append(str(run["seed"]))
    if len(seeds) == 1:
        return f"{'supported' if True in seeds else 'not supported'} on {device}"
    return (
        f"supported on the {device} of seed(s) {', '.join(seeds[True])}, not on that of "
        f"seed(s) {', '.join(seeds[False])}"
    )


def recipe_line(used: Mapping, support: str) -> str:
    """What a training run used (``rebasin.recipe.ResolvedRecipe`` as JSON), in words;
    ``support`` says where bf16 was supported (:func:`_bf16_support`)."""
    augment = f"crop (pad {used['crop_padding']}) + flip" if used["augment"] else "none"
    schedule = used["schedule"]
    if schedule == "onecycle":
        schedule += f" (peak lr {used['peak_lr']:g})"
    return (
        f"augmentation {augment}; {schedule} schedule"
        + (", Nesterov" if used["nesterov"] else "")
        + f"; label smoothing {used['label_smoothing']:g}; channels_last "
        f"{'yes' if used['channels_last'] else 'no'}; bf16 autocast "
        f"{'yes' if used['bf16'] else 'no'} (requested {used['bf16_requested']}, {support})"
    )


def _oneshot_sections(results: Mapping, plots: set[str]) -> list[str]:
    config = results["config"]
    k = config["experiment"]["num_clients"]
    summary = results["one_shot"]["summary"]
    groups = group_names(config["scenario"], k)
    methods = _ordered_methods(summary["methods"])
    out = ["", "## One-shot merge", ""]
    rows = [
        [m, pct(summary["methods"][m]["accuracy"]), num(summary["methods"][m]["loss"])]
        for m in methods
    ]
    rows.append(["best single client", pct(summary["best_client"]["accuracy"]), MISSING])
    out.append(table(["model", "test accuracy (%)", "test loss"], rows))
    out += [""] + [f"- `{m}`: {METHOD_NOTES[m]}" for m in methods if m in METHOD_NOTES]
    out.append("- `best single client`: per seed, the client model with the highest accuracy")

    out += ["", "## Per client", ""]
    client_rows = []
    for i, name in enumerate(n for n in summary["models"] if n.startswith("client ")):
        entry = summary["clients"][name]
        client_rows.append(
            [
                name,
                groups[i],
                num(summary["shard_sizes"][i], 0),
                pct(entry["accuracy"]),
                num(entry["loss"]),
            ]
        )
    out.append(
        table(
            ["client", "region / name", "training examples", "test accuracy (%)", "test loss"],
            client_rows,
        )
    )

    out += ["", "## Accuracy by class group", ""]
    out.append(
        "Mean per-class test accuracy (%) over the classes whose training examples are mostly "
        "held by each region (client)."
    )
    out.append("")
    group_rows = [
        [name] + [pct(s) for s in summary["group_accuracy"][name]]
        for name in [n for n in summary["models"] if n.startswith("client ")] + methods
    ]
    out.append(table(["model"] + [f"{g} classes (%)" for g in groups], group_rows))

    if "interpolation" in summary:
        interp = summary["interpolation"]
        lambdas = next(iter(interp.values()))["lambdas"]
        mid = min(range(len(lambdas)), key=lambda i: abs(lambdas[i] - 0.5))
        out += ["", f"## Interpolation between {groups[0]} and {groups[1]}", ""]
        out.append(
            "Barriers: the largest drop of accuracy (points) / rise of loss along the path below "
            "the straight line between the two endpoints."
        )
        out.append("")
        interp_rows = [
            [
                curve,
                point(data["accuracy"], mid),
                point(data["loss"], mid, scale=1.0, digits=4),
                pct(data["accuracy_barrier"]),
                num(data["loss_barrier"]),
            ]
            for curve, data in interp.items()
        ]
        out.append(
            table(
                [
                    "path",
                    f"accuracy at λ={lambdas[mid]:g} (%)",
                    f"loss at λ={lambdas[mid]:g}",
                    "accuracy barrier (pts)",
                    "loss barrier",
                ],
                interp_rows,
            )
        )
        if "interpolation.png" in plots:
            out += ["", "![Interpolation](interpolation.png)"]
    if "per_class.png" in plots:
        out += ["", "![Per-class accuracy](per_class.png)"]

    runs = results["one_shot"]["runs"]
    out += ["", "## Per seed (test accuracy, %)", ""]
    seed_rows = [
        [m] + [f"{100 * run['methods'][m]['accuracy']:.2f}" for run in runs] for m in methods
    ]
    seed_rows += [
        [f"client {i}"] + [f"{100 * run['clients'][i]['accuracy']:.2f}" for run in runs]
        for i in range(k)
    ]
    out.append(table(["model"] + [f"seed {run['seed']}" for run in runs], seed_rows))

    out += ["", "## Merge time (s)", ""]
    out.append(
        table(["method", "seconds"], [[m, num(s, 3)] for m, s in summary["merge_seconds"].items()])
    )
    out.append("")
    out.append(f"Wall time per seed: {num(summary['wall_seconds'], 1)} s (training included).")
    loaded = [
        f"seed {run['seed']} client {i}" for run in runs for i in run.get("clients_from_disk", [])
    ]
    if loaded:
        # Their training ran in an earlier, interrupted run: not in that seed's wall time.
        out.append(
            f"Loaded from `clients/` (trained by an earlier, interrupted run, whose training "
            f"time the seed's wall time leaves out): {', '.join(loaded)}."
        )
    return out


def _multiround_sections(results: Mapping, plots: set[str]) -> list[str]:
    config = results["config"]
    groups = group_names(config["scenario"], config["experiment"]["num_clients"])
    summary = results["multi_round"]["summary"]
    strategies = list(summary["strategies"])
    names = [STRATEGY_NAMES.get(s, s) for s in strategies]
    out = ["", "## Multi-round federated training", ""]
    eval_examples = results["config"]["experiment"]["test_limit_per_class"]
    where = (
        f"the first {10 * eval_examples} examples of the test set"
        if eval_examples
        else "the whole test set"
    )
    out.append(
        f"The global model after each round, evaluated by the ServerApp on {where} "
        "(round 0: the initial model): test accuracy (%) and loss."
    )
    out.append("")
    rows = []
    for i, r in enumerate(summary["rounds"]):
        row = [str(r)]
        row += [point(summary["strategies"][s]["server_accuracy"], i) for s in strategies]
        row += [
            point(summary["strategies"][s]["server_loss"], i, scale=1.0, digits=4)
            for s in strategies
        ]
        rows.append(row)
    out.append(
        table(["round"] + [f"{n} accuracy (%)" for n in names] + [f"{n} loss" for n in names], rows)
    )
    out += ["", "The final global model on the experiment's test set, and per class group:", ""]
    final_rows = [
        [
            STRATEGY_NAMES.get(s, s),
            pct(summary["strategies"][s]["final_accuracy"]),
            num(summary["strategies"][s]["final_loss"]),
        ]
        + [pct(g) for g in summary["strategies"][s]["final_group_accuracy"]]
        + [num(summary["strategies"][s]["wall_seconds"], 1)]
        for s in strategies
    ]
    out.append(
        table(
            ["strategy", "test accuracy (%)", "test loss"]
            + [f"{g} classes (%)" for g in groups]
            + ["wall time (s)"],
            final_rows,
        )
    )
    if "rounds.png" in plots:
        out += ["", "![Accuracy per round](rounds.png)"]
    if "per_class_rounds.png" in plots:
        out += ["", "![Per-class accuracy of the final models](per_class_rounds.png)"]
    return out


def render_report(results: Mapping, plots: Sequence[Path | str] = ()) -> str:
    """The Markdown report of ``results`` (as read from ``results.json``)."""
    names = {Path(p).name for p in plots}
    lines = _header(results)
    if "one_shot" in results:
        lines += _oneshot_sections(results, names)
    if "multi_round" in results:
        lines += _multiround_sections(results, names)
    return "\n".join(lines) + "\n"


def write_report(results: Mapping, out_dir: Path, plots: Sequence[Path | str] = ()) -> Path:
    """Write ``out_dir/report.md``; return its path."""
    path = Path(out_dir) / REPORT_FILE
    path.write_text(render_report(results, plots))
    return path
