"""Content priors for exploring slides early in training.

See docs/estimator.md (exploration and priors) for how they enter the proposal.

A prior is a non-negative map over a slide's attention view, ``float32 [h, w]``, zero
off tissue. Training may draw patches from a mixture of the attention with it (and
with uniform exploration) while the attention net is still uninformative; the
estimator reweights the draws, so the model learns the same thing, only sooner.

- ``tissue``: uniform over the tissue mask.
- ``hematoxylin``: the hematoxylin density of colour deconvolution (Ruifrok and
  Johnston's H&E-DAB stain vectors, scikit-image's ``rgb2hed``) on tissue: nuclei are
  dense in hematoxylin, so cellular regions are drawn more often.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.app.errors import ConfigError


def tissue_prior(thumbnail: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """1 on tissue, 0 elsewhere: ``float32 [h, w]``."""
    return tissue.astype(np.float32)


def hematoxylin_prior(thumbnail: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density of ``thumbnail`` (uint8 [h, w, 3]) on ``tissue``
    (bool [h, w]), clipped at 0: ``float32 [h, w]``."""
    from skimage.color import rgb2hed

    density = rgb2hed(thumbnail[..., :3])[..., 0]
    return (np.clip(density, 0, None) * tissue).astype(np.float32)


PRIORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "tissue": tissue_prior,
    "hematoxylin": hematoxylin_prior,
}
"""Priors by the name ``TrainConfig.prior`` / ``ats-wsi train --prior`` use."""


def slide_prior(name: str, thumbnail: np.ndarray, tissue: np.ndarray) -> np.ndarray | None:
    """The prior ``name`` of a slide's view (``"none"``: ``None``), never all zero:
    a view without tissue or stain gets a uniform prior."""
    if name == "none":
        return None
    if name not in PRIORS:
        raise ConfigError(f"prior: unknown {name!r}; choose from {['none', *PRIORS]}")
    prior = PRIORS[name](thumbnail, tissue)
    return prior if prior.any() else np.ones_like(prior)
