"""Reading a labels CSV: each hygiene problem gives its own message (no slides read)."""

from __future__ import annotations

import pytest

from pipeline.app import files
from pipeline.app.errors import UserError
from pipeline.app.slide.labels import read_labels


def write(path, rows, columns=("slide", "label")):
    files.write_csv(path, columns, rows)
    return path


def test_clean_table(tmp_path):
    csv = write(
        tmp_path / "l.csv",
        [
            {"slide": "a.tiff", "label": "x", "case": "p1"},
            {"slide": "b.tiff", "label": " y ", "case": ""},
        ],
        ("slide", "label", "case"),
    )
    table = read_labels(csv, tmp_path)
    assert [(r.name, r.label, r.case) for r in table.rows] == [("a", "x", "p1"), ("b", "y", "b")]
    assert table.rows[0].path == tmp_path / "a.tiff" and table.rows[0].line == 2
    assert table.classes == ("x", "y") and table.left_out == [] and table.notes == []


def test_empty_and_whitespace_labels_are_left_out(tmp_path):
    csv = write(
        tmp_path / "l.csv",
        [
            {"slide": "a.tiff", "label": "x"},
            {"slide": "b.tiff", "label": ""},
            {"slide": "c.tiff", "label": "   "},
        ],
    )
    table = read_labels(csv, tmp_path)
    assert [r.name for r in table.rows] == ["a"] and table.classes == ("x",)
    assert table.left_out == [
        f"{csv} line 3: b.tiff: empty label; row left out",
        f"{csv} line 4: c.tiff: empty label; row left out",
    ]


def test_duplicates(tmp_path):
    csv = write(
        tmp_path / "l.csv",
        [
            {"slide": "a.tiff", "label": "x"},
            {"slide": "b.tiff", "label": "x"},
            {"slide": "a", "label": "x"},
            {"slide": "b.tiff", "label": "y"},
            {"slide": "c.tiff", "label": "y"},
        ],
    )
    table = read_labels(csv)
    assert [r.name for r in table.rows] == ["a", "c"]
    (note,) = table.notes
    assert note == f"{csv}: slide a listed on lines 2, 4 with the same label; counted once"
    (conflict,) = table.left_out
    assert "slide b listed on lines 3, 5 with conflicting labels" in conflict
    assert "'x'" in conflict and "'y'" in conflict and conflict.endswith("slide left out")


def test_names_without_extension(tmp_path):
    for name in ("a.svs", "b.tiff", "b.ome.tiff"):
        (tmp_path / name).write_bytes(b"")
    csv = write(
        tmp_path / "l.csv",
        [{"slide": "a", "label": "x"}, {"slide": "b", "label": "y"}, {"slide": "zz", "label": "y"}],
    )
    table = read_labels(csv, tmp_path)
    assert [(r.name, r.path) for r in table.rows] == [
        ("a", tmp_path / "a.svs"),
        ("zz", tmp_path / "zz"),
    ]
    using = tmp_path / "a.svs"
    assert table.notes == [f"{csv} line 2: a listed without its extension; using {using}"]
    assert table.left_out == [
        f"{csv} line 3: b matches several files (b.ome.tiff, b.tiff); row left out"
    ]


def test_missing_file_or_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv: labels CSV not found"):
        read_labels(tmp_path / "nope.csv")
    csv = write(tmp_path / "l.csv", [{"slide": "a", "class": "x"}], ("slide", "class"))
    columns = r"expected columns \['slide', 'label'\], found \['slide', 'class'\]"
    with pytest.raises(UserError, match=columns):
        read_labels(csv)
