"""Typed configuration of a slide classifier and of its training, stored as JSON.

A run directory holds ``config.json`` (``RunConfig`` below) beside the weights in
safetensors; these dataclasses are the only schema of that file. Sizes are
``(height, width)`` in pixels of the level they refer to.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from dataclasses import dataclass, field
from typing import Any

from pipeline.app.errors import ConfigError

FORMAT = "ats-wsi-run"
FORMAT_VERSION = 2
"""Version 2: the networks sit under ``sampler`` (the core's ``AttentionSampling``)
and the tissue mask is the core's sampling mask, not a fourth input channel."""


def package_version() -> str:
    """The installed ``ats-wsi`` version (``"unknown"`` in a source tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ats-wsi")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ModelConfig:
    """What the model is and which view of a slide it reads.

    Attributes:
        class_names: label of each output class, in output order.
        attention_net / feature_net: names in ``models.ATTENTION_NETS`` /
            ``models.FEATURE_NETS``.
        width: channel width of the default networks.
        patch_size: ``(h, w)`` of each patch in pixels of the patch level.
        n_patches: patches sampled per slide.
        replace: sample with replacement.
        receptive_field: of the attention network, for mapping attention cells to
            the patch level (0 for "same" padding).
        entropy_strength: weight of the attention entropy regularizer (0 disables it).
        low_res_max_side: the attention view is the slide's thumbnail whose longer
            side is at most this many pixels (e.g. 512 turns a 40,000 x 30,000
            slide into a 512 x 384 view, downsample 78.1).
        low_res_level / low_res_mpp: take a whole pyramid level as the attention
            view instead, by index or microns per pixel (mpp wins when the slide
            states its mpp).
        patch_level: index of the pyramid level patches are read from (0 = full
            resolution), used when ``patch_mpp`` is None.
        patch_mpp: microns per pixel wanted for patches; the closest level at least
            as fine is used (slides without mpp fall back to ``patch_level``).
        tissue_mask: restrict sampling to tissue (Otsu on saturation of the view).
    """

    class_names: tuple[str, ...]
    attention_net: str = "small"
    feature_net: str = "small"
    width: int = 8
    patch_size: tuple[int, int] = (32, 32)
    n_patches: int = 12
    replace: bool = False
    receptive_field: int = 0
    entropy_strength: float = 0.01
    low_res_max_side: int = 256
    low_res_level: int | None = None
    low_res_mpp: float | None = None
    patch_level: int = 0
    patch_mpp: float | None = None
    tissue_mask: bool = True

    def __post_init__(self) -> None:
        _as_ints(self, "width", "n_patches", "receptive_field", "low_res_max_side",
                 "low_res_level", "patch_level")  # fmt: skip
        if len(self.class_names) < 2:
            raise ConfigError(f"class_names: need at least 2 classes, got {list(self.class_names)}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"class_names: duplicates in {list(self.class_names)}")
        _check_positive(
            width=self.width, n_patches=self.n_patches, low_res_max_side=self.low_res_max_side
        )
        if len(self.patch_size) != 2 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size: expected (height, width) >= 1, got {self.patch_size}")
        for name in ("patch_level", "low_res_level"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}: expected >= 0, got {value}")
        if self.entropy_strength < 0:
            raise ConfigError(f"entropy_strength: expected >= 0, got {self.entropy_strength}")
        # JSON gives lists; the dataclass is hashable and compares equal either way.
        object.__setattr__(self, "class_names", tuple(self.class_names))
        patch_size = tuple(_index(s, "patch_size") for s in self.patch_size)
        object.__setattr__(self, "patch_size", patch_size)


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained.

    Attributes:
        epochs: passes over the training slides.
        lr / weight_decay: AdamW parameters.
        batch_size: slides whose gradients are accumulated per optimizer step (each
            slide runs alone through the network, so slides of any size mix).
        val_fraction: share of the labelled slides held out for validation
            (stratified by class, chosen by ``seed``).
        seed: fixes the split, the slide order and the patch sampling of each epoch.
    """

    epochs: int = 10
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 4
    val_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        _as_ints(self, "epochs", "batch_size", "seed")
        _check_positive(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class PredictConfig:
    """How slides are predicted (the options of ``prediction.predict``).

    Attributes:
        seed: run seed; each slide's sampling is seeded by ``slide_seed(seed, path)``.
    """

    seed: int = 0


@dataclass(frozen=True)
class DemoConfig:
    """The options of ``ats-wsi demo`` (``demo.run_demo``).

    Attributes:
        out_dir: where the data, the model and the predictions go.
        n_train / n_test: synthetic slides to train on / to predict.
        size: side of each synthetic slide in pixels.
        epochs: training epochs.
        seed: dataset and training seed.
    """

    out_dir: str = "ats-demo"
    n_train: int = 40
    n_test: int = 16
    size: int = 1536
    epochs: int = 10
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    """Contents of a run directory's ``config.json``."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(self)}
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "config.json") -> RunConfig:
        """Parse ``text``; ``source`` names the file in error messages."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ConfigError(f"{source}: not an ats-wsi run config (expected format {FORMAT!r})")
        if body.get("version") != FORMAT_VERSION:
            raise ConfigError(
                f"{source}: config version {body.get('version')!r}, "
                f"this ats-wsi reads version {FORMAT_VERSION}"
            )
        try:
            return cls(
                model=ModelConfig(**_known_fields(ModelConfig, body["model"])),
                train=TrainConfig(**_known_fields(TrainConfig, body.get("train", {}))),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{source}: malformed config ({e})") from None


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise TypeError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return values


def _index(value: Any, name: str) -> int:
    """``value`` as an int: any integer type (``numpy.int64`` too), never a float or bool."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def _as_ints(config: Any, *names: str) -> None:
    """Normalise the integer fields ``names`` of a frozen dataclass (``None`` kept)."""
    for name in names:
        value = getattr(config, name)
        if value is not None:
            object.__setattr__(config, name, _index(value, name))


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name}: expected > 0, got {value}")
