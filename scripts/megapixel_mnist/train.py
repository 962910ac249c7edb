"""Train and compare attention sampling and the baselines on Megapixel MNIST.

Run from the repository root:

    python -m scripts.megapixel_mnist --preset quick --out runs/megapixel_mnist_quick

Writes under --out: `metrics.csv` (one row per model and epoch), `results.csv` and
`results.md` (test error, time and peak memory per image), `test_error.png` (test
error per epoch), `patches.png` (an image, its attention and sampled patches) and
`model.safetensors` (the trained `ats-unbiased` model's state dict).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from .data import CanvasConfig, Digits, MegapixelMNIST, load_idx_digits, load_sklearn_digits
from .models import MODELS, ATSModel, exact_twin


@dataclass(frozen=True)
class Preset:
    """One experiment: data geometry and size, optimisation, the models to compare.

    epochs maps a model name to its number of epochs (models absent from it are
    skipped); the paper's settings are the defaults.
    """

    name: str
    canvas: CanvasConfig
    n_train: int
    n_test: int
    epochs: dict[str, int]
    batch_size: int = 128
    patch_size: int = 50
    n_patches: int = 10
    regularizer: float = 1e-4
    lr: float = 1e-3
    clip_norm: float = 1.0
    seed: int = 0
    exploration: float = 0.0
    prior_weight: float = 0.0
    remedy_steps: int = 0
    centred_head: bool = False
    early_patches: int = 0
    prior_init_steps: int = 0
    regularizer_end: float | None = None
    estimator: str = "unbiased"


ALL = dict.fromkeys(MODELS, 1)
PRESETS = {
    p.name: p
    for p in (
        # The reference script's defaults (1500x1500, 50 noise squares, 500 epochs).
        Preset(
            "paper", CanvasConfig((1500, 1500), 0.12, 50), 5000, 1000, dict.fromkeys(MODELS, 500)
        ),
        Preset(
            "quick",
            CanvasConfig((160, 160), 0.12, 3),
            800,
            200,
            {"ats-unbiased": 24, "ats-reference": 24, "low-res-cnn": 20, "full": 2},
            batch_size=16,
            patch_size=32,
        ),
        Preset(
            "tiny",
            CanvasConfig((160, 160), 0.12, 2),
            8,
            4,
            ALL,
            batch_size=4,
            patch_size=24,
            n_patches=3,
        ),
        # The original authors' sanity setting: 500x500 canvases, no noise, scale 0.2,
        # the paper's networks and patches. 18 epochs (1,134 steps) take about 25
        # minutes on one thread of this CPU (docs/cold_start.md).
        Preset(
            "easy", CanvasConfig((500, 500), 0.2, 0), 2000, 500, {"ats-unbiased": 18}, batch_size=32
        ),
    )
}


def load_digits(mnist_dir: str | None, split: str) -> Digits:
    """scikit-learn's digits, or MNIST IDX files from `mnist_dir` (standard names, .gz ok)."""
    if mnist_dir is None:
        return load_sklearn_digits(split)
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        names = [f"{prefix}-{kind}", f"{prefix}-{kind}.gz"]
        paths = [Path(mnist_dir) / n for n in names if (Path(mnist_dir) / n).is_file()]
        if not paths:
            raise FileNotFoundError(f"{mnist_dir}: none of {names} found")
        found.append(paths[0])
    return load_idx_digits(*found)


def make_datasets(preset: Preset, mnist_dir: str | None = None):
    train = MegapixelMNIST(
        load_digits(mnist_dir, "train"), preset.n_train, preset.canvas, seed=preset.seed
    )
    test = MegapixelMNIST(
        load_digits(mnist_dir, "test"), preset.n_test, preset.canvas, seed=preset.seed + 1
    )
    return train, test


def build_model(name: str, preset: Preset) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](preset)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch, preset: Preset, step: int = 0
):
    """One optimisation step (the `step`-th); returns (loss, number of errors) on the batch."""
    x_low, x_high, y = batch
    logits, regularizer = model(x_low, x_high, step)
    loss = nn.functional.cross_entropy(logits, y) + regularizer
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), preset.clip_norm)
    optimizer.step()
    return loss.item(), int((logits.argmax(1) != y).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader, draws: int = 1) -> tuple[float, float]:
    """(mean cross-entropy, error rate) over `loader` of the class probabilities averaged
    over `draws` forwards (independent draws of patches for a sampling model, as
    `ats-wsi predict` averages its draws)."""
    model.eval()
    total_loss, errors, count = 0.0, 0, 0
    for x_low, x_high, y in loader:
        logits = torch.stack([model(x_low, x_high).logits for _ in range(draws)])
        log_mean = logits.log_softmax(2).logsumexp(0) - math.log(draws)  # [B, 10]
        total_loss += float(nn.functional.nll_loss(log_mean, y, reduction="sum"))
        errors += int((log_mean.argmax(1) != y).sum())
        count += len(y)
    model.train()
    return total_loss / count, errors / count


