"""Megapixel MNIST script: generator invariants, IDX parsing, models, a tiny run."""

import csv
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The script package lives in scripts/ (not installed): import it from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pipeline  # noqa: E402
from scripts.megapixel_mnist import data, models, train  # noqa: E402

TINY = train.PRESETS["tiny"]


@pytest.fixture(scope="module")
def digits():
    return data.load_sklearn_digits("train")


@pytest.fixture(scope="module")
def canvases(digits):
    return data.MegapixelMNIST(digits, 12, data.CanvasConfig((200, 260), n_noise=5), seed=3)


def test_sklearn_digits_are_28x28_in_unit_range():
    train_digits = data.load_sklearn_digits("train")
    test_digits = data.load_sklearn_digits("test")
    assert train_digits.images.shape == (1300, 28, 28)
    assert test_digits.images.shape == (497, 28, 28)
    for pool in (train_digits, test_digits):
        assert pool.images.dtype == np.float32
        assert pool.images.min() == 0 and 0.9 < pool.images.max() <= 1
        assert set(pool.labels.tolist()) == set(range(10))


def test_canvas_holds_three_target_digits_and_two_others(canvases, digits):
    assert canvases.digit_ids.shape == (12, 5)
    assert set(canvases.targets.tolist()) <= set(range(10))
    for i in range(len(canvases)):
        classes = digits.labels[canvases.digit_ids[i]]
        assert (classes[:3] == canvases.targets[i]).all()
        assert (classes[3:] != canvases.targets[i]).all()
        assert canvases[i][2] == canvases.targets[i]


def test_objects_do_not_overlap_and_are_drawn_where_stored(canvases):
    s = 28
    for i in range(len(canvases)):
        pos = canvases.positions[i]
        assert pos.shape == (5 + 5, 2)
        assert (pos >= 0).all() and (pos + s <= np.array([200, 260])).all()
        gap = np.abs(pos[:, None] - pos[None])  # [n, n, 2]
        overlapping = (gap < s).all(-1) & ~np.eye(len(pos), dtype=bool)
        assert not overlapping.any()
        canvas = canvases.high(i)
        for (y, x), image in zip(pos, canvases.objects(i), strict=True):
            np.testing.assert_array_equal(canvas[y : y + s, x : x + s], image)
        # Nothing else is drawn: the canvas mass is the objects' mass.
        assert canvas.sum() == pytest.approx(sum(o.sum() for o in canvases.objects(i)), rel=1e-5)


def test_noise_squares_are_line_patterns(canvases):
    bank = canvases.noise_bank
    assert bank.shape == (50, 28, 28)
    lit = bank > 0
    assert lit.any(axis=(1, 2)).all()
    # Lines, not blobs: a few percent of the square, strokes at digit intensity.
    assert (lit.mean(axis=(1, 2)) < 0.25).all()
    assert bank[lit].min() >= 0.8 and bank.max() <= 1


def test_low_view_equals_area_downscaled_canvas(canvases):
    assert canvases.config.low_size == (24, 31)
    for i in range(len(canvases)):
        low = canvases.low(i)
        assert low.shape == (24, 31)
        np.testing.assert_allclose(low, data.area_downscale(canvases.high(i), (24, 31)), atol=1e-6)


