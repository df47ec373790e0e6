"""Figures of the analysis tools, composed with numpy and OpenCV only (uint8 BGR arrays, ready for ``cv2.imwrite``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from torch import Tensor

WINDOW_COLOR = (0, 200, 0)  # BGR green: stands out on the white-to-red attribution colours
TEXT_COLOR = (0, 0, 0)
BACKGROUND = 255
GAP = 4
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Share of the image in an attribution overlay; the rest is the attribution colour.
OVERLAY_IMAGE_WEIGHT = 0.3

# Upper half of the diverging "seismic" scale: 0 -> white, 0.5 -> red, 1 -> dark red, so that an attribution of
# zero leaves the image visible and the strongest pixels stand out.
_HEAT_STOPS = np.array([0.0, 0.5, 1.0])
_HEAT_RGB = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 BGR image; raise OSError when OpenCV cannot (e.g. a missing folder)."""
    if not cv2.imwrite(str(path), image):
        raise OSError(f'could not write {path}.')


def to_bgr_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """[C, H, W] (C = 1 or 3, RGB) float in [0, 1] -> [H, W, 3] uint8 BGR."""
    arr = image.detach().float().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image, dtype=np.float32)
    arr = np.clip(arr, 0.0, 1.0).transpose(1, 2, 0)
    arr = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[..., ::-1]
    return np.ascontiguousarray(np.round(arr * 255.0).astype(np.uint8))


def heat_colors(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8 BGR on the white -> red -> dark red scale."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _HEAT_STOPS, _HEAT_RGB[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb[..., ::-1] * 255.0).astype(np.uint8)


def feature_colors(values: np.ndarray) -> np.ndarray:
    """[H, W] float -> [H, W, 3] uint8 BGR (viridis), min-max normalised; a constant map is drawn dark."""
    v = np.asarray(values, dtype=np.float64)
    span = v.max() - v.min()
    v = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    return cv2.applyColorMap(np.round(v * 255.0).astype(np.uint8), cv2.COLORMAP_VIRIDIS)


def resize_bicubic(image: np.ndarray, *, size: tuple) -> np.ndarray:
    """Resize [h, w, ...] to ``size`` = (height, width), bicubic."""
    height, width = size
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)


def attribution_overlay(attribution: np.ndarray, image_bgr: np.ndarray, *, size: tuple) -> np.ndarray:
    """Blend an attribution map [h, w] in [0, 1] onto an image [h, w, 3] uint8, both resized (bicubic) to ``size``
    (height, width). Returns [height, width, 3] uint8 BGR."""
    attr = np.clip(resize_bicubic(attribution.astype(np.float32), size=size), 0.0, 1.0)
    image = resize_bicubic(image_bgr, size=size).astype(np.float64)
    blend = heat_colors(attr) * (1.0 - OVERLAY_IMAGE_WEIGHT) + image * OVERLAY_IMAGE_WEIGHT
    return np.round(blend).astype(np.uint8)


def line_thickness(image: np.ndarray) -> int:
    return max(1, round(min(image.shape[:2]) / 200))


def draw_window(image: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """A copy of ``image`` [H, W, 3] with the square window (top-left column x, row y, side size) outlined inside."""
    out = image.copy()
    cv2.rectangle(out, (x, y), (x + size - 1, y + size - 1), WINDOW_COLOR, line_thickness(out))
    return out


def caption(lines: Sequence[str], width: int) -> np.ndarray:
    """A white strip [h, width, 3] uint8 with one text line per entry, shrunk (then cut) to fit the width."""
    scale, thickness, margin = 0.5, 1, 3
    fitted = []
    for text in lines:
        (w, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
        s = scale
        while w > width - 2 * margin and s > 0.3:
            s -= 0.05
            (w, _), _ = cv2.getTextSize(text, FONT, s, thickness)
        while w > width - 2 * margin and len(text) > 2:
            text = text[:-3] + '..'
            (w, _), _ = cv2.getTextSize(text, FONT, s, thickness)
        fitted.append((text, s))
    line_height = 18
    strip = np.full((line_height * len(lines) + margin, width, 3), BACKGROUND, np.uint8)
    for i, (text, s) in enumerate(fitted):
        cv2.putText(strip, text, (margin, line_height * (i + 1) - 4), FONT, s, TEXT_COLOR, 1, cv2.LINE_AA)
    return strip


def captioned(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    return np.concatenate([image, caption(lines, image.shape[1])], axis=0)


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Panels [h_i, w_i, 3] in one row, top-aligned on white, ``GAP`` pixels apart."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1)
    out = np.full((height, width, 3), BACKGROUND, np.uint8)
    x = 0
    for p in panels:
        out[:p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + GAP
    return out


def grid(tiles: Sequence[np.ndarray], *, columns: int) -> np.ndarray:
    """Equal-sized tiles [h, w, 3] in rows of ``columns``, ``GAP`` pixels apart, on white."""
    h, w = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    out = np.full((rows * h + (rows - 1) * GAP, columns * w + (columns - 1) * GAP, 3), BACKGROUND, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + GAP):r * (h + GAP) + h, c * (w + GAP):c * (w + GAP) + w] = tile
    return out


def enlarge(image: np.ndarray, *, min_side: int) -> np.ndarray:
    """Nearest-neighbour enlargement by the smallest integer factor that makes the shorter side at least
    ``min_side``: block patterns stay sharp."""
    factor = max(1, math.ceil(min_side / min(image.shape[:2])))
    if factor == 1:
        return image
    return cv2.resize(image, (image.shape[1] * factor, image.shape[0] * factor), interpolation=cv2.INTER_NEAREST)
