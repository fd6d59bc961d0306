"""A procedurally generated multi-domain dataset that needs no download.

Six shape classes (identity = shape; position, scale, rotation and colour are random)
rendered in four PACS-like styles: `photo` (shaded object with a cast shadow on a
sky/ground scene, sensor noise), `painting` (brush strokes, ochre-shifted palette),
`cartoon` (flat saturated fill, thick black outline, bold comic stripes) and `sketch`
(grey pencil outline and graphite shading on hatched paper). The styles differ in
texture, palette, outline vs fill, noise and background, so a model trained on three
domains loses accuracy on the fourth: a real domain gap, small enough for the whole
sweep -> table loop to run on a laptop CPU in minutes.

Generation is numpy + PIL only and deterministic from `seed` (a few seconds on one
core); the arrays are cached at `<data_root>/embedded/embedded-<hash>.npz`, written
atomically, and regenerated when the file is unreadable.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dgbench.atomic import atomic_write
from dgbench.data.base import DatasetConfig, DomainData, MultiDomainDataset, data_root
from dgbench.registry import DATASETS

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # bump whenever the rendering changes, so stale caches are not reused
DOMAINS = ("photo", "painting", "cartoon", "sketch")
CLASSES = ("circle", "cross", "ring", "square", "star", "triangle")  # sorted: ImageFolder order

Array = np.ndarray
Rng = np.random.Generator
Shape = tuple[str, float, float, float, float]  # (class, centre x, centre y, radius, rotation)


@dataclass(kw_only=True)
class EmbeddedConfig(DatasetConfig):
    """Generation knobs; every one of them is part of the cache key."""

    name: str = "embedded"
    images_per_domain: int = 600  # split as evenly as possible across the classes
    resolution: int = 32  # stored (working) resolution, pixels per side
    seed: int = 0  # generation seed: same seed -> bit-identical images
    supersample: int = 4  # shapes are drawn at resolution*supersample, then box-filtered (anti-aliasing)
    min_size: float = 0.26  # smallest object radius, as a fraction of the image side
    max_size: float = 0.40  # largest object radius, as a fraction of the image side
    max_shift: float = 0.15  # object centre offset from the image centre, fraction of the side (each axis)
    max_rotation: float = 30.0  # objects are rotated uniformly within ±this many degrees

    def domain_names(self) -> list[str]:
        return list(DOMAINS)

    def image_size(self) -> int:
        return self.resolution


# ---------------------------------------------------------------- shapes (high-res masks)


def _shape_parts(cls: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[str, Any, bool]]:
    """Primitives `(kind, geometry, is_hole)` of one shape; kind is "ellipse" or "poly"."""

    def poly(radii: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        n = len(radii)
        angles = [theta + offset + 2 * math.pi * k / n for k in range(n)]
        return [(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles, strict=True)]

    if cls in ("circle", "ring"):  # a ring is a circle with a hole of 0.55 its radius
        radii = [(r, False), (0.55 * r, True)][: 1 + (cls == "ring")]
        return [("ellipse", (cx - q, cy - q, cx + q, cy + q), hole) for q, hole in radii]
    if cls == "square":
        return [("poly", poly([1.15 * r] * 4, math.pi / 4), False)]
    if cls == "triangle":
        return [("poly", poly([1.25 * r] * 3, -math.pi / 2), False)]
    if cls == "star":
        return [("poly", poly([1.25 * r, 0.45 * r] * 5, -math.pi / 2), False)]
    # cross: a plus sign of arm half-width w, rotated by theta
    w, c, s = 0.32 * r, math.cos(theta), math.sin(theta)
    pts = [(w, 1.1 * r), (w, w), (1.1 * r, w), (1.1 * r, -w), (w, -w), (w, -1.1 * r)]
    pts += [(-x, -y) for x, y in pts]
    return [("poly", [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], False)]


def _mask(shape: Shape, size: int, res: int, width: float = 0.0) -> Array:
    """Coverage in [0, 1] at `res` of the filled shape (width 0) or of its outline (stroke px at `size`)."""
    parts = _shape_parts(*shape)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for kind, geom, hole in parts:
        if width <= 0:
            fill = 0 if hole else 255
            draw.ellipse(geom, fill=fill) if kind == "ellipse" else draw.polygon(geom, fill=fill)
        elif kind == "ellipse":  # PIL strokes ellipses inwards: grow the box to centre the stroke
            box = [v + d * width / 2 for v, d in zip(geom, (-1, -1, 1, 1), strict=True)]
            draw.ellipse(box, outline=255, width=round(width))
        else:
            draw.line([*geom, geom[0], geom[1]], fill=255, width=round(width), joint="curve")
    return np.asarray(img.resize((res, res), Image.Resampling.BOX), dtype=np.float32) / 255.0


# ---------------------------------------------------------------- textures and colours


def _hsv(h: float, s: float, v: float) -> Array:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _smooth_noise(rng: Rng, res: int, cells: int) -> Array:
    """Low-frequency noise in [0, 1], shape (res, res, 1): a coarse random grid, bicubically upsampled."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    return np.clip(np.asarray(grid.resize((res, res), Image.Resampling.BICUBIC))[..., None], 0.0, 1.0)