def test_area_downscale_averages_blocks_and_keeps_mass():
    rng = np.random.default_rng(0)
    image = rng.random((12, 18))
    # Integer factor: plain block means.
    blocks = image.reshape(4, 3, 6, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(data.area_downscale(image, (4, 6)), blocks, rtol=1e-6)
    # Fractional factor (12 -> 5): each output averages 2.4 pixels; mass is preserved.
    low = data.area_downscale(image, (5, 7))
    assert low.sum() * (12 / 5) * (18 / 7) == pytest.approx(image.sum(), rel=1e-6)
    np.testing.assert_allclose(data.area_downscale(np.ones((12, 18)), (5, 7)), 1, rtol=1e-6)
    # First output row: pixels 0, 1 fully and 0.4 of pixel 2, over 2.4.
    np.testing.assert_allclose(data.area_matrix(12, 5)[0, :3], [1 / 2.4, 1 / 2.4, 0.4 / 2.4])


def test_generation_is_deterministic_by_seed(digits):
    config = data.CanvasConfig((160, 160), n_noise=3)
    a, b = (data.MegapixelMNIST(digits, 4, config, seed=7) for _ in range(2))
    c = data.MegapixelMNIST(digits, 4, config, seed=8)
    for name in ("targets", "digit_ids", "noise_ids", "positions", "noise_bank"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.high(2), b.high(2))
    assert not np.array_equal(a.positions, c.positions)


def test_crowded_canvas_is_rejected(digits):
    with pytest.raises(ValueError, match="without overlap"):
        data.MegapixelMNIST(digits, 1, data.CanvasConfig((100, 100), n_noise=20), seed=0)


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_idx_files_are_parsed(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 10
    _write_idx(tmp_path / "img", images)
    _write_idx(tmp_path / "lab.gz", labels, compress=True)
    ints = (np.arange(6).reshape(2, 3) - 2).astype(">i4")
    _write_idx(tmp_path / "ints", ints)

    np.testing.assert_array_equal(data.read_idx(tmp_path / "img"), images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "lab.gz"), labels)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "ints"), ints)
    pool = data.load_idx_digits(tmp_path / "img", tmp_path / "lab.gz")
    np.testing.assert_allclose(pool.images, images / 255.0, rtol=1e-6)
    assert pool.labels.tolist() == labels.tolist()
    canvases = data.MegapixelMNIST(pool, 2, data.CanvasConfig((150, 150), n_noise=1), seed=0)
    assert canvases[1][1].shape == (1, 150, 150)


