"""report.html: built from an output directory's files, checked in headless Chromium.

The output directory is written by the real per-slide writers
(``outputs.write_slide_files``) from ``SlideResult``s made here, so the report sees
every case at once: ok slides, a failed slide, a slide without tissue, QC columns and
probability spreads (``prob_<class>_sd``). Chromium (Debian ``chromium`` and
``chromium-driver``) renders the page; without it the browser tests skip, except
under ``CI=true`` where they fail.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

from pipeline.app import files
from pipeline.app.cli import main
from pipeline.app.prediction.inference import SlideResult
from pipeline.app.results import outputs
from pipeline.app.results.report import REPORT, write_report

CLASSES = ("benign", "tumour")
SCORES = tuple(f"prob_{c}" for c in CLASSES)
COLUMNS = [
    *outputs.prediction_columns(SCORES),
    "prob_benign_sd",
    "prob_tumour_sd",
    "tissue_fraction",
    "mpp",
]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
    "--disable-background-networking --disable-component-update --disable-sync"
).split()


def fake_result(i: int, rng: np.random.Generator) -> SlideResult:
    """An ``ok`` result of a 4000 x 3000 slide: pink blob on white, attention peaked
    at one spot, 6 patches of 48 px from level 0."""
    h, w = 400, 300
    yy, xx = np.mgrid[:h, :w]
    tissue = (yy - 200) ** 2 / 150**2 + (xx - 150) ** 2 / 110**2 < 1
    display = np.where(tissue[..., None], [200, 120, 170], [245, 245, 245]).astype(np.uint8)
    attention = np.where(tissue[::8, ::8], 1.0, 0.0)  # [50, 38]
    attention[10 + i, 15] = 200.0
    attention /= attention.sum()
    tumour = (0.5, 0.2, 0.4, 0.3)[i]  # not in slide order: sorting has work to do
    boxes = np.array([[1000 + 300 * k, 1000 + 100 * i, 48, 48] for k in range(6)])
    return SlideResult(
        slide=f"slide {i:02d}",
        path=f"/data/slide {i:02d}.svs",
        status="ok",
        label=CLASSES[i % 2],
        probs=np.array([1 - tumour, tumour], np.float32),
        display=display,
        attention=attention.astype(np.float32),
        boxes=boxes,
        patch_attention=rng.random(6).astype(np.float32),
        patches=rng.integers(0, 255, (6, 48, 48, 3), dtype=np.uint8),
        slide_shape=(4000, 3000),
    )


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """Four ok slides, one failed, one without tissue; QC and spread columns."""
    out = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        result = fake_result(i, rng)
        outputs.write_slide_files(out, result, SCORES, "absolute" if i else "relative")
        row = result.row(SCORES)
        row.update(
            prob_benign_sd="0.01",
            prob_tumour_sd="0.01",
            tissue_fraction=f"{0.3 + 0.1 * i:.2f}",
            mpp="0.5",
        )
        rows.append(row)
    rows.append(
        {
            "slide": "broken",
            "path": "/data/broken.svs",
            "status": "error",
            "error": "SlideError: /data/broken.svs: not a slide <format>",
        }
    )
    rows.append(
        {
            "slide": "glass",
            "path": "/data/glass.svs",
            "status": "no_tissue",
            "tissue_fraction": "0.00",
            "mpp": "0.5",
        }
    )
    files.write_csv(out / outputs.PREDICTIONS, COLUMNS, rows)
    write_report(out)
    return out


def test_report_names_every_slide_and_escapes_text(out_dir):
    page = (out_dir / REPORT).read_text()
    for name in ("slide 00", "slide 03", "broken", "glass"):
        assert f">{name}</a>" in page
    assert "not a slide &lt;format&gt;" in page and "<format>" not in page
    assert "0.500 ± 0.010" in page  # probability with its spread
    assert "tissue_fraction" in page and "http" not in page.replace("http-equiv", "")


def test_report_command_rebuilds_and_reports_bad_directories(out_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    (copy / REPORT).unlink()
    assert main(["report", str(copy)]) == 0
    original = (out_dir / REPORT).read_text().replace(f"report: {out_dir.name}", "report: copy")
    assert (copy / REPORT).read_text() == original  # the title names the directory
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no predictions.csv" in capsys.readouterr().err


def test_missing_image_is_a_note_not_a_broken_image(out_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    outputs.thumbnail_path(copy, "slide 01").unlink()
    write_report(copy)
    page = (copy / REPORT).read_text()
    assert "missing: thumbnails/slide 01.jpg" in page
    assert "thumbnails/slide%2001.jpg" not in page


# --- in the browser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} (apt: chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="ats-chromium-")
    for flag in [*FLAGS, f"--user-data-dir={profile}", "--window-size=1200,1000"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


LOAD_ALL_IMAGES = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images);
for (const img of images) img.loading = "eager";  // lazy ones would wait for a scroll
Promise.all(images.map((img) => img.decode().then(() => true, () => false)))
  .then((ok) => done(images.map((img, i) =>
    [img.getAttribute("src"), ok[i] && img.naturalWidth > 0])));
"""


