"""A grouped bar chart as PNG, drawn with Pillow (a torchvision dependency), no matplotlib.

For scripts that must run where only torch, torchvision and a few small packages are
installed (the GPU paper-scale run): one chart of values in [0, 1] per group and series.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Distinguishable colours (Okabe-Ito), cycled over the series.
PALETTE = (
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (213, 94, 0),
    (240, 228, 66),
    (0, 0, 0),
)


def bar_chart(groups: Mapping[str, Mapping[str, float]], path: Path, title: str) -> Path:
    """Write a grouped bar chart of values in ``[0, 1]`` (drawn as percentages) to ``path``.

    ``groups`` maps a group label (x axis) to ``{series: value}``; every series gets one
    colour, named in the legend. Values outside ``[0, 1]`` are clipped to the axis.
    """
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    if not groups or not series:
        raise ValueError("bar_chart needs at least one group with one value")
    font = ImageFont.load_default()
    bar, gap, left, top, plot_h = 14, 28, 60, 40, 300
    group_w = bar * len(series) + gap
    legend_h = 16 * len(series) + 10
    width = max(left + group_w * len(groups) + 20, 360)
    height = top + plot_h + 40 + legend_h
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill="black", font=font)
    for pct in range(0, 101, 20):  # y axis with grid lines
        y = top + plot_h - pct * plot_h / 100
        draw.line([(left, y), (width - 10, y)], fill=(220, 220, 220))
        draw.text((10, y - 6), f"{pct}%", fill="black", font=font)
    for g, (label, values) in enumerate(groups.items()):
        x0 = left + g * group_w + gap // 2
        for s, name in enumerate(series):
            if name not in values:
                continue
            value = min(max(float(values[name]), 0.0), 1.0)
            x = x0 + s * bar
            draw.rectangle(
                [(x, top + plot_h - value * plot_h), (x + bar - 2, top + plot_h)],
                fill=PALETTE[s % len(PALETTE)],
            )
        draw.text((x0, top + plot_h + 8), label, fill="black", font=font)
    for s, name in enumerate(series):
        y = top + plot_h + 34 + 16 * s
        draw.rectangle([(left, y), (left + 10, y + 10)], fill=PALETTE[s % len(PALETTE)])
        draw.text((left + 16, y - 1), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
