"""attention_sampling, SampleSoftmax and MultinomialEntropy."""

import math

import pytest
import torch
from torch import nn

from pipeline import (
    MultinomialEntropy,
    SampleSoftmax,
    attention_sampling,
    extract_patches,
    patch_offsets,
)


class _Recording(nn.Module):
    """A real feature network (flatten + linear) that records the shapes it is called on."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.calls = []

    def forward(self, patches):
        self.calls.append(tuple(patches.shape))
        return self.linear(patches.flatten(1))


def _model(regularizer=None, patch_size=(6, 5), keep_channel=False, **kwargs):
    attention = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), SampleSoftmax(not keep_channel))
    feature = _Recording(3 * patch_size[0] * patch_size[1], 4)
    return attention_sampling(
        attention, feature, patch_size, n_patches=5, attention_regularizer=regularizer, **kwargs
    )


def test_forward_shapes_and_one_feature_call():
    torch.manual_seed(0)
    model = _model(generator=torch.Generator().manual_seed(1))
    x_low, x_high = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 40, 40)
    features, attention, patches = model(x_low, x_high)
    assert features.shape == (2, 4) and attention.shape == (2, 8, 8)
    assert patches.shape == (2, 5, 3, 6, 5)
    assert model.feature.calls == [(10, 3, 6, 5)]
    features.sum().backward()
    # Gradients reach the attention network through the estimator.
    assert model.attention[0].weight.grad.abs().sum() > 0
    assert model.feature.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("replace", [False, True])
def test_eval_runs_the_feature_network_once_per_distinct_position(replace):
    """K draws on one image (one object listed K times, as a PatchSource shared by the
    batch is) repeat positions: in eval mode each is computed once, and the estimate
    equals that of K separate copies of the image, where nothing is shared."""
    torch.manual_seed(0)
    model = _model(replace=replace).eval()
    k, image = 4, torch.rand(3, 40, 40)
    x_low = torch.rand(1, 3, 4, 4).expand(k, -1, -1, -1)  # 16 cells, 4 x 5 patches

    def draw(x_high):
        return model.draw(x_low, x_high, generator=torch.Generator().manual_seed(3))

    shared = draw([image] * k)
    distinct = len(torch.unique(shared.offsets.flatten(0, 1), dim=0))
    assert model.feature.calls[-1][0] == distinct < k * 5
    separate = draw([image.clone() for _ in range(k)])
    items = torch.arange(k).view(k, 1, 1).expand(k, 5, 1)
    per_item = len(torch.unique(torch.cat([items, separate.offsets], -1).flatten(0, 1), dim=0))
    assert model.feature.calls[-1][0] == per_item  # repeats within a draw: with replacement
    assert (per_item < k * 5) if replace else (per_item == k * 5)
    torch.testing.assert_close(shared.features, separate.features)
    torch.testing.assert_close(shared.offsets, separate.offsets)
    model.train()
    draw([image] * k)
    assert model.feature.calls[-1][0] == k * 5  # training: every patch, as the batch is


def test_attention_with_a_channel_axis_and_default_patch_size():
    torch.manual_seed(0)
    attention = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), SampleSoftmax())  # [B, 1, h, w]
    model = attention_sampling(attention, _Recording(3 * 8 * 8, 2), n_patches=3)
    features, att, patches = model(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 32, 32))
    assert att.shape == (1, 8, 8) and patches.shape == (1, 3, 3, 8, 8)


def test_draw_returns_what_forward_used_and_the_regularizer():
    torch.manual_seed(0)
    regularizer = MultinomialEntropy(strength=0.5)
    model = _model(regularizer)
    x_low, x_high = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 40, 40)
    out = model.draw(x_low, x_high, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out.regularizer, regularizer(out.attention))
    # The offsets and probabilities are those of the patches the feature net saw.
    assert torch.equal(out.patches, extract_patches(x_high, out.offsets, (6, 5)))
    cells = (out.offsets + torch.tensor([3, 2])) * 8 // 40  # patch centres -> cells
    picked = out.attention.flatten(1).gather(1, cells[..., 0] * 8 + cells[..., 1])
    torch.testing.assert_close(out.sampled_attention, picked)
    # Forward is the first three outputs of a draw with the same generator state.
    model.generator = torch.Generator().manual_seed(4)
    features, attention, patches = model(x_low, x_high)
    assert torch.equal(patches, out.patches) and torch.equal(features, out.features)
    out.regularizer.backward()
    assert model.attention[0].weight.grad.abs().sum() > 0
    assert _model().draw(x_low, x_high).regularizer.item() == 0


def test_mask_at_the_view_resolution_is_pooled_to_the_attention_grid():
    torch.manual_seed(0)
    # Attention on a 4 x 4 grid (stride-2 conv) of an 8 x 8 view.
    attention = nn.Sequential(nn.Conv2d(3, 1, 3, stride=2, padding=1), SampleSoftmax(True))
    model = attention_sampling(attention, _Recording(3 * 6 * 5, 4), (6, 5), n_patches=2)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 5, 2] = True  # one view pixel, inside attention cell (2, 1)
    out = model.draw(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 40, 40), mask=mask)
    expected = torch.zeros(1, 4, 4)
    expected[0, 2, 1] = 1
    assert torch.equal(out.attention, expected)
    with pytest.raises(ValueError, match="spatial axes"):
        model.draw(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 40, 40), mask=mask[0])


def test_mask_restricts_the_sampled_cells():
    torch.manual_seed(0)
    model = _model(receptive_field=2, generator=torch.Generator().manual_seed(2))
    x_high = torch.rand(2, 3, 40, 40)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 1, 6] = True
    mask[1, 7, 0] = True
    _, attention, patches = model(torch.rand(2, 3, 8, 8), x_high, mask=mask)
    assert (attention[~mask] == 0).all() and (attention[mask] == 1).all()
    # Only one cell is allowed: the first patch is that cell's patch; later draws are
    # zero-probability cells and the estimate is the exact (single-cell) one.
    cells = torch.tensor([[[1, 6]], [[7, 0]]])
    offsets = patch_offsets(cells, (8, 8), (8, 8), (40, 40), (6, 5), receptive_field=2)
    assert torch.equal(patches[:, :1], extract_patches(x_high, offsets, (6, 5)))
    features = model.feature.linear(patches[:, 0].flatten(1))
    torch.testing.assert_close(model(torch.rand(2, 3, 8, 8), x_high, mask=mask)[0], features)


def test_estimator_pass_through_and_validation():
    x_low, x_high = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 40, 40)
    outputs, grads = [], []
    for estimator in ("unbiased", "reference"):
        torch.manual_seed(0)  # same weights, same draws
        model = _model(estimator=estimator, generator=torch.Generator().manual_seed(3))
        features, _, _ = model(x_low, x_high)
        features.sum().backward()
        outputs.append(features.detach())
        grads.append(model.attention[0].weight.grad)
    torch.testing.assert_close(outputs[0], outputs[1])  # same forward
    assert not torch.allclose(grads[0], grads[1])  # different attention gradient
    with pytest.raises(ValueError, match="estimator"):
        _model(estimator="other")
    with pytest.raises(ValueError, match="n_patches must be >= 1"):
        attention_sampling(nn.Identity(), nn.Identity(), n_patches=0)


def test_sample_softmax():
    x = torch.randn(2, 1, 3, 4, dtype=torch.float64)
    out = SampleSoftmax()(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.sum((1, 2, 3)), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(out.flatten(1), torch.softmax(x.flatten(1), 1))
    smooth = SampleSoftmax(squeeze_channels=True, smooth=0.2)(x)
    assert smooth.shape == (2, 3, 4)
    torch.testing.assert_close(smooth, 0.8 * out.squeeze(1) + 0.2 / 12)
    assert smooth.min() >= 0.2 / 12
    with pytest.raises(ValueError, match="smooth"):
        SampleSoftmax(smooth=1.0)
    with pytest.raises(ValueError, match=r"\[B, 1, \.\.\.\]"):
        SampleSoftmax(squeeze_channels=True)(torch.randn(2, 3, 4, 4))


def test_multinomial_entropy_value_and_direction():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    entropy = torch.tensor([1.5 * math.log(2), 0.0], dtype=torch.float64)
    value = MultinomialEntropy(strength=2.0, eps=1e-12)(p)
    torch.testing.assert_close(value, -2.0 * entropy.mean(), atol=1e-9, rtol=0)
    # Minimising it with a positive strength raises the entropy; negative lowers it.
    for strength, direction in [(1.0, 1), (-1.0, -1)]:
        logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]], requires_grad=True)
        start = _entropy(torch.softmax(logits, 1))
        optimizer = torch.optim.SGD([logits], lr=0.5)
        for _ in range(10):
            optimizer.zero_grad()
            MultinomialEntropy(strength)(torch.softmax(logits, 1)).backward()
            optimizer.step()
        assert direction * (_entropy(torch.softmax(logits, 1)) - start) > 0.1


def _entropy(p):
    return -(p * p.log()).sum().item()


def test_integer_arguments_of_any_integer_type():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    attention = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), SampleSoftmax(True))
    model = attention_sampling(
        attention, _Recording(3 * 6 * 5, 4), (np.int64(6), np.int32(5)), n_patches=np.int64(3)
    )
    _, _, patches = model(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 40, 40))
    assert patches.shape == (1, 3, 3, 6, 5) and model.n_patches == 3
    with pytest.raises(TypeError, match="n_patches must be an int, got float"):
        attention_sampling(attention, nn.Identity(), n_patches=3.0)
    with pytest.raises(TypeError, match="patch_size must be an int, got float"):
        model.patch_size = (6.0, 5)
        model(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 40, 40))
