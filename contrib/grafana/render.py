"""Render pushsvc-dashboard.json to a PNG from a live Prometheus, without Grafana.

Every panel's own PromQL is run through the Prometheus HTTP API
(``query_range``) and drawn with matplotlib at the panel's grid position,
so the picture shows what the dashboard shows. Used for
docs/img/dashboard.png (see docs/operations.md, "Dashboard")::

    pip install matplotlib
    python contrib/grafana/render.py --prometheus http://127.0.0.1:9090 \\
        --minutes 5 --out docs/img/dashboard.png

Template variables: ``$job`` (``--job``), ``$instance`` (all), and
``$__rate_interval`` (``--rate-interval``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

HERE = Path(__file__).resolve().parent
GRID_COLUMNS = 24
CELL_WIDTH_IN = 0.78  # inches per grid column
CELL_HEIGHT_IN = 0.36  # inches per grid row (Grafana: 30 px)
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#ff780a"]
UNITS = {"s": "s", "reqps": "/s", "Bps": "B/s", "percentunit": "%", "short": ""}


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[Any]:
    """The ``matrix`` result of ``expr`` over [start, end]."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    url = f"{base}/api/v1/query_range?{params}"
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - http(s) URL given by the operator
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    result: list[Any] = body["data"]["result"]
    return result


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace the dashboard's template variables."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${name}", variables[name])
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format."""
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out.replace("{{", "").replace("}}", "").strip() or "value"


def fmt(value: float, unit: str) -> str:
    """A short human number with the panel's unit."""
    if math.isnan(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    suffix = UNITS.get(unit, "")
    for limit, letter in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{letter}{suffix}"
    return f"{value:.3g}{suffix}" if value % 1 else f"{value:.0f}{suffix}"


def style(ax: Axes, title: str) -> None:
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.set_title(title, color=TEXT, fontsize=8, loc="left", pad=4, fontweight="bold")
    ax.tick_params(colors=TEXT, labelsize=6, length=2)


def draw_timeseries(
    ax: Axes, panel: dict[str, Any], series: list[tuple[str, Any]], span: tuple[float, float]
) -> None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    style(ax, panel["title"])
    ax.grid(color=GRID, linewidth=0.5)
    ax.set_xlim(*(datetime.datetime.fromtimestamp(t, tz=datetime.UTC) for t in span))
    for index, (name, values) in enumerate(series[:8]):
        stamps = [datetime.datetime.fromtimestamp(float(t), tz=datetime.UTC) for t, _v in values]
        points = [float(v) if v not in ("NaN", "+Inf", "-Inf") else math.nan for _t, v in values]
        color = PALETTE[index % len(PALETTE)]
        ax.plot(stamps, points, color=color, linewidth=1.0, label=name[:28])
        ax.fill_between(stamps, points, alpha=0.08, color=color)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _p: fmt(v, unit)))
    if not series:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no data", color=TEXT, ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(
            loc="upper left",
            fontsize=5,
            ncol=min(4, len(series)),
            frameon=False,
            labelcolor=TEXT,
            handlelength=1,
        )


def draw_stat(ax: Axes, panel: dict[str, Any], series: list[tuple[str, Any]]) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit", "short")
    style(ax, panel["title"])
    ax.set_xticks([])
    ax.set_yticks([])
    value = math.nan
    if series and series[0][1]:
        raw = series[0][1][-1][1]
        value = float(raw) if raw not in ("NaN", "+Inf", "-Inf") else math.nan
    color = PALETTE[0]
    for step in defaults.get("thresholds", {}).get("steps", []):
        if step["value"] is None or (not math.isnan(value) and value >= step["value"]):
            color = {"green": PALETTE[0], "orange": PALETTE[3], "red": PALETTE[4]}.get(
                step["color"], PALETTE[0]
            )
    ax.text(
        0.5,
        0.42,
        fmt(value, unit),
        color=color,
        fontsize=20,
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontweight="bold",
    )


def render(args: argparse.Namespace) -> None:
    dashboard = json.loads(Path(args.dashboard).read_text())
    variables = {"job": args.job, "instance": ".*", "__rate_interval": args.rate_interval}
    end = args.end or time.time()
    start = end - args.minutes * 60
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(GRID_COLUMNS * CELL_WIDTH_IN, rows * CELL_HEIGHT_IN + 0.6))
    fig.patch.set_facecolor(BACKGROUND)
    fig.text(0.01, 0.995, dashboard["title"], color=TEXT, fontsize=14, va="top", weight="bold")
    height = rows * CELL_HEIGHT_IN + 0.6
    width = GRID_COLUMNS * CELL_WIDTH_IN
    for panel in panels:
        grid = panel["gridPos"]
        top = (0.6 + grid["y"] * CELL_HEIGHT_IN) / height
        if panel["type"] == "row":
            fig.text(0.01, 1 - top - 0.004, panel["title"], color=TEXT, fontsize=10, va="top")
            continue
        # Room inside the panel's cell for the title, tick labels and a gutter.
        left, right, bottom, title = (0.1, 0.06, 0.06, 0.22)
        if panel["type"] == "timeseries":
            left, bottom = 0.55, 0.3
        box = [
            (grid["x"] * CELL_WIDTH_IN + left) / width,
            1 - top - (grid["h"] * CELL_HEIGHT_IN - bottom) / height,
            (grid["w"] * CELL_WIDTH_IN - left - right) / width,
            (grid["h"] * CELL_HEIGHT_IN - bottom - title) / height,
        ]
        ax = fig.add_axes(box)
        series: list[tuple[str, Any]] = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], variables)
            for result in query_range(args.prometheus, expr, start, end, args.step):
                name = legend(target.get("legendFormat", ""), result["metric"])
                series.append((name, result["values"]))
        if panel["type"] == "stat":
            draw_stat(ax, panel, series)
        else:
            draw_timeseries(ax, panel, series, (start, end))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi, facecolor=BACKGROUND)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus URL")
    parser.add_argument("--dashboard", default=str(HERE / "pushsvc-dashboard.json"))
    parser.add_argument("--out", default="dashboard.png", help="PNG to write")
    parser.add_argument("--minutes", type=float, default=15, help="time range to show")
    parser.add_argument("--end", type=float, default=0, help="end of the range (Unix time; now)")
    parser.add_argument("--step", type=float, default=5, help="seconds between points")
    parser.add_argument("--job", default="pushsvc", help="value of $job")
    parser.add_argument("--rate-interval", default="1m", help="value of $__rate_interval")
    parser.add_argument("--dpi", type=int, default=110)
    render(parser.parse_args())


if __name__ == "__main__":
    main()
