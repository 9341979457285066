"""A small PNG of a report figure, drawn with numpy and zlib alone (no browser, no matplotlib).

The tour's index shows one picture per model: :func:`thumbnail_png` paints the first heatmap or
bar chart of a plotly figure (in its initial state) into a few hundred pixels, with the figure's
own colour scale, and encodes it as PNG bytes. Like every figure, it draws what it is given.

>>> import numpy as np
>>> from qkov.report.figures import heatmap
>>> png = thumbnail_png(heatmap(np.eye(3), [0, 1, 2], [0, 1, 2], "identity", "x", "y"))
>>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import plotly.colors

from ..errors import QkovError
from .figures import figure_dict

WHITE = np.array([255, 255, 255], dtype=np.float64)


def _rgb(c: str) -> np.ndarray:
    """A plotly colour (``'#1f77b4'`` or ``'rgb(31,119,180)'``) as three numbers 0..255."""
    rgb = plotly.colors.hex_to_rgb(c) if c.startswith("#") else plotly.colors.unlabel_rgb(c)
    return np.array(rgb, dtype=np.float64)


def _scale(name: Any, reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """(stops [n], colours [n, 3]) of a plotly colour scale, given by name or as pairs."""
    pairs = plotly.colors.get_colorscale(name) if isinstance(name, str) else name
    stops = np.array([float(s) for s, _ in pairs])
    cols = np.array([_rgb(c) for _, c in pairs])
    if reverse:
        stops, cols = 1 - stops[::-1], cols[::-1]
    return stops, cols


def _paint_heatmap(tr: dict[str, Any], size: int) -> np.ndarray:
    z = np.array([[np.nan if v is None else v for v in row] for row in tr["z"]], dtype=np.float64)
    ok = np.isfinite(z)
    if "zmid" in tr and tr.get("zmid") is not None:
        m = float(np.abs(z[ok] - tr["zmid"]).max()) if ok.any() else 1.0
        lo, hi = tr["zmid"] - (m or 1.0), tr["zmid"] + (m or 1.0)
    else:
        lo = tr.get("zmin", float(z[ok].min()) if ok.any() else 0.0)
        hi = tr.get("zmax", float(z[ok].max()) if ok.any() else 1.0)
    t = np.clip((np.where(ok, z, lo) - lo) / ((hi - lo) or 1.0), 0, 1)         # [rows, cols] in 0..1
    stops, cols = _scale(tr.get("colorscale") or "Blues", bool(tr.get("reversescale")))
    rgb = np.stack([np.interp(t, stops, cols[:, c]) for c in range(3)], -1)     # [rows, cols, 3]
    rgb[~ok] = WHITE
    reps = max(1, size // max(z.shape))                                          # each cell a square of pixels
    return np.repeat(np.repeat(rgb, reps, 0), reps, 1)


def _paint_bars(tr: dict[str, Any], width: int, height: int) -> np.ndarray:
    y = np.array([0.0 if v is None else v for v in tr["y"]], dtype=np.float64)
    canvas = np.tile(WHITE, (height, width, 1))
    n, top = len(y), float(y.max()) or 1.0
    color = (tr.get("marker") or {}).get("color")
    colors = color if isinstance(color, list) else [color or "#1f77b4"] * n
    slot = width / max(n, 1)
    for i, (v, c) in enumerate(zip(y, colors)):
        h = int(round(max(v, 0) / top * (height - 4)))
        x0, x1 = int(i * slot + slot * 0.15), max(int(i * slot + slot * 0.85), int(i * slot + slot * 0.15) + 1)
        canvas[height - h:, x0:x1] = _rgb(c)
    return canvas


def _paint_line(tr: dict[str, Any], width: int, height: int) -> np.ndarray:
    y = np.array([np.nan if v is None else v for v in tr["y"]], dtype=np.float64)
    canvas = np.tile(WHITE, (height, width, 1))
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return canvas
    lo, hi = float(y[ok].min()), float(y[ok].max())
    xs = np.linspace(2, width - 3, len(y))
    ys = (height - 3) - (np.where(ok, y, lo) - lo) / ((hi - lo) or 1.0) * (height - 6)
    color = _rgb((tr.get("line") or {}).get("color") or "#636efa")
    t = np.linspace(0, len(y) - 1, 8 * width)                                   # dense points along the line
    px, py = np.interp(t, np.arange(len(y)), xs), np.interp(t, np.arange(len(y)), ys)
    for dx in (0, 1):
        for dy in (0, 1):                                                      # two pixels thick
            canvas[np.clip(py.astype(int) + dy, 0, height - 1), np.clip(px.astype(int) + dx, 0, width - 1)] = color
    return canvas


def _png(rgb: np.ndarray) -> bytes:
    """``rgb [h, w, 3]`` (0..255) as PNG bytes: 8-bit RGB, no filter, zlib-compressed."""
    img = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def thumbnail_png(fig, size: int = 192) -> bytes:
    """The first heatmap (cells as squares, about ``size`` pixels a side), bar chart or line
    (``size`` x ``size // 2``) of a plotly figure, as PNG bytes."""
    traces = figure_dict(fig).get("data", [])
    for tr in traces:
        if tr.get("type") == "heatmap":
            return _png(_paint_heatmap(tr, size))
        if tr.get("type") == "bar":
            return _png(_paint_bars(tr, size, size // 2))
        if tr.get("type", "scatter") == "scatter" and tr.get("hoverinfo") != "skip" and tr.get("y"):
            return _png(_paint_line(tr, size, size // 2))
    raise QkovError("the figure has no heatmap, bar chart or line to draw a thumbnail of")
