"""Batched augmentation: equal to torchvision's tensor ops per sample, with the reference distributions.

Tolerances (float32 rounding, measured max |diff| in brackets): crop + resize + flip 1e-6 on
[0, 1] values (2e-7); each colour op and their random-order composition 1e-5 on [0, 1] values
(2e-6, mostly the HSV round trip of adjust_hue); the whole pipeline after ImageNet
normalization 5e-5 (8e-6). Both implementations are held to them: the compiled one that runs
on CPU (`augment_batch`) and the batched tensor ops that run on accelerators (`_augment_tensors`,
here on CPU); and they agree with each other to within 1e-5 after normalization (6e-6,
`test_compiled_equals_tensor_ops`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import dgbench.data.batch_augment as ba
import dgbench.data.cpu_augment as cpu_augment
from dgbench.data.batch_augment import AugmentParams, augment_batch, eval_batch, sample_params
from dgbench.data.transforms import EvalTransform, resized_crop_box

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # no normalization: outputs are the [0, 1] images
CROP_TOL, COLOUR_TOL, PIPELINE_TOL = 1e-6, 1e-5, 5e-5

# Pixels that exercise the corner cases of the colour kernels: black, white, grey (no hue),
# primaries and secondaries (max ties between channels), a near-grey and a saturated tint.
SPECIAL = torch.tensor(
    [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
     [0, 255, 255], [255, 0, 255], [10, 200, 200], [200, 10, 200], [121, 120, 120], [250, 251, 251],
     [1, 0, 0], [90, 90, 30], [30, 90, 90]],
    dtype=torch.uint8,
)  # fmt: skip


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 (B, H, W, 3) images whose first pixels are the SPECIAL colours."""
    images = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8, generator=_gen(seed))
    flat = images.view(batch, height * width, 3)
    n = min(len(SPECIAL), height * width)
    flat[:, :n] = SPECIAL[:n]
    return images


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(
    images: torch.Tensor, params: AugmentParams, resolution: int, mean=MEAN, std=STD
) -> torch.Tensor:
    """torchvision.transforms.v2.functional's tensor ops, one sample at a time."""
    out = []
    for i in range(len(params)):
        x = images[i].permute(2, 0, 1).float() / 255
        box = [int(params.top[i]), int(params.left[i]), int(params.height[i]), int(params.width[i])]
        x = TF.resized_crop(x, *box, size=[resolution, resolution], antialias=False)
        if params.flip[i]:
            x = TF.horizontal_flip(x)
        for op in params.order[i].tolist():
            if op == ba.BRIGHTNESS:
                x = TF.adjust_brightness(x, float(params.brightness[i]))
            elif op == ba.CONTRAST:
                x = TF.adjust_contrast(x, float(params.contrast[i]))
            elif op == ba.SATURATION:
                x = TF.adjust_saturation(x, float(params.saturation[i]))
            elif float(params.hue[i]) != 0:  # a zero shift is the identity (we skip its HSV round trip)
                x = TF.adjust_hue(x, float(params.hue[i]))
        if params.grayscale[i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        out.append(TF.normalize(x, list(mean), list(std)))
    return torch.stack(out)


def _geometry_only(params: AugmentParams) -> AugmentParams:
    ident = AugmentParams.identity(len(params), 1, 1)
    for name in ("top", "left", "height", "width", "flip"):
        setattr(ident, name, getattr(params, name))
    return ident


def _tensor_ops(images: torch.Tensor, params: AugmentParams, resolution: int, mean, std) -> torch.Tensor:
    return ba._augment_tensors(ba._nhwc(images), params, resolution, mean, std)


Augment = Callable[..., torch.Tensor]


@pytest.fixture(params=["compiled", "tensor-ops"])
def augment(request: pytest.FixtureRequest) -> Augment:
    """Each implementation, with `augment_batch`'s signature."""
    return augment_batch if request.param == "compiled" else _tensor_ops


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# -- 1. equivalence with torchvision's tensor ops -------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "resolution"),
    [(32, 32, 32), (48, 40, 32), (20, 26, 32), (7, 9, 16), (227, 227, 224)],
    ids=["same", "down", "up", "tiny-up", "pacs"],
)
def test_crop_resize_flip_equals_resized_crop(
    height: int, width: int, resolution: int, augment: Augment
) -> None:
    batch = 12 if height > 100 else 48
    images = _images(batch, height, width)
    params = _geometry_only(sample_params(batch, height, width, _gen(1)))
    params.flip[: batch // 2] = torch.tensor([True, False]).repeat(batch // 4)  # both flips for sure
    got = augment(images, params, resolution, *RAW)
    assert _max_diff(got, _reference(images, params, resolution, *RAW)) <= CROP_TOL


def test_crop_edges_replicate_the_box_not_the_neighbouring_pixels(augment: Augment) -> None:
    """An upscaled box's border comes from the box alone (torchvision crops, then resizes)."""
    images = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    images[0, :, :2] = 255  # bright columns just left of the box
    params = AugmentParams.identity(1, 8, 8)
    params.left, params.width = torch.tensor([2]), torch.tensor([4])
    got = augment(images, params, 16, *RAW)
    assert float(got.max()) == 0.0
    assert _max_diff(got, _reference(images, params, 16, *RAW)) == 0.0


def test_a_sample_gets_the_same_bits_in_a_mixed_batch_as_alone() -> None:
    """The tensor path's batched colour ops (one blend per position for brightness, contrast and
    saturation; hue and grayscale on their samples) leave each sample's arithmetic its own."""
    batch, size = 48, 12
    images = _images(batch, size, size, seed=6)
    params = sample_params(batch, size, size, _gen(7))
    params.hue[:6] = 0  # skipped shifts, mixed with applied ones
    params.grayscale[6:12] = True
    together = _tensor_ops(images, params, size, MEAN, STD)
    for i in range(batch):
        alone = _tensor_ops(images[i : i + 1], params[i : i + 1], size, MEAN, STD)
        assert torch.equal(together[i : i + 1], alone), i


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_each_colour_op_equals_torchvision(op: str, augment: Augment) -> None:
    batch, size = 64, 24
    images = _images(batch, size, size, seed=2)
    params = AugmentParams.identity(batch, size, size)
    g = _gen(3)
    if op == "hue":
        values = torch.empty(batch).uniform_(-0.5, 0.5, generator=g)
        values[:4] = torch.tensor([-0.5, 0.5, 0.0, 1 / 6])
    else:
        values = torch.empty(batch).uniform_(0.0, 2.0, generator=g)  # wider than 0.7..1.3: clamping
        values[:4] = torch.tensor([0.0, 0.7, 1.3, 2.0])
    setattr(params, op, values)
    # Move the op through all four positions (the other three are identities).
    code = ("brightness", "contrast", "saturation", "hue").index(op)
    params.order = torch.stack([torch.randperm(4, generator=g) for _ in range(batch)])
    got = augment(images, params, size, *RAW)
    assert _max_diff(got, _reference(images, params, size, *RAW)) <= COLOUR_TOL
    assert set((params.order == code).nonzero()[:, 1].tolist()) == {0, 1, 2, 3}


def test_colour_ops_in_random_order_and_grayscale_equal_torchvision(augment: Augment) -> None:
    batch, size = 96, 20
    images = _images(batch, size, size, seed=4)
    drawn = sample_params(batch, size, size, _gen(5))
    params = AugmentParams.identity(batch, size, size)
    for name in ("order", "brightness", "contrast", "saturation", "hue", "grayscale"):
        setattr(params, name, getattr(drawn, name))
    params.grayscale[:8] = True
    got = augment(images, params, size, *RAW)
    want = _reference(images, params, size, *RAW)
    assert _max_diff(got, want) <= COLOUR_TOL
    # The order matters (so the test above can fail): a fixed order is visibly different.
    params.order = torch.arange(4).repeat(batch, 1)
    assert _max_diff(augment(images, params, size, *RAW), want) > 0.05


@pytest.mark.parametrize(("height", "width", "resolution"), [(32, 32, 32), (40, 30, 32), (64, 64, 48)])
def test_whole_pipeline_equals_torchvision_per_sample(
    height: int, width: int, resolution: int, augment: Augment
) -> None:
    batch = 64
    images = _images(batch, height, width, seed=6)
    params = sample_params(batch, height, width, _gen(7))
    got = augment(images, params, resolution, MEAN, STD)
    assert got.shape == (batch, 3, resolution, resolution) and got.dtype == torch.float32
    assert _max_diff(got, _reference(images, params, resolution)) <= PIPELINE_TOL


def test_layouts_and_float_input_agree(augment: Augment) -> None:
    images = _images(16, 24, 20)
    params = sample_params(16, 24, 20, _gen(8))
    hwc = augment(images, params, 16, MEAN, STD)
    assert torch.equal(augment(images.permute(0, 3, 1, 2), params, 16, MEAN, STD), hwc)
    as_float = images.permute(0, 3, 1, 2).float() / 255
    # uint8 rows are scaled to [0, 1] after the row interpolation, float ones before: rounding only.
    assert _max_diff(augment(as_float, params, 16, MEAN, STD), hwc) <= 1e-5


def test_compiled_equals_tensor_ops() -> None:
    """The CPU and accelerator implementations agree on PACS-sized batches, every colour order included."""
    images = _images(48, 227, 227, seed=9)
    params = sample_params(48, 227, 227, _gen(10))
    params.hue[:4] = 0  # skipped by both
    params.grayscale[::5] = True
    assert len({tuple(o) for o in params.order.tolist()}) > 15
    assert (
        _max_diff(augment_batch(images, params, 224, MEAN, STD), _tensor_ops(images, params, 224, MEAN, STD))
        <= 1e-5
    )


def test_compiled_result_does_not_depend_on_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Images are split among the cores in chunks; the split changes no value."""
    images = _images(40, 32, 32, seed=9)
    params = sample_params(40, 32, 32, _gen(10))
    results = []
    for cores in (1, 3, 16):
        monkeypatch.setattr(cpu_augment, "available_cores", lambda cores=cores: cores)
        results.append(augment_batch(images, params, 32, MEAN, STD))
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_eval_batch_cpu_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    images = _images(40, 40, 40, seed=9)
    whole = eval_batch(images, 32, MEAN, STD)
    monkeypatch.setattr(ba, "_CPU_CHUNK_FLOATS", 3 * 40 * 40 * 3)  # chunks of 3 samples
    assert ba._chunk_size(40, 3 * 40 * 40, torch.device("cpu")) == 3
    assert torch.equal(eval_batch(images, 32, MEAN, STD), whole)


def test_padded_images_with_per_sample_sizes(augment: Augment) -> None:
    """(B,) sizes: boxes stay inside each image, and the padded canvas gives the unpadded result."""
    sizes = [(20, 30), (32, 32), (25, 17), (32, 9)]
    canvas = torch.full((len(sizes), 32, 32, 3), 255, dtype=torch.uint8)
    images = [_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    for i, img in enumerate(images):
        canvas[i, : img.shape[0], : img.shape[1]] = img
    heights, widths = torch.tensor([h for h, _ in sizes]), torch.tensor([w for _, w in sizes])
    for seed in range(20):
        params = sample_params(len(sizes), heights, widths, _gen(seed))
        assert bool(
            (params.top + params.height <= heights).all() and (params.left + params.width <= widths).all()
        )
        assert bool((params.top >= 0).all() and (params.left >= 0).all())
    got = augment(canvas, params, 16, MEAN, STD)
    for i, img in enumerate(images):
        alone = augment(img[None], params[i : i + 1], 16, MEAN, STD)
        assert _max_diff(got[i : i + 1], alone) <= 1e-6


def test_bad_inputs_are_rejected() -> None:
    params = sample_params(2, 8, 8, _gen(0))
    with pytest.raises(ValueError, match="ambiguous"):
        augment_batch(torch.zeros(2, 3, 8, 3, dtype=torch.uint8), params, 8, MEAN, STD)
    with pytest.raises(ValueError, match="3 channels"):
        augment_batch(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), params, 8, MEAN, STD)
    with pytest.raises(ValueError, match="parameter sets"):
        augment_batch(torch.zeros(3, 8, 8, 3, dtype=torch.uint8), params, 8, MEAN, STD)
    with pytest.raises(TypeError):
        augment_batch(torch.zeros(2, 8, 8, 3, dtype=torch.int32), params, 8, MEAN, STD)


# -- 2. identity parameters == eval path == reference EvalTransform --------------------------------


def test_identity_params_equal_eval_batch_and_eval_transform(augment: Augment) -> None:
    batch, size = 16, 32
    images = _images(batch, size, size, seed=11)
    augmented = augment(images, AugmentParams.identity(batch, size, size), size, MEAN, STD)
    evaluated = eval_batch(images, size, MEAN, STD)
    reference = torch.stack([EvalTransform(size, MEAN, STD)(Image.fromarray(a.numpy())) for a in images])
    assert _max_diff(augmented, evaluated) <= 1e-6  # normalization as x * (1 / std) - mean / std
    assert torch.equal(evaluated, reference)


@pytest.mark.parametrize("size", [64, 50, 20])
def test_eval_batch_resize_is_close_to_pil(size: int) -> None:
    """PIL resizes in uint8: within about one grey level of PyTorch's antialiased bilinear."""
    images = _images(8, size, size, seed=12)
    got = eval_batch(images, 32, *RAW)
    want = torch.stack([EvalTransform(32, *RAW)(Image.fromarray(a.numpy())) for a in images])
    diff = (got - want).abs()
    assert float(diff.max()) <= 1.5 / 255 and float(diff.mean()) <= 0.5 / 255


# -- 3. distributions ------------------------------------------------------------------------------

N = 20_000
N_REF = 4_000


def _crop_stats_analytic(scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), tries=10) -> tuple[float, float]:
    """Mean area fraction and mean |log aspect| of torchvision's sampler on a large square image.

    A candidate (s, L) is valid iff s <= exp(-|L|) (both sides fit); the first valid of ten
    is kept, else the full image. Rounding is negligible at 1000 px.
    """
    log_r = np.linspace(math.log(ratio[0]), math.log(ratio[1]), 400_001)
    limit = np.minimum(1.0, np.exp(-np.abs(log_r)))
    width = scale[1] - scale[0]
    p_valid = np.clip((limit - scale[0]) / width, 0, None)  # P(valid | L)
    area = np.clip((limit**2 - scale[0] ** 2) / (2 * width), 0, None)  # E[s; valid | L]
    p = p_valid.mean()
    fallback = (1 - p) ** tries
    mean_area = (1 - fallback) * area.mean() / p + fallback
    mean_abs_log = (1 - fallback) * (np.abs(log_r) * p_valid).mean() / p
    return float(mean_area), float(mean_abs_log)


