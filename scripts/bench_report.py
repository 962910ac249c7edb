"""Page weight of report.html for a large batch (docs/report.md).

Replicates the ``ok`` slides of an existing ``predict`` output directory into ``--n``
slides (files hard-linked, rows copied under new names), builds the report, and
opens it in headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven by
selenium)::

    python scripts/bench_report.py --source results/ --n 2000 --out /tmp/big-report

Prints the build time, the HTML size, and what the browser fetched to show the top
of the page (image count and bytes on disk) against the directory's total, waiting
``--wait`` seconds for lazy images, and the 1-minute load average before and after
(the machine may be shared). Without Chromium or selenium (or with
``--no-browser``) the browser part is skipped, with a line saying why.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline.app import files
from pipeline.app.results import outputs
from pipeline.app.results.report import REPORT, write_report

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
    "--disable-background-networking --disable-component-update --disable-sync"
).split()


def replicate(source: Path, out: Path, n: int) -> None:
    rows = [r for r in files.read_csv(source / outputs.PREDICTIONS) if r["status"] == "ok"]
    if not rows:
        raise SystemExit(f"{source}: no ok rows to replicate")
    copies = []
    for i in range(n):
        row = dict(rows[i % len(rows)])
        old, new = row["slide"], f"{row['slide']}-{i:05d}"
        pairs = [
            (outputs.heatmap_path(source, old), outputs.heatmap_path(out, new)),
            (outputs.thumbnail_path(source, old), outputs.thumbnail_path(out, new)),
            (outputs.geojson_path(source, old), outputs.geojson_path(out, new)),
        ]
        gallery = outputs.gallery_path(source, old, 0).parent
        pairs += [(p, outputs.gallery_path(out, new, int(p.stem))) for p in gallery.glob("*.png")]
        for src, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
        row["slide"] = new
        copies.append(row)
    files.write_csv(out / outputs.PREDICTIONS, list(rows[0]), copies)


def browser_missing() -> str | None:
    """Why the page cannot be opened in headless Chromium here, or None if it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    return f"{' and '.join(missing)} not found (apt: chromium-driver)" if missing else None


def browse(page: Path, n: int, wait: float = 2.0) -> dict:
    """What headless Chromium loads of ``page`` (``n`` slides): timings, and the images
    decoded at the top of the page and after a jump to the middle panel, ``wait``
    seconds after each."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp()
    for flag in [*FLAGS, f"--user-data-dir={profile}", "--window-size=1300,1000"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.get(page.as_uri())
        time.sleep(wait)  # let lazy images near the viewport arrive
        timing = driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0];"
            "const paint = performance.getEntriesByName('first-contentful-paint')[0];"
            "return [paint ? paint.startTime : -1, t.domContentLoadedEventEnd, t.loadEventEnd]"
        )
        # Resource timing skips file:// URLs: the loaded images are those decoded.
        names = driver.execute_script(
            "return Array.from(document.images).filter((i) => i.complete && i.naturalWidth)"
            ".map((i) => i.src)"
        )
        images = driver.execute_script("return document.images.length")
        # Jump to the middle panel, as a reviewer following a table link does.
        driver.execute_script(f"document.getElementById('slide-{n // 2}').scrollIntoView()")
        time.sleep(wait)
        after_jump = driver.execute_script(
            "return Array.from(document.images).filter((i) => i.complete && i.naturalWidth)"
            ".map((i) => i.src)"
        )
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    from urllib.parse import unquote, urlparse

    fetched = [Path(unquote(urlparse(n).path)) for n in names]
    jumped = [Path(unquote(urlparse(n).path)) for n in after_jump]
    return {
        "first_contentful_paint_ms": timing[0],
        "dom_content_loaded_ms": timing[1],
        "load_ms": timing[2],
        "img_elements": images,
        "images_loaded": len(fetched),
        "images_loaded_bytes": sum(p.stat().st_size for p in fetched if p.is_file()),
        "images_loaded_after_jump_to_the_middle": len(jumped),
        "bytes_loaded_after_jump": sum(p.stat().st_size for p in jumped if p.is_file()),
    }


def main(argv: list[str] | None = None) -> int:
    """Replicate, build and measure the report of ``argv``; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="a predict output directory")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--wait", type=float, default=2.0, help="seconds for lazy images after each scroll"
    )
    parser.add_argument("--no-browser", action="store_true", help="skip the browser part")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    if args.out.exists():
        shutil.rmtree(args.out)
    replicate(args.source, args.out, args.n)
    start = time.perf_counter()
    page = write_report(args.out)
    built = time.perf_counter() - start
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file() and p != page)
    size = page.stat().st_size / 1e6
    print(f"{args.n} slides: report built in {built:.1f} s, {size:.2f} MB HTML")
    print(f"files beside it: {total / 1e6:.0f} MB")
    missing = "--no-browser" if args.no_browser else browser_missing()
    if missing:
        print(f"browser: skipped ({missing})")
    else:
        loaded = browse(args.out / REPORT, args.n, args.wait)
        for key, value in loaded.items():
            print(f"{key}: {value:.0f}" if isinstance(value, float) else f"{key}: {value}")
        share = loaded["images_loaded_bytes"] / total if total else float("nan")
        print(f"loaded at the top of the page / files beside it: {share:.2%}")
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
