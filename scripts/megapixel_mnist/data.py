"""Megapixel MNIST: digits and line noise scattered on a large empty canvas.

Follows the recipe of Katharopoulos & Fleuret (ICML 2019), section 4.2: each canvas
holds 5 digits at their native size, 3 of the target class and 2 of other classes,
plus line-pattern noise; the label is the target class (0-9). The model sees a
low-resolution view (the canvas downscaled by area averaging, scale 0.12 in the
paper) and may read patches of the full-resolution canvas.

Storage is sparse: a dataset keeps, per canvas, which digit and noise images sit
where (a few hundred integers) and renders the pixels on demand. Every object is a
`size x size` square and no two objects overlap, so the canvas is a plain sum of
placed objects and the low-resolution view is the sum of each object downscaled on
its own (area averaging is linear), which is exactly `area_downscale(canvas)`.

Coordinates are `(y, x)` top-left corners in canvas pixels, sizes `(height, width)`.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Digits:
    """A pool of digit images.

    images (float32 ndarray[N, s, s], values in [0, 1]); labels (int64 ndarray[N], 0-9).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"digit images must be [N, s, s], got {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"expected {len(self.images)} labels, got array of shape {self.labels.shape}"
            )
        missing = sorted(set(range(10)) - set(np.unique(self.labels).tolist()))
        if missing:
            raise ValueError(f"the digit pool lacks classes {missing}; all of 0-9 are needed")

    @property
    def size(self) -> int:
        return self.images.shape[1]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST distribution format), gzip-compressed or not."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header {shape} needs {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw[header:], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx_digits(images_path: str | Path, labels_path: str | Path) -> Digits:
    """MNIST-style digits from an IDX image file ([N, s, s] uint8) and label file ([N])."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected [N, s, s] images, got shape {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    scale = 255.0 if images.dtype == np.uint8 else float(max(images.max(), 1))
    return Digits((images / scale).astype(np.float32), labels.astype(np.int64))


def load_sklearn_digits(split: str, size: int = 28) -> Digits:
    """scikit-learn's bundled 8x8 digits, bilinearly upscaled to `size` and scaled to [0, 1].

    split: "train" (the first 1300 of the 1797 images) or "test" (the other 497), so
    that test canvases are made of digits never seen in training.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    bunch = load_digits()
    part = slice(0, 1300) if split == "train" else slice(1300, None)
    small = torch.from_numpy(bunch.images[part] / 16.0).float()[:, None]  # [N, 1, 8, 8]
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")
    return Digits(big[:, 0].clamp(0, 1).numpy(), bunch.target[part].astype(np.int64))


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Area-averaging weights (float64 [n_out, n_in], rows sum to 1).

    Output cell i covers input span [i * n_in / n_out, (i + 1) * n_in / n_out); its value
    is the mean of the input over that span, pixels cut by a border weighted by the
    covered fraction. E.g. 1500 -> 180: each output averages 8.33 input pixels.
    """
    step = n_in / n_out
    lo = np.arange(n_out)[:, None] * step
    j = np.arange(n_in)[None, :]
    overlap = np.minimum(j + 1, lo + step) - np.maximum(j, lo)
    return np.clip(overlap, 0, None) / step


def area_downscale(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Downscale `image` (ndarray[H, W]) to `out_hw` by area averaging -> float32."""
    rows = area_matrix(image.shape[0], out_hw[0])
    cols = area_matrix(image.shape[1], out_hw[1])
    return (rows @ image @ cols.T).astype(np.float32)


