"""``report.html``: the review page of a prediction directory, built from its files.

The page reads nothing but the output directory (``outputs``): the rows of
``predictions.csv`` and each slide's thumbnail, heatmap, gallery and GeoJSON, so it
can be rebuilt at any time (``ats-wsi report OUT_DIR``, and by ``predict`` at the end
of every run). It is one static HTML file with the images as files beside it: no
network, no framework, a few lines of plain JavaScript to sort the summary table.

Layout: a summary table (one row per slide: slide, status, label, the model's
scores, e.g. the probability of each class, with their spread when
``predictions.csv`` has ``<score>_sd`` columns, any QC columns, the error), then one
panel per slide in the table's order: the display thumbnail with the patch boxes,
the heatmap with its colour bar and the statement of its scale, and the patches at
full resolution by decreasing attention, each captioned with its rank, attention and
level-0 box. Failed slides show their error. For thousands of slides every image is
lazy-loaded (fetched when scrolled near) and each panel is skipped by the browser's
layout until it is near the screen (``content-visibility``); docs/report.md gives
the measured page weight.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from pipeline.app.errors import UserError
from pipeline.app.files import atomic_write_bytes, is_number, read_csv
from pipeline.app.results import outputs

REPORT = "report.html"
SMALL_PATCH = 96
"""Patches smaller than this (CSS pixels) are shown enlarged by a whole factor,
pixels kept square (``image-rendering: pixelated``)."""


@dataclass
class Patch:
    """One sampled patch as the report shows it.

    Attributes:
        index: its detection's index in the GeoJSON (``outputs.gallery_path``).
        rank: 1 for the patch with the most attention.
        attention: its attention probability.
        box: level-0 ``(y, x, h, w)`` of its GeoJSON rectangle (clipped to the slide).
    """

    index: int
    rank: int
    attention: float
    box: tuple[int, int, int, int]


@dataclass
class SlideEntry:
    """A row of ``predictions.csv`` and what the directory holds for it."""

    row: dict[str, str]
    patches: list[Patch] = field(default_factory=list)
    scale: str = ""


@dataclass(frozen=True)
class Columns:
    """The columns of ``predictions.csv``, by role: ``scores`` (the task's, e.g.
    ``prob_<class>``; ``outputs.score_columns_of``), ``spread`` (scores with a
    ``<score>_sd`` column) and ``qc`` (any column the report does not otherwise know,
    e.g. tissue fraction or mpp)."""

    scores: tuple[str, ...]
    spread: frozenset[str]
    qc: tuple[str, ...]

    @classmethod
    def of(cls, header: list[str]) -> Columns:
        scores = outputs.score_columns_of(header)
        spread = frozenset(c for c in scores if outputs.spread_column(c) in header)
        known = {*outputs.BASE_COLUMNS, "error", *scores, *map(outputs.spread_column, spread)}
        return cls(scores, spread, tuple(c for c in header if c not in known))


def read_patches(geojson: Path) -> list[Patch]:
    """The patch detections of a slide's GeoJSON (``outputs.patches_feature_collection``),
    by decreasing attention."""
    features = json.loads(geojson.read_text())["features"]
    detections = [f for f in features if f["properties"].get("objectType") == "detection"]
    attention = [float(f["properties"]["measurements"]["attention"]) for f in detections]
    patches = []
    for rank, i in enumerate(outputs.attention_order(attention), start=1):
        ring = detections[i]["geometry"]["coordinates"][0]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        box = (min(ys), min(xs), max(ys) - min(ys), max(xs) - min(xs))
        patches.append(Patch(int(i), rank, attention[i], box))
    return patches


def read_entries(out_dir: Path) -> tuple[Columns, list[SlideEntry]]:
    """The columns and rows of ``out_dir``'s ``predictions.csv`` with their files."""
    csv_path = out_dir / outputs.PREDICTIONS
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: no such directory")
    if not csv_path.is_file():
        raise UserError(
            f"{out_dir}: no {outputs.PREDICTIONS}, nothing to report "
            "(run ats-wsi predict into it first)"
        )
    rows = read_csv(csv_path)
    header = list(rows[0]) if rows else []
    entries = []
    for row in rows:
        entry = SlideEntry(row)
        slide = row["slide"]
        geojson = outputs.geojson_path(out_dir, slide)
        if row.get("status") == "ok" and geojson.is_file():
            entry.patches = read_patches(geojson)
        heatmap = outputs.heatmap_path(out_dir, slide)
        if row.get("status") == "ok" and heatmap.is_file():
            entry.scale = outputs.heatmap_scale_text(heatmap)
        entries.append(entry)
    return Columns.of(header), entries


