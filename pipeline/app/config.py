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
FORMAT_VERSION = 3
"""Version 3: the model's task (``ModelConfig.task``, ``targets``, ``loss``); version
2 files load as classification. Version 2: the networks sit under ``sampler`` (the
core's ``AttentionSampling``) and the tissue mask is the core's sampling mask, not a
fourth input channel."""
READ_VERSIONS = (2, 3)


def package_version() -> str:
    """The installed ``ats-wsi`` version (``"unknown"`` in a source tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ats-wsi")
    except PackageNotFoundError:
        return "unknown"


ESTIMATORS = ("unbiased", "linear")
"""The core estimators a model may use (``pipeline.expectation``; the biased
``"reference"`` is for comparison in the core only)."""


@dataclass(frozen=True)
class ModelConfig:
    """What the model is and which view of a slide it reads.

    Attributes:
        task: the kind of target (``tasks.TASKS``): ``"classification"``, ...
        class_names: classification: the label of each output class, in output order.
        targets: columns of the labels CSV that hold the target (the task's default
            when empty: ``label`` for classification).
        loss: the task's loss when it offers a choice (``None``: its default;
            regression: ``"mse"`` or ``"huber"``).
        target_stats: regression: the training labels' ``(mean, sd)``, which
            standardise the head's target (set when a run starts).
        attention_net: a name in ``models.ATTENTION_NETS``.
        feature_net: a name in ``models.FEATURE_NETS``, ``"timm:<model name>"`` or
            ``"<module.path>:<callable>"`` (``encoders``).
        width: channel width of the default networks.
        patch_size: ``(h, w)`` of each patch in pixels of the patch level.
        n_patches: patches sampled per slide.
        replace: sample with replacement.
        estimator: how the draws are averaged (the core's ``expectation``):
            ``"unbiased"`` (the mean of the per-draw estimates) or ``"linear"`` (later
            draws weighted more; also unbiased, less variance when the attention is
            peaked; without replacement only); see docs/estimator.md.
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
        patch_mpp: microns per pixel of the patches, exactly: read from the
            coarsest level at least as fine over ``patch_size * patch_mpp`` microns and
            resampled to ``patch_size`` (``resolution``); e.g. 0.5 with 224 x 224
            patches on a 0.25 mpp slide reads 448 x 448 level-0 pixels per patch.
        tissue_mask: restrict sampling to tissue (Otsu on saturation of the view).
        feature_weights: local file of the encoder's initial weights (safetensors,
            or ``.bin`` / ``.pth`` read with ``torch.load(weights_only=True)``).
        feature_weights_sha256: its SHA-256, recorded when a run starts; a file that
            hashes differently is refused.
        feature_mean / feature_std / feature_input_size: the encoder's input
            normalisation (per RGB channel, on [0, 1] pixels) and ``(h, w)`` input
            size, applied inside the model; for ``timm:`` encoders taken from the
            architecture's pretrained config unless given.
        freeze_features: the encoder is not trained (batch norm kept in eval mode);
            with ``feature_weights`` its weights are not copied into the run
            directory but read from that file, checked against its SHA-256.
        assume_mpp / slide_mpp: microns per level-0 pixel of slides whose files
            state none: one value for every such slide, or ``(file name, mpp)`` pairs
            (``--slide-mpp CSV``) that also override what a file states. Input
            metadata, not part of the trained model: ``predict`` sets its own.
    """

    class_names: tuple[str, ...] = ()
    task: str = "classification"
    targets: tuple[str, ...] = ()
    loss: str | None = None
    target_stats: tuple[float, ...] = ()
    attention_net: str = "small"
    feature_net: str = "small"
    width: int = 8
    patch_size: tuple[int, int] = (32, 32)
    n_patches: int = 12
    replace: bool = False
    estimator: str = "unbiased"
    receptive_field: int = 0
    entropy_strength: float = 0.01
    low_res_max_side: int = 256
    low_res_level: int | None = None
    low_res_mpp: float | None = None
    patch_level: int = 0
    patch_mpp: float | None = None
    tissue_mask: bool = True
    feature_weights: str | None = None
    feature_weights_sha256: str | None = None
    feature_mean: tuple[float, ...] | None = None
    feature_std: tuple[float, ...] | None = None
    feature_input_size: tuple[int, int] | None = None
    freeze_features: bool = False
    assume_mpp: float | None = None
    slide_mpp: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        _as_ints(
            self,
            "width",
            "n_patches",
            "receptive_field",
            "low_res_max_side",
            "low_res_level",
            "patch_level",
        )
        _check_positive(
            width=self.width, n_patches=self.n_patches, low_res_max_side=self.low_res_max_side
        )
        if len(self.patch_size) != 2 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size: expected (height, width) >= 1, got {self.patch_size}")
        _check_at_most(
            width=self.width,
            n_patches=self.n_patches,
            low_res_max_side=self.low_res_max_side,
            receptive_field=self.receptive_field,
            patch_size=max(self.patch_size),
        )
        for name in ("patch_level", "low_res_level"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}: expected >= 0, got {value}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(
                f"estimator: expected one of {list(ESTIMATORS)}, got {self.estimator!r}"
            )
        if self.estimator == "linear" and self.replace:
            raise ConfigError("estimator 'linear' weighs draws made without replacement")
        if self.entropy_strength < 0:
            raise ConfigError(f"entropy_strength: expected >= 0, got {self.entropy_strength}")
        # JSON gives lists; the dataclass is hashable and compares equal either way.
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "targets", tuple(str(c) for c in self.targets))
        object.__setattr__(self, "target_stats", tuple(float(s) for s in self.target_stats))
        patch_size = tuple(_index(s, "patch_size") for s in self.patch_size)
        object.__setattr__(self, "patch_size", patch_size)
        self._check_encoder_and_mpp()

    def _check_encoder_and_mpp(self) -> None:
        for name in ("feature_mean", "feature_std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 3:
                    raise ConfigError(f"{name}: expected 3 values (R, G, B), got {list(value)}")
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.feature_std is not None and min(self.feature_std) <= 0:
            raise ConfigError(f"feature_std: expected > 0, got {list(self.feature_std)}")
        if self.feature_input_size is not None:
            size = tuple(_index(s, "feature_input_size") for s in self.feature_input_size)
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"feature_input_size: expected (height, width) >= 1, got {size}")
            object.__setattr__(self, "feature_input_size", size)
        for name in ("patch_mpp", "low_res_mpp", "assume_mpp"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}: expected > 0 microns per pixel, got {value}")
        pairs = tuple((str(name), float(mpp)) for name, mpp in self.slide_mpp)
        bad = [f"{name}: {mpp}" for name, mpp in pairs if not mpp > 0]
        if bad:
            raise ConfigError(f"slide_mpp: expected > 0 microns per pixel, got {bad[:3]}")
        object.__setattr__(self, "slide_mpp", pairs)


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained.

    Attributes:
        epochs: passes over the training slides.
        lr / weight_decay: AdamW parameters.
        batch_size: slides per optimizer step, stacked into one forward (views of
            different shapes are padded; ``streaming``).
        queue_depth: batches in flight in the streaming loop: 1 reads a batch's tiles
            and then computes (serial); ``d`` reads ``d - 1`` batches ahead while the
            model computes, their positions drawn with weights up to ``d - 1`` steps
            old and weighed as a proposal (unbiased; docs/estimator.md, sampling from
            a proposal).
        val_fraction: share of the labelled slides held out for validation
            (stratified by class, grouped by case, chosen by ``seed``); it is taken
            as one fold of ``round(1 / val_fraction)``, e.g. 0.3 holds out a third.
            Unused with an external validation set or cross-validation folds.
        seed: fixes the split, the slide order and the patch sampling of each epoch.
        exploration: cold-start remedy (docs/estimator.md, exploration and priors):
            training draws patches from the attention mixed with this weight of
            uniform over tissue; the estimate stays unbiased. 0 (default) samples
            from the attention.
        prior / prior_weight: a content prior (``"tissue"``, ``"hematoxylin"``, see
            ``priors``) mixed into the proposal with this weight (< 1).
        remedy_epochs: both weights decay linearly to 0 over this many epochs (0:
            constant over the whole training). Prediction never explores.
        early_patches: patches per slide in the first ``remedy_epochs`` (0: the
            model's ``n_patches`` throughout). More draws from the same proposal: the
            estimate stays unbiased, its variance falls, and the feature net learns
            from more patches per step.
        prior_init_steps: before the first epoch, this many Adam steps (learning
            rate 0.01, ``batch_size`` slides each) fit the attention net alone to
            ``prior`` (cross-entropy of its map to the normalised prior on tissue):
            training starts by drawing where the prior is. It changes the initial
            weights, not the estimator; it reads no patches and no labels. 0: off.
        select_metric: validation metric that picks the best epoch, one of the task's
            ``select_metrics`` (``None``: the task's default, e.g. ``roc_auc`` for
            classification; ties, and validation sets where it is undefined, fall
            back to the lower validation loss).
        patience: stop after this many epochs without a better validation metric
            (0: never stop early).
        balance: imbalanced classes: ``"none"``, ``"weights"`` (loss weighted by
            ``n / (n_classes * n_class)``) or ``"sampling"`` (each epoch draws its
            slides with replacement, every class equally likely).
        feature_lr: learning rate of the encoder when it is fine-tuned (default ``lr``).
        amp: mixed precision (float16 autocast and gradient scaling) on CUDA; a no-op
            on the CPU.
        augment_flips: random flips and 90-degree rotations of each training slide
            (its attention view and its patches alike).
        color_jitter: strength of the brightness / contrast / saturation jitter of the
            sampled patches (factors drawn in ``[1 - s, 1 + s]``; 0 = off).
        hed_jitter: strength of the stain jitter of the sampled patches in HED space
            (per stain, scale in ``[1 - s, 1 + s]`` and shift in ``[-s, s]``; 0 = off).
    """

    epochs: int = 10
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 4
    val_fraction: float = 0.25
    seed: int = 0
    exploration: float = 0.0
    prior: str = "none"
    prior_weight: float = 0.0
    remedy_epochs: float = 0.0
    early_patches: int = 0
    prior_init_steps: int = 0
    select_metric: str | None = None
    patience: int = 0
    balance: str = "none"
    queue_depth: int = 3
    feature_lr: float | None = None
    amp: bool = False
    augment_flips: bool = False
    color_jitter: float = 0.0
    hed_jitter: float = 0.0

    def __post_init__(self) -> None:
        _as_ints(
            self,
            "epochs",
            "batch_size",
            "seed",
            "patience",
            "queue_depth",
            "early_patches",
            "prior_init_steps",
        )
        _check_positive(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, queue_depth=self.queue_depth
        )
        _check_at_most(
            epochs=self.epochs,
            batch_size=self.batch_size,
            queue_depth=self.queue_depth,
            early_patches=self.early_patches,
        )
        if self.feature_lr is not None and not self.feature_lr >= 0:
            raise ConfigError(f"feature_lr: expected >= 0, got {self.feature_lr}")
        for name in ("color_jitter", "hed_jitter"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: expected in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.exploration <= 1.0:
            raise ConfigError(f"exploration: expected in [0, 1], got {self.exploration}")
        if not 0.0 <= self.prior_weight < 1.0:
            raise ConfigError(f"prior_weight: expected in [0, 1), got {self.prior_weight}")
        if self.prior_weight > 0 and self.prior == "none":
            raise ConfigError("prior_weight > 0 needs a prior (tissue or hematoxylin)")
        if self.remedy_epochs < 0:
            raise ConfigError(f"remedy_epochs: expected >= 0, got {self.remedy_epochs}")
        if self.prior_init_steps < 0:
            raise ConfigError(f"prior_init_steps: expected >= 0, got {self.prior_init_steps}")
        if self.prior_init_steps and self.prior == "none":
            raise ConfigError("prior_init_steps > 0 needs a prior (tissue or hematoxylin)")
        if self.early_patches < 0:
            raise ConfigError(f"early_patches: expected >= 0, got {self.early_patches}")
        if self.early_patches and not self.remedy_epochs:
            raise ConfigError(
                "early_patches needs remedy_epochs > 0 (for every epoch, set the model's n_patches)"
            )
        if self.patience < 0:
            raise ConfigError(f"patience: expected >= 0, got {self.patience}")
        if self.select_metric is not None:
            _check_choice("select_metric", self.select_metric, SELECT_METRICS)
        _check_choice("balance", self.balance, BALANCE_MODES)


SELECT_METRICS = (
    "roc_auc",
    "balanced_accuracy",
    "mean_auc",
    "r2",
    "pearson_r",
    "c_index",
    "c_index_uno",
    "td_auc",
)
"""Every task's ``select_metrics`` (the command line's choices; each task checks its own)."""
TASK_NAMES = ("classification", "multilabel", "regression", "survival")
"""The built-in tasks (``tasks.TASKS``; the command line's choices)."""
BALANCE_MODES = ("none", "weights", "sampling")


@dataclass(frozen=True)
class EvaluateConfig:
    """The options of ``evaluation.evaluate`` (``ats-wsi evaluate``).

    Attributes:
        n_bootstrap: stratified bootstrap resamples behind the 95 % intervals.
        seed: of the resampling.
    """

    n_bootstrap: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class PredictConfig:
    """How slides are predicted (the options of ``prediction.predict``).

    Attributes:
        seed: run seed; each slide's sampling is seeded by ``slide_seed(seed, path)``.
        draws: independent draws of patches per slide whose class probabilities are
            averaged (their spread is reported as ``prob_<class>_sd``); all draws'
            patches are read in one pass, each tile decoded once. Measured in
            docs/validation.md: the spread of a single draw across seeds is several
            times that of the mean of 8.
        roi_dir: a directory of ``<slide>.geojson`` region-of-interest files (polygons
            in level-0 pixels, as QuPath exports them) restricting where patches are
            sampled; a slide without a file is sampled wherever there is tissue.
    """

    seed: int = 0
    draws: int = 8
    roi_dir: str | None = None

    def __post_init__(self) -> None:
        _as_ints(self, "seed", "draws")
        _check_positive(draws=self.draws)
        _check_at_most(draws=self.draws)


@dataclass(frozen=True)
class InputConfig:
    """Which inputs ``predict`` reads, and what their files do not say.

    Attributes:
        recursive: list the sub-directories of directories too.
        slides_csv: a CSV with a ``path`` and an optional ``slide`` (output name)
            column, read besides the slides named directly.
        assume_mpp / slide_mpp: microns per level-0 pixel of slides whose files
            state none (as ``ModelConfig``'s); they replace the model config's own,
            so slides of unknown mpp get error rows unless given here.
        slide_time_limit: seconds each stage of a slide (reading its attention
            view, then classifying it) may spend reading the file before that slide
            becomes an error row (``readers.Limits.seconds``); ``None``: no limit.
    """

    recursive: bool = False
    slides_csv: str | None = None
    assume_mpp: float | None = None
    slide_mpp: tuple[tuple[str, float], ...] = ()
    slide_time_limit: float | None = 900.0

    def __post_init__(self) -> None:
        if self.slide_time_limit is not None:
            _check_positive(slide_time_limit=self.slide_time_limit)
        if self.slides_csv is not None:
            object.__setattr__(self, "slides_csv", str(self.slides_csv))
        object.__setattr__(self, "slide_mpp", tuple((str(n), float(m)) for n, m in self.slide_mpp))


HEATMAP_SCALES = ("absolute", "relative")


@dataclass(frozen=True)
class ReportConfig:
    """How ``predict`` draws each slide's pictures and whether it writes ``report.html``.

    Attributes:
        heatmap_side: longer side in pixels of the display thumbnail that the heatmap
            and the patch boxes are drawn on (``Slide.thumbnail``, so never larger than
            level 0): e.g. 1024 turns a 40,000 x 30,000 slide into 1024 x 768.
        heatmap_scale: colour scale of the attention overlay: ``"absolute"`` (the
            attention probability of each cell on a log scale from uniform attention,
            ``1 / cells``, to 1: comparable between slides with the same attention
            grid) or ``"relative"`` (linear, 0 to this slide's largest cell).
        report: write ``report.html`` at the end of ``predict``.
    """

    heatmap_side: int = 1024
    heatmap_scale: str = "absolute"
    report: bool = True

    def __post_init__(self) -> None:
        _as_ints(self, "heatmap_side")
        _check_positive(heatmap_side=self.heatmap_side)
        _check_at_most(heatmap_side=self.heatmap_side)
        if self.heatmap_scale not in HEATMAP_SCALES:
            raise ConfigError(
                f"heatmap_scale: expected one of {list(HEATMAP_SCALES)}, got {self.heatmap_scale!r}"
            )


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
        if body.get("version") not in READ_VERSIONS:
            raise ConfigError(
                f"{source}: config version {body.get('version')!r}, "
                f"this ats-wsi reads versions {list(READ_VERSIONS)}"
            )
        try:
            return cls(
                model=ModelConfig(**_known_fields(ModelConfig, body["model"])),
                train=TrainConfig(**_known_fields(TrainConfig, body.get("train", {}))),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{source}: malformed config ({e})") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def model_config_from_dict(values: Any, source: str) -> ModelConfig:
    """A ``ModelConfig`` from its ``dataclasses.asdict`` form (e.g. a prediction
    manifest's); ``source`` names the file in error messages."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: malformed model config (expected an object)")
    try:
        return ModelConfig(**_known_fields(ModelConfig, values))
    except TypeError as e:
        raise ConfigError(f"{source}: malformed model config ({e})") from None


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {list(choices)}, got {value!r}")


LIMITS = {
    "width": 1024,
    "n_patches": 10_000,
    "early_patches": 10_000,
    "low_res_max_side": 16_384,
    "receptive_field": 4096,
    "patch_size": 8192,
    "epochs": 100_000,
    "batch_size": 4096,
    "queue_depth": 64,
    "draws": 1000,
    "heatmap_side": 16_384,
}
"""Upper bounds of the size options, far above any real use: a config file (a model
directory from elsewhere) cannot make a process allocate terabytes (a ``width`` of
10^6 asks for a 720 GB tensor)."""


def _check_at_most(**values: int) -> None:
    for name, value in values.items():
        if value is not None and value > LIMITS[name]:
            raise ConfigError(f"{name}: expected at most {LIMITS[name]}, got {value}")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name}: expected > 0, got {value}")
