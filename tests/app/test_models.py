"""The default networks."""

from __future__ import annotations

import torch

from pipeline.app import models


def test_small_feature_cnn_in_chunks_on_the_cpu_is_the_same_network(monkeypatch):
    torch.manual_seed(0)
    net = models.SmallFeatureCNN(width=4)
    patches = torch.rand(10, 3, 24, 20)

    def features_and_grads(chunk_pixels: int):
        monkeypatch.setattr(models, "CPU_CHUNK_PIXELS", chunk_pixels)
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
