"""The attention-sampling layers: sample patches, and the whole low-to-high pipeline.

``attention_sampling(attention, feature, ...)`` wires an attention network (on the
low-resolution view), :func:`sample`, patch reading from the high-resolution image and
:func:`expectation` into one ``nn.Module``, like the reference library's function of
the same name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from .expectation import _check_estimator, expectation
from .patches import HighResolution, PatchSource, gather_patches
from .proposals import Weight, explore, weight_at
from .sampling import mask_attention, sample


def sample_patches(
    x_low: Tensor,
    x_high: HighResolution,
    attention: Tensor,
    n_patches: int,
    patch_size: int | Sequence[int],
    receptive_field: int = 0,
    replace: bool = False,
    use_logits: bool = False,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    *,
    proposal: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample ``n_patches`` cells of ``attention`` and read their patches from ``x_high``.

    Args:
        x_low (Tensor[B, C, *low]): the low-resolution view the attention was computed
            on; only its spatial size is used (to map cells to ``x_high``).
        x_high: the high-resolution image, see ``patches.HighResolution``.
        attention (Tensor[B, *att]): probabilities (logits when ``use_logits``), one
            axis per spatial axis of ``x_low``.
        n_patches, replace, use_logits, generator: as in ``sample``.
        patch_size: ``(height, width)`` in ``x_high`` pixels (one int for all axes).
        receptive_field: of the attention network, in ``x_low`` pixels (see
            ``patch_offsets`` for the mapping).
        mask (BoolTensor[B, *att] | None): True where sampling is allowed.
        proposal (Tensor[B, *att] | None): draw from this distribution instead of
            the attention (``sample(..., proposal=)``; docs/estimator.md, sampling
            from a proposal).

    Returns:
        patches (Tensor[B, N, C, *patch_size]) on ``x_low``'s device,
        sampled_attention (Tensor[B, N]), offsets (LongTensor[B, N, d]) in ``x_high``;
        with a ``proposal``, also sampled_proposal (Tensor[B, N]) for ``expectation``.
    """
    _checks.tensor(x_low, "x_low", min_dim=3)
    _checks.tensor(attention, "attention", min_dim=2)
    _checks.same_batch(x_low.shape[0], attention.shape[0], "attention")
    low_size = tuple(x_low.shape[2:])
    if attention.dim() - 1 != len(low_size):
        raise ValueError(
            f"attention must have one axis per spatial axis of x_low {low_size}, got shape "
            f"{tuple(attention.shape)}"
        )
    patch_size = _checks.size_tuple(patch_size, len(low_size), "patch_size")
    if mask is not None:
        attention = mask_attention(attention, mask, use_logits)
    drawn = sample(n_patches, attention, replace, use_logits, generator, proposal=proposal)
    samples, sampled_attention = drawn[:2]
    patches, offsets = gather_patches(
        x_high,
        samples,
        attention.shape[1:],
        low_size,
        patch_size,
        receptive_field,
        device=x_low.device,
    )
    return (patches, sampled_attention, offsets, *drawn[2:])


