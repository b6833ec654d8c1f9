"""``gallery.png``: every failure as a labelled pair, clean | failure, its class, seed and iteration beneath.

A pure function of the images (the writer callback saves the result through the run folder): tiles larger than
``tile`` pixels are shrunk, so a Stable Diffusion run's gallery of hundreds of failures stays a viewable file.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

TILE = 128
PAIRS_PER_ROW = 4
LABEL_HEIGHT = 16
GAP = 6


def gallery_label(record: dict) -> str:
    """class · seed · iteration (latent search) or class · seed · +added words (prompt search)."""
    head = f"{record.get('class')} · seed {record.get('seed')}"
    if record.get("words"):
        return f"{head} · +{' '.join(record['words'])}"
    return f"{head} · it {record.get('iterations')}"


def _fit(text: str, font, width: int) -> str:
    while text and font.getlength(text) > width:
        text = text[:-2] + "…"
    return text


def _scaled(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / image.height))
    return image.convert("RGB").resize((width, height), Image.NEAREST)


def labelled_pairs(pairs: list[tuple[Image.Image, Image.Image, str]], tile: int = TILE) -> torch.Tensor:
    """``[3, H, W]`` float image in [0, 1]: the pairs on a white sheet, ``PAIRS_PER_ROW`` per row, labels beneath.
    Images keep their aspect ratio (a prompt's seed grid is wide), at most ``tile`` pixels high."""
    if not pairs:
        raise ValueError("no pairs to draw")
    height = min(tile, max(max(a.height, b.height) for a, b, _ in pairs))
    scaled = [(_scaled(a, height), _scaled(b, height), label) for a, b, label in pairs]
    cell_w = max(a.width + b.width + 2 for a, b, _ in scaled)
    cell_h = height + LABEL_HEIGHT
    columns = max(1, min(PAIRS_PER_ROW if cell_w <= 2 * TILE + 2 else 1, len(pairs)))
    rows = -(-len(pairs) // columns)
    sheet = Image.new("RGB", (columns * (cell_w + GAP) + GAP, rows * (cell_h + GAP) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(11)
    for k, (clean, final, label) in enumerate(scaled):
        x = GAP + (k % columns) * (cell_w + GAP)
        y = GAP + (k // columns) * (cell_h + GAP)
        sheet.paste(clean, (x, y))
        sheet.paste(final, (x + clean.width + 2, y))
        draw.text((x, y + height + 2), _fit(label, font, cell_w), fill="black", font=font)
    return torch.from_numpy(np.asarray(sheet).copy()).permute(2, 0, 1).float() / 255
