"""`augment_batch` on CPU: each image augmented by one compiled function (numba), row by row.

The batched tensor ops of `dgbench.data.batch_augment` suit an accelerator, where the whole batch
goes through one kernel sequence. On CPU each of those ~60 ops is a pass over memory: at 224 px
the images leave the caches between ops, and hue alone is a dozen passes. Here the same
arithmetic runs on one output row at a time (3 x R floats, in L1): crop + resize + flip from the
uint8 source, the colour ops in the sample's order, grayscale, normalisation, each a loop over
the row that the compiler vectorises. Contrast needs the mean luma of the whole image at its
place in the order, so an image takes two passes: up to contrast (summing the luma), and from
contrast on, in place in the output.

The arithmetic follows `batch_augment`'s ops one for one, in float32 (its lerps written as
a + w (b - a), where torch's lerp changes form at w = 0.5), so the two paths agree to float32
rounding: within 1e-5 after normalisation (tested). Images are
spread over the usable cores by `dgbench.data.cpu_workers`; the compiled function releases the
GIL. Compilation (~seconds) happens once per machine: numba caches it on disk.
"""

from __future__ import annotations

import numba
import numpy as np

from dgbench.data.batch_augment import _LUMA, BRIGHTNESS, CONTRAST, SATURATION
from dgbench.data.cpu_workers import available_cores, run_on_cores

_F = np.float32
_ZERO, _ONE, _TWO, _FOUR, _SIX = _F(0), _F(1), _F(2), _F(4), _F(6)
_SIXTH = _F(1 / 6)
_TINY = _F(1e-30)
_L_R, _L_G, _L_B = (_F(w) for w in _LUMA)

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _clamp01(v: float) -> float:
    return min(max(v, _ZERO), _ONE)


@_jit
def _luma(r: float, g: float, b: float) -> float:
    return r * _L_R + g * _L_G + b * _L_B


@_jit
def _blend_row(x: np.ndarray, ref: np.ndarray, f: float) -> None:
    """clamp(f x + (1 - f) ref, 0, 1) in place, ref per pixel (torchvision's _blend)."""
    rest = _ONE - f
    for j in range(x.shape[0]):
        x[j] = _clamp01(x[j] * f + ref[j] * rest)


@_jit
def _scale_row(x: np.ndarray, f: float, ref: float) -> None:
    """clamp(f x + (1 - f) ref, 0, 1) in place for a constant ref (brightness: ref 0; contrast: the mean)."""
    add = ref * (_ONE - f)
    for j in range(x.shape[0]):
        x[j] = _clamp01(x[j] * f + add)