def _boxes(params: AugmentParams) -> np.ndarray:
    return torch.stack([params.top, params.left, params.height, params.width], 1).numpy().astype(float)


def _reference_boxes(n: int, height: int, width: int, seed: int) -> np.ndarray:
    g = _gen(seed)
    return np.array([resized_crop_box(width, height, (0.7, 1.0), (3 / 4, 4 / 3), g) for _ in range(n)], float)


def _ks_uniform(values: torch.Tensor, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the sample and U(low, high)."""
    x = np.sort((values.double().numpy() - low) / (high - low))
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - x).max(), (x - np.arange(n) / n).max()))


KS_CRIT = 1.95 / math.sqrt(N)  # alpha = 0.001


def test_crop_area_and_aspect_on_a_large_square_image() -> None:
    params = sample_params(N, 1000, 1000, _gen(20))
    area = (params.height * params.width).double() / 1e6
    aspect = params.width.double() / params.height.double()
    assert 0.7 - 2e-3 <= float(area.min()) and float(area.max()) <= 1.0
    assert 0.75 - 2e-3 <= float(aspect.min()) and float(aspect.max()) <= 4 / 3 + 2e-3
    assert abs(float(aspect.median()) - 1.0) <= 0.01
    # Rejection makes the kept area mean 0.80 (not 0.85) and favours ratios near 1.
    mean_area, mean_abs_log = _crop_stats_analytic()
    assert abs(float(area.mean()) - mean_area) <= 0.003  # SE ~0.0005
    assert abs(float(aspect.log().abs().mean()) - mean_abs_log) <= 0.003  # SE ~0.0005
    assert abs(float(aspect.log().mean())) <= 0.004  # symmetric
    ref = _reference_boxes(N_REF, 1000, 1000, seed=21)
    ref_area = ref[:, 2] * ref[:, 3] / 1e6
    assert abs(ref_area.mean() - mean_area) <= 0.005  # the reference sampler agrees
    assert abs(np.abs(np.log(ref[:, 3] / ref[:, 2])).mean() - mean_abs_log) <= 0.005


@pytest.mark.parametrize(("height", "width"), [(32, 32), (100, 160), (100, 150), (140, 100)])
def test_crop_boxes_match_the_reference_sampler(height: int, width: int) -> None:
    """Same means of (top, left, h, w) and the same fallback rate as `resized_crop_box`."""
    ours = _boxes(sample_params(N, height, width, _gen(30)))
    ref = _reference_boxes(N_REF, height, width, seed=31)
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    se = np.sqrt(ours.var(0) / len(ours) + ref.var(0) / len(ref))
    assert (np.abs(ours.mean(0) - ref.mean(0)) <= 5 * se + 1e-9).all(), (ours.mean(0), ref.mean(0), se)
    full_height = (ours[:, 2] == height).mean(), (ref[:, 2] == height).mean()
    assert abs(full_height[0] - full_height[1]) <= 5 * math.sqrt(0.25 / N_REF)


def test_crop_fallback_is_the_central_crop() -> None:
    """An image too wide for any candidate always falls back to torchvision's central crop."""
    params = sample_params(64, 100, 400, _gen(32))
    assert bool((params.height == 100).all() and (params.width == 133).all())
    assert bool((params.top == 0).all() and (params.left == (400 - 133) // 2).all())
    tall = sample_params(64, 400, 100, _gen(33))
    assert bool((tall.width == 100).all() and (tall.height == 133).all() and (tall.top == 133).all())
    assert resized_crop_box(400, 100, (0.7, 1.0), (3 / 4, 4 / 3), _gen(0)) == (0, 133, 100, 133)


def test_crop_position_is_uniform_over_valid_offsets() -> None:
    params = sample_params(N, 32, 32, _gen(34))
    free = (32 - params.height).double()
    movable = free > 0
    frac = (params.top.double()[movable] + 0.5) / (free[movable] + 1)  # uniform on (0, 1) in the limit
    assert abs(float(frac.mean()) - 0.5) <= 0.01
    assert bool((params.top == 0).any() and (params.top == 32 - params.height).any())
    for side in (params.top, params.left):
        assert bool((side >= 0).all())


def test_flip_grayscale_factors_hue_and_order_distributions() -> None:
    params = sample_params(N, 64, 64, _gen(40))
    assert abs(float(params.flip.double().mean()) - 0.5) <= 0.015  # SE 0.0035
    assert abs(float(params.grayscale.double().mean()) - 0.1) <= 0.01  # SE 0.0021
    for name in ("brightness", "contrast", "saturation"):
        values = getattr(params, name)
        assert 0.7 <= float(values.min()) and float(values.max()) <= 1.3
        assert abs(float(values.mean()) - 1.0) <= 0.006  # SE 0.0012
        assert _ks_uniform(values, 0.7, 1.3) <= KS_CRIT
    assert -0.3 <= float(params.hue.min()) and float(params.hue.max()) <= 0.3
    assert abs(float(params.hue.mean())) <= 0.006
    assert _ks_uniform(params.hue, -0.3, 0.3) <= KS_CRIT
    # Independent factors (a shared draw would show up as correlation).
    corr = np.corrcoef(
        torch.stack([params.brightness, params.contrast, params.saturation, params.hue]).numpy()
    )
    assert np.abs(corr - np.eye(4)).max() <= 0.03
    # Orders: permutations of 0..3, each of the 24 with rate 1/24 (chi-square, 23 dof, alpha 0.001).
    assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(N, 4))
    codes = (params.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[torch.unique(codes)].double()
    assert len(counts) == 24
    chi2 = float(((counts - N / 24) ** 2 / (N / 24)).sum())
    assert chi2 <= 49.7


# -- 4. determinism and ranges ---------------------------------------------------------------------


def test_same_seed_same_params_and_output_other_seed_differs() -> None:
    images = _images(32, 32, 32, seed=50)
    a, b, c = (sample_params(32, 32, 32, _gen(s)) for s in (7, 7, 8))
    for name in AugmentParams.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.top * 1000 + a.left, c.top * 1000 + c.left)
    assert not torch.equal(a.brightness, c.brightness)
    out_a, out_b, out_c = (augment_batch(images, p, 32, MEAN, STD) for p in (a, b, c))
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, out_c)


def test_outputs_finite_and_in_range_before_normalization(augment: Augment) -> None:
    images = _images(64, 40, 40, seed=51)
    params = sample_params(64, 40, 40, _gen(52))
    raw = augment(images, params, 32, *RAW)
    assert bool(torch.isfinite(raw).all()) and float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0
    normalized = augment(images, params, 32, MEAN, STD)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert _max_diff(normalized, (raw - mean) / std) <= 1e-6
    # Grayscale samples have three equal channels.
    grey = raw[params.grayscale]
    assert len(grey) and torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_params_move_and_slice() -> None:
    params = sample_params(10, 16, 16, _gen(60))
    assert len(params) == 10 and len(params[2:5]) == 3 and len(params[params.flip]) == int(params.flip.sum())
    moved = params.to("cpu")
    assert all(torch.equal(getattr(moved, n), getattr(params, n)) for n in AugmentParams.__dataclass_fields__)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    for size, resolution in ((32, 32), (227, 224)):
        images = _images(24, size, size, seed=70)
        params = sample_params(24, size, size, _gen(71))
        cpu = augment_batch(images, params, resolution, MEAN, STD)
        cuda = augment_batch(images.cuda(), params, resolution, MEAN, STD)
        assert cuda.device.type == "cuda"
        assert _max_diff(cuda.cpu(), cpu) <= PIPELINE_TOL
        ident = AugmentParams.identity(24, size, size)
        assert (
            _max_diff(
                augment_batch(images.cuda(), ident, size, MEAN, STD).cpu(),
                eval_batch(images, size, MEAN, STD),
            )
            <= 1e-6
        )