def _strokes(rng: Rng, res: int, colours: list[Array], jitter: float, n: int, main: float) -> Array:
    """A canvas of short, thick, mostly parallel brush strokes in the given colours."""
    size = 2 * res
    base = (colours[0] * 255).astype(np.uint8)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in base))
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        col = colours[rng.integers(len(colours))] + rng.normal(0, jitter, 3)
        x, y = rng.uniform(0, size, 2)
        ang, half = main + rng.normal(0, 0.25), rng.uniform(0.1, 0.3) * size
        dx, dy = half * math.cos(ang), half * math.sin(ang)
        fill = tuple(int(c) for c in np.clip(col * 255, 0, 255))
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=fill, width=int(rng.integers(5, 10)))
    return np.asarray(img.resize((res, res), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _blend(under: Array, over: Array | float, alpha: Array) -> Array:
    return under * (1 - alpha[..., None]) + np.asarray(over, dtype=np.float32) * alpha[..., None]


def _waves(res: int, angle: float, period: float) -> Array:
    """A plane sine wave in [-1, 1] (`period` px, crests along `angle`): stripes and hatching."""
    xs = np.arange(res, dtype=np.float32)
    return np.sin((np.cos(angle) * xs[None, :] + np.sin(angle) * xs[:, None]) * (2 * math.pi / period))


# ---------------------------------------------------------------- domain styles


def _contrasting(rng: Rng, under: Array, alpha: Array, hue: float, sat: float) -> Array:
    """An object colour whose brightness differs clearly from the background it covers."""
    lum = float((under.mean(-1) * alpha).sum() / max(alpha.sum(), 1e-6))
    gap = rng.uniform(0.3, 0.5)
    value = lum - gap if lum > 0.55 else lum + gap
    return _hsv(hue, sat, float(np.clip(value, 0.08, 1.0)))


def _photo(rng: Rng, shape: Shape, res: int, size: int) -> Array:
    """Shaded object with a soft shadow over a textured sky/ground scene, sensor noise."""
    yy = np.linspace(0, 1, res, dtype=np.float32)[:, None, None]
    horizon = rng.uniform(0.35, 0.75) + 0.15 * (_smooth_noise(rng, res, 3) - 0.5)
    ground = 1 / (1 + np.exp(-(yy - horizon) * 25))
    sky = _hsv(rng.uniform(0.52, 0.62), rng.uniform(0.2, 0.5), rng.uniform(0.7, 0.95))
    earth = _hsv(rng.uniform(0.06, 0.33), rng.uniform(0.3, 0.6), rng.uniform(0.25, 0.55))
    bg = (sky * (1 - ground) + earth * ground) * (0.9 + 0.2 * _smooth_noise(rng, res, 6))
    bg = bg + rng.normal(0, 0.025, (res, res, 1))
    alpha = _mask(shape, size, res)
    obj = _contrasting(rng, bg, alpha, rng.uniform(), rng.uniform(0.3, 0.7))
    bg = _blend(bg, 0.0, 0.4 * np.roll(alpha, (1, 1), axis=(0, 1)))  # cast shadow
    light = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(-1, 1, res, dtype=np.float32)
    shade = 0.8 + 0.25 * (np.cos(light) * xs[None, :] + np.sin(light) * xs[:, None])
    obj = obj * shade[..., None] * (0.92 + 0.16 * _smooth_noise(rng, res, 8))
    return _blend(bg, obj, alpha) + rng.normal(0, 0.02, (res, res, 3))


def _painting(rng: Rng, shape: Shape, res: int, size: int) -> Array:
    """Brush strokes for both background and object, palette pulled towards ochre."""
    tint = np.array([0.75, 0.55, 0.3], dtype=np.float32)
    main = rng.uniform(0, math.pi)
    bg_cols = [0.7 * _hsv(rng.uniform(), rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.9)) + 0.3 * tint]
    bg_cols += [np.clip(bg_cols[0] + rng.normal(0, 0.04, 3), 0, 1) for _ in range(2)]
    bg = _strokes(rng, res, bg_cols, 0.02, 25, main)
    alpha = _mask(shape, size, res)
    obj_col = 0.7 * _contrasting(rng, bg, alpha, rng.uniform(), rng.uniform(0.6, 1.0)) + 0.3 * tint
    obj = _strokes(rng, res, [obj_col, obj_col * 0.9, np.clip(obj_col * 1.1, 0, 1)], 0.02, 20, main + 1.5)
    img = _blend(bg, obj, np.clip(alpha * (0.9 + 0.2 * _smooth_noise(rng, res, 10)[..., 0]), 0, 1))
    if rng.random() < 0.25:  # a loosely painted dark contour, as painters often add
        img = _blend(img, obj_col * 0.4, 0.8 * _mask(shape, size, res, width=size / rng.uniform(14, 20)))
    return img * (0.95 + 0.1 * _smooth_noise(rng, res, 16))


def _cartoon(rng: Rng, shape: Shape, res: int, size: int) -> Array:
    """Flat saturated fill with a thick black outline over bold high-contrast comic stripes.

    The stripes are dark: outlines stop being the only strong edges, so the outline cue a
    model learns from sketches no longer transfers for free (keeps a gap under augmentation).
    """
    light = _hsv(rng.uniform(), rng.uniform(0.1, 0.35), rng.uniform(0.9, 1.0))
    dark = _hsv(rng.uniform(), rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.3))
    stripes = np.clip(0.5 + 2 * _waves(res, rng.uniform(0, math.pi), rng.uniform(5, 9)), 0, 1)
    bg = _blend(np.broadcast_to(light, (res, res, 3)), dark, stripes)
    fill = _hsv(rng.uniform(), rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0))
    img = _blend(bg, fill, _mask(shape, size, res))
    return _blend(img, 0.05, _mask(shape, size, res, width=size / rng.uniform(11, 15)))