def test_rendered_page_has_a_panel_per_slide_and_no_broken_image(out_dir, browser):
    browser.get((out_dir / REPORT).as_uri())
    panels = browser.find_elements("css selector", "section.panel")
    rows = files.read_csv(out_dir / outputs.PREDICTIONS)
    assert [p.find_element("tag name", "h2").text.rsplit(" ", 1)[0] for p in panels] == [
        r["slide"] for r in rows
    ]
    initially = browser.execute_script(
        "return Array.from(document.images).filter((i) => i.complete && i.naturalWidth).length"
    )
    browser.set_script_timeout(30)
    loaded = browser.execute_async_script(LOAD_ALL_IMAGES)
    assert len(loaded) == 4 * (2 + 6)  # thumbnail, heatmap, 6 patches per ok slide
    assert [src for src, ok in loaded if not ok] == []
    assert initially < len(loaded)  # lazy: panels below the fold wait
    errors = {p.get_attribute("data-status"): p for p in panels[4:]}
    assert "not a slide <format>" in errors["error"].find_element("css selector", "pre").text
    assert errors["no_tissue"].find_elements("tag name", "img") == []
    # The gallery is ordered by attention, the rank starting at 1.
    captions = panels[0].find_elements("css selector", ".gallery figcaption")
    values = [float(c.text.split("attention ")[1].split()[0]) for c in captions]
    assert values == sorted(values, reverse=True) and captions[0].text.startswith("#1 ")


def test_colour_bar_is_present_and_stated(out_dir, browser):
    browser.get((out_dir / REPORT).as_uri())
    scales = browser.find_elements("css selector", "figcaption.colour-scale")
    assert len(scales) == 4
    assert "relative to this slide's largest cell" in scales[0].text
    assert all("log scale from" in s.text for s in scales[1:])
    heatmap = browser.find_element("css selector", "img.heatmap")
    browser.execute_script("arguments[0].scrollIntoView(); return arguments[0].decode()", heatmap)
    box = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height, window.devicePixelRatio]",
        heatmap,
    )
    shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
    left, top, width, height, ratio = (float(v) for v in box)
    natural = 300 + outputs.COLOUR_BAR_WIDTH
    x0 = int((left + width * 300 / natural) * ratio)  # where the colour bar strip starts
    strip = shot[int(top * ratio) : int((top + height) * ratio), x0 : int((left + width) * ratio)]
    pixels = strip.reshape(-1, 3).astype(int)
    # viridis' ends, #fde725 and #440154, drawn by the colour bar in the screenshot
    for end in ([253, 231, 37], [68, 1, 84]):
        assert (np.abs(pixels - end).max(axis=1) < 25).sum() > 20, end


def test_table_sorts_by_the_clicked_column(out_dir, browser):
    browser.get((out_dir / REPORT).as_uri())

    def column(index):
        cells = browser.find_elements("css selector", f"#summary tbody td:nth-child({index})")
        return [c.text for c in cells]

    headers = browser.find_elements("css selector", "#summary th button")
    names = [h.text for h in headers]
    tumour = names.index("p(tumour)") + 1
    headers[tumour - 1].click()
    values = column(tumour)
    numbers = [float(v.split(" ±")[0]) for v in values if v]
    assert numbers == sorted(numbers) and len(numbers) == 4
    assert values[-2:] == ["", ""]  # failed slides have no probability: last
    headers[tumour - 1].click()
    numbers = [float(v.split(" ±")[0]) for v in column(tumour) if v]
    assert numbers == sorted(numbers, reverse=True)
    status = names.index("status") + 1
    headers[status - 1].click()
    assert column(status) == sorted(column(status))
    assert column(status)[0] == "error"
