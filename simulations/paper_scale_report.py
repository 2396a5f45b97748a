"""The paper-scale run's summary, Markdown report and chart (Pillow only: no matplotlib)."""

from __future__ import annotations

from pathlib import Path


def summarize(runs: list[dict]) -> list[dict]:
    """Per (width, norm): mean/std over seeds of every method, the clients and the gap."""
    from simulations.results import stat

    groups: dict[tuple[float, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["width"], run["norm"]), []).append(run)
    rows = []
    for (width, norm), rs in groups.items():
        methods = list(rs[0]["methods"])
        rows.append(
            {
                "width": width,
                "norm": norm,
                "seeds": [r["seed"] for r in rs],
                "params": rs[0]["params"],
                "methods": {m: stat(r["methods"][m]["accuracy"] for r in rs) for m in methods},
                "clients": [
                    stat(r["clients"][i]["accuracy"] for r in rs)
                    for i in range(len(rs[0]["clients"]))
                ],
                "best_client": stat(r["best_client_accuracy"] for r in rs),
                "gap_to_best_client": {
                    m: stat(r["gap_to_best_client"][m] for r in rs) for m in methods
                },
                "images_per_second": stat(x for r in rs for x in r["images_per_second"]),
            }
        )
    return rows


def _pct(entry: dict) -> str:
    if entry["mean"] is None:
        return "-"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"


def render_report(results: dict) -> str:
    """``paper_scale.md``: provenance, then one table per width and norm."""
    env, cfg = results["environment"], results["config"]
    recipe = cfg["recipe"]
    lines = [
        "# Paper-scale run: wide ResNet-20, US/EU split of CIFAR-10",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {env['date']}; device {env['device']}"
        + (f" ({env['gpu']})" if env["gpu"] else "")
        + f"; torch {env['torch']}; bf16 supported: {'yes' if env['bf16_supported'] else 'no'}",
        f"- Data: {results['data']['train_examples']} training images (two regions, own "
        f"fraction {cfg['own_fraction']}), {results['data']['test_examples']} test images",
        f"- Training: {cfg['epochs']} epochs, batch {cfg['batch_size']}, SGD Nesterov, "
        f"one-cycle max lr {cfg['max_lr']}, weight decay {cfg['weight_decay']}, label "
        f"smoothing {recipe['label_smoothing']}, crop + flip on the device, channels_last, "
        f"bf16 {cfg['bf16']} (used: {'yes' if results['runs'][0]['training']['bf16'] else 'no'})",
        f"- Seeds: {', '.join(str(s) for s in cfg['seeds'])} (mean ± sample std)",
        f"- Wall time: {results['wall_seconds']:.0f} s (data {results['data_seconds']:.0f} s)",
        *_interrupted_lines(results),
        "",
        "![accuracy](paper_scale.png)",
    ]
    for row in results["summary"]:
        lines += [
            "",
            f"## ResNet-20 x{row['width']:g}, {row['norm']} norm ({row['params']:,} parameters)",
            "",
            f"Training: {row['images_per_second']['mean']:.0f} images/s per client.",
            "",
            "| model | test accuracy % | gap to best client (points) |",
            "|:---|---:|---:|",
        ]
        for i, c in enumerate(row["clients"]):
            lines.append(f"| client {i} | {_pct(c)} | |")
        lines.append(f"| best client | {_pct(row['best_client'])} | 0 |")
        for m, s in row["methods"].items():
            lines.append(f"| {m} | {_pct(s)} | {_pct(row['gap_to_best_client'][m])} |")
    return "\n".join(lines) + "\n"


def _interrupted_lines(results: dict) -> list[str]:
    """A cut-off run (the script's timeout) names the settings it did not reach."""
    cut = results.get("interrupted")
    if not cut:
        return []
    left = ", ".join(f"x{r['width']:g} {r['norm']} seed {r['seed']}" for r in cut["not_run"])
    return [
        f"- **Interrupted** after {cut['after_seconds']:.0f} s: not run: {left or 'none'}; "
        "the tables hold the finished runs only"
    ]


def write_chart(results: dict, path: Path) -> Path:
    """Mean test accuracy of every method (and the best client) per width and norm."""
    from simulations.png_chart import bar_chart

    groups = {}
    for row in results["summary"]:
        values = {"best client": row["best_client"]["mean"]}
        values.update({m: s["mean"] for m, s in row["methods"].items()})
        groups[f"x{row['width']:g} {row['norm']}"] = {
            k: v for k, v in values.items() if v is not None
        }
    return bar_chart(groups, path, "ResNet-20 US/EU on CIFAR-10: test accuracy")