def _sketch(rng: Rng, shape: Shape, res: int, size: int) -> Array:
    """Grey pencil outline (drawn twice, slightly offset) and graphite shading on hatched paper.

    The hatching puts pencil lines everywhere, so outlines learned from cartoons do not
    transfer for free (keeps a gap under DomainBed's grayscale augmentation).
    """
    paper = _hsv(rng.uniform(0.08, 0.15), rng.uniform(0.0, 0.12), rng.uniform(0.88, 1.0))
    img = paper + rng.normal(0, 0.035, (res, res, 1))
    hatch = np.clip(3 * (_waves(res, rng.uniform(0, math.pi), rng.uniform(3, 5)) - 0.5), 0, 1)
    img = _blend(img, rng.uniform(0.25, 0.45), hatch * rng.uniform(0.6, 0.9))
    shading = rng.uniform(0.25, 0.55) * (0.75 + 0.5 * _smooth_noise(rng, res, 6)[..., 0])
    img = _blend(img, 0.1, np.clip(shading, 0, 1) * _mask(shape, size, res))
    for _ in range(2):
        dx, dy = rng.normal(0, 0.012 * size, 2)
        jittered = (shape[0], shape[1] + dx, shape[2] + dy, *shape[3:])
        line = _mask(jittered, size, res, width=size / rng.uniform(28, 40))
        grain = 0.55 + 0.45 * _smooth_noise(rng, res, 12)[..., 0]
        img = _blend(img, rng.uniform(0.05, 0.35), line * grain)
    return img


STYLES: dict[str, Callable[[Rng, Shape, int, int], Array]] = dict(
    zip(DOMAINS, (_photo, _painting, _cartoon, _sketch), strict=True)
)


# ---------------------------------------------------------------- generation and cache


def generation_params(cfg: Any) -> dict[str, Any]:
    """The generation knobs of `cfg` (an `EmbeddedConfig` or a DictConfig): the cache key.

    Every `EmbeddedConfig` field that `DatasetConfig` does not declare counts, so a new knob
    can never be forgotten in the key.
    """
    shared = {f.name for f in fields(DatasetConfig)}
    knobs = [f for f in fields(EmbeddedConfig) if f.name not in shared]
    return {f.name: type(f.default)(getattr(cfg, f.name)) for f in knobs}


def _domain_rng(seed: int, domain_index: int) -> Rng:
    """One independent stream per domain, so domains never share draws."""
    return np.random.default_rng(np.random.SeedSequence([seed, domain_index]))