class SamplePatches(nn.Module):
    """Module form of :func:`sample_patches`.

    ``forward(x_low, x_high, attention, return_offsets=False, mask=None, prior=None,
    step=None)`` returns ``(patches [B, N, C, *patch_size], sampled_attention [B, N])``,
    plus the top-left ``offsets [B, N, 2]`` in ``x_high``'s grid when ``return_offsets``.

    Exploration (docs/estimator.md, exploration and priors): with ``exploration``
    (``e``) or ``prior_weight`` (``w``) not 0 (constants, or schedules of the training
    ``step`` such as ``linear_decay``), positions are drawn in training mode from the
    proposal ``explore(attention, e, mask, prior, w)`` and ``forward`` returns one more
    output, ``sampled_proposal [B, N]``, to pass to ``expectation(..., sampled_proposal=)``
    (in eval mode the draws come from the attention and it equals
    ``sampled_attention``). ``prior`` (``[B, *att]`` or a finer grid, average-pooled)
    is a non-negative content prior such as tissue or stain density.
    """

    def __init__(
        self,
        n_patches: int,
        patch_size: int | Sequence[int],
        receptive_field: int = 0,
        replace: bool = False,
        use_logits: bool = False,
        *,
        generator: torch.Generator | None = None,
        exploration: Weight = 0.0,
        prior_weight: Weight = 0.0,
    ) -> None:
        super().__init__()
        self.n_patches = _checks.positive_int(n_patches, "n_patches")
        self.patch_size = patch_size
        self.receptive_field = receptive_field
        self.replace = replace
        self.use_logits = use_logits
        self.generator = generator
        self.exploration = exploration
        self.prior_weight = prior_weight
        if use_logits and self.explores:
            raise ValueError("exploration and priors mix probabilities: use_logits=False")

    @property
    def explores(self) -> bool:
        """Whether a proposal may be used (``forward`` then returns ``sampled_proposal``)."""
        return _explores(self.exploration, self.prior_weight)

    def forward(
        self,
        x_low: Tensor,
        x_high: HighResolution,
        attention: Tensor,
        return_offsets: bool = False,
        mask: Tensor | None = None,
        prior: Tensor | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, ...]:
        if mask is not None:
            mask = mask_on_grid(mask, attention.shape[1:])
            attention = mask_attention(attention, mask, self.use_logits)
        proposal = _proposal(self, attention, mask, prior, step)
        patches, sampled_attention, offsets, *sampled_proposal = sample_patches(
            x_low,
            x_high,
            attention,
            self.n_patches,
            self.patch_size,
            self.receptive_field,
            self.replace,
            self.use_logits,
            self.generator,
            proposal=proposal,
        )
        out = (patches, sampled_attention) + ((offsets,) if return_offsets else ())
        if self.explores:
            out += (sampled_proposal[0] if sampled_proposal else sampled_attention.detach(),)
        return out

    def extra_repr(self) -> str:
        return (
            f"n_patches={self.n_patches}, patch_size={self.patch_size}, "
            f"receptive_field={self.receptive_field}, replace={self.replace}, "
            f"use_logits={self.use_logits}"
        )


class Draw(NamedTuple):
    """Everything one draw of :class:`AttentionSampling` produced.

    Attributes:
        features (Tensor[B, D]): the estimate of the attention-weighted feature mean.
        attention (Tensor[B, *att]): the attention map the patches were drawn from
            (restricted to ``mask`` when one was given).
        patches (Tensor[B, N, C, *patch_size]): the patches the feature net saw.
        offsets (LongTensor[B, N, ndim]): their top-left corners in ``x_high``'s
            grid, ``(y, x)`` for images.
        sampled_attention (Tensor[B, N]): the attention probability of each patch.
        regularizer (Tensor[]): the attention regularizer's value on ``attention``
            (a constant 0 without regularizer), to add to the training loss.
        sampled_proposal (Tensor[B, N] | None): the proposal's probability of each
            patch when the draw came from a proposal (exploration, prior), else None.
    """

    features: Tensor
    attention: Tensor
    patches: Tensor
    offsets: Tensor
    sampled_attention: Tensor
    regularizer: Tensor
    sampled_proposal: Tensor | None = None


class Plan(NamedTuple):
    """The positions of a draw (``AttentionSampling.plan``), before any patch is read.

    Attributes:
        samples (LongTensor[B, N, d]): the drawn attention cells, in draw order.
        drawn_probability (Tensor[B, N]): each cell's probability under the
            distribution it was drawn from (the proposal, or the attention), detached.
        from_proposal: whether that distribution was a proposal (exploration, prior).
        attention_size: the attention map's spatial shape.
    """

    samples: Tensor
    drawn_probability: Tensor
    from_proposal: bool
    attention_size: tuple[int, ...]


