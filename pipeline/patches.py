"""Cut patches out of a high-resolution image at positions sampled on an attention map.

Coordinates are ``(y, x)`` (one per spatial axis, in axis order) and sizes
``(height, width)``. The high-resolution image is either a tensor ``[B, C, *spatial]``
or anything satisfying :class:`PatchSource` (a lazy slide level), so the same code
serves in-memory megapixel images and gigapixel slides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from . import _checks


@runtime_checkable
class PatchSource(Protocol):
    """A 2-D image that is read by patches, never whole (``readers.Level``, ``readers.Slide``).

    ``shape`` is ``(H, W, C)``, channels last like a numpy image.
    ``read_patches(offsets, size, fill=0)`` takes ``offsets`` (``np.ndarray`` int64
    ``[N, 2]``, ``(y, x)`` top-left corners in this image's pixel grid, possibly outside
    it) and ``size`` ``(h, w)`` and returns ``np.ndarray`` uint8 ``[N, h, w, C]`` with
    ``fill`` where a patch leaves the image.
    """

    @property
    def shape(self) -> tuple[int, int, int]: ...

    def read_patches(
        self, offsets: np.ndarray, size: tuple[int, int], fill: int = 0
    ) -> np.ndarray: ...


HighResolution = Tensor | PatchSource | Sequence[Tensor | PatchSource]
"""``x_high``: a tensor ``[B, C, *spatial]``, a ``PatchSource`` (the image of every
batch item: all items' patches are read in one call), or a list with one
``PatchSource`` or tensor ``[C, *spatial]`` per batch item (their sizes may differ)."""


def extract_patches(
    x: Tensor, offsets: Tensor, size: int | Sequence[int], fill: float = 0
) -> Tensor:
    """Patches of ``x`` whose top-left corners are ``offsets``; ``fill`` outside ``x``.

    Args:
        x (Tensor[B, C, *spatial]): 1, 2 or 3 spatial axes, any dtype, any strides
            (a permuted channels-last tensor is read in place), CPU or CUDA.
        offsets (LongTensor[B, N, ndim]): top-left corner of each patch in ``x``'s pixel
            grid, ``(y, x)`` for images; may lie partly or wholly outside ``x``.
        size: the patch size per spatial axis, ``(height, width)`` for images, or one
            int for every axis.
        fill: the value of pixels outside ``x``.

    Returns:
        Tensor[B, N, C, *size] of ``x``'s dtype on ``x``'s device.

    Nothing image-sized is copied or padded: the patches that lie inside ``x`` are
    copied row by row (each a run of ``size[-1]`` pixels along the last axis) by one
    ``index_select`` over a view of ``x`` whose rows start at every element, so each
    row is one block copy, not a per-pixel gather; only the patches that leave ``x``
    go through a per-pixel gather with clamped index grids and a mask. The offsets
    are read on the CPU (a synchronisation when they are on a GPU). Example:
    ``offsets = [[[-2, 5]]]``, ``size = (4, 4)`` gives rows -2..1 (the first two are
    ``fill``) and columns 5..8.
    """
    _checks.tensor(x, "x", min_dim=3)
    _checks.tensor(offsets, "offsets")
    spatial = tuple(x.shape[2:])
    ndim = len(spatial)
    if offsets.dim() != 3 or offsets.shape[-1] != ndim:
        raise ValueError(
            f"offsets must have shape [B, N, {ndim}] for x of shape {tuple(x.shape)}, "
            f"got {tuple(offsets.shape)}"
        )
    _checks.integer(offsets, "offsets")
    _checks.same_batch(x.shape[0], offsets.shape[0], "offsets")
    size = _checks.size_tuple(size, ndim, "size")
    _checks.fits(size, spatial, "the image x")
    batch, n, channels = offsets.shape[0], offsets.shape[1], x.shape[1]
    if batch * n * channels == 0:
        return x.new_empty((batch, n, channels, *size))

    # The row index is arithmetic on a few hundred numbers: numpy's per-operation
    # cost is a fraction of torch's, which would dominate small calls.
    wanted = offsets.to("cpu", torch.long).numpy()
    last = np.array(spatial) - np.array(size)
    start = np.minimum(np.maximum(wanted, 0), last)  # [B, N, ndim], the patch inside x
    index = torch.from_numpy(_row_index(x.stride(), channels, start, size)).to(x.device)
    patches = _rows(x, size[-1]).index_select(0, index).view(batch, n, channels, *size)
    moved = start != wanted
    if moved.any():  # some patches leave x
        leaving = np.flatnonzero(moved.any(-1))  # flat [B * N] indices
        b, i = (torch.from_numpy(v).to(x.device) for v in np.divmod(leaving, n))
        moving = offsets.to(x.device, torch.long)[b, i]
        patches[b, i] = _gather_with_fill(x, b, moving, size, fill)
    return patches


def _rows(x: Tensor, width: int) -> Tensor:
    """``rows[k]``: the ``width`` elements of ``x`` along its last axis from element
    ``k`` of its storage on: an overlapping view, no copy, in which every row of every
    patch is one row."""
    step = x.stride(-1)
    span = int(np.dot(np.subtract(x.shape, 1), x.stride()))  # x's last element
    return x.as_strided((span - (width - 1) * step + 1, width), (1, step))


def _row_index(
    strides: tuple[int, ...], channels: int, start: np.ndarray, size: tuple[int, ...]
) -> np.ndarray:
    """int64 ``[B * N * C * prod(size[:-1])]``: the ``_rows`` of the patches at ``start
    [B, N, ndim]`` of an ``x`` of ``strides`` and ``channels``, in output order."""
    within = np.arange(channels) * strides[1]  # a patch's rows relative to its first
    for length, stride in zip(size[:-1], strides[2:-1], strict=True):
        within = within[..., None] + np.arange(length) * stride  # [C, *size[:-1]]
    first = start @ np.array(strides[2:])  # [B, N]
    if len(start) > 1:
        first += np.arange(len(start))[:, None] * strides[0]
    return (first.reshape(*first.shape, *(1,) * within.ndim) + within).reshape(-1)


def _gather_with_fill(
    x: Tensor, batch: Tensor, offsets: Tensor, size: tuple[int, ...], fill: float
) -> Tensor:
    """Patches ``[M, C, *size]`` of ``x [B, C, *spatial]`` at ``offsets [M, ndim]`` of
    batch items ``batch [M]``, with ``fill`` outside: one gather through x's strides."""
    m, ndim = offsets.shape
    index = batch.view(m, *([1] * ndim)) * x.stride(0)  # element offsets, [M, *size]
    inside = torch.ones((), dtype=torch.bool, device=x.device)
    for axis, (extent, length) in enumerate(zip(x.shape[2:], size, strict=True)):
        shape = [m] + [1] * ndim
        shape[1 + axis] = length
        coords = (offsets[:, axis, None] + torch.arange(length, device=x.device)).view(shape)
        inside = inside & (coords >= 0) & (coords < extent)
        index = index + coords.clamp(0, extent - 1) * x.stride(2 + axis)
    last = (x.shape[0] - 1) * x.stride(0) + sum(
        (e - 1) * s for e, s in zip(x.shape[2:], x.stride()[2:], strict=True)
    )
    planes = x.as_strided((x.shape[1], last + 1), (x.stride(1), 1))  # [C, span], no copy
    patches = planes.gather(1, index.view(1, -1).expand(x.shape[1], -1))
    patches = patches.view(x.shape[1], m, *size).transpose(0, 1)  # [M, C, *size]
    return patches.masked_fill(~inside.unsqueeze(1), fill)


def patch_offsets(
    samples: Tensor,
    attention_size: Sequence[int],
    low_size: Sequence[int],
    high_size: Sequence[int],
    patch_size: Sequence[int],
    receptive_field: int = 0,
) -> Tensor:
    """Top-left corners in the high-resolution grid of patches centred on attention cells.

    Per axis, attention cell ``i`` of an ``h_att``-cell map computed on an ``h_low``-pixel
    view by a network of receptive field ``rf`` is centred, in high-resolution pixels, at
    ``c = (rf/2 + (i + 0.5) * (h_low - rf) / h_att) * (H_high / h_low)``; the patch of
    ``p`` pixels starts at ``round(c - p/2)``, rounding halves to even (as the reference
    library did). The arithmetic is exact (integers), so no float rounding moves a patch.

    Example: ``h_att = h_low = 32``, ``H_high = 256``, ``rf = 0``, ``p = 32``: cell 0 is
    centred at 4 and its patch starts at -12; cell 31 at 252, start 236.

    Args:
        samples (LongTensor[..., d]): attention-map positions, as returned by ``sample``.
        attention_size, low_size, high_size, patch_size: ``d`` sizes each (``h_att``,
            ``h_low``, ``H_high``, ``p`` per axis).
        receptive_field: ``rf`` in low-resolution pixels, ``0 <= rf < h_low``.

    Returns:
        LongTensor[..., d] of top-left corners, on ``samples``' device.
    """
    _checks.tensor(samples, "samples", min_dim=1)
    _checks.integer(samples, "samples")
    d = samples.shape[-1]
    sizes = [
        _checks.size_tuple(s, d, name)
        for s, name in [
            (attention_size, "attention_size"),
            (low_size, "low_size"),
            (high_size, "high_size"),
            (patch_size, "patch_size"),
        ]
    ]
    _checks.fits(sizes[3], sizes[2], "the high-resolution image")
    if isinstance(receptive_field, bool) or not isinstance(receptive_field, int):
        raise TypeError(f"receptive_field must be an int, got {type(receptive_field).__name__}")
    if not 0 <= receptive_field < min(sizes[1]):
        raise ValueError(
            f"receptive_field must be in [0, {min(sizes[1])}) (the low-resolution size "
            f"{sizes[1]}), got {receptive_field}"
        )
    device = samples.device
    h_att, h_low, h_high, p = (torch.tensor(s, dtype=torch.long, device=device) for s in sizes)
    rf = receptive_field
    numerator = (rf * h_att + (2 * samples + 1) * (h_low - rf)) * h_high - p * h_att * h_low
    denominator = 2 * h_att * h_low
    quotient = torch.div(numerator, denominator, rounding_mode="floor")
    twice_rest = 2 * (numerator - quotient * denominator)
    round_up = (twice_rest > denominator) | ((twice_rest == denominator) & (quotient % 2 == 1))
    return quotient + round_up.long()


def gather_patches(
    x_high: HighResolution,
    samples: Tensor,
    attention_size: Sequence[int],
    low_size: Sequence[int],
    patch_size: Sequence[int],
    receptive_field: int = 0,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Read the patches of every sampled attention cell from ``x_high``.

    Args:
        x_high: see ``HighResolution``; each batch item is mapped with its own size.
        samples (LongTensor[B, N, d]): attention-map positions.
        attention_size, low_size, patch_size, receptive_field: as in ``patch_offsets``.
        device: where the patches go (default: ``samples``' device).

    Returns:
        patches (Tensor[B, N, C, *patch_size]): ``x_high``'s dtype for a tensor; float32
            in ``[0, 1]`` (uint8 / 255) for a ``PatchSource``.
        offsets (LongTensor[B, N, d]): their top-left corners in each item's grid.
    """
    device = samples.device if device is None else device
    batch = samples.shape[0]
    if isinstance(x_high, Tensor):
        _checks.same_batch(batch, x_high.shape[0], "x_high")
        items = None
    elif isinstance(x_high, PatchSource):
        # One image for every batch item (e.g. several draws on one slide): one read
        # of all B x N patches, so a tile under patches of several items decodes once.
        patches, offsets = _read_item(
            x_high,
            samples.flatten(0, 1),
            attention_size,
            low_size,
            patch_size,
            receptive_field,
            device,
        )
        return patches.unflatten(0, samples.shape[:2]), offsets.unflatten(0, samples.shape[:2])
    elif isinstance(x_high, Sequence) and not isinstance(x_high, str):
        items = list(x_high)
    else:
        raise TypeError(
            "x_high must be a tensor [B, C, H, W], a PatchSource (an object with .shape "
            f"(H, W, C) and .read_patches) or a list of those, got {type(x_high).__name__}"
        )
    if items is None:
        offsets = patch_offsets(
            samples, attention_size, low_size, x_high.shape[2:], patch_size, receptive_field
        )
        patches = extract_patches(x_high, offsets, patch_size)
        return patches.to(device), offsets
    _checks.same_batch(batch, len(items), "x_high (number of images)")
    read = [
        _read_item(item, samples[b], attention_size, low_size, patch_size, receptive_field, device)
        for b, item in enumerate(items)
    ]
    patches, offsets = zip(*read, strict=True)
    return torch.stack(patches), torch.stack(offsets)


def _read_item(
    item: Tensor | PatchSource,
    samples: Tensor,
    attention_size: Sequence[int],
    low_size: Sequence[int],
    patch_size: Sequence[int],
    receptive_field: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Patches ``[N, C, *patch_size]`` and offsets ``[N, d]`` of one batch item."""
    if isinstance(item, Tensor):
        high_size = item.shape[1:]
    elif isinstance(item, PatchSource):
        high_size = tuple(item.shape[:2])
    else:
        raise TypeError(
            f"each x_high item must be a tensor [C, *spatial] or a PatchSource, "
            f"got {type(item).__name__}"
        )
    offsets = patch_offsets(
        samples, attention_size, low_size, high_size, patch_size, receptive_field
    )
    if isinstance(item, Tensor):
        patches = extract_patches(item[None], offsets[None].to(item.device), patch_size)[0]
        return patches.to(device), offsets
    size = tuple(patch_size)
    array = item.read_patches(offsets.cpu().numpy(), size)
    expected = (offsets.shape[0], *size, item.shape[2])
    if not isinstance(array, np.ndarray) or array.shape != expected or array.dtype != np.uint8:
        raise ValueError(
            f"{type(item).__name__}.read_patches returned "
            f"{getattr(array, 'dtype', type(array).__name__)} "
            f"{getattr(array, 'shape', '')}, expected uint8 {expected}"
        )
    pixels = torch.from_numpy(array).to(device).permute(0, 3, 1, 2)  # [N, C, h, w]
    return pixels.float().div_(255), offsets
