"""A loss-curve picture drawn with PIL alone (no plotting dependency)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from mask2former.fileio import save_image


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics JSONL file; for a step logged twice (a resumed run) the last row wins."""
    rows: dict[int, dict] = {}
    with open(path) as handle:
        for line in handle:
            try:
                row = json.loads(line)
                rows[int(row["step"])] = row
            except (ValueError, KeyError, TypeError):  # blank, or torn by a kill during the write
                continue
    return [rows[step] for step in sorted(rows)]


def plot_loss_curve(
    rows: list[dict], out_path: str | Path, key: str = "loss", size: tuple[int, int] = (640, 360)
) -> None:
    """Draw `key` against `step` on a log-10 y axis and write a PNG atomically."""
    width, height = size
    left, right, top, bottom = 60, 15, 20, 35
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [(r["step"], r[key]) for r in rows if key in r and r[key] > 0 and math.isfinite(r[key])]
    draw.text((left, 3), f"training {key} (log scale)", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if len(points) >= 1:
        steps = [p[0] for p in points]
        values = [math.log10(p[1]) for p in points]
        x0, x1 = min(steps), max(max(steps), min(steps) + 1)
        y0, y1 = min(values), max(values)
        if y1 - y0 < 1e-6:
            y0, y1 = y0 - 0.5, y1 + 0.5

        def to_pixel(step: float, value: float) -> tuple[float, float]:
            px = left + (step - x0) / (x1 - x0) * (width - left - right)
            py = top + (y1 - value) / (y1 - y0) * (height - top - bottom)
            return px, py

        for tick in range(math.floor(y0), math.ceil(y1) + 1):
            if y0 <= tick <= y1:
                _, py = to_pixel(x0, tick)
                draw.line([left, py, width - right, py], fill=(220, 220, 220))
                draw.text((5, py - 6), f"1e{tick}", fill="black")
        draw.text((left, height - bottom + 5), str(x0), fill="black")
        draw.text((width - right - 50, height - bottom + 5), str(x1), fill="black")
        draw.text(((left + width) // 2 - 15, height - bottom + 18), "step", fill="black")
        draw.line([to_pixel(s, v) for s, v in zip(steps, values, strict=True)], fill=(200, 40, 40), width=2)
    out_path = Path(out_path)
    save_image(image, out_path)