def write_report(out_dir: str | os.PathLike) -> Path:
    """Build ``out_dir/report.html`` from the directory's files; returns its path.

    Raises ``FileNotFoundError`` for a missing directory and ``UserError`` when it
    has no ``predictions.csv``.
    """
    out_dir = Path(out_dir)
    columns, entries = read_entries(out_dir)
    path = out_dir / REPORT
    atomic_write_bytes(path, render(out_dir, columns, entries).encode())
    return path


def render(out_dir: Path, columns: Columns, entries: list[SlideEntry]) -> str:
    """The page's HTML (images referenced relative to ``out_dir``)."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.row.get("status", "")] = counts.get(e.row.get("status", ""), 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    panels = "\n".join(_panel(out_dir, i, e, columns) for i, e in enumerate(entries))
    return _PAGE.format(
        title=html.escape(f"ats-wsi report: {out_dir.resolve().name}"),
        summary=html.escape(f"{len(entries)} slides: {summary}" if entries else "no slides"),
        csv=quote(outputs.PREDICTIONS),
        table=_table(entries, columns),
        panels=panels,
        colour_map=outputs.COLOUR_MAP,
    )


def _number(text: str, digits: int = 3) -> str:
    try:
        return f"{float(text):.{digits}f}"
    except ValueError:
        return text


def _score(row: dict[str, str], column: str, columns: Columns) -> str:
    """``0.930 ± 0.020`` (spread when the CSV has it), or ``""``."""
    value = row.get(column, "")
    if not value:
        return ""
    sd = row.get(outputs.spread_column(column), "") if column in columns.spread else ""
    return _number(value) + (f" ± {_number(sd)}" if sd else "")


def _table(entries: list[SlideEntry], columns: Columns) -> str:
    numeric = {c for c in columns.qc if all(is_number(e.row.get(c) or "0") for e in entries)}
    heads = [("slide", "text"), ("status", "text"), ("label", "text")]
    heads += [(outputs.score_heading(c), "number") for c in columns.scores]
    heads += [(c, "number" if c in numeric else "text") for c in columns.qc]
    heads += [("error", "text")]
    head = "".join(
        f'<th data-type="{kind}"><button type="button">{html.escape(name)}</button></th>'
        for name, kind in heads
    )
    body = []
    for i, e in enumerate(entries):
        r = e.row
        cells = [
            f'<td><a href="#slide-{i}" title="{html.escape(r.get("path", ""))}">'
            f"{html.escape(r['slide'])}</a></td>",
            f'<td class="status-{html.escape(r.get("status", ""))}">'
            f"{html.escape(r.get('status', ''))}</td>",
            f"<td>{html.escape(r.get('label', ''))}</td>",
        ]
        for c in columns.scores:
            value = r.get(c, "")
            cells.append(
                f'<td data-value="{html.escape(value)}">{html.escape(_score(r, c, columns))}</td>'
            )
        for c in columns.qc:
            value = r.get(c, "")
            shown = _number(value) if c in numeric and value else value
            cells.append(f'<td data-value="{html.escape(value)}">{html.escape(shown)}</td>')
        cells.append(f'<td class="error">{html.escape(r.get("error", ""))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<table id="summary"><thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{chr(10).join(body)}\n</tbody></table>"
    )


def _image(out_dir: Path, path: Path, alt: str, css: str, zoom: bool = False) -> str:
    """An ``<img>`` of ``path`` (relative to ``out_dir``) with its pixel size, lazy-loaded,
    or a note that the file is missing (no broken image). ``zoom`` enlarges a small
    image by a whole factor to at least ``SMALL_PATCH`` pixels."""
    from PIL import Image

    relative = path.relative_to(out_dir).as_posix()
    try:
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
    except (FileNotFoundError, OSError):
        return f'<p class="missing">missing: {html.escape(relative)}</p>'
    factor = max(1, -(-SMALL_PATCH // max(width, height))) if zoom else 1
    src = quote(relative)
    # A link to the file itself: full size in a new tab (the page shows it smaller).
    return (
        f'<a href="{src}"><img class="{css}" src="{src}" alt="{html.escape(alt)}" '
        f'width="{width * factor}" height="{height * factor}" loading="lazy"></a>'
    )


def _panel(out_dir: Path, i: int, entry: SlideEntry, columns: Columns) -> str:
    r = entry.row
    slide, status = r["slide"], r.get("status", "")
    head = (
        f'<section class="panel" id="slide-{i}" data-status="{html.escape(status)}">\n'
        f'<h2>{html.escape(slide)} <span class="status-{html.escape(status)}">'
        f"{html.escape(status)}</span></h2>\n"
        f'<p class="path">{html.escape(r.get("path", ""))}</p>\n'
    )
    if status != "ok":
        return head + f'<pre class="error">{html.escape(r.get("error", ""))}</pre>\n</section>'
    probs = " · ".join(
        f"{html.escape(outputs.score_heading(c))} {html.escape(_score(r, c, columns))}"
        for c in columns.scores
    )
    qc = "".join(f" · {html.escape(c)} {html.escape(r.get(c, ''))}" for c in columns.qc)
    thumbnail = _image(
        out_dir,
        outputs.thumbnail_path(out_dir, slide),
        f"{slide}: thumbnail with the sampled patches",
        "thumbnail",
    )
    heatmap = _image(
        out_dir, outputs.heatmap_path(out_dir, slide), f"{slide}: attention heatmap", "heatmap"
    )
    gallery = "\n".join(
        "<figure>"
        + _image(
            out_dir,
            outputs.gallery_path(out_dir, slide, p.index),
            f"{slide} patch rank {p.rank}",
            "patch",
            zoom=True,
        )
        + f"<figcaption>#{p.rank} · attention {p.attention:.3g}<br>"
        f"x {p.box[1]}, y {p.box[0]} · {p.box[3]} × {p.box[2]}</figcaption></figure>"
        for p in entry.patches
    )
    return (
        head
        + f'<p class="prediction">label <b>{html.escape(r.get("label", ""))}</b> · '
        + f"{probs}{qc}</p>\n"
        + '<div class="views">\n'
        + f"<figure>{thumbnail}<figcaption>Thumbnail; boxes: the sampled patches, "
        "numbered by attention rank</figcaption></figure>\n"
        + f'<figure>{heatmap}<figcaption class="colour-scale">Colour ({outputs.COLOUR_MAP}): '
        + f"{html.escape(entry.scale or 'scale not recorded')}</figcaption></figure>\n</div>\n"
        + f"<h3>Sampled patches by attention ({len(entry.patches)}; "
        "level-0 pixel boxes)</h3>\n" + f'<div class="gallery">\n{gallery}\n</div>\n</section>'
    )


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }}
th button {{ font: inherit; font-weight: bold; border: 0; background: none; cursor: pointer;
             padding: 0; }}
th[aria-sort=ascending] button::after {{ content: " \\25B2"; }}
th[aria-sort=descending] button::after {{ content: " \\25BC"; }}
td[data-value] {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.error {{ color: #a00; max-width: 40em; }}
.status-error, .status-no_tissue {{ color: #a00; font-weight: bold; }}
.panel {{ border-top: 2px solid #888; padding: 0.5em 0 1em; content-visibility: auto;
          contain-intrinsic-size: auto 900px; }}
.panel h2 {{ margin: 0.2em 0; font-size: 1.2em; }}
.path {{ color: #666; margin: 0; font-size: 0.9em; }}
.views {{ display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }}
.views figure {{ width: min(520px, 90vw); }}
.views img {{ width: 100%; height: auto; display: block; }}
figure {{ margin: 0; }}
figcaption {{ font-size: 0.85em; color: #444; max-width: 520px; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.gallery figcaption {{ font-size: 0.75em; }}
img.patch {{ image-rendering: pixelated; display: block; }}
pre.error {{ color: #a00; white-space: pre-wrap; background: #fff4f4; padding: 0.5em; }}
.missing {{ color: #a00; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{summary}. Data: <a href="{csv}">predictions.csv</a>. Heatmaps in {colour_map},
transparent where the attention is 0 (no tissue). Click a column header to sort.</p>
{table}
{panels}
<script>
// Sort the summary table by the clicked column (numbers by value, blanks last).
for (const th of document.querySelectorAll("#summary th")) {{
  th.querySelector("button").addEventListener("click", () => {{
    const col = th.cellIndex, numeric = th.dataset.type === "number";
    const dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    for (const other of th.parentElement.children) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    const key = (row) => {{
      const cell = row.cells[col];
      return cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent;
    }};
    const tbody = th.closest("table").tBodies[0];
    const rows = Array.from(tbody.rows);
    rows.sort((a, b) => {{
      const x = key(a), y = key(b);
      if (x === "" || y === "") return (x === "") - (y === "");
      if (numeric) return dir * (parseFloat(x) - parseFloat(y));
      return dir * x.localeCompare(y, undefined, {{numeric: true}});
    }});
    tbody.append(...rows);
  }});
}}
</script>
</body>
</html>
"""
