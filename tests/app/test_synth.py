"""The synthetic dataset: its label is visible at level 0 and nowhere coarser."""

import numpy as np
import pytest

import readers
from pipeline.app import files
from pipeline.app.synth import CHECKER_AMPLITUDE, make_layout, write_slide


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    return img[:h, :w].astype(np.float64).reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))


def test_same_seed_positive_and_negative_differ_only_at_high_resolution():
    pos = make_layout((512, 512), seed=5, positive=True, atypical_fraction=1.0)
    neg = make_layout((512, 512), seed=5, positive=False)
    assert pos.positive and not neg.positive
    np.testing.assert_array_equal(pos.cells, neg.cells)
    full_pos, full_neg = pos.render(0, 0, 512, 512, 1.0), neg.render(0, 0, 512, 512, 1.0)
    # Level 0: the checkerboard is there, at full amplitude.
    assert np.abs(full_pos.astype(int) - full_neg).max() >= CHECKER_AMPLITUDE
    # Averaged over 4x4 blocks (what any thumbnail does) it is gone, up to the
    # rounding of each pixel to uint8.
    diff = np.abs(_block_mean(full_pos, 4) - _block_mean(full_neg, 4))
    assert diff.max() <= 1.0
    # And the rendered coarse levels are identical.
    for d in (4.0, 8.0):
        side = int(512 / d)
        np.testing.assert_array_equal(
            pos.render(0, 0, side, side, d), neg.render(0, 0, side, side, d)
        )


def test_written_thumbnails_are_identical_and_level0_is_not(tmp_path):
    for name, positive in (("pos.tiff", True), ("neg.tiff", False)):
        write_slide(tmp_path / name, make_layout((1024, 1024), seed=2, positive=positive))
    with (
        readers.open_slide(tmp_path / "pos.tiff") as p,
        readers.open_slide(tmp_path / "neg.tiff") as n,
    ):
        np.testing.assert_array_equal(p.thumbnail((128, 128)), n.thumbnail((128, 128)))
        full_p = p.read_region((0, 0), 0, (1024, 1024)).astype(int)
        full_n = n.read_region((0, 0), 0, (1024, 1024))
        assert np.abs(full_p - full_n).max() > CHECKER_AMPLITUDE  # after JPEG, still there


def test_cells_lie_in_tissue_and_atypical_only_when_positive():
    layout = make_layout((2048, 2048), seed=9, positive=True, atypical_fraction=0.5)
    assert len(layout.cells) > 50
    assert layout.tissue_inside(layout.cells[:, 0], layout.cells[:, 1]).all()
    assert layout.atypical.sum() == round(0.5 * len(layout.cells))
    assert not make_layout((2048, 2048), seed=9, positive=False).atypical.any()


def test_dataset_labels(dataset):
    rows = files.read_csv(dataset / "labels.csv")
    assert [r["label"] for r in rows] == ["negative", "positive"] * (len(rows) // 2)
    assert all((dataset / r["slide"]).is_file() for r in rows)


def test_bad_sizes():
    with pytest.raises(
        ValueError, match=r"shape: expected \(height, width\) >= 64, got \(32, 512\)"
    ):
        make_layout((32, 512), seed=0, positive=False)


def test_parallel_writing_gives_the_same_files(tmp_path):
    from pipeline.app.synth import write_dataset

    write_dataset(tmp_path / "one", n=2, size=256, seed=4)
    write_dataset(tmp_path / "two", n=2, size=256, seed=4, workers=2)
    for name in ("slide_000.tiff", "slide_001.tiff", "labels.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