@_jit
def _luma_row(r: np.ndarray, g: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    for j in range(r.shape[0]):
        out[j] = _luma(r[j], g[j], b[j])


@_jit
def _hue_row(r: np.ndarray, g: np.ndarray, b: np.ndarray, shift: float) -> None:
    """batch_augment._shift_hue on one row: HSV hue += shift, in its closed form."""
    shift6 = shift * _SIX
    for j in range(r.shape[0]):
        rj, gj, bj = r[j], g[j], b[j]
        maxc = max(rj, max(gj, bj))
        delta = maxc - min(rj, min(gj, bj))
        if maxc == rj:  # the first channel holding the maximum, as torchvision's masks
            h6 = gj - bj
        elif maxc == gj:
            h6 = (bj - rj) + _TWO * delta
        else:
            h6 = (rj - gj) + _FOUR * delta
        h6 = h6 / max(delta, _TINY) + shift6
        r[j] = _hue_channel(h6 + _F(5), maxc, delta)
        g[j] = _hue_channel(h6 + _F(3), maxc, delta)
        b[j] = _hue_channel(h6 + _ONE, maxc, delta)


@_jit
def _hue_channel(k: float, maxc: float, delta: float) -> float:
    k = k - np.floor(k * _SIXTH) * _SIX
    ramp = _clamp01(min(k, _FOUR - k))
    return _clamp01(maxc - ramp * delta)


@_jit
def _apply(
    code: int, r: np.ndarray, g: np.ndarray, b: np.ndarray, f: float, mean: float, luma: np.ndarray
) -> None:
    """Colour op `code` with factor f on one row (contrast with the image's mean luma `mean`)."""
    if code == BRIGHTNESS:
        for x in (r, g, b):
            _scale_row(x, f, _ZERO)
    elif code == CONTRAST:
        for x in (r, g, b):
            _scale_row(x, f, mean)
    elif code == SATURATION:
        _luma_row(r, g, b, luma)
        for x in (r, g, b):
            _blend_row(x, luma, f)
    elif f != _ZERO:  # hue; a zero shift is the identity
        _hue_row(r, g, b, f)


@_jit
def _augment_image(src, rows, columns, factors, order, grayscale, scale, offset, to_unit, out) -> None:
    """One image: src (H, W, 3) -> out (3, R, R); rows and columns are (i0, i1, weight) taps, each (R,)."""
    (y0, y1, ly), (x0, x1, lx) = rows, columns
    size = out.shape[1]
    luma = np.empty(size, dtype=np.float32)
    contrast_at = 0
    for k in range(4):
        if order[k] == CONTRAST:
            contrast_at = k
    height, width, _ = src.shape
    pixels = src.reshape(height, width * 3)
    between = np.empty(width * 3, dtype=np.float32)  # the interpolated source row, interleaved RGB
    total = 0.0
    for i in range(size):
        # Rows first: a lerp between the two source rows, over the whole row (vectorised); then
        # the columns, gathered from that row.
        above, below, w = pixels[y0[i]], pixels[y1[i]], ly[i]
        for u in range(width * 3):
            p = _F(above[u])
            between[u] = (p + w * (_F(below[u]) - p)) * to_unit
        r, g, b = out[0, i], out[1, i], out[2, i]
        for j in range(size):
            u, v, t = 3 * x0[j], 3 * x1[j], lx[j]
            for ch in range(3):
                p = between[u + ch]
                out[ch, i, j] = p + t * (between[v + ch] - p)
        for k in range(contrast_at):
            _apply(order[k], r, g, b, factors[order[k]], _ZERO, luma)
        _luma_row(r, g, b, luma)
        for j in range(size):
            total += luma[j]
    mean = _F(total / (size * size))
    for i in range(size):
        r, g, b = out[0, i], out[1, i], out[2, i]
        for k in range(contrast_at, 4):
            _apply(order[k], r, g, b, factors[order[k]], mean, luma)
        if grayscale:
            _luma_row(r, g, b, luma)
            r[:] = luma
            g[:] = luma
            b[:] = luma
        for ch, x in enumerate((r, g, b)):
            s, o = scale[ch], offset[ch]
            for j in range(size):
                x[j] = o + x[j] * s


@_jit
def _augment_images(
    src, start, stop, rows, columns, factors, order, grayscale, scale, offset, to_unit, out
) -> None:
    """Images start..stop-1 of the batch; every array has the batch first."""
    for s in range(start, stop):
        _augment_image(
            src[s],
            (rows[0][s], rows[1][s], rows[2][s]),
            (columns[0][s], columns[1][s], columns[2][s]),
            factors[s],
            order[s],
            grayscale[s],
            scale,
            offset,
            to_unit,
            out[s],
        )


def augment_on_cpu(
    src: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    columns: tuple[np.ndarray, np.ndarray, np.ndarray],
    factors: np.ndarray,
    order: np.ndarray,
    grayscale: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    out: np.ndarray,
) -> None:
    """Augment src (B, H, W, 3, uint8 or float32 in [0, 1]) into out (B, 3, R, R) float32, on every core."""
    to_unit = _F(1 / 255) if src.dtype == np.uint8 else _ONE
    batch = src.shape[0]
    step = max(1, batch // (4 * available_cores()))  # a few chunks per core balance the load

    def work(start: int) -> None:
        stop = min(start + step, batch)
        _augment_images(
            src, start, stop, rows, columns, factors, order, grayscale, scale, offset, to_unit, out
        )

    run_on_cores(work, range(0, batch, step))
