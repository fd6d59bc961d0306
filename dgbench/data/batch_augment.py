"""DomainBed's training augmentation as batched tensor ops: one kernel sequence per minibatch.

`dgbench.data.transforms.TrainTransform` augments one PIL image at a time. This module does
the same augmentation to a whole uint8 batch at once, on CPU or GPU:

    params = sample_params(len(images), height, width, generator)   # vectorised CPU draws
    batch = augment_batch(images, params, resolution, mean, std)    # on images.device

`sample_params` draws every per-sample parameter from the reference distributions:
RandomResizedCrop(scale=(0.7, 1), ratio=(3/4, 4/3)) with torchvision's ten-try rejection
sampling (ten candidates per sample drawn at once, the first valid one kept) and its
central-crop fallback, box sizes rounded half-to-even like Python's `round`, top/left uniform
over the valid positions; flip p=0.5; ColorJitter(0.3, 0.3, 0.3, 0.3): brightness, contrast
and saturation factors ~ U(0.7, 1.3), a hue shift ~ U(-0.3, 0.3), the four ops in a uniformly
random order; RandomGrayscale p=0.1. The generator's stream is consumed in another order than
the reference's sequential loop: a seed gives the same *distribution* as `TrainTransform`,
not the same boxes.

`augment_batch` is specified by torchvision's tensor kernels (`torchvision.transforms.v2.
functional`) on float images in [0, 1]: for fixed parameters it equals, sample by sample,
`resized_crop(antialias=False)` -> `horizontal_flip` -> the four `adjust_*` ops in the sample's
order -> `rgb_to_grayscale(num_output_channels=3)` -> `normalize`, up to float32 rounding
(measured max |diff| ~1e-5 after normalization; the tests assert 5e-5). As batched ops:

* crop + resize: bilinear with PyTorch's `align_corners=False` source coordinates (computed as
  its CPU kernel does: float32 scale, double products, float32 taps), per sample, with the
  taps clamped to the box: the reference crops and *then* resizes, so an upscaled box
  replicates its own edge pixels instead of blending in the pixels just outside it. Rows then
  columns, each as whole-row copies + lerp (see `_crop_resize_flip`); the flip reverses the
  column taps. Max error 2e-7 against `resized_crop` (CPU and CUDA). The
  suggested one-op alternatives were measured and rejected: `grid_sample(align_corners=False)`
  with per-sample affine grids, and `roi_align(aligned=True, sampling_ratio=1)` (same sample
  points, clamped to the image rather than the box), are both off by up to 0.12 (of 1) at
  the borders of upscaled boxes. `grid_sample` with grids clamped to the box comes within
  3e-5 (its float32 normalized-coordinate round trip; not exact even for identity boxes) and
  is 2-3.5x faster than this stage on one CPU thread, about a quarter of the pipeline at 224 px.
* brightness, contrast, saturation: torchvision's `_blend`, clamp(f x + (1 - f) ref, 0, 1),
  with ref = 0, the image's mean luma (0.2989 R + 0.587 G + 0.114 B), or the pixel's luma.
* hue: torchvision's RGB -> HSV -> shift -> RGB in closed form, channel c =
  max - (max - min) clamp(min(k_c, 4 - k_c), 0, 1), k_c = (n_c + 6 h) mod 6, n = (5, 3, 1);
  a zero shift is skipped as the identity it is.
* At each of the four positions, one blend of the whole batch does each sample's brightness,
  contrast or saturation (exact weights of 0 and 1 pick its op: the bits of the op alone), then the
  hue shift runs on the samples whose op is there (a gather and scatter unless that is all of
  them). Which samples those are is decided on the host from a CPU copy of the parameters
  (`_Schedule`), and the weights and indices reach the device in one copy each per batch. On a
  GPU the host's kernel launches, not the arithmetic, bound this stage: its length is what counts.
* normalize as x (1 / std) - mean / std, one op that also transposes the image back; within
  1e-6 of torchvision's (x - mean) / std, which `eval_batch` keeps bit for bit.

Against the reference PIL path (`TrainTransform`), for the same parameters: PIL works in
uint8 (each op rounds; contrast uses an integer mean; hue goes through 8-bit HSV) and it
*antialiases* downscaled boxes (`resized_crop(antialias=True)`), where this path, like the
tensor reference, interpolates from the 2x2 nearest pixels. Measured on smooth random
images: geometry alone differs by 0.3/255 on average (max 1/255) when source and target
sizes match (boxes are then only upscaled, where PIL's bilinear equals this one), and by
1.2/255 (max 10/255) for sources twice the target size; the whole pipeline by ~1.6-1.9/255
(max ~25/255, PIL's 8-bit hue). Sources much larger than the target alias fine texture
here: resize them once to about the target size when PIL parity matters.

A batch shares one (height, width); `sample_params` also takes (B,) height/width tensors for
images padded into a common canvas (top-left): boxes stay inside each image's own extent, so
padding is never read.

On CPU the same arithmetic, op for op, runs compiled image by image (`dgbench.data.cpu_augment`);
the batched ops above serve accelerators, and the tests hold the two to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from dgbench.devices import to_device

# Colour-op codes in `AugmentParams.order`, as in `TrainTransform._color_jitter`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
GRAYSCALE = 4  # not a colour-jitter op: RandomGrayscale, after them (`_Schedule`)

CROP_SCALE = (0.7, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.3
FLIP_P = 0.5
GRAYSCALE_P = 0.1
CROP_TRIES = 10

# On CPU, `eval_batch` processes batches in chunks of about this many floats (4 MiB) per 3-channel tensor.
_CPU_CHUNK_FLOATS = 1 << 20

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


@dataclass
class AugmentParams:
    """Per-sample augmentation parameters of a batch of B images (every field has leading dim B).

    The crop box (`top`, `left`, `height`, `width`, int64) is in source pixels; `flip` and
    `grayscale` are bool; `order` is a (B, 4) int64 permutation of the colour-op codes
    (BRIGHTNESS, CONTRAST, SATURATION, HUE) applied first to last; `brightness`, `contrast`,
    `saturation` are float32 factors and `hue` a float32 shift in [-0.5, 0.5].
    """

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor
    flip: Tensor
    order: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    grayscale: Tensor

    def __len__(self) -> int:
        return int(self.top.shape[0])

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(**{f.name: to_device(getattr(self, f.name), device) for f in fields(self)})

    def __getitem__(self, index: slice | Tensor) -> AugmentParams:
        """The parameters of a subset of the samples (a slice, index tensor or boolean mask)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def cat(cls, parts: Sequence[AugmentParams]) -> AugmentParams:
        """The parameters of several batches, concatenated in order."""
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    @classmethod
    def identity(cls, batch: int, height: int, width: int) -> AugmentParams:
        """The full image, no flip, factors 1, hue 0, no grayscale: `augment_batch` then only resizes."""
        full = torch.zeros(batch, dtype=torch.long)
        ones = torch.ones(batch)
        no = torch.zeros(batch, dtype=torch.bool)
        return cls(
            top=full,
            left=full.clone(),
            height=torch.full((batch,), height, dtype=torch.long),
            width=torch.full((batch,), width, dtype=torch.long),
            flip=no,
            order=torch.arange(4).repeat(batch, 1),
            brightness=ones,
            contrast=ones.clone(),
            saturation=ones.clone(),
            hue=torch.zeros(batch),
            grayscale=no.clone(),
        )


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return torch.empty(shape).uniform_(low, high, generator=generator)


