"""The default networks."""

from __future__ import annotations

import dataclasses

import torch

import pipeline
from pipeline.app.model import networks


def test_small_feature_cnn_in_chunks_on_the_cpu_is_the_same_network(monkeypatch):
    torch.manual_seed(0)
    net = networks.SmallFeatureCNN(width=4)
    patches = torch.rand(10, 3, 24, 20)

    def features_and_grads(chunk_pixels: int):
        monkeypatch.setattr(networks, "CPU_CHUNK_PIXELS", chunk_pixels)
        calls = []
        hook = net.body.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
        net.zero_grad()
        out = net(patches)
        out.square().sum().backward()
        hook.remove()
        return out.detach(), [p.grad.clone() for p in net.parameters()], calls

    whole, whole_grads, whole_calls = features_and_grads(10 * 24 * 20)
    chunked, chunked_grads, chunked_calls = features_and_grads(3 * 24 * 20)
    assert whole_calls == [10] and chunked_calls == [3, 3, 3, 1]
    assert chunked.shape == (10, 8)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(chunked_grads, whole_grads, strict=True):
        # Weight gradients sum over the patches, in another order: float32 rounding.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_small_networks_convolve_channels_last_with_the_same_result():
    torch.manual_seed(0)
    for net, x in (
        (networks.SmallAttentionCNN(width=4), torch.rand(2, 3, 32, 40)),
        (networks.SmallFeatureCNN(width=4), torch.rand(5, 3, 24, 20)),
    ):
        layouts: list[bool] = []

        def record(module, inputs, layouts=layouts):
            layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))

        hook = net.body[0][0].register_forward_pre_hook(record)
        out = net(x)
        hook.remove()
        assert layouts == [True]
        with torch.no_grad():  # the same layers, applied by hand in the default layout
            h = (x - 0.5) / 0.25
            assert h.is_contiguous()
            for block in net.body:
                h = block(h)
            expected = (
                net.softmax(net.logits(h))
                if isinstance(net, networks.SmallAttentionCNN)
                else torch.amax(h, dim=(-2, -1))
            )
        torch.testing.assert_close(out, expected)


def test_the_configured_estimator_weighs_the_same_draws():
    from pipeline.app.config import ModelConfig

    config = ModelConfig(class_names=("a", "b"), width=4, n_patches=5, patch_size=(16, 16))
    torch.manual_seed(0)
    mean = networks.SlideClassifier(config)
    weighted = networks.SlideClassifier(dataclasses.replace(config, estimator="linear"))
    weighted.load_state_dict(mean.state_dict())
    x_low, x_high = torch.rand(2, 3, 24, 24), torch.rand(2, 3, 96, 96)
    draws = [
        model.classify(x_low, x_high, generator=torch.Generator().manual_seed(1)).draw
        for model in (mean, weighted)
    ]
    torch.testing.assert_close(draws[0].offsets, draws[1].offsets)
    features = mean.feature_net(draws[0].patches.flatten(0, 1)).view(2, 5, -1)
    for draw, estimator in zip(draws, ("unbiased", "linear"), strict=True):
        expected = pipeline.expectation(features, draw.sampled_attention, estimator=estimator)
        torch.testing.assert_close(draw.features, expected)
    assert not torch.allclose(draws[0].features, draws[1].features)