def make_noise_patterns(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """`count` noise squares (float32 [count, size, size]) of two random straight lines each.

    Each line passes through a random point of the square at a random angle; its
    pixels have intensities in [0.8, 1], like digit strokes, so brightness alone
    does not tell noise from digits.
    """
    patterns = np.zeros((count, size, size), np.float32)
    t = np.linspace(-1.5 * size, 1.5 * size, 6 * size)
    for pattern in patterns:
        for _ in range(2):
            cy, cx = rng.uniform(0, size - 1, 2)
            angle = rng.uniform(0, np.pi)
            ys = np.round(cy + t * np.sin(angle)).astype(int)
            xs = np.round(cx + t * np.cos(angle)).astype(int)
            inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
            pattern[ys[inside], xs[inside]] = 1.0
        pattern *= rng.uniform(0.8, 1.0, (size, size)).astype(np.float32)
    return patterns


@dataclass(frozen=True)
class CanvasConfig:
    """Geometry of one Megapixel MNIST canvas.

    size: canvas (height, width) in pixels; scale: low-resolution view size over
    canvas size (0.12: 1500 -> 180); n_noise: noise squares per canvas;
    n_patterns: distinct noise patterns in the dataset's bank.
    """

    size: tuple[int, int] = (1500, 1500)
    scale: float = 0.12
    n_noise: int = 50
    n_patterns: int = 50

    @property
    def low_size(self) -> tuple[int, int]:
        return (round(self.size[0] * self.scale), round(self.size[1] * self.scale))


N_DIGITS, N_TARGET = 5, 3


class MegapixelMNIST(torch.utils.data.Dataset):
    """`n` canvases, deterministic given (digits, config, seed).

    Per canvas it stores `targets[i]`, `digit_ids[i]` ([5] indices into `digits`, the 3
    target-class ones first), `noise_ids[i]` ([n_noise] indices into `noise_bank`) and
    `positions[i]` ([5 + n_noise, 2] (y, x) top-left corners, digits first).
    Items are `(x_low float32[1, h, w], x_high float32[1, H, W], label int)`.
    """

    def __init__(self, digits: Digits, n: int, config: CanvasConfig, seed: int) -> None:
        s = digits.size
        n_objects = N_DIGITS + config.n_noise
        if min(config.size) < s or config.n_noise < 0 or n < 1:
            raise ValueError(
                f"need n >= 1, n_noise >= 0 and canvas >= {s} pixels a side, got n={n}, "
                f"config={config}"
            )
        if n_objects * (2 * s) ** 2 > config.size[0] * config.size[1]:
            raise ValueError(
                f"{n_objects} objects of {s}x{s} cannot be spread without overlap on a "
                f"{config.size} canvas; use a larger canvas or fewer noise squares"
            )
        self.digits, self.config, self.n = digits, config, n
        rng = np.random.default_rng(seed)
        self.noise_bank = make_noise_patterns(rng, config.n_patterns, s)
        by_class = [np.flatnonzero(digits.labels == c) for c in range(10)]
        self.targets = rng.integers(0, 10, n)
        self.digit_ids = np.stack(
            [
                np.concatenate(
                    [
                        rng.choice(by_class[t], N_TARGET),
                        rng.choice(np.flatnonzero(digits.labels != t), N_DIGITS - N_TARGET),
                    ]
                )
                for t in self.targets
            ]
        )
        self.noise_ids = rng.integers(0, config.n_patterns, (n, config.n_noise))
        self.positions = np.stack([self._place(rng, n_objects, s) for _ in range(n)])
        self._rows = area_matrix(config.size[0], config.low_size[0])
        self._cols = area_matrix(config.size[1], config.low_size[1])

    def _place(self, rng: np.random.Generator, count: int, s: int) -> np.ndarray:
        """`count` top-left corners of non-overlapping s x s squares, by rejection."""
        placed = np.empty((count, 2), np.int64)
        limit = np.array(self.config.size) - s
        k = 0
        for _ in range(1000 * count):
            candidate = rng.integers(0, limit + 1)
            if k == 0 or not (np.abs(placed[:k] - candidate) < s).all(axis=1).any():
                placed[k] = candidate
                k += 1
                if k == count:
                    return placed
        raise ValueError(f"could not place {count} squares on a {self.config.size} canvas")

    def objects(self, i: int) -> list[np.ndarray]:
        """The images placed on canvas i, in the order of `positions[i]`."""
        digits = self.digits.images[self.digit_ids[i]]
        return list(digits) + list(self.noise_bank[self.noise_ids[i]])

    def high(self, i: int) -> np.ndarray:
        """Canvas i at full resolution (float32 [H, W])."""
        canvas = np.zeros(self.config.size, np.float32)
        s = self.digits.size
        for (y, x), image in zip(self.positions[i], self.objects(i), strict=True):
            canvas[y : y + s, x : x + s] = image
        return canvas

    def low(self, i: int) -> np.ndarray:
        """Canvas i downscaled by area averaging (float32 [h, w]), object by object."""
        low = np.zeros(self.config.low_size, np.float64)
        s = self.digits.size
        for (y, x), image in zip(self.positions[i], self.objects(i), strict=True):
            rows = self._rows[:, y : y + s]
            cols = self._cols[:, x : x + s]
            r0, r1 = _nonzero_span(rows)
            c0, c1 = _nonzero_span(cols)
            low[r0:r1, c0:c1] += rows[r0:r1] @ image @ cols[c0:c1].T
        return low.astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"canvas index {i} out of range for {self.n} canvases")
        x_low = torch.from_numpy(self.low(i))[None]
        x_high = torch.from_numpy(self.high(i))[None]
        return x_low, x_high, int(self.targets[i])


def _nonzero_span(weights: np.ndarray) -> tuple[int, int]:
    """First and one-past-last rows of `weights` ([n, m]) with any nonzero entry."""
    rows = np.flatnonzero(weights.any(axis=1))
    return int(rows[0]), int(rows[-1]) + 1