def sample_params(
    batch: int,
    height: int | Tensor,
    width: int | Tensor,
    generator: torch.Generator | None,
    *,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    jitter: float = JITTER,
    flip_p: float = FLIP_P,
    grayscale_p: float = GRAYSCALE_P,
) -> AugmentParams:
    """Draw DomainBed's augmentation parameters for `batch` images of `height` x `width` pixels.

    Vectorised over the batch; all draws come from `generator` (a CPU generator; None = the
    global RNG) and the result lives on the CPU (see `AugmentParams.to`). `height`/`width` may
    be (B,) tensors for per-sample image sizes.
    """
    H = torch.as_tensor(height, dtype=torch.float64, device="cpu").expand(batch)
    W = torch.as_tensor(width, dtype=torch.float64, device="cpu").expand(batch)
    if batch and bool((H < 1).any() or (W < 1).any()):
        raise ValueError("images must be at least 1x1 pixels")

    # RandomResizedCrop: CROP_TRIES candidates per sample, all at once. The draws are float32
    # like the reference's `torch.empty(1).uniform_`, the arithmetic float64 like its Python floats.
    area = (H * W)[:, None]
    target_area = area * _uniform((batch, CROP_TRIES), *scale, generator).double()
    aspect = torch.exp(
        _uniform((batch, CROP_TRIES), math.log(ratio[0]), math.log(ratio[1]), generator).double()
    )
    cand_w = torch.round(torch.sqrt(target_area * aspect))  # half-to-even, like Python's round
    cand_h = torch.round(torch.sqrt(target_area / aspect))
    valid = (cand_w > 0) & (cand_w <= W[:, None]) & (cand_h > 0) & (cand_h <= H[:, None])
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first valid try (0 if none)
    found = valid.any(dim=1)
    w = cand_w.gather(1, first).squeeze(1)
    h = cand_h.gather(1, first).squeeze(1)

    # Fallback for samples with no valid try: the largest central crop within the ratio bounds.
    in_ratio = W / H
    fb_w = torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W)
    fb_h = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    w, h = torch.where(found, w, fb_w), torch.where(found, h, fb_h)

    # Uniform integer positions in [0, H - h] and [0, W - w] (torch.randint's distribution).
    u_top = torch.rand(batch, dtype=torch.float64, generator=generator)
    u_left = torch.rand(batch, dtype=torch.float64, generator=generator)
    top = torch.minimum(torch.floor(u_top * (H - h + 1)), H - h)
    left = torch.minimum(torch.floor(u_left * (W - w + 1)), W - w)
    top = torch.where(found, top, torch.div(H - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(W - w, 2, rounding_mode="floor"))

    flip = torch.rand(batch, generator=generator) < flip_p
    # argsort of i.i.d. uniforms: each of the 24 permutations equally likely, like randperm(4).
    order = torch.rand(batch, 4, dtype=torch.float64, generator=generator).argsort(dim=1)
    brightness = _uniform((batch,), 1 - jitter, 1 + jitter, generator)
    contrast = _uniform((batch,), 1 - jitter, 1 + jitter, generator)
    saturation = _uniform((batch,), 1 - jitter, 1 + jitter, generator)
    hue = _uniform((batch,), -jitter, jitter, generator)
    grayscale = torch.rand(batch, generator=generator) < grayscale_p
    return AugmentParams(
        top=top.long(),
        left=left.long(),
        height=h.long(),
        width=w.long(),
        flip=flip,
        order=order,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
        grayscale=grayscale,
    )


def _channels_last(images: Tensor) -> bool:
    """Whether a (B, H, W, 3) or (B, 3, H, W) uint8 or floating batch is channels-last; fails otherwise."""
    if images.ndim != 4:
        raise ValueError(f"expected a (B, H, W, 3) or (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    last, first = images.shape[-1] == 3, images.shape[1] == 3
    if last and first:
        raise ValueError(f"ambiguous layout for shape {tuple(images.shape)}: both dim 1 and dim 3 are 3")
    if not (last or first):
        raise ValueError(f"expected 3 channels in dim 1 or dim 3, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating images, got {images.dtype}")
    return last


def _nchw(images: Tensor) -> Tensor:
    """A (B, 3, H, W) view of a (B, H, W, 3) or (B, 3, H, W) uint8 or floating batch."""
    return images.permute(0, 3, 1, 2) if _channels_last(images) else images


def _nhwc(images: Tensor) -> Tensor:
    """A contiguous (B, H, W, 3) uint8 or floating batch (a copy only for channels-first input)."""
    return images.contiguous() if _channels_last(images) else images.permute(0, 2, 3, 1).contiguous()


def _scalar(value: float, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.full((), value, dtype=dtype, device=like.device)  # a fill: no host-to-device copy


def _to_float(images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 -> contiguous float32 in [0, 1]; floating images are taken as [0, 1] already."""
    x = images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    # True division, as ToTensor does (CUDA turns division by a Python scalar into multiplication
    # by its reciprocal; a tensor divisor keeps it exact on every device).
    return x.div_(_scalar(255.0, x)) if images.dtype == torch.uint8 else x


def _chunk_size(batch: int, floats_per_sample: int, device: torch.device) -> int:
    """Samples per chunk: the whole batch on accelerators; on CPU, chunks of about _CPU_CHUNK_FLOATS floats.

    glibc serves large allocations with fresh mmap'd pages, so on CPU every out-of-place op on
    a whole 224 px batch pays a page fault per 4 KiB (measured: 7x slower than the same op on
    chunks of a few MB, whose memory the allocator recycles). The ops are per-sample, so
    chunking changes no value.
    """
    if device.type != "cpu":
        return max(batch, 1)
    return max(1, min(batch, _CPU_CHUNK_FLOATS // floats_per_sample))


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = to_device(torch.tensor(mean, dtype=x.dtype), x.device).view(1, -1, 1, 1)
    s = to_device(torch.tensor(std, dtype=x.dtype), x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _source_coords(start: Tensor, length: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps (i0, i1, weight of i1), each (B, size), for resizing [start, start + length) to `size`.

    PyTorch's `interpolate(mode="bilinear", align_corners=False)` coordinates, rounded as its
    CPU kernel rounds them (float32 scale = length / size, the product in double, the source
    coordinate in float32): src = scale * (i + 0.5) - 0.5, clamped below at 0; the upper tap
    is clamped to the box's last pixel. Indices are then offset by `start` into the image.
    """
    scale = (length.to(torch.float32) / _scalar(size, length, torch.float32)).double()[:, None]
    dst = torch.arange(size, device=length.device, dtype=torch.float64).add_(0.5)
    src = (scale * dst).sub_(0.5).float().clamp_(min=0)
    i0 = src.floor()
    lam = (src - i0).clamp_(0, 1)
    i0 = i0.long()
    last = (length - 1)[:, None]
    i1 = torch.minimum(i0 + 1, last)
    i0 = torch.minimum(i0, last)
    return i0 + start[:, None], i1 + start[:, None], lam


def _lerp_rows(rows: Tensor, index0: Tensor, index1: Tensor, weight: Tensor) -> Tensor:
    """rows[index0] + weight * (rows[index1] - rows[index0]), as float: whole-row copies, then one lerp."""
    out = rows.index_select(0, index0).float()
    return out.lerp_(rows.index_select(0, index1).float(), weight[:, None])


def _crop_resize_flip(src: Tensor, plan: _Plan, resolution: int) -> Tensor:
    """The box of each image of src (B, H, W, 3) resized to R x R (bilinear), flipped if asked.

    Returns float (N, 3, R, R) in [0, 1], *transposed*: dim 2 is the output column and dim 3
    the output row. Separable, with the taps of `_source_coords`: the image rows first, as
    whole-row copies of the channels-last source and a lerp; then one transposing copy to
    planar column-major, where the columns are whole rows again (copies + lerp). Row copies
    are an order of magnitude faster on CPU than gathers along an inner dimension, and the
    colour ops that follow do not care which way round the image is (the normalisation in
    `_augment_tensors` transposes it back).
    """
    b, height, width, _ = src.shape
    r = resolution
    y0, y1, ly = plan.rows
    image_rows = (torch.arange(b, device=src.device) * height)[:, None]
    y0, y1 = ((image_rows + t).flatten() for t in (y0, y1))
    rows = _lerp_rows(src.reshape(-1, width * 3), y0, y1, ly.flatten())
    columns = torch.empty(b, 3, width, r, device=src.device)
    to_unit = 1 / 255 if src.dtype == torch.uint8 else 1.0
    torch.mul(rows.view(b, r, width, 3).permute(0, 3, 2, 1), to_unit, out=columns)
    x0, x1, lx = plan.columns
    plane_rows = (torch.arange(b * 3, device=src.device) * width).view(b, 3, 1)
    x0, x1 = ((plane_rows + t[:, None, :]).flatten() for t in (x0, x1))
    weight = lx[:, None, :].expand(b, 3, r).flatten()
    return _lerp_rows(columns.view(b * 3 * width, r), x0, x1, weight).view(b, 3, r, r)


def _luma(x: Tensor) -> Tensor:
    """(B, 1, H, W) luminance, in torchvision's rgb_to_grayscale order of operations."""
    r, g, b = x.unbind(dim=1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _select(is_b: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a where is_b is 0, b where it is 1 (exactly: products by 0 and 1 are exact), in a's memory."""
    return a.mul_(1 - is_b).add_(b.mul_(is_b))


_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)  # n_c of `_shift_hue`, for (R, G, B)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision's adjust_hue (RGB -> HSV, hue += shift mod 1, HSV -> RGB) of (N, 3, H, W) in [0, 1].

    Closed form: with h6 the hue in sixths of a turn, channel c is
    max - (max - min) * clamp(min(k_c, 4 - k_c), 0, 1), k_c = (n_c + h6) mod 6, n = (5, 3, 1)
    for (R, G, B); this is torchvision's sector table of v, p, q, t with v * s = max - min.
    `shift` broadcasts against (N, 1, 1, 1). Comparisons and `where` are avoided: on CPU they
    cost 10-40x an arithmetic op per element.
    """
    maxc = x.amax(dim=1, keepdim=True)
    delta = maxc - x.amin(dim=1, keepdim=True)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    # Hue (times 6 * delta) from the first channel holding the maximum, as torchvision's masks:
    # G - B for R, B - R + 2 delta for G, R - G + 4 delta for B (a tie gives the same hue either
    # way). sign(max - c) is 0 where channel c holds the maximum and 1 elsewhere.
    g_or_b = _select((maxc - g).sign_(), (b - r).add_(delta, alpha=2), (r - g).add_(delta, alpha=4))
    h6 = _select((maxc - r).sign_(), g - b, g_or_b)
    # Where delta = 0 the numerator is 0 too (hue 0, as torchvision); any positive divisor works.
    h6.div_(delta.clamp(min=1e-30)).add_(shift * 6)
    k = h6 + to_device(_HUE_OFFSETS, x.device)
    # k mod 6 as k - 6 floor(k / 6): the ramp below is continuous and 6-periodic, so a
    # rounding step at a multiple of 6 changes nothing (remainder() is ~10x slower on CPU).
    k.sub_(k.mul(1 / 6).floor_(), alpha=6)
    ramp = torch.minimum(k, torch.rsub(k, 4)).clamp_(0, 1)
    return torch.addcmul(maxc, ramp, delta, value=-1).clamp_(0, 1)


@dataclass
class _Plan:
    """What `augment_batch` needs per sample, on the batch's device, computed once per batch.

    `rows` and `columns` are the bilinear taps (i0, i1, weight), each (N, R), of
    `_source_coords` for each box; a flip is folded in as reversed column taps. `factors` is
    (N, 4): brightness, contrast, saturation factors and hue shift, by op code.
    """

    rows: tuple[Tensor, Tensor, Tensor]
    columns: tuple[Tensor, Tensor, Tensor]
    factors: Tensor

    @classmethod
    def of(cls, params: AugmentParams, resolution: int) -> _Plan:
        columns = _source_coords(params.left, params.width, resolution)
        flip = params.flip[:, None]
        return cls(
            rows=_source_coords(params.top, params.height, resolution),
            columns=tuple(torch.where(flip, t.flip(1), t) for t in columns),  # type: ignore[arg-type]
            factors=torch.stack([params.brightness, params.contrast, params.saturation, params.hue], dim=1),
        )


def _grayscale(x: Tensor, _: Tensor | None) -> Tensor:
    return x.copy_(_luma(x).expand_as(x))


@dataclass
class _Schedule:
    """The colour ops position by position, then grayscale, as few kernel sequences as exactness allows.

    At each of the four positions, brightness, contrast and saturation are one blend of the whole
    batch, x f + L (1 - f) s + M (1 - f) c clamped to [0, 1], where L is the pixel's luma, M the
    image's mean luma, and per sample (f, s, c) is (brightness, 0, 0), (contrast, 0, 1),
    (saturation, 1, 0), or (1, 0, 0) for a sample whose op there is the hue shift. With s, c in
    {0, 1} and f = 1 every extra term is an exact 0 or an exact product by 1, so each sample gets
    the bits of its own op alone, clamp(f x + (1 - f) ref, 0, 1) with 1 - f in float32. The hue
    shift then runs on its samples alone (a gather and scatter unless that is all of them), as
    does grayscale at the end. On a GPU every op of this sequence costs the host a kernel launch
    whatever the batch: 7-10 per blend instead of up to three gathered groups of 2-10.

    Decided on the host from the parameters as `sample_params` returns them, on the CPU (no device
    sync): `blend` holds each position's (f, (1 - f) s, (1 - f) c) as (4, 3, N) (None where no sample
    blends), `hue` and `grayscale` the rows of `index` holding their samples (None for all,
    an empty slice for none); `blend` and `index` reach the device in one copy each.
    A zero hue shift is skipped: it is the identity, and the HSV round trip would only add rounding.
    """

    blend: Tensor | None
    blended: list[tuple[bool, bool]]  # per position: any sample blending there, any taking contrast
    hue: list[slice | None]
    grayscale: slice | None
    index: Tensor | None

    @classmethod
    def of(cls, params: AugmentParams, device: torch.device) -> _Schedule:
        order = params.order
        factors = torch.stack([params.brightness, params.contrast, params.saturation], dim=1)  # by op code
        is_hue = order == HUE
        f = torch.where(is_hue, 1.0, factors.gather(1, order.clamp(max=SATURATION)))  # (N, 4) by position
        rest = 1 - f  # float32, as torchvision's (1 - ratio)
        weights = (f, torch.where(order == SATURATION, rest, 0.0), torch.where(order == CONTRAST, rest, 0.0))
        blend = torch.stack(weights, dim=1).permute(2, 1, 0).contiguous()  # (4 positions, 3, N)
        blended = [(bool((~is_hue[:, k]).any()), bool((order[:, k] == CONTRAST).any())) for k in range(4)]
        flat: list[int] = []

        def rows(samples: list[int]) -> slice | None:
            if len(samples) == len(order):
                return None
            flat.extend(samples)
            return slice(len(flat) - len(samples), len(flat))

        shifted = (params.hue != 0)[:, None] & is_hue
        hue = [rows(torch.nonzero(shifted[:, k]).flatten().tolist()) for k in range(4)]
        grayscale = rows(torch.nonzero(params.grayscale).flatten().tolist())
        index = to_device(torch.tensor(flat, dtype=torch.long), device) if flat else None
        use = any(any_blend for any_blend, _ in blended)
        return cls(to_device(blend, device) if use else None, blended, hue, grayscale, index)


def _blend_all(x: Tensor, weights: Tensor, contrast: bool) -> Tensor:
    """One position's brightness/contrast/saturation blend of every sample (see `_Schedule`), in place."""
    f, saturation, contrast_weight = (w.view(-1, 1, 1, 1) for w in weights)
    luma = _luma(x)
    x.mul_(f).add_(luma * saturation)
    if contrast:
        x.add_(luma.mean(dim=(1, 2, 3), keepdim=True).mul_(contrast_weight))
    return x.clamp_(0, 1)


def _on_rows(
    x: Tensor,
    rows: slice | None,
    index: Tensor | None,
    op: Callable[[Tensor, Tensor | None], Tensor],
    factor: Tensor | None,
) -> Tensor:
    """op on the samples at `index[rows]` (all for None, none for an empty slice), written back in place."""
    if rows is None:
        return op(x, factor)
    if rows.start == rows.stop:
        return x
    picked = index[rows]  # type: ignore[index]
    x.index_copy_(0, picked, op(x.index_select(0, picked), None if factor is None else factor[picked]))
    return x


def _colour(x: Tensor, factors: Tensor, schedule: _Schedule) -> Tensor:
    """The schedule's ops on x (N, 3, H, W); `factors` (N, 4) by op code (see `_Plan`)."""
    shift = factors[:, HUE].view(-1, 1, 1, 1)
    for k, (any_blend, any_contrast) in enumerate(schedule.blended):
        if any_blend:
            x = _blend_all(x, schedule.blend[k], any_contrast)  # type: ignore[index]
        x = _on_rows(x, schedule.hue[k], schedule.index, _shift_hue, shift)
    return _on_rows(x, schedule.grayscale, schedule.index, _grayscale, None)


def _normalization(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[Tensor, ...]:
    """(scale, offset), each (1, 3, 1, 1): (x - mean) / std as x * scale + offset (within 1 ulp)."""
    inv_std = 1 / torch.as_tensor(std, dtype=torch.float64)
    offset = -torch.as_tensor(mean, dtype=torch.float64) * inv_std
    return tuple(to_device(t.float(), device).view(1, 3, 1, 1) for t in (inv_std, offset))


def augment_batch(
    images: Tensor,
    params: AugmentParams,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """Augment a uint8 (B, H, W, 3) or (B, 3, H, W) batch: float32 (B, 3, resolution, resolution), normalized.

    Crop + bilinear resize of each sample's box, horizontal flip, the four colour ops in each
    sample's order (clamped to [0, 1] after each), grayscale, then (x - mean) / std. Runs on
    `images.device`; `params` are moved there. Floating inputs are taken as [0, 1] images.

    On an accelerator the whole batch goes through one kernel sequence (`_augment_tensors`). On
    CPU the same arithmetic runs image by image, row by row, compiled (`dgbench.data.cpu_augment`):
    as tensor ops every op would be a pass over memory (measured by `tools/bench_batch_augment.py`).
    """
    src = _nhwc(images)
    if len(params) != src.shape[0]:
        raise ValueError(f"{len(params)} parameter sets for a batch of {src.shape[0]} images")
    if src.device.type != "cpu":
        return _augment_tensors(src, params, resolution, mean, std)
    from dgbench.data.cpu_augment import augment_on_cpu  # numba: imported only where it runs

    plan = _Plan.of(params, resolution)
    scale, offset = (t.flatten().numpy() for t in _normalization(mean, std, src.device))
    out = torch.empty(src.shape[0], 3, resolution, resolution)
    arrays = (src if src.dtype == torch.uint8 else src.float()).numpy()
    augment_on_cpu(
        arrays,
        tuple(t.numpy() for t in plan.rows),  # type: ignore[arg-type]
        tuple(t.numpy() for t in plan.columns),  # type: ignore[arg-type]
        plan.factors.numpy(),
        params.order.numpy(),
        params.grayscale.numpy(),
        scale,
        offset,
        out.numpy(),
    )
    return out


def _augment_tensors(
    src: Tensor, params: AugmentParams, resolution: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """`augment_batch` as one sequence of batched tensor ops on src (B, H, W, 3), on its device."""
    plan = _Plan.of(params.to(src.device), resolution)
    x = _crop_resize_flip(src, plan, resolution)
    x = _colour(x, plan.factors, _Schedule.of(params, src.device))
    scale, offset = _normalization(mean, std, src.device)
    out = torch.empty(src.shape[0], 3, resolution, resolution, device=src.device)
    return torch.addcmul(offset, x.transpose(2, 3), scale, out=out)  # x^T transposes the image back


def eval_batch(images: Tensor, resolution: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """`EvalTransform` for a batch: resize to resolution x resolution, then normalize.

    Bilinear with antialiasing (PyTorch's, which follows PIL's filter); a no-op at the target
    size, where the output equals `EvalTransform`'s bit for bit.
    """
    src = _nchw(images)
    batch, _, height, width = src.shape
    out = torch.empty(batch, 3, resolution, resolution, device=src.device)
    step = _chunk_size(batch, 3 * max(height * width, resolution * resolution), src.device)
    for s in range(0, batch, step):
        x = _to_float(src[s : s + step])
        if (height, width) != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True).clamp_(0, 1)
        out[s : s + step] = x
    return _normalize(out, mean, std)
