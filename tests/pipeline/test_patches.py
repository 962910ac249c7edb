"""Patch geometry: extract_patches, the cell-to-patch mapping, PatchSource inputs."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from pipeline import PatchSource, SamplePatches, extract_patches, patch_offsets, sample


def _naive_patches(x, offsets, size, fill):
    """Pad the whole image by the patch size and slice patch by patch."""
    ndim = len(size)
    pad = []
    for s in reversed(size):
        pad += [s, s]
    padded = torch.nn.functional.pad(x.double(), pad, value=float(fill))
    out = []
    for b in range(offsets.shape[0]):
        row = []
        for start in offsets[b].tolist():
            window = tuple(slice(o + s, o + 2 * s) for o, s in zip(start, size, strict=True))
            row.append(padded[(b, slice(None), *window)])
        out.append(torch.stack(row))
    return torch.stack(out).to(x.dtype) if ndim else None


def _coordinate_image(batch, height, width):
    """x[b] = (row index, column index, b): every pixel says where it is."""
    rows = torch.arange(height, dtype=torch.float64).view(height, 1).expand(height, width)
    cols = torch.arange(width, dtype=torch.float64).view(1, width).expand(height, width)
    return torch.stack([torch.stack([rows, cols, torch.full_like(rows, b)]) for b in range(batch)])


def _centre_minus_half(i, h_att, h_low, h_high, p, rf):
    """``centre - p/2`` of docs/estimator.md (cell-to-patch mapping), exactly."""
    centre = (Fraction(rf, 2) + (i + Fraction(1, 2)) * Fraction(h_low - rf, h_att)) * Fraction(
        h_high, h_low
    )
    return centre - Fraction(p, 2)


def _expected_start(i, h_att, h_low, h_high, p, rf):
    return round(_centre_minus_half(i, h_att, h_low, h_high, p, rf))  # half to even


@pytest.mark.parametrize(
    ("spatial", "size"),
    [((11,), (4,)), ((9, 13), (3, 4)), ((9, 13), (5, 5)), ((5, 6, 7), (2, 3, 4))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8, torch.int32])
def test_extract_patches_matches_pad_and_slice(spatial, size, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, *spatial, generator=g) * 100).to(dtype)
    # Offsets from fully outside (before and after) to fully inside, on every axis.
    low = torch.tensor([-s for s in size])
    high = torch.tensor([e + 1 for e in spatial])
    offsets = low + (torch.rand(2, 40, len(spatial), generator=g) * (high - low)).long()
    for few_or_many in (offsets[:, :1], offsets):
        got = extract_patches(x, few_or_many, size, fill=7)
        assert got.shape == (*few_or_many.shape[:2], 3, *size) and got.dtype == dtype
        assert torch.equal(got, _naive_patches(x, few_or_many, size, fill=7))


def _slice_loop(x, offsets, size):
    """The loop a user would write: one slice per patch (offsets inside ``x``)."""
    h, w = size
    return torch.stack(
        [
            torch.stack([x[b, :, y : y + h, c : c + w] for y, c in offsets[b].tolist()])
            for b in range(len(x))
        ]
    )


@pytest.mark.parametrize("size", [(1, 1), (1, 13), (9, 1), (9, 13), (4, 6)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "expanded"])
@pytest.mark.parametrize("n", [1, 30])
def test_extract_patches_equals_the_slice_loop_with_its_gradients(size, layout, n):
    """Bit for bit, every patch size from one pixel to the whole image, in any memory
    layout; overlapping patches accumulate their gradients as the loop's do."""
    g = torch.Generator().manual_seed(1)
    leaf = torch.rand(1 if layout == "expanded" else 2, 3, 9, 13, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        leaf = leaf.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    leaf.requires_grad_(True)
    x = leaf.expand(2, -1, -1, -1)  # the batch's two items share memory when expanded
    span = torch.tensor([9 - size[0] + 1, 13 - size[1] + 1])
    offsets = (torch.rand(2, n, 2, generator=g) * span).long()  # repeats: overlaps
    weights = torch.rand(2, n, 3, *size, generator=g, dtype=torch.float64)
    got = extract_patches(x, offsets, size)
    (grad,) = torch.autograd.grad((got * weights).sum(), leaf)
    expected = _slice_loop(x, offsets, size)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), leaf)
    assert torch.equal(got, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_extract_patches_reads_any_layout_in_place():
    x = torch.rand(2, 5, 6, 3).permute(0, 3, 1, 2)  # channels-last memory, [B, C, H, W]
    offsets = torch.tensor([[[-1, 2], [3, 4]], [[0, 0], [5, 5]]])
    expected = extract_patches(x.contiguous(), offsets, (3, 2))
    assert torch.equal(extract_patches(x, offsets, (3, 2)), expected)
    assert torch.equal(extract_patches(x[:, :2], offsets, 2), expected[:, :, :2, :2, :2])


def test_extract_patches_bool_and_half():
    x = torch.rand(1, 2, 6, 6) > 0.5
    offsets = torch.tensor([[[-2, -2], [4, 3]]])
    assert torch.equal(extract_patches(x, offsets, 3), _naive_patches(x, offsets, (3, 3), 0))
    half = torch.rand(1, 2, 6, 6).half()
    got = extract_patches(half, offsets, 3, fill=0.5)
    assert torch.equal(got, _naive_patches(half, offsets, (3, 3), 0.5))


def test_extract_patches_gradcheck():
    x = torch.rand(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([[[-1, -1], [2, 3]], [[3, 4], [0, 0]]])
    torch.autograd.gradcheck(lambda t: extract_patches(t, offsets, (3, 3)), (x,))


def test_extract_patches_errors():
    x = torch.rand(2, 3, 8, 8)
    offsets = torch.zeros(2, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="batch size 1, expected 2"):
        extract_patches(x, offsets[:1], 3)
    with pytest.raises(ValueError, match=r"patch size \(9, 3\) is larger than the image x"):
        extract_patches(x, offsets, (9, 3))
    with pytest.raises(ValueError, match=r"offsets must have shape \[B, N, 2\]"):
        extract_patches(x, offsets[..., :1], 3)
    with pytest.raises(TypeError, match="integer"):
        extract_patches(x, offsets.float(), 3)
    with pytest.raises(ValueError, match="2 entries"):
        extract_patches(x, offsets, (3, 3, 3))


def test_patch_offsets_is_the_exact_mapping():
    ties = 0
    cases = itertools.product([3, 4, 7], [7, 8, 16], [16, 33, 64], [1, 4, 5, 8], [0, 3])
    for h_att, h_low, h_high, p, rf in cases:
        if p > h_high:
            continue
        cells = torch.arange(h_att).view(-1, 1)
        got = patch_offsets(cells, (h_att,), (h_low,), (h_high,), (p,), rf).flatten().tolist()
        want = [_expected_start(i, h_att, h_low, h_high, p, rf) for i in range(h_att)]
        assert got == want, (h_att, h_low, h_high, p, rf)
        ties += sum(
            (_centre_minus_half(i, h_att, h_low, h_high, p, rf) % 1) == Fraction(1, 2)
            for i in range(h_att)
        )
    assert ties > 50  # the half-to-even rule was exercised


def test_patch_offsets_errors():
    cells = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="receptive_field must be in"):
        patch_offsets(cells, (4, 4), (8, 8), (64, 64), (8, 8), receptive_field=8)
    with pytest.raises(ValueError, match="larger than the high-resolution image"):
        patch_offsets(cells, (4, 4), (8, 8), (64, 32), (8, 40))
    with pytest.raises(TypeError, match="samples must be an integer tensor"):
        patch_offsets(cells.float(), (4, 4), (8, 8), (64, 64), (8, 8))


@pytest.mark.parametrize(("patch", "rf"), [((5, 4), 0), ((6, 7), 3), ((1, 1), 0), ((8, 8), 5)])
def test_sample_patches_cuts_where_the_mapping_says(patch, rf):
    # Non-square images, batch of 2; every attention cell in turn (one-hot maps), so
    # border cells are covered; coordinates in the pixels prove where each patch is.
    h_low, w_low, h_att, w_att, h_high, w_high = 12, 10, 4, 3, 50, 37
    x_high = _coordinate_image(2, h_high, w_high)
    x_low = torch.zeros(2, 3, h_low, w_low)
    layer = SamplePatches(1, patch, receptive_field=rf)
    for cell in itertools.product(range(h_att), range(w_att)):
        attention = torch.zeros(2, h_att, w_att)
        attention[0, cell[0], cell[1]] = 1
        attention[1, h_att - 1 - cell[0], w_att - 1 - cell[1]] = 1
        patches, sampled, offsets = layer(x_low, x_high, attention, return_offsets=True)
        assert patches.shape == (2, 1, 3, *patch) and (sampled == 1).all()
        for b, (i, j) in enumerate([cell, (h_att - 1 - cell[0], w_att - 1 - cell[1])]):
            y0 = _expected_start(i, h_att, h_low, h_high, patch[0], rf)
            x0 = _expected_start(j, w_att, w_low, w_high, patch[1], rf)
            assert offsets[b, 0].tolist() == [y0, x0]
            _assert_patch_at(patches[b, 0], y0, x0, b, h_high, w_high)


def _assert_patch_at(patch, y0, x0, b, h_high, w_high):
    """``patch [3, h, w]`` shows the coordinates from ``(y0, x0)`` on, and 0 outside."""
    h, w = patch.shape[1:]
    rows = torch.arange(y0, y0 + h, dtype=torch.float64).view(h, 1).expand(h, w)
    cols = torch.arange(x0, x0 + w, dtype=torch.float64).view(1, w).expand(h, w)
    inside = (rows >= 0) & (rows < h_high) & (cols >= 0) & (cols < w_high)
    expected = torch.stack([rows, cols, torch.full_like(rows, b)]) * inside
    assert torch.equal(patch, expected)


class ArrayPatchSource:
    """A PatchSource over an in-memory uint8 image ``[H, W, C]``, reading with numpy."""

    def __init__(self, image: np.ndarray):
        self.image = image

    @property
    def shape(self):
        return self.image.shape

    def read_patches(self, offsets, size, fill=0):
        # The protocol's argument types, checked as a reader would.
        if not (isinstance(offsets, np.ndarray) and offsets.dtype == np.int64):
            raise TypeError(f"offsets must be an int64 array, got {type(offsets)}")
        if offsets.ndim != 2 or offsets.shape[1] != 2 or len(size) != 2:
            raise ValueError(f"offsets [N, 2] and size (h, w) expected, got {offsets.shape}")
        h, w = size
        height, width, channels = self.image.shape
        out = np.full((len(offsets), h, w, channels), fill, dtype=np.uint8)
        for n, (y, x) in enumerate(offsets.tolist()):
            top, left = max(y, 0), max(x, 0)
            bottom, right = min(y + h, height), min(x + w, width)
            if top < bottom and left < right:
                out[n, top - y : bottom - y, left - x : right - x] = self.image[
                    top:bottom, left:right
                ]
        return out


def _random_image(seed, height, width):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_patch_source_gives_the_tensor_path_patches():
    image = _random_image(1, 70, 90)
    assert isinstance(ArrayPatchSource(image), PatchSource)
    x_high = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x_low = torch.zeros(1, 3, 7, 9)
    attention = torch.softmax(torch.randn(1, 63), 1).view(1, 7, 9)
    results = []
    for source in (x_high, ArrayPatchSource(image), [ArrayPatchSource(image)]):
        layer = SamplePatches(
            20, (24, 20), receptive_field=1, generator=torch.Generator().manual_seed(3)
        )
        results.append(layer(x_low, source, attention, return_offsets=True))
    for patches, sampled, offsets in results[1:]:
        assert patches.dtype == torch.float32
        assert torch.equal(patches, results[0][0])
        assert torch.equal(sampled, results[0][1]) and torch.equal(offsets, results[0][2])
    assert (results[0][2] < 0).any()  # some patches leave the image: fill is exercised


def test_list_of_sources_maps_each_item_with_its_own_size():
    sizes = [(64, 48), (33, 100)]
    images = [_random_image(b, *size) for b, size in enumerate(sizes)]
    x_high = [ArrayPatchSource(images[0]), torch.from_numpy(images[1]).permute(2, 0, 1)]
    x_low = torch.zeros(2, 3, 8, 8)
    attention = torch.softmax(torch.randn(2, 16), 1).view(2, 4, 4)
    layer = SamplePatches(6, 10, generator=torch.Generator().manual_seed(4))
    patches, _, offsets = layer(x_low, x_high, attention, return_offsets=True)
    samples, _ = sample(6, attention, generator=torch.Generator().manual_seed(4))
    for b, size in enumerate(sizes):
        expected = patch_offsets(samples[b], (4, 4), (8, 8), size, (10, 10))
        assert torch.equal(offsets[b], expected)
        naive = _naive_patches(
            torch.from_numpy(images[b]).permute(2, 0, 1)[None].double(), expected[None], (10, 10), 0
        )[0]
        scale = 255 if b == 0 else 1  # source -> [0, 1] floats; tensor item keeps uint8
        assert torch.equal((patches[b].double() * scale).round(), naive)


class _WrongShapeSource(ArrayPatchSource):
    """Fault injection: a source that drops the channel axis."""

    def read_patches(self, offsets, size, fill=0):
        return super().read_patches(offsets, size, fill)[..., 0]


def test_sample_patches_errors():
    x_low = torch.zeros(2, 3, 8, 8)
    attention = torch.full((2, 4, 4), 1 / 16)
    layer = SamplePatches(2, 8)
    with pytest.raises(ValueError, match="x_high has batch size 3, expected 2"):
        layer(x_low, torch.zeros(3, 3, 32, 32), attention)
    with pytest.raises(ValueError, match=r"x_high \(number of images\) has batch size 1"):
        layer(x_low, [ArrayPatchSource(_random_image(0, 32, 32))], attention)
    with pytest.raises(ValueError, match="attention has batch size 1, expected 2"):
        layer(x_low, torch.zeros(2, 3, 32, 32), attention[:1])
    with pytest.raises(ValueError, match="larger than the high-resolution image"):
        SamplePatches(2, 40)(x_low, torch.zeros(2, 3, 32, 32), attention)
    with pytest.raises(TypeError, match="PatchSource"):
        layer(x_low, np.zeros((2, 32, 32, 3)), attention)
    with pytest.raises(ValueError, match="read_patches returned uint8"):
        layer(x_low[:1], _WrongShapeSource(_random_image(0, 32, 32)), attention[:1])
    with pytest.raises(ValueError, match="one axis per spatial axis"):
        layer(x_low, torch.zeros(2, 3, 32, 32), attention.flatten(1))


@pytest.mark.parametrize(
    ("low", "high", "patch"), [((6,), (40,), (7,)), ((3, 4, 5), (9, 12, 15), (4, 3, 2))]
)
def test_sample_patches_on_1d_and_3d_tensors(low, high, patch):
    # Volumes and signals go through the same mapping, axis by axis.
    g = torch.Generator().manual_seed(5)
    x_high = torch.rand(2, 2, *high, generator=g)
    attention = torch.softmax(torch.randn(2, math.prod(low), generator=g), 1).view(2, *low)
    layer = SamplePatches(4, patch, generator=torch.Generator().manual_seed(6))
    patches, _, offsets = layer(torch.zeros(2, 1, *low), x_high, attention, return_offsets=True)
    samples, _ = sample(4, attention, generator=torch.Generator().manual_seed(6))
    assert torch.equal(offsets, patch_offsets(samples, low, low, high, patch))
    assert torch.equal(patches, _naive_patches(x_high, offsets, patch, 0))
