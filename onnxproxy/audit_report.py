"""What an audit leaves behind: audit.json, audit.csv, one PNG per unit and method, inputs.npz and report.html,
a single self-contained page (images embedded as data URIs, the gain plot as inline SVG).

Everything is written into a staging folder inside the output folder and then moved into place, so a crash
while writing leaves the earlier outputs (or none) and the journal intact."""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import jinja2
import numpy as np

from onnxproxy import report

CSV_FIELDS = ("node", "tensor", "objective", "unit", "method", "onnxruntime_activation", "activation",
              "initial_activation", "validated", "best_step", "best_seed", "status", "image", "input")
OUTPUTS = ("images", "inputs.npz", "audit.csv", "report.html", "audit.json")  # audit.json last: it marks completion


def write_outputs(out_dir: Path, document: dict, inputs: dict[str, np.ndarray], layout: str,
                  input_range: tuple[float, float]):
    """`inputs` maps each record's `input` name to its best input (without batch axis)."""
    staging = Path(tempfile.mkdtemp(prefix=".outputs.", dir=out_dir))
    try:
        pngs = {record["image"]: _png(report.input_to_image(inputs[record["input"]], layout, input_range))
                for record in document["results"]}
        for name, data in pngs.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        np.savez(staging / "inputs.npz", **{key: value[None] for key, value in inputs.items()})
        _write_csv(staging / "audit.csv", document["results"])
        (staging / "report.html").write_text(render_html(document, pngs), encoding="utf-8")
        report.write_json(staging / "audit.json", document)
        for name in OUTPUTS:
            if (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_csv(path: Path, records: list[dict]):
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


# ------------------------------------------------------------------------------------------------- page


def render_html(document: dict, pngs: dict[str, bytes]) -> str:
    environment = jinja2.Environment(loader=jinja2.PackageLoader("onnxproxy", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True)
    environment.filters["number"] = _number
    environment.filters["signed"] = _signed
    uris = {name: "data:image/png;base64," + base64.b64encode(data).decode("ascii") for name, data in pngs.items()}
    methods = document["settings"]["methods"]
    return environment.get_template("audit.html").render(
        document=document, methods=methods, compared=len(methods) == 2, chart=gain_chart(document["nodes"]),
        cards=_cards(document, uris), model_name=Path(document["model"]).stem,
        results_count=sum(record["status"] != "nonfinite" for record in document["results"]))


def _number(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def _signed(value) -> str:
    if value is None:
        return "–"
    return f"{value:+.3g}".replace("-", "−") if value else "0"


def _cards(document: dict, uris: dict[str, str]) -> dict[str, list[dict]]:
    """Per node (by tensor), per unit: the image and validated activation of each method, side by side."""
    cards: dict[str, list[dict]] = {}
    for node in document["nodes"]:
        cards[node["tensor"]] = [{**row, "images": []} for row in node["units"]]
    by_unit = {(node["tensor"], card["unit"]): card for node in document["nodes"] for card in cards[node["tensor"]]}
    for record in document["results"]:
        by_unit[(record["tensor"], record["unit"])]["images"].append(
            {"method": record["method"], "uri": uris[record["image"]], "value": record["onnxruntime_activation"],
             "validated": record["validated"], "status": record["status"]})
    return cards


# --------------------------------------------------------------------------------------------- gain plot

LABEL_WIDTH, PLOT_WIDTH, NOTE_WIDTH = 190, 560, 150  # pixels of the SVG: node names | bars | median and share
ROW_HEIGHT, TOP, BOTTOM = 30, 12, 44


def gain_chart(summaries: list[dict]) -> dict | None:
    """Geometry of a horizontal bar chart: per node a bar for the median gain (ProxyGrad minus vanilla) and a
    dot per unit, on one shared axis with round ticks. None when no node compared both methods."""
    rows = [summary for summary in summaries if summary.get("median_gain") is not None]
    if not rows:
        return None
    gains = [row["gain"] for summary in rows for row in summary["units"] if row["gain"] is not None]
    ticks = _ticks(min(0.0, *gains), max(0.0, *gains))
    low, high = ticks[0], ticks[-1]

    def x(value):
        return LABEL_WIDTH + (value - low) / (high - low) * PLOT_WIDTH

    zero = x(0.0)
    plot_bottom = TOP + ROW_HEIGHT * len(rows)
    return {
        "width": LABEL_WIDTH + PLOT_WIDTH + NOTE_WIDTH, "height": plot_bottom + BOTTOM, "top": TOP,
        "plot_bottom": plot_bottom, "zero": zero, "plot_left": LABEL_WIDTH, "plot_right": LABEL_WIDTH + PLOT_WIDTH,
        "ticks": [{"x": x(tick), "label": _tick_label(tick)} for tick in ticks],
        "rows": [{"label": _shorten(summary["node"]), "title": summary["node"], "y": TOP + index * ROW_HEIGHT,
                  "middle": TOP + index * ROW_HEIGHT + ROW_HEIGHT / 2,
                  "bar_x": min(zero, x(summary["median_gain"])), "bar_width": abs(x(summary["median_gain"]) - zero),
                  "rising": summary["median_gain"] > 0,
                  "dots": [x(row["gain"]) for row in summary["units"] if row["gain"] is not None],
                  "median": summary["median_gain"],
                  "share": f"{summary['proxygrad_higher']}/{summary['compared_units']} higher"}
                 for index, summary in enumerate(rows)],
    }


def _ticks(low: float, high: float) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high], zero among them."""
    span = high - low or 1.0
    raw = span / 5
    power = 10 ** math.floor(math.log10(raw))
    step = next(factor * power for factor in (1, 2, 5, 10) if factor * power >= raw)
    first, last = math.floor(low / step), math.ceil(high / step)
    if first == last:
        last += 1
    return [index * step for index in range(first, last + 1)]


def _tick_label(value: float) -> str:
    return f"{value:.4g}".replace("-", "−") if value else "0"


def _shorten(name: str, limit: int = 26) -> str:
    """Long ONNX names keep their end, which is the part that differs between layers."""
    return name if len(name) <= limit else "…" + name[-(limit - 1):]