def _labels(n: int) -> Array:
    """`n` labels sorted by class (ImageFolder order), as even as possible (first classes get the rest)."""
    counts = [n // len(CLASSES) + (k < n % len(CLASSES)) for k in range(len(CLASSES))]
    return np.repeat(np.arange(len(CLASSES)), counts).astype(np.int64)


def generate(params: dict[str, Any]) -> dict[str, tuple[Array, Array]]:
    """Render every domain: `{domain: (uint8 N×H×W×3, int64 labels sorted by class)}`."""
    res, n = params["resolution"], params["images_per_domain"]
    size = res * params["supersample"]
    out = {}
    for d, domain in enumerate(DOMAINS):
        rng = _domain_rng(params["seed"], d)
        labels = _labels(n)
        images = np.empty((n, res, res, 3), dtype=np.uint8)
        for i, label in enumerate(labels):
            r = rng.uniform(params["min_size"], params["max_size"]) * size
            lim = max(0.0, min(params["max_shift"] * size, size / 2 - 1.05 * r))
            cx, cy = size / 2 + rng.uniform(-lim, lim, 2)
            theta = math.radians(rng.uniform(-1, 1) * params["max_rotation"])
            shape = (CLASSES[label], float(cx), float(cy), float(r), theta)
            img = STYLES[domain](rng, shape, res, size)
            images[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        out[domain] = (images, labels)
    return out


def cache_path(root: Path, params: dict[str, Any]) -> Path:
    """`<root>/embedded/embedded-<hash>.npz`; the hash covers the params and GENERATOR_VERSION."""
    key = json.dumps({**params, "version": GENERATOR_VERSION}, sort_keys=True)
    return root / "embedded" / f"embedded-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _save(path: Path, data: dict[str, tuple[Array, Array]]) -> None:
    """Write the cache atomically, so a kill never leaves a torn file."""
    arrays = {f"{d}_{k}": v for d, (x, y) in data.items() for k, v in (("images", x), ("labels", y))}
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def _load(path: Path, params: dict[str, Any]) -> dict[str, tuple[Array, Array]]:
    """Read a cache file, checking every array against `params` (a mismatch raises ValueError)."""
    n, res = params["images_per_domain"], params["resolution"]
    with np.load(path, allow_pickle=False) as f:
        data = {d: (f[f"{d}_images"], f[f"{d}_labels"]) for d in DOMAINS}
    for d, (x, y) in data.items():
        if x.shape != (n, res, res, 3) or x.dtype != np.uint8 or not np.array_equal(y, _labels(n)):
            raise ValueError(f"domain {d!r}: images {x.shape} {x.dtype} or labels do not match {params}")
        data[d] = (x, y.astype(np.int64))
    return data


def load_or_generate(root: Path, params: dict[str, Any]) -> dict[str, tuple[Array, Array]]:
    """The cached arrays for `params`, generating (and caching) them when missing or unreadable."""
    path = cache_path(root, params)
    if path.exists():
        try:
            return _load(path, params)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("embedded: unreadable cache %s (%s: %s); regenerating", path, type(err).__name__, err)
    start = time.perf_counter()
    data = generate(params)
    _save(path, data)
    log.info("embedded: generated %s in %.1fs, cached at %s", params, time.perf_counter() - start, path)
    return data


# ---------------------------------------------------------------- dataset


class EmbeddedDomain(DomainData):
    """One generated domain, held in memory as a uint8 array (`arrays`) for fast tensor pipelines."""

    def __init__(self, name: str, arrays: Array, labels: Array) -> None:
        self.name = name
        self.arrays = arrays
        self.labels = labels
        counters: dict[int, int] = {}
        self.ids = []
        for label in labels.tolist():
            counters[label] = counters.get(label, -1) + 1
            self.ids.append(f"{CLASSES[label]}/{counters[label]:05d}")

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.arrays[index])


class EmbeddedDataset(MultiDomainDataset):
    """Four PACS-like styles of six shape classes; 1000 steps show the domain gap on a small CNN."""

    name = "embedded"
    resolution = 32
    steps = 1000
    checkpoint_freq = 100


def build_embedded(cfg: Any) -> EmbeddedDataset:
    """Build (or load from cache) the embedded dataset from an `EmbeddedConfig` or a DictConfig."""
    params = generation_params(cfg)
    data = load_or_generate(data_root(getattr(cfg, "root", None)), params)
    dataset = EmbeddedDataset([EmbeddedDomain(d, *data[d]) for d in DOMAINS], CLASSES)
    dataset.resolution = params["resolution"]
    return dataset


DATASETS.register("embedded", EmbeddedConfig, build_embedded)
