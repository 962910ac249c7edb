"""Feature encoders by name, their input normalisation, and their weights from local files.

``ModelConfig.feature_net`` names the network that turns patches into features:

- ``"small"``: the built-in ``SmallFeatureCNN`` (``models.FEATURE_NETS``), trained from
  scratch;
- ``"timm:<model name>"``: any timm architecture (``pip install 'ats-wsi[timm]'``),
  built with ``pretrained=False, num_classes=0`` so it returns its pooled features,
  e.g. ``timm:resnet18`` (512 features) or ``timm:vit_small_patch16_224`` (384);
- ``"<module.path>:<callable>"``: a user factory, called without arguments, returning
  ``(nn.Module, out_width)``; the module maps ``float [M, 3, h, w]`` to ``[M, out_width]``.

Nothing is downloaded: pretrained weights come from a local file the user names
(``ModelConfig.feature_weights``, ``--feature-weights``): safetensors, or ``.bin`` /
``.pth`` read by ``torch.load(weights_only=True)`` (tensors only, no code). A file that
does not fit the architecture is a one-line ``ConfigError`` naming the missing and
unexpected keys.

External encoders (timm and factories) are wrapped in ``Encoder``, which resizes the
patches to the encoder's input size and normalises them with its mean and std, so
patches stay RGB in ``[0, 1]`` everywhere outside the model. For timm models those
come from the architecture's pretrained config (e.g. ImageNet mean/std, 224 x 224) and
are written into the run's ``config.json`` (``resolve``), where the user may override
them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.app.config import ModelConfig
from pipeline.app.errors import ConfigError, UserError

TIMM_PREFIX = "timm:"
TORCH_PICKLE_SUFFIXES = (".bin", ".pth", ".pt")
"""Weights files read with ``torch.load(weights_only=True)``; anything else is safetensors."""


class Encoder(nn.Module):
    """An external feature network with its input handling inside the model.

    ``forward(patches float [M, 3, h, w] RGB in [0, 1]) -> float [M, out_features]``:
    patches are resized to ``input_size`` (bilinear, antialiased) when they differ,
    normalised ``(x - mean) / std`` per channel, then passed to ``net``.

    Attributes:
        net: the wrapped network; a weights file holds exactly its ``state_dict`` keys.
        out_features: width of the features.
        input_size: ``(h, w)`` the network sees, or None to take patches as they come.
    """

    def __init__(
        self,
        net: nn.Module,
        out_features: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        input_size: Sequence[int] | None,
    ) -> None:
        super().__init__()
        self.net = net
        self.out_features = int(out_features)
        self.input_size = None if input_size is None else tuple(int(s) for s in input_size)
        # Not persistent: the normalisation is part of the config, not of the weights.
        self.register_buffer("mean", _channels(mean, 0.0), persistent=False)
        self.register_buffer("std", _channels(std, 1.0), persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(patches.shape[-2:]) != self.input_size:
            patches = F.interpolate(
                patches, size=self.input_size, mode="bilinear", antialias=True, align_corners=False
            )
        features = self.net((patches - self.mean) / self.std)
        return features.flatten(1)  # [M, D]: some factories keep [M, D, 1, 1]


def _channels(values: Sequence[float] | None, default: float) -> torch.Tensor:
    values = (default,) * 3 if values is None else tuple(float(v) for v in values)
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def is_external(name: str) -> bool:
    """True for ``timm:`` names and ``module:callable`` factories."""
    return ":" in name


def is_factory(name: str) -> bool:
    """True for a ``module:callable`` factory: code that building the encoder imports
    and calls."""
    return is_external(name) and not name.startswith(TIMM_PREFIX)


def check_trusted(name: str, trusted: str | None, source: str) -> None:
    """Refuse a factory that a saved file (``source``) names unless the user named
    the same one (``trusted``, ``--trust-feature-net``): a model directory from
    elsewhere must not make this process import and call code of its choosing."""
    if is_factory(name) and name != trusted:
        raise ConfigError(
            f"{source}: feature_net {name!r} would import and call code that the model "
            f"directory names; if you trust it, name it yourself: --trust-feature-net "
            f"{name} (Python: trust_feature_net={name!r})"
        )


def _timm():
    try:
        import timm
    except ImportError as e:
        raise UserError(
            f"timm encoders need the optional extra: pip install 'ats-wsi[timm]' ({e})"
        ) from None
    return timm


def build_external(config: ModelConfig) -> Encoder:
    """The ``Encoder`` of ``config.feature_net`` (a ``timm:`` name or a factory), with
    random weights and the normalisation of ``config`` (see ``resolve``)."""
    name = config.feature_net
    if name.startswith(TIMM_PREFIX):
        timm = _timm()
        arch = name[len(TIMM_PREFIX) :]
        try:
            net = timm.create_model(arch, pretrained=False, num_classes=0)
        except RuntimeError as e:  # timm's "Unknown model"
            raise ConfigError(f"feature_net {name!r}: {e}") from None
        width = net.num_features
    else:
        net, width = _call_factory(name)
    return Encoder(net, width, config.feature_mean, config.feature_std, config.feature_input_size)


def _call_factory(name: str) -> tuple[nn.Module, int]:
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"feature_net {name!r}: cannot import the factory ({e})") from None
    made = factory()
    if (
        not isinstance(made, tuple)
        or len(made) != 2
        or not isinstance(made[0], nn.Module)
        or isinstance(made[1], bool)
        or not isinstance(made[1], int)
    ):
        raise ConfigError(
            f"feature_net {name!r}: the factory must return (nn.Module, out_width), "
            f"got {type(made).__name__}"
        )
    return made


def resolve(config: ModelConfig) -> ModelConfig:
    """``config`` with what a run records about its encoder filled in.

    For ``timm:`` encoders, ``feature_mean`` / ``feature_std`` / ``feature_input_size``
    left as None are taken from the architecture's pretrained config (e.g. for
    ``timm:resnet18``: ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225),
    224 x 224). With ``feature_weights``, its path becomes absolute and its SHA-256 is
    recorded in ``feature_weights_sha256`` (a different recorded hash is an error).
    """
    changes: dict = {}
    if config.feature_net.startswith(TIMM_PREFIX):
        pretrained = _timm().get_pretrained_cfg(config.feature_net[len(TIMM_PREFIX) :])
        if pretrained is not None:
            defaults = {
                "feature_mean": tuple(pretrained.mean),
                "feature_std": tuple(pretrained.std),
                "feature_input_size": tuple(pretrained.input_size[-2:]),
            }
            changes = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    if config.feature_weights is not None:
        path = Path(config.feature_weights).absolute()
        changes["feature_weights"] = str(path)
        changes["feature_weights_sha256"] = checked_sha256(path, config.feature_weights_sha256)
    return dataclasses.replace(config, **changes)


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def checked_sha256(path: str | os.PathLike, expected: str | None) -> str:
    """SHA-256 of the weights file ``path``; a ``ConfigError`` when ``expected`` is
    given and differs (not the weights the run was made with)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: encoder weights file not found")
    actual = sha256(path)
    if expected is not None and actual != expected:
        raise ConfigError(
            f"{path}: encoder weights differ from the run's (SHA-256 {actual[:16]}..., "
            f"config.json records {expected[:16]}...)"
        )
    return actual


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or ``.bin`` / ``.pth`` / ``.pt``
    through ``torch.load(weights_only=True)`` (no code is unpickled). A checkpoint
    that nests its tensors under ``state_dict`` or ``model`` is unwrapped."""
    path = Path(path)
    try:
        if path.suffix.lower() in TORCH_PICKLE_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: encoder weights file not found") from None
    except Exception as e:  # a corrupt or foreign file: reported in one line
        raise ConfigError(f"{path}: not a readable weights file ({_reason(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a dict of tensors")
    return state


def _reason(error: Exception) -> str:
    """One line of ``error``: torch's refusal of a pickle keeps only its cause (the
    rest of its text suggests ``weights_only=False``, which is not an option here)."""
    text = " ".join(str(error).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0]
        text = f"not a tensors-only checkpoint: {text.strip()}"
    return f"{type(error).__name__}: {text}"


def load_weights(encoder: nn.Module, path: str | os.PathLike) -> None:
    """Load the weights file ``path`` into ``encoder`` (the wrapped ``net`` of an
    ``Encoder``, else the module itself), all keys and shapes matching.

    A timm model's classifier weights (its pretrained config's ``classifier``, e.g.
    ``fc.*``) are ignored: the encoder is built without that head (``num_classes=0``).
    """
    target = encoder.net if isinstance(encoder, Encoder) else encoder
    state = read_weights(path)
    head = getattr(target, "pretrained_cfg", {}).get("classifier")
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{h}.") for h in heads)}
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{path}: weights do not fit the encoder: missing keys {_some(missing)}, "
            f"unexpected keys {_some(unexpected)}"
        )
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"{path}: weights do not fit the encoder: {len(wrong)} tensors of another shape, "
            f"e.g. {k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        )
    target.load_state_dict(state, strict=True)


def _some(keys: list[str], limit: int = 5) -> str:
    """``[a, b, c] (+7 more)``: a key list short enough for one line."""
    shown = "[" + ", ".join(keys[:limit]) + "]"
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def parameter_groups(
    attention_and_head: list[nn.Parameter], encoder: nn.Module, lr: float, feature_lr: float | None
) -> list[dict]:
    """Optimizer groups: the attention net and head at ``lr``, the encoder's trainable
    parameters at ``feature_lr`` (default ``lr``); a frozen encoder has none."""
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    groups = [{"params": attention_and_head, "lr": lr}]
    if trainable:
        groups.append({"params": trainable, "lr": lr if feature_lr is None else feature_lr})
    return groups
