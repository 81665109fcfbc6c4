"""What a run leaves behind: one PNG per result, a grid, results.json and inputs.npz, written atomically
into an output folder (everything goes to a temporary sibling first and is moved in place at the end)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from onnxproxy.errors import UserError

VIEW_SIZE = 128  # small inputs are upscaled (nearest neighbour) to at least this many pixels for viewing


def safe_name(text: str) -> str:
    """`text` usable as a file or folder name: characters other than letters, digits, '-', '_', '.' become '_'."""
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in text)


def check_out_dir(out_dir: Path, force: bool):
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise UserError(f"{out_dir} exists and is not empty; choose another --out or pass --force")


@contextmanager
def atomic_dir(out_dir: Path):
    """Yield a temporary folder beside out_dir; on success it replaces out_dir, on failure it is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.unlink()
    os.replace(staging, out_dir)


def json_number(value):
    """A float for strict JSON, which has no NaN or infinity: those, and None, become null."""
    return None if value is None or not math.isfinite(value) else float(value)


def write_json(path: Path, document: dict):
    """Write JSON atomically (temp file + rename in the same folder)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)


def input_to_image(array: np.ndarray, layout: str, input_range: tuple[float, float]) -> Image.Image:
    """An input (without batch axis) as the model sees it: range mapped to 0-255, channels last, the first
    three channels (or grey), upscaled for viewing. Non-image inputs become a square or a strip."""
    low, high = input_range
    scaled = np.clip((np.asarray(array, dtype=np.float64) - low) / (high - low), 0, 1)
    pixels = _as_height_width_channels(scaled, layout)
    pixels = (pixels * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    factor = max(1, math.ceil(VIEW_SIZE / max(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _as_height_width_channels(array: np.ndarray, layout: str) -> np.ndarray:
    if array.ndim == 3:
        pixels = np.moveaxis(array, 0, -1) if layout != "NHWC" else array
        return pixels[:, :, :3] if pixels.shape[2] >= 3 else pixels[:, :, :1]
    flat = array.reshape(-1)
    side = math.isqrt(flat.size)
    if side * side == flat.size:
        return flat.reshape(side, side, 1)
    return flat.reshape(1, -1, 1)


def grid_image(tiles: list[tuple[Image.Image, str]], columns: int | None = None) -> Image.Image:
    """Tiles in rows, each with its caption (one or two lines) underneath."""
    font = ImageFont.load_default(size=12)
    columns = columns or min(len(tiles), 8)
    width = max(tile.width for tile, _ in tiles)
    height = max(tile.height for tile, _ in tiles)
    caption_height, margin = 32, 6
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * (width + margin) + margin, rows * (height + caption_height + margin) + margin),
                     "white")
    draw = ImageDraw.Draw(grid)
    for index, (tile, caption) in enumerate(tiles):
        left = margin + (index % columns) * (width + margin)
        top = margin + (index // columns) * (height + caption_height + margin)
        grid.paste(tile.convert("RGB"), (left, top))
        draw.multiline_text((left, top + height + 2), caption, fill="black", font=font, spacing=2)
    return grid


def write_results(folder: Path, document: dict, inputs: dict[str, np.ndarray], images: dict[str, Image.Image],
                  grid: Image.Image):
    for name, image in images.items():
        image.save(folder / name)
    grid.save(folder / "grid.png")
    np.savez(folder / "inputs.npz", **{key: value[None].astype(np.float32) for key, value in inputs.items()})
    write_json(folder / "results.json", document)
