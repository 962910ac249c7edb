"""Where the time of one attention-sampling training step goes, on a Megapixel MNIST preset.

    python -m scripts.megapixel_mnist.profile_step --preset easy [--steps 5] [--threads 1]

The step is taken apart with the core's ``plan`` / ``read`` / ``estimate`` (which
together are exactly ``draw``) so that each phase is timed on its own:

- ``attention + sampling``: the attention net on the low-resolution view, N draws;
- ``patch extraction``: the N patches cut from the high-resolution canvas;
- ``attention + features + estimate``: the attention net again (with gradient), the
  feature net on B x N patches, the expectation and the head;
- ``backward`` and ``optimizer step``.

Prints the mean seconds per phase over ``--steps`` steps (after one warm-up step) and
the share of each, then torch.profiler's most expensive operators of one step. Batches
come from the preset's training set, from its start again when it runs out.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .train import PRESETS, build_model, make_datasets

PHASES = (
    "attention + sampling",
    "patch extraction",
    "attention + features + estimate",
    "backward",
    "optimizer step",
)


def step_phases(model, optimizer, x_low, x_high, y, clip_norm: float) -> dict[str, float]:
    """One training step of an ``ATSModel``; seconds per phase."""
    ats, times = model.ats, {}

    def timed(name, fn):
        began = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - began
        return out

    plan = timed(PHASES[0], lambda: ats.plan(x_low))
    patches, offsets = timed(
        PHASES[1], lambda: ats.read(x_low, x_high, plan.samples, plan.attention_size)
    )

    def estimate():
        draw = ats.estimate(x_low, patches, offsets, plan)
        logits, regularizer = model.classify(draw)
        return nn.functional.cross_entropy(logits, y) + regularizer

    loss = timed(PHASES[2], estimate)
    optimizer.zero_grad()
    timed(PHASES[3], loss.backward)

    def update():
        nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()

    timed(PHASES[4], update)
    return times


def cycle(loader: Iterable) -> Iterator:
    """The batches of ``loader``, from the start again when it runs out (re-iterated,
    not cached: a preset's batches may not all fit in memory at once)."""
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="easy")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model = build_model("ats-unbiased", preset).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
    train_set, _ = make_datasets(preset)
    loader = torch.utils.data.DataLoader(train_set, preset.batch_size, shuffle=False)
    batches = cycle(loader)
    x_low, x_high, y = next(batches)
    step_phases(model, optimizer, x_low, x_high, y, preset.clip_norm)  # warm-up
    totals = dict.fromkeys(PHASES, 0.0)
    for _ in range(args.steps):
        x_low, x_high, y = next(batches)
        for name, seconds in step_phases(
            model, optimizer, x_low, x_high, y, preset.clip_norm
        ).items():
            totals[name] += seconds / args.steps
    total = sum(totals.values())
    print(
        f"preset {preset.name}: batch {preset.batch_size}, {preset.n_patches} patches of "
        f"{preset.patch_size}^2, canvas {preset.canvas.size}, {args.threads} thread(s)\n"
    )
    print("| phase | s/step | share |\n|---|---|---|")
    for name, seconds in totals.items():
        print(f"| {name} | {seconds:.3f} | {seconds / total:.0%} |")
    print(f"| total | {total:.3f} | 100% |\n")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_phases(model, optimizer, x_low, x_high, y, preset.clip_norm)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