class AttentionSampling(nn.Module):
    """The attention-sampling pipeline; build it with :func:`attention_sampling`.

    ``forward(x_low, x_high, mask=None)`` returns
    ``(features [B, D], attention [B, *att], patches [B, N, C, *patch_size])``;
    ``draw(x_low, x_high, mask=None, generator=None, prior=None, step=None)`` returns
    all of one draw as a :class:`Draw`, the regularizer's value included: the training
    loop adds ``draw.regularizer`` to its loss. Exploration and priors as in
    :class:`SamplePatches` (training mode only; the estimate stays unbiased).
    """

    def __init__(
        self,
        attention: Callable[[Tensor], Tensor],
        feature: Callable[[Tensor], Tensor],
        patch_size: int | Sequence[int] | None,
        n_patches: int,
        replace: bool,
        attention_regularizer: Callable[[Tensor], Tensor] | None,
        receptive_field: int,
        estimator: str,
        generator: torch.Generator | None,
        exploration: Weight = 0.0,
        prior_weight: Weight = 0.0,
    ) -> None:
        super().__init__()
        _check_estimator(estimator, replace)
        if estimator == "reference" and _explores(exploration, prior_weight):
            raise ValueError(f"the {estimator!r} estimator is not defined under a proposal")
        self.attention = attention  # registered as a submodule when it is one
        self.feature = feature
        self.attention_regularizer = attention_regularizer
        self.patch_size = patch_size
        self.n_patches = _checks.positive_int(n_patches, "n_patches")
        self.replace = replace
        self.receptive_field = receptive_field
        self.estimator = estimator
        self.generator = generator
        self.exploration = exploration
        self.prior_weight = prior_weight

    def draw(
        self,
        x_low: Tensor,
        x_high: HighResolution,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        prior: Tensor | None = None,
        step: int | None = None,
    ) -> Draw:
        """One draw of patches and its estimate.

        Args:
            x_low (Tensor[B, C, *low]): the low-resolution view.
            x_high: the high-resolution image, see ``patches.HighResolution``.
            mask (BoolTensor[B, *m] | None): True where sampling is allowed (e.g.
                tissue). On the attention grid, or on any finer grid such as
                ``x_low``'s (a cell is allowed when any mask pixel inside it is
                True, by adaptive max pooling). The attention is restricted and
                renormalised for the sampling, the expectation and the regularizer.
            generator: overrides the module's ``generator`` for this draw.
            prior (Tensor[B, *p] | None): content prior for the proposal, on the
                attention grid or a finer one (average-pooled).
            step: training step, for ``exploration`` / ``prior_weight`` schedules.
        """
        attention, mask = self.attend(x_low, mask)
        samples, sampled_attention, sampled_proposal = self._sample(
            attention, mask, generator, prior, step
        )
        patches, offsets = self.read(x_low, x_high, samples, attention.shape[1:])
        return self._estimate(
            attention,
            patches,
            offsets,
            samples,
            sampled_attention,
            sampled_proposal,
            _image_ids(x_high, len(x_low), offsets.device),
        )

    def plan(
        self,
        x_low: Tensor,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        prior: Tensor | None = None,
        step: int | None = None,
    ) -> Plan:
        """The positions of a draw, without reading or computing anything else: the
        first half of :meth:`draw` for loops that read patches in the background
        (``read``) while the model computes, and finish with :meth:`estimate`.
        Arguments as in :meth:`draw`; no gradient is recorded."""
        with torch.no_grad():
            attention, mask = self.attend(x_low, mask)
            samples, sampled_attention, sampled_proposal = self._sample(
                attention, mask, generator, prior, step
            )
        drawn = sampled_attention if sampled_proposal is None else sampled_proposal
        return Plan(samples, drawn, sampled_proposal is not None, tuple(attention.shape[1:]))

    def read(
        self, x_low: Tensor, x_high: HighResolution, samples: Tensor, attention_size: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """``(patches [B, N, C, *patch_size], offsets [B, N, d])`` of the attention cells
        ``samples (LongTensor[B, N, d])`` (``gather_patches`` with this module's
        geometry); safe to run in another thread while the model computes."""
        patch_size = x_low.shape[2:] if self.patch_size is None else self.patch_size
        patch_size = _checks.size_tuple(patch_size, x_low.dim() - 2, "patch_size")
        return gather_patches(
            x_high,
            samples,
            attention_size,
            x_low.shape[2:],
            patch_size,
            self.receptive_field,
            device=x_low.device,
        )

    def estimate(
        self,
        x_low: Tensor,
        patches: Tensor,
        offsets: Tensor,
        plan: Plan,
        mask: Tensor | None = None,
        stale: bool = False,
    ) -> Draw:
        """The second half of :meth:`draw`: the attention (with gradient) and the
        estimate from the patches of ``plan``'s positions.

        ``stale``: the weights changed since ``plan`` was made (a training loop that
        planned the next slides before its last optimizer step). The positions were
        then drawn from the old attention ``q``, a proposal in the sense of
        docs/estimator.md (sampling from a proposal): the estimator weighs them by
        ``a / q`` with ``a`` the current attention, so value and gradients stay
        unbiased.
        """
        attention, mask = self.attend(x_low, mask)
        if tuple(attention.shape[1:]) != plan.attention_size:
            raise ValueError(
                f"the attention map is {tuple(attention.shape[1:])}, the plan was made on "
                f"{plan.attention_size}"
            )
        flat = plan.samples.new_zeros(plan.samples.shape[:2])  # [B, N] flat cell index
        for axis, size in enumerate(plan.attention_size):
            flat = flat * size + plan.samples[..., axis]
        sampled_attention = attention.flatten(1).gather(1, flat)
        q = plan.drawn_probability if plan.from_proposal or stale else None
        return self._estimate(attention, patches, offsets, plan.samples, sampled_attention, q)

    def forward(
        self, x_low: Tensor, x_high: HighResolution, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(features, attention, patches)`` of :meth:`draw`."""
        out = self.draw(x_low, x_high, mask)
        return out.features, out.attention, out.patches

    def attend(self, x_low: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The attention ``[B, *att]`` of ``x_low``, restricted to ``mask`` (BoolTensor
        ``[B, *m]``, pooled to the attention grid) and renormalised there, and that mask
        on the grid (None without a mask): what :meth:`draw` samples from."""
        _checks.tensor(x_low, "x_low", min_dim=3)
        attention = self.attention(x_low)
        if attention.dim() == x_low.dim() and attention.shape[1] == 1:
            attention = attention.squeeze(1)  # [B, 1, *att] -> [B, *att]
        if mask is not None:
            mask = mask_on_grid(mask, attention.shape[1:])
            attention = mask_attention(attention, mask)
        return attention, mask

    def _sample(
        self, attention, mask, generator, prior, step
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(samples, sampled_attention, sampled_proposal or None)`` of one draw."""
        samples, sampled_attention, *proposed = sample(
            self.n_patches,
            attention,
            self.replace,
            generator=self.generator if generator is None else generator,
            proposal=_proposal(self, attention, mask, prior, step),
        )
        return samples, sampled_attention, proposed[0] if proposed else None

    def _estimate(
        self,
        attention,
        patches,
        offsets,
        samples,
        sampled_attention,
        sampled_proposal,
        images: Tensor | None = None,
    ) -> Draw:
        regularizer = (
            attention.new_zeros(())
            if self.attention_regularizer is None
            else self.attention_regularizer(attention)
        )
        batch, n = sampled_attention.shape
        if self.training or images is None:
            features = self.feature(patches.flatten(0, 1))  # [B * N, ...]
        else:
            features = _features_once(self.feature, patches, offsets, images)
        features = features.reshape(batch, n, *features.shape[1:])  # [B, N, ...]
        features = expectation(
            features,
            sampled_attention,
            self.replace,
            self.estimator,
            sampled_proposal=sampled_proposal,
        )
        return Draw(
            features, attention, patches, offsets, sampled_attention, regularizer, sampled_proposal
        )


def _image_ids(x_high: HighResolution, batch: int, device: torch.device) -> Tensor:
    """LongTensor[B]: equal for batch items whose patches come from the same image (one
    ``PatchSource`` shared by the batch, or the same object listed twice)."""
    if isinstance(x_high, Tensor):
        return torch.arange(batch, device=device)
    if isinstance(x_high, PatchSource):
        return torch.zeros(batch, dtype=torch.long, device=device)
    first: dict[int, int] = {}
    ids = [first.setdefault(id(item), i) for i, item in enumerate(x_high)]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _features_once(
    feature: Callable[[Tensor], Tensor], patches: Tensor, offsets: Tensor, images: Tensor
) -> Tensor:
    """``feature`` of ``patches [B, N, C, *size]`` as ``[B * N, ...]``, computed once
    per distinct (image ``images [B]``, position ``offsets [B, N, d]``)."""
    batch, n = offsets.shape[:2]
    keys = torch.cat([images.view(batch, 1, 1).expand(batch, n, 1), offsets], -1).flatten(0, 1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    distinct = int(inverse.max()) + 1
    flat = patches.flatten(0, 1)
    if distinct == len(keys):
        return feature(flat)
    order = torch.arange(len(keys), device=keys.device)
    first = torch.full((distinct,), len(keys), device=keys.device)
    first = first.scatter_reduce(0, inverse, order, "amin")  # one patch per position
    return feature(flat[first])[inverse]


def _explores(exploration: Weight, prior_weight: Weight) -> bool:
    return callable(exploration) or callable(prior_weight) or bool(exploration or prior_weight)


def _proposal(
    module: SamplePatches | AttentionSampling,
    attention: Tensor,
    mask: Tensor | None,
    prior: Tensor | None,
    step: int | None,
) -> Tensor | None:
    """The proposal of a draw by ``module`` (``None``: from the attention itself).

    Only in training mode: prediction samples from the attention it learnt."""
    if not (module.training and _explores(module.exploration, module.prior_weight)):
        return None
    grid = attention.shape[1:]
    return explore(
        attention,
        weight_at(module.exploration, step, "exploration"),
        mask,
        None if prior is None else prior_on_grid(prior, grid),
        weight_at(module.prior_weight, step, "prior_weight"),
    )


def prior_on_grid(prior: Tensor, grid: Sequence[int]) -> Tensor:
    """``prior (Tensor[B, *p])`` averaged onto ``grid`` (the attention's spatial shape)."""
    _checks.tensor(prior, "prior", min_dim=2)
    return _pool_to_grid(prior.float(), grid, "prior", "avg")


def mask_on_grid(mask: Tensor, grid: Sequence[int]) -> Tensor:
    """``mask (BoolTensor[B, *m])`` reduced to ``grid`` (the attention's spatial
    shape) by adaptive max pooling: a cell is True when any of its pixels is."""
    _checks.tensor(mask, "mask", min_dim=2)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape[1:]) == tuple(grid):
        return mask
    return _pool_to_grid(mask.float(), grid, "mask", "max") > 0.5


def _pool_to_grid(x: Tensor, grid: Sequence[int], name: str, kind: str) -> Tensor:
    """``x [B, *s]`` adaptively pooled (``"avg"`` or ``"max"``) to ``[B, *grid]``."""
    grid = tuple(grid)
    if tuple(x.shape[1:]) == grid:
        return x
    if x.dim() - 1 != len(grid) or not 1 <= len(grid) <= 3:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected [B, *grid] with the attention's "
            f"{len(grid)} spatial axes (grid {grid})"
        )
    pool = getattr(F, f"adaptive_{kind}_pool{len(grid)}d")
    return pool(x[:, None], grid)[:, 0]


def attention_sampling(
    attention: Callable[[Tensor], Tensor],
    feature: Callable[[Tensor], Tensor],
    patch_size: int | Sequence[int] | None = None,
    n_patches: int = 10,
    replace: bool = False,
    attention_regularizer: Callable[[Tensor], Tensor] | None = None,
    receptive_field: int = 0,
    *,
    estimator: str = "unbiased",
    generator: torch.Generator | None = None,
    exploration: Weight = 0.0,
    prior_weight: Weight = 0.0,
) -> AttentionSampling:
    """Build the attention-sampling pipeline as one ``nn.Module``.

    Args:
        attention: maps ``x_low [B, C, *low]`` to probabilities ``[B, *att]`` or
            ``[B, 1, *att]`` (e.g. a CNN ending in ``SampleSoftmax``).
        feature: maps patches ``[M, C, *patch_size]`` to features ``[M, D]`` (any
            trailing shape); called once per draw. In training mode on all ``M = B *
            N`` patches; in eval mode on the distinct ones only, those at the same
            position of the same image computed once (repeats come from draws with
            replacement, and from batch items that share one ``PatchSource``, such as
            several draws on one slide), so it must be a function of the patch alone.
        patch_size: ``(height, width)`` in ``x_high`` pixels; ``None`` means the size
            of ``x_low``, as in the reference library.
        n_patches: ``N`` per batch item.
        replace: sample with replacement (if in doubt, don't).
        attention_regularizer: called on the attention map ``[B, *att]`` at every
            forward, e.g. ``MultinomialEntropy``; its value is
            ``module.draw(...).regularizer``, to be added to the training loss.
        receptive_field: of the attention network in ``x_low`` pixels (0 for
            ``padding="same"`` networks); see ``patch_offsets``.
        estimator: ``"unbiased"``, ``"reference"`` or ``"linear"``, see ``expectation``.
        generator: a ``torch.Generator`` on the attention's device to repeat runs.
        exploration / prior_weight: in training mode, draw from the proposal
            ``explore(attention, exploration, mask, prior, prior_weight)`` (uniform
            exploration over the allowed cells and a content prior passed to ``draw``);
            a constant in ``[0, 1)`` or a schedule of the step (``linear_decay``).
            The estimate and its gradients stay unbiased (docs/estimator.md, sampling
            from a proposal); 0 (the default) draws from the attention itself.

    Returns:
        ``AttentionSampling``: ``forward(x_low, x_high, mask=None)`` ->
        ``(features [B, D], attention [B, *att], patches [B, N, C, *patch_size])``;
        ``draw(x_low, x_high, mask=None, generator=None)`` -> :class:`Draw`.
    """
    return AttentionSampling(
        attention,
        feature,
        patch_size,
        n_patches,
        replace,
        attention_regularizer,
        receptive_field,
        estimator,
        generator,
        exploration,
        prior_weight,
    )


class SampleSoftmax(nn.Module):
    """Softmax over all the positions of each batch item, optionally smoothed.

    ``forward(x [B, *S])`` -> ``(1 - smooth) * softmax + smooth / P`` of shape ``[B, *S]``
    (``P`` positions), or ``[B, *S[1:]]`` with ``squeeze_channels`` (``x [B, 1, ...]``,
    channels first). ``smooth`` in ``[0, 1)`` keeps every position sampleable.
    """

    def __init__(self, squeeze_channels: bool = False, smooth: float = 0.0) -> None:
        super().__init__()
        if not 0 <= smooth < 1:
            raise ValueError(f"smooth must be in [0, 1), got {smooth}")
        self.squeeze_channels = squeeze_channels
        self.smooth = smooth

    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor(x, "x", min_dim=2)
        if self.squeeze_channels and x.shape[1] != 1:
            raise ValueError(f"squeeze_channels needs x of shape [B, 1, ...], got {tuple(x.shape)}")
        flat = torch.softmax(x.flatten(1), dim=1)  # [B, P]
        if self.smooth > 0:
            flat = (1 - self.smooth) * flat + self.smooth / flat.shape[1]
        out = flat.view_as(x)
        return out.squeeze(1) if self.squeeze_channels else out

    def extra_repr(self) -> str:
        return f"squeeze_channels={self.squeeze_channels}, smooth={self.smooth}"