def _to(device: torch.device, batch):
    return [t.to(device) for t in batch]


class _DeviceLoader:
    """A DataLoader whose batches land on `device`."""

    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        return (_to(self.device, batch) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def statistics_loader(train_set, batch_size: int):
    """The batches a centred head's test-time statistics are recomputed from: the same
    first 256 training canvases every time."""
    first = torch.utils.data.Subset(train_set, range(min(len(train_set), 256)))
    return torch.utils.data.DataLoader(first, batch_size)


def refresh_statistics(model: nn.Module, loader) -> None:
    """Recompute a centred head's test-time statistics from `loader`'s
    `(x_low, x_high, y)` batches (`ATSModel.refresh_head_statistics`); other models
    have none."""
    if getattr(model, "centred_head", False):
        model.refresh_head_statistics((x_low, x_high) for x_low, x_high, _ in loader)


def _forever(loader):
    while True:
        yield from loader


def fit(
    name: str, model: nn.Module, train_loader, test_loader, preset: Preset, log, statistics=None
) -> None:
    """Train `model` for its preset epochs, calling `log(row)` after each epoch.

    statistics: training batches from which a centred head's test-time
    statistics are recomputed before each evaluation (`ATSModel.refresh_head_statistics`).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
    step, trained_seconds = 0, 0.0
    if preset.prior_init_steps and isinstance(model, ATSModel):
        start = time.perf_counter()
        views = (x_low for x_low, _, _ in _forever(train_loader))
        model.fit_attention_to_prior(itertools.islice(views, preset.prior_init_steps))
        trained_seconds += time.perf_counter() - start
    for epoch in range(1, preset.epochs[name] + 1):
        start = time.perf_counter()
        total_loss, errors, count = 0.0, 0, 0
        for batch in tqdm(train_loader, desc=f"{name} epoch {epoch}", leave=False):
            loss, batch_errors = train_step(model, optimizer, batch, preset, step)
            step += 1
            total_loss += loss * len(batch[2])
            errors += batch_errors
            count += len(batch[2])
        train_seconds = time.perf_counter() - start
        trained_seconds += train_seconds
        if statistics is not None:
            refresh_statistics(model, statistics)
        test_loss, test_error = evaluate(model, test_loader)
        log(
            {
                "model": name,
                "epoch": epoch,
                "steps": step,
                "train_seconds": trained_seconds,
                "train_loss": total_loss / count,
                "train_error": errors / count,
                "test_loss": test_loss,
                "test_error": test_error,
                "train_seconds_per_image": train_seconds / count,
            }
        )


def peak_forward_memory(model: nn.Module, x_low: torch.Tensor, x_high: torch.Tensor) -> int:
    """Peak bytes of tensor memory allocated during one inference forward.

    On CUDA: torch.cuda.max_memory_allocated above the level before the call. On CPU:
    torch.profiler's allocation records (each op's net allocation and the frees it
    reports) accumulated in time order. Inputs and weights, allocated before, are
    not counted.
    """
    model.eval()
    with torch.no_grad():
        if x_low.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(x_low, x_high)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x_low, x_high)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    deltas = (
        e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage for e in events
    )
    return max(itertools.accumulate(deltas, initial=0))


@torch.no_grad()
def seconds_per_image(model: nn.Module, dataset, device: torch.device, n: int = 20) -> float:
    """Mean inference time of one image (batch of 1), after one warm-up forward."""
    model.eval()
    images = [
        _to(device, (x_low[None], x_high[None]))
        for x_low, x_high, _ in (dataset[i] for i in range(min(n, len(dataset))))
    ]
    model(*images[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x_low, x_high in images:
        model(x_low, x_high)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(images)


def plot_test_error(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        ax.plot(
            [r["epoch"] for r in mine],
            [100 * r["test_error"] for r in mine],
            marker="o",
            label=name,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def plot_patches(model: ATSModel, dataset, index: int, path: Path, device: torch.device) -> None:
    """The canvas with its sampled patches outlined, the attention map and the patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    x_low, x_high, label = dataset[index]
    x_low, x_high = _to(device, (x_low[None], x_high[None]))
    draw = model.ats.draw(x_low, x_high)
    predicted = int(model.classify(draw).logits.argmax(1))
    attention, patches, offsets = draw.attention, draw.patches, draw.offsets
    n = patches.shape[1]
    fig = plt.figure(figsize=(9, 4.2), dpi=80)
    columns = (n + 1) // 2
    grid = fig.add_gridspec(2, 4 + columns)
    ax = fig.add_subplot(grid[:, :2])
    ax.imshow(x_high[0, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    p = model.patch_size
    for y, x in offsets[0].tolist():
        ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), p, p, fill=False, color="red", lw=1))
    ax.set_title(f"canvas (label {label}, predicted {predicted}), sampled patches", fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(grid[:, 2:4])
    ax.imshow(attention[0].cpu().numpy(), cmap="viridis")
    ax.set_title("attention", fontsize=9)
    ax.axis("off")
    for k in range(n):
        ax = fig.add_subplot(grid[k // columns, 4 + k % columns])
        ax.imshow(patches[0, k, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(
    preset: Preset, out: Path, models: list[str], device: torch.device, mnist_dir: str | None = None
) -> list[dict]:
    """Train and measure `models` on `preset`; returns the results rows."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "preset.json").write_text(json.dumps(dataclasses.asdict(preset), indent=2))
    train_set, test_set = make_datasets(preset, mnist_dir)
    metrics_path = out / "metrics.csv"
    metrics_path.unlink(missing_ok=True)
    rows, results = [], []

    def log(row: dict) -> None:
        rows.append(row)
        new = not metrics_path.exists()
        with metrics_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        tqdm.write(
            f"{row['model']} epoch {row['epoch']}: train loss {row['train_loss']:.3f}, "
            f"test error {100 * row['test_error']:.1f}%"
        )

    for name in models:
        torch.manual_seed(preset.seed)
        model = build_model(name, preset).to(device)
        shuffle = torch.Generator().manual_seed(preset.seed)
        loader = torch.utils.data.DataLoader(
            train_set, preset.batch_size, shuffle=True, generator=shuffle
        )
        test_loader = torch.utils.data.DataLoader(test_set, preset.batch_size)
        statistics = statistics_loader(train_set, preset.batch_size)
        fit(
            name,
            model,
            _DeviceLoader(loader, device),
            _DeviceLoader(test_loader, device),
            preset,
            log,
            _DeviceLoader(statistics, device),
        )
        mine = [r for r in rows if r["model"] == name]
        train_seconds = float(np.mean([r["train_seconds_per_image"] for r in mine]))
        results.append(
            measure(name, model, test_set, device, len(mine), mine[-1]["test_error"], train_seconds)
        )
        if isinstance(model, ATSModel):
            # The exact sum the sampled estimate stands for, with the same trained networks.
            exact = exact_twin(model)
            error = evaluate(exact, _DeviceLoader(test_loader, device))[1]
            results.append(
                measure(
                    f"{name} (exact sum)", exact, test_set, device, len(mine), error, float("nan")
                )
            )
        if name == "ats-unbiased":
            partial = out / "model.safetensors.partial"  # a crash leaves no half-written file
            # Channels-last weights are not contiguous; safetensors wants them packed.
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, partial)
            partial.replace(out / "model.safetensors")
            plot_patches(model, test_set, 0, out / "patches.png", device)
            # The probabilities of 8 draws of n_patches averaged, as `ats-wsi predict`
            # does by default: the same networks and patch count, several draws.
            error = evaluate(model, _DeviceLoader(test_loader, device), draws=8)[1]
            row = measure(
                f"{name} (mean of 8 draws)", model, test_set, device, len(mine), error, float("nan")
            )
            row["test_seconds_per_image"] *= 8  # measured for one draw
            results.append(row)
            # The same networks with 4x the patches per canvas at test time: how much of
            # the test error is the variance of a 10-patch estimate.
            trained_patches = model.n_patches
            model.n_patches = 4 * trained_patches
            refresh_statistics(model, _DeviceLoader(statistics, device))
            error = evaluate(model, _DeviceLoader(test_loader, device))[1]
            results.append(
                measure(
                    f"{name} ({model.n_patches} patches at test)",
                    model,
                    test_set,
                    device,
                    len(mine),
                    error,
                    float("nan"),
                )
            )
            model.n_patches = trained_patches
    plot_test_error(rows, out / "test_error.png")
    write_results(results, out, preset)
    return results


def measure(
    name: str,
    model: nn.Module,
    test_set,
    device: torch.device,
    epochs: int,
    test_error: float,
    train_seconds: float,
) -> dict:
    """One results row: error, train and test time per image, peak forward memory."""
    x_low, x_high, _ = test_set[0]
    peak = peak_forward_memory(model, *_to(device, (x_low[None], x_high[None])))
    return {
        "model": name,
        "epochs": epochs,
        "test_error": test_error,
        "train_seconds_per_image": train_seconds,
        "test_seconds_per_image": seconds_per_image(model, test_set, device),
        "peak_memory_mb_per_image": peak / 2**20,
    }


def write_results(results: list[dict], out: Path, preset: Preset) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    lines = [
        f"Preset `{preset.name}`: canvas {preset.canvas.size}, low-res "
        f"{preset.canvas.low_size}, {preset.n_train} train / {preset.n_test} test images.",
        "",
        "| model | epochs | test error | train s/image | test s/image | peak MB/image |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {int(r['epochs'])} | {100 * r['test_error']:.1f}% | "
        f"{_seconds(r['train_seconds_per_image'])} | {_seconds(r['test_seconds_per_image'])} | "
        f"{r['peak_memory_mb_per_image']:.2f} |"
        for r in results
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def combine(runs: list[Path], out: Path) -> None:
    """Merge the metrics and results of runs of one preset made in separate processes."""
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for run_dir in runs:
        with (run_dir / "metrics.csv").open() as f:
            rows += [
                {**r, "epoch": int(r["epoch"]), "test_error": float(r["test_error"])}
                for r in csv.DictReader(f)
            ]
        with (run_dir / "results.csv").open() as f:
            results += [
                {k: v if k == "model" else float(v) for k, v in r.items()}
                for r in csv.DictReader(f)
            ]
    preset = PRESETS[json.loads((runs[0] / "preset.json").read_text())["name"]]
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_test_error(rows, out / "test_error.png")
    write_results(results, out, preset)


def _seconds(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default runs/megapixel_mnist_<preset>)",
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    parser.add_argument(
        "--mnist",
        default=None,
        metavar="DIR",
        help="directory with the MNIST IDX files (default: scikit-learn digits)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lr", type=float, default=None, help="override the preset's lr")
    parser.add_argument(
        "--epochs", type=int, default=None, help="override the preset's epochs (all models)"
    )
    parser.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    parser.add_argument(
        "--exploration",
        type=float,
        default=None,
        help="ATS: weight of uniform exploration (unbiased; see docs/estimator.md)",
    )
    parser.add_argument(
        "--prior-weight",
        type=float,
        default=None,
        help="ATS: weight of the brightness prior of the low-res view",
    )
    parser.add_argument(
        "--remedy-steps",
        type=int,
        default=None,
        help="ATS: decay both weights linearly to 0 over this many steps",
    )
    parser.add_argument(
        "--centred-head",
        action="store_true",
        default=None,
        help="ATS: standardise the estimated features before the head "
        "(a cold-start remedy, see ATSModel)",
    )
    parser.add_argument(
        "--early-patches",
        type=int,
        default=None,
        help="ATS: patches per canvas during the --remedy-steps",
    )
    parser.add_argument(
        "--prior-init-steps",
        type=int,
        default=None,
        help="ATS: first fit the attention net to the brightness prior "
        "for this many batches (a cold-start remedy, see ATSModel)",
    )
    parser.add_argument(
        "--estimator",
        choices=("unbiased", "linear"),
        default=None,
        help="ATS: average of the draws (pipeline.expectation's estimator)",
    )
    parser.add_argument(
        "--regularizer-end",
        type=float,
        default=None,
        help="ATS: ramp the entropy strength to this value (negative: "
        "sharper attention) from --remedy-steps to the budget's end",
    )
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="only merge these runs' metrics and results into --out",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.lr is not None:
        preset = dataclasses.replace(preset, lr=args.lr)
    if args.epochs is not None:
        preset = dataclasses.replace(preset, epochs=dict.fromkeys(preset.epochs, args.epochs))
    overrides = {
        "seed": args.seed,
        "exploration": args.exploration,
        "prior_weight": args.prior_weight,
        "remedy_steps": args.remedy_steps,
        "centred_head": args.centred_head,
        "early_patches": args.early_patches,
        "prior_init_steps": args.prior_init_steps,
        "estimator": args.estimator,
        "regularizer_end": args.regularizer_end,
    }
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; expected a subset of {list(MODELS)}")
    out = args.out or Path("runs") / f"megapixel_mnist_{preset.name}"
    if args.combine:
        combine(args.combine, out)
        return
    run(
        preset,
        out,
        [m for m in models if m in preset.epochs],
        torch.device(args.device),
        args.mnist,
    )
