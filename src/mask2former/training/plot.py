"""Training curves drawn with PIL alone (no plotting dependency): the loss, and validation figures if any."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from mask2former.fileio import save_image

LOSS_PANEL = (640, 360)
VAL_PANEL_HEIGHT = 240
VAL_COLOURS = [(40, 90, 200), (30, 150, 60), (200, 120, 20), (120, 40, 160)]


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics JSONL file merged per step (training and validation rows of one step become one;
    for a step logged twice, as in a resumed run, the later values win)."""
    rows: dict[int, dict] = {}
    with open(path) as handle:
        for line in handle:
            try:
                row = json.loads(line)
                rows.setdefault(int(row["step"]), {}).update(row)
            except (ValueError, KeyError, TypeError):  # blank, or torn by a kill during the write
                continue
    return [rows[step] for step in sorted(rows)]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 x 10^k steps) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _log_ticks(low_exponent: float, high_exponent: float) -> list[float]:
    """Ticks of a log axis from 10^low to 10^high: 1-2-5 steps per decade over a few decades, powers of
    ten over many, round linear values inside a single decade (so a narrow range still has labels)."""
    span = high_exponent - low_exponent
    if span < 1:
        return [t for t in nice_ticks(10**low_exponent, 10**high_exponent, 4) if t > 0]
    multipliers = (1, 2, 5) if span < 2.5 else (1,)
    return [
        m * 10**k
        for k in range(math.floor(low_exponent), math.ceil(high_exponent) + 1)
        for m in multipliers
        if low_exponent - 1e-9 <= math.log10(m * 10**k) <= high_exponent + 1e-9
    ]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:g}"


def _panel(draw, box, xs, series, x_range, log_y: bool, y_title: str, title: str, y_range=None) -> None:
    """One framed chart in box (left, top, right, bottom): series [(label, colour, ys)] against xs."""
    left, top, right, bottom = box
    draw.text((left, top - 16), title, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    values = [y for _, _, ys in series for y in ys if y is not None]
    if not values:
        return
    transform = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    shown = [transform(v) for v in values]
    y0, y1 = y_range or (min(shown), max(shown))
    if y1 - y0 < 1e-9:
        y0, y1 = (
            y0 - (0.5 if log_y else max(abs(y0) * 0.05, 0.5)),
            y1 + (0.5 if log_y else max(abs(y1) * 0.05, 0.5)),
        )
    x0, x1 = x_range

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (right - left),
            top + (y1 - transform(y)) / (y1 - y0) * (bottom - top),
        )

    ticks = _log_ticks(y0, y1) if log_y else nice_ticks(y0, y1)
    for tick in ticks:
        if tick <= 0 and log_y:
            continue
        _, py = to_pixel(x0, tick)
        if top - 1 <= py <= bottom + 1:
            draw.line([left, py, right, py], fill=(225, 225, 225))
            draw.text((left - 6 - 6 * len(_label(tick)), py - 6), _label(tick), fill="black")
    for tick in nice_ticks(x0, x1, 6):
        px, _ = to_pixel(tick, 10**y0 if log_y else y0)
        if left - 1 <= px <= right + 1:
            draw.line([px, bottom, px, bottom + 4], fill="black")
            draw.text((px - 3 * len(_label(tick)), bottom + 6), _label(tick), fill="black")
    draw.text(((left + right) // 2 - 12, bottom + 20), "step", fill="black")
    draw.text((4, top - 16), y_title, fill="black")
    legend_x = right - 8
    for label, colour, ys in reversed(series):
        points = [to_pixel(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if len(points) == 1:
            px, py = points[0]
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        elif points:
            draw.line(points, fill=colour, width=2)
        if len(series) > 1:
            legend_x -= 7 * len(label) + 8
            draw.text((legend_x, top + 4), label, fill=colour)


def plot_loss_curve(
    rows: list[dict], out_path: str | Path, key: str = "loss", size: tuple[int, int] = LOSS_PANEL
) -> None:
    """The training `key` against step (log y axis), plus a panel of the validation figures (val_* keys,
    percent) when the rows have any; written as a PNG atomically."""
    width, height = size
    val_keys = sorted(
        {k for row in rows for k in row if k.startswith("val_") and isinstance(row[k], (int, float))}
    )
    total_height = height + (VAL_PANEL_HEIGHT if val_keys else 0)
    image = Image.new("RGB", (width, total_height), "white")
    draw = ImageDraw.Draw(image)
    train = [r for r in rows if key in r and r[key] > 0 and math.isfinite(r[key])]
    steps = [r["step"] for r in rows] or [0]
    x_range = (min(steps), max(max(steps), min(steps) + 1))
    box = (70, 24, width - 15, height - 40)
    _panel(
        draw,
        box,
        [r["step"] for r in train],
        [(key, (200, 40, 40), [r[key] for r in train])],
        x_range,
        log_y=True,
        y_title=f"{key} (log)",
        title=f"         training {key}",
    )
    if val_keys:
        val_rows = [r for r in rows if any(k in r for k in val_keys)]
        series = [
            (k[4:], VAL_COLOURS[i % len(VAL_COLOURS)], [r.get(k) for r in val_rows])
            for i, k in enumerate(val_keys)
        ]
        val_box = (70, height + 24, width - 15, total_height - 40)
        values = [v for _, _, ys in series for v in ys if v is not None]
        low, high = min(values), max(values)
        margin = max((high - low) * 0.1, 1.0)
        _panel(
            draw,
            val_box,
            [r["step"] for r in val_rows],
            series,
            x_range,
            log_y=False,
            y_title="percent",
            title="         validation",
            y_range=(max(low - margin, 0.0), min(high + margin, 100.0)),
        )
    out_path = Path(out_path)
    save_image(image, out_path)