def test_bad_idx_files_raise_value_error(tmp_path):
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "text")
    _write_idx(tmp_path / "short", np.zeros((3, 4, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(ValueError, match="needs"):
        data.read_idx(tmp_path / "short")


def test_mnist_directory_with_standard_names_is_loaded(tmp_path):
    images = np.zeros((10, 28, 28), np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    assert train.load_digits(str(tmp_path), "test").labels.tolist() == list(range(10))
    with pytest.raises(FileNotFoundError, match="train-images"):
        train.load_digits(str(tmp_path), "train")


def test_full_model_computes_the_features_of_the_patches_ats_samples():
    # A one-hot attention map makes SamplePatches read exactly that cell's patch: the
    # feature net on it must equal the full model's dense features at that cell.
    torch.manual_seed(0)
    h, w, H, W, p = 5, 7, 43, 61, 20
    model = models.FullModel(patch_size=p).double()
    x_low, x_high = torch.zeros(2, 1, h, w).double(), torch.rand(2, 1, H, W).double()
    dense = model.patch_features(x_low, x_high)  # [B, D, h, w]
    sampler = pipeline.SamplePatches(1, (p, p))
    for cy, cx in [(0, 0), (4, 6), (2, 3), (0, 6)]:
        attention = torch.zeros(2, h, w).double()
        attention[:, cy, cx] = 1
        patches, _, offsets = sampler(x_low, x_high, attention, return_offsets=True)
        assert (
            offsets[:, 0].tolist()
            == [[int(models.grid_offsets(h, H, p)[cy]), int(models.grid_offsets(w, W, p)[cx])]] * 2
        )
        torch.testing.assert_close(model.features(patches[:, 0]), dense[:, :, cy, cx])


def test_peak_memory_counts_the_forward_activations():
    conv = torch.nn.Conv2d(1, 16, 3)

    class Model(torch.nn.Module):
        def forward(self, x_low, x_high):
            return conv(x_high).relu()

    x = torch.zeros(1, 1, 130, 130)
    output_bytes = 16 * 128 * 128 * 4
    peak = train.peak_forward_memory(Model(), x, x)
    assert 2 * output_bytes <= peak <= 3 * output_bytes  # conv output plus relu output


@pytest.mark.parametrize("name", list(models.MODELS))
def test_training_steps_change_parameters(name):
    torch.manual_seed(0)
    train_set, _ = train.make_datasets(TINY)
    model = train.build_model(name, TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=TINY.lr)
    before = [p.detach().clone() for p in model.parameters()]
    batch = next(iter(torch.utils.data.DataLoader(train_set, TINY.batch_size)))
    for _ in range(2):
        loss, errors = train.train_step(model, optimizer, batch, TINY)
        assert np.isfinite(loss) and 0 <= errors <= TINY.batch_size
    x_low, x_high, _ = batch
    assert torch.isfinite(model(x_low, x_high).regularizer)
    after = list(model.parameters())
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True)]
    assert all(changed), f"{name}: {changed.count(False)} parameter tensors did not change"


def test_tiny_run_writes_metrics_results_and_figures(tmp_path):
    results = train.run(TINY, tmp_path, list(models.MODELS), torch.device("cpu"))
    names = [r["model"] for r in results]
    assert names == [
        "ats-unbiased",
        "ats-unbiased (exact sum)",
        "ats-unbiased (mean of 8 draws)",
        "ats-unbiased (12 patches at test)",
        "ats-reference",
        "ats-reference (exact sum)",
        "low-res-cnn",
        "full",
    ]
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("model,epoch,steps,train_seconds,train_loss")
    assert len(metrics) == 1 + sum(TINY.epochs.values())
    for r in results:
        assert 0 <= r["test_error"] <= 1 and r["test_seconds_per_image"] > 0
        assert r["peak_memory_mb_per_image"] > 0
    full = next(r for r in results if r["model"] == "full")
    ats = next(r for r in results if r["model"] == "ats-unbiased")
    assert full["peak_memory_mb_per_image"] > ats["peak_memory_mb_per_image"]
    for figure in ("test_error.png", "patches.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The saved ats-unbiased model loads into a fresh one (strictly: the same keys).
    from safetensors.torch import load_file

    saved = train.build_model("ats-unbiased", TINY)
    saved.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert not list(tmp_path.glob("*.partial"))


def test_evaluation_averages_the_probabilities_of_several_draws():
    train_set, _ = train.make_datasets(TINY)
    loader = torch.utils.data.DataLoader(train_set, TINY.batch_size)
    torch.manual_seed(0)
    model = train.build_model("ats-unbiased", TINY)
    torch.manual_seed(1)
    one = train.evaluate(model, loader)
    torch.manual_seed(1)
    again = train.evaluate(model, loader, draws=1)
    assert one == again  # draws=1 is the single-draw evaluation, exactly
    torch.manual_seed(1)
    probabilities, labels = [], []
    model.eval()
    with torch.no_grad():
        for x_low, x_high, y in loader:
            draws = [model(x_low, x_high).logits.softmax(1) for _ in range(3)]
            probabilities.append(torch.stack(draws).mean(0))
            labels.append(y)
    p, y = torch.cat(probabilities), torch.cat(labels)
    torch.manual_seed(1)
    loss, error = train.evaluate(model, loader, draws=3)
    assert error == float((p.argmax(1) != y).float().mean())
    assert loss == pytest.approx(float(-p[torch.arange(len(y)), y].log().mean()), rel=1e-5)


def test_cold_start_runs_arms_and_summarises(tmp_path):
    from scripts.megapixel_mnist import cold_start

    cold_start.main(
        [
            "--preset",
            "tiny",
            "--arms",
            "plain",
            "explore+prior",
            "--seeds",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    table = {r["arm"]: r for r in cold_start.summarise(tmp_path)}
    assert set(table) == {"plain", "explore+prior"}
    assert all(r["seeds"] == 1 and r["final_steps"] == 2 for r in table.values())
    assert (tmp_path / "cold_start.png").stat().st_size > 0
    assert "| explore+prior | 1 |" in (tmp_path / "cold_start.md").read_text()
    rows = [{"steps": s, "test_error": e} for s, e in [(10, 0.9), (20, 0.4), (30, 0.05)]]
    assert cold_start.first_below(rows, 0.5)["steps"] == 20
    assert cold_start.first_below(rows, 0.01) is None


def test_centred_head_standardises_the_estimate_over_the_batch():
    import dataclasses

    torch.manual_seed(0)
    train_set, _ = train.make_datasets(TINY)
    x_low, x_high, _ = next(iter(torch.utils.data.DataLoader(train_set, TINY.batch_size)))
    assert isinstance(train.build_model("ats-unbiased", TINY).head, torch.nn.Linear)
    model = train.build_model("ats-unbiased", dataclasses.replace(TINY, centred_head=True))
    norm, linear = model.head
    seen = {}
    norm.register_forward_pre_hook(lambda m, i: seen.update(estimate=i[0].detach()))
    linear.register_forward_pre_hook(lambda m, i: seen.update(head_input=i[0].detach()))
    model(x_low, x_high)
    estimate = seen["estimate"]  # [B, 32]: the estimated features of the batch's canvases
    assert estimate.shape == (TINY.batch_size, 32) and (estimate.std(0) > 0).any()
    centred = estimate - estimate.mean(0)
    expected = centred / (centred.square().mean(0) + norm.eps).sqrt()
    torch.testing.assert_close(seen["head_input"], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen["head_input"].mean(0), torch.zeros(32), atol=1e-5, rtol=0)


def test_refreshed_head_statistics_are_those_of_the_test_time_estimates():
    import dataclasses

    train_set, _ = train.make_datasets(TINY)
    x_low, x_high, _ = next(iter(torch.utils.data.DataLoader(train_set, TINY.batch_size)))
    model = train.build_model("ats-unbiased", dataclasses.replace(TINY, centred_head=True))
    norm = model.head[0]
    model(x_low, x_high)  # one training forward moves the running averages a little
    seen = []
    norm.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
    torch.manual_seed(5)
    model.refresh_head_statistics([(x_low, x_high), (x_low, x_high)])
    assert model.training and norm.momentum == 0.1  # restored
    # Two test-time draws (eval mode: from the attention alone), cumulative average.
    first, second = seen
    torch.testing.assert_close(norm.running_mean, (first.mean(0) + second.mean(0)) / 2)
    torch.testing.assert_close(norm.running_var, (first.var(0) + second.var(0)) / 2)


def test_fitting_the_attention_to_the_prior_moves_its_mass_onto_the_strokes():
    train_set, _ = train.make_datasets(TINY)
    loader = torch.utils.data.DataLoader(train_set, TINY.batch_size)
    x_low = next(iter(loader))[0]
    torch.manual_seed(0)
    model = train.build_model("ats-unbiased", TINY)
    bright = x_low[:, 0] > 0.05

    def mass_on_strokes() -> float:
        with torch.no_grad():
            return float((model.ats.attention(x_low) * bright).sum((1, 2)).mean())

    before = mass_on_strokes()
    features = {k: v.clone() for k, v in model.ats.feature.state_dict().items()}
    steps = model.fit_attention_to_prior(x_low for _ in range(100))
    assert steps == 100
    prior = models.brightness_prior(x_low)
    prior_mass = float(((prior / prior.sum((1, 2), keepdim=True)) * bright).sum((1, 2)).mean())
    assert before < 0.5 * prior_mass < mass_on_strokes()
    # Only the attention net was trained.
    assert all(torch.equal(v, model.ats.feature.state_dict()[k]) for k, v in features.items())


def test_early_patches_are_drawn_in_the_early_training_steps_only():
    import dataclasses

    train_set, _ = train.make_datasets(TINY)
    x_low, x_high, _ = next(iter(torch.utils.data.DataLoader(train_set, TINY.batch_size)))
    preset = dataclasses.replace(TINY, early_patches=7, remedy_steps=2)
    model = train.build_model("ats-unbiased", preset)
    seen = []
    model.ats.feature.register_forward_pre_hook(lambda m, i: seen.append(len(i[0])))
    for step in range(3):
        model(x_low, x_high, step)
    model.eval()
    model(x_low, x_high, 0)
    b, n = TINY.batch_size, TINY.n_patches
    assert seen == [b * 7, b * 7, b * n, b * n]


def test_entropy_ramp_holds_then_moves_linearly_to_its_end():
    ramp = models.entropy_ramp(1e-4, -0.01, 10, 30)
    assert [ramp(s) for s in (0, 10)] == [1e-4, 1e-4]
    assert ramp(20) == pytest.approx((1e-4 - 0.01) / 2)
    assert ramp(30) == ramp(99) == -0.01
    with pytest.raises(ValueError, match="begin_step < end_step"):
        models.entropy_ramp(1e-4, -0.01, 30, 30)


def test_regularizer_schedule_sets_the_strength_of_each_training_step():
    import dataclasses

    train_set, _ = train.make_datasets(TINY)
    x_low, x_high, _ = next(iter(torch.utils.data.DataLoader(train_set, TINY.batch_size)))
    # TINY: 8 canvases in batches of 4 for one epoch, so the budget is 2 steps.
    preset = dataclasses.replace(TINY, regularizer_end=-0.5, epochs={"ats-unbiased": 1})
    model = train.build_model("ats-unbiased", preset)
    entropy = model.ats.attention_regularizer
    strengths = []
    for step in range(3):
        value = model(x_low, x_high, step).regularizer
        strengths.append(entropy.strength)
        attention = model.ats.attend(x_low)[0]
        torch.testing.assert_close(value, pipeline.MultinomialEntropy(entropy.strength)(attention))
    assert strengths == [TINY.regularizer, (TINY.regularizer - 0.5) / 2, -0.5]
    model.eval()
    model(x_low, x_high, 0)
    assert entropy.strength == -0.5  # evaluation leaves it alone


def test_preset_estimator_reaches_the_sampler():
    import dataclasses

    model = train.build_model("ats-unbiased", dataclasses.replace(TINY, estimator="linear"))
    assert model.ats.estimator == "linear"
    assert train.build_model("ats-unbiased", TINY).ats.estimator == "unbiased"


def test_draws_reloads_a_run_and_evaluates_it_over_seeded_draws(tmp_path, capsys):
    import dataclasses

    from scripts.megapixel_mnist import draws

    preset = dataclasses.replace(TINY, centred_head=True, estimator="linear")
    train.run(preset, tmp_path, ["ats-unbiased"], torch.device("cpu"))
    loaded_preset, model = draws.load_run(tmp_path)
    assert loaded_preset == preset
    _, test_set = train.make_datasets(preset)
    loader = torch.utils.data.DataLoader(test_set, preset.batch_size)
    errors = draws.errors_over_draws(model, loader, 3)
    assert errors == draws.errors_over_draws(model, loader, 3)  # seeded: repeatable
    assert len(errors) == 3 and all(0 <= e <= 1 for e in errors)
    draws.main([str(tmp_path), "--repeats", "2"])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {tmp_path} | linear | ") and row.count("±") == 2


def test_profile_step_times_every_phase_of_a_training_step(capsys):
    from scripts.megapixel_mnist import profile_step

    # TINY has two training batches: four steps after the warm-up go round them again.
    profile_step.main(["--preset", "tiny", "--steps", "4", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    table = {name.strip(): (float(s), float(share.strip(" %"))) for name, s, share in rows[1:]}
    assert list(table) == [*profile_step.PHASES, "total"]
    assert all(seconds > 0 for seconds, _ in table.values())
    assert sum(share for _, share in list(table.values())[:-1]) == pytest.approx(100, abs=3)
    assert "Self CPU time total" in out  # torch.profiler's table of one step


def test_command_line_runs_models_apart_and_combines_them(tmp_path):
    # `python -m scripts.megapixel_mnist`: two models in separate runs, then merged.
    common = ["--preset", "tiny", "--device", "cpu", "--epochs", "1", "--seed", "2"]
    train.main([*common, "--models", "ats-reference", "--out", str(tmp_path / "ats")])
    train.main([*common, "--models", "low-res-cnn", "--out", str(tmp_path / "low")])
    runs = [str(tmp_path / "ats"), str(tmp_path / "low")]
    train.main(["--preset", "tiny", "--out", str(tmp_path / "both"), "--combine", *runs])
    with (tmp_path / "both" / "results.csv").open() as f:
        models = [row["model"] for row in csv.DictReader(f)]
    assert models == ["ats-reference", "ats-reference (exact sum)", "low-res-cnn"]
    metrics = (tmp_path / "both" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 2  # one epoch of each model
    assert (tmp_path / "both" / "test_error.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        train.main([*common, "--models", "no-such-model", "--out", str(tmp_path / "x")])
