"""End to end: attention sampling learns a megapixel-style task that low resolution cannot.

Each 256x256 image holds one 16x16 square of stripes: horizontal stripes for class 0,
vertical for class 1. Averaged 8x8 (the low-resolution view), both are the same flat
grey block, so the class is invisible at low resolution (asserted below); the model
must learn where to look (attention on 32x32 cells) and what the patch shows (features
on 4 patches of 32x32 at full resolution). Under uniform attention a patch touches the
square about 3% of the time, so the attention has to learn: checked through the
attention mass it puts on the square's four cells.
"""

import pytest
import torch
from torch import nn

from pipeline import SampleSoftmax, attention_sampling

HIGH, SCALE, SQUARE, PATCH = 256, 8, 16, 32


def _images(labels, generator):
    """Low-resolution views ``[B, 1, 32, 32]``, the images ``[B, 1, 256, 256]`` and the
    squares' top-left low-resolution cells ``[B, 2]``."""
    batch = len(labels)
    x_high = torch.zeros(batch, 1, HIGH, HIGH)
    stripes = (torch.arange(SQUARE) % 2).float()
    horizontal = stripes.view(SQUARE, 1).expand(SQUARE, SQUARE)
    corners = torch.randint(0, (HIGH - SQUARE) // SCALE + 1, (batch, 2), generator=generator)
    for b, (label, (y, x)) in enumerate(
        zip(labels.tolist(), (corners * SCALE).tolist(), strict=True)
    ):
        x_high[b, 0, y : y + SQUARE, x : x + SQUARE] = horizontal.T if label else horizontal
    return nn.functional.avg_pool2d(x_high, SCALE), x_high, corners


def _model():
    attention = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 1, 3, padding=1),
        SampleSoftmax(squeeze_channels=True),
    )
    feature = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )
    sampler = attention_sampling(
        attention,
        feature,
        patch_size=PATCH,
        n_patches=4,
        generator=torch.Generator().manual_seed(1),
    )
    return sampler, nn.Linear(8, 2)


@pytest.fixture
def one_thread():
    # Tiny convolutions run fastest on one thread, above all on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_class_is_invisible_at_low_resolution():
    low_0, high_0, _ = _images(torch.tensor([0]), torch.Generator().manual_seed(5))
    low_1, high_1, _ = _images(torch.tensor([1]), torch.Generator().manual_seed(5))
    assert low_0.shape == (1, 1, 32, 32)
    assert torch.equal(low_0, low_1) and not torch.equal(high_0, high_1)


def test_learns_above_chance_from_sampled_patches(one_thread):
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(2)
    sampler, head = _model()
    optimizer = torch.optim.Adam([*sampler.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(150):
        labels = torch.randint(0, 2, (16,), generator=data)
        x_low, x_high, _ = _images(labels, data)
        features, _, _ = sampler(x_low, x_high)
        loss = nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    labels = torch.randint(0, 2, (256,), generator=data)
    x_low, x_high, corners = _images(labels, data)
    with torch.no_grad():
        features, attention, _ = sampler(x_low, x_high)
        accuracy = (head(features).argmax(1) == labels).float().mean()
    # Chance is 0.5 with a standard deviation of 0.031 over 256 images: 0.75 is 8 sigma.
    assert accuracy >= 0.75, accuracy
    on_square = torch.stack(
        [attention[b, y : y + 2, x : x + 2].sum() for b, (y, x) in enumerate(corners.tolist())]
    )
    assert on_square.mean() > 0.25, on_square.mean()  # uniform attention: 4 / 1024
