"""A report of many rows: paged data scripts, sort and filter over all rows, full images, any copy of the folder.

A finished run is fabricated in the stored layout (tests/fabricate.py: results
table, summary, item folders with meta.json and loss.csv; an output image in a
few items), the report is built by the real ``build_report`` with its default
paging, and headless Chromium (Debian's, through Playwright) opens it from
``file://``. The run is big enough for many pages of cards (1,200 rows: 48 on
the page, then pages of 24) and small enough to build in seconds.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from fabricate import expected, fabricate, item_of

from nst_run import report

ROWS = 1_200
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update"]
FULL_SIZE = (640, 360)  # larger than the output thumbnail (OUTPUT_THUMB_PX), so the zoomed image tells which it is
SHOWN_IDS = "els => els.map(e => e.textContent)"


def big_image(path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", FULL_SIZE, (10, 160, 90)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The fabricated run's folder, its report built with the default paging; row 1's output image is full size."""
    run = fabricate(tmp_path_factory.mktemp("paged-report"), ROWS, image_every=25, iterations=100)
    big_image(run.parents[1] / "items" / item_of(0) / "stylized.png")
    report.build_report(str(run))
    return run


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000}, offline=True
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    """A fresh tab that records console errors, CSP refusals and script errors (checked at the end of each test)."""
    tab = browser.new_page()
    problems: list[str] = []
    tab.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    tab.on("pageerror", lambda err: problems.append(f"Uncaught {err}"))
    yield tab
    tab.close()
    assert not [m for m in problems if "Content Security Policy" in m or "Refused" in m or "Uncaught" in m], problems


def open_report(page, folder: Path) -> None:
    page.goto((folder / "report.html").as_uri())
    page.wait_for_function("() => !document.getElementById('sort').disabled")  # the whole index has loaded


def shown_ids(page) -> list[str]:
    return page.eval_on_selector_all("#cards article.card h2.id", SHOWN_IDS)


def data_scripts(page) -> list[str]:
    return page.eval_on_selector_all("script[src]", "els => els.map(e => e.getAttribute('src'))")


def test_no_file_over_the_cap_and_rebuilds_prune_what_they_no_longer_use(built, tmp_path):
    files = [built / "report.html", *(built / report.DATA_DIR).iterdir()]
    assert max(f.stat().st_size for f in files) <= report.MAX_FILE_BYTES
    cards = sorted(f.name for f in files if f.name.startswith("cards-"))
    assert len(cards) == -(-(ROWS - report.VIEW_ROWS) // report.PAGE_ROWS)  # every card past the page's, PAGE_ROWS a file
    page = (built / "report.html").read_text(encoding="utf-8")
    assert page.count('<article class="card') == report.VIEW_ROWS
    assert all(name in page for name in cards)  # the page names every script it may load

    # A lower cap, on a copy: more, smaller files, none over it; the scripts of the first build are deleted.
    copy = tmp_path / "out"
    shutil.copytree(built.parents[1], copy)
    run = copy / "runs" / built.name
    cap = 64_000
    report.build_report(str(run), max_file_bytes=cap)
    written = [run / "report.html", *(run / report.DATA_DIR).iterdir()]
    assert max(f.stat().st_size for f in written) <= cap
    names = {f.name for f in written}
    assert not names & set(cards) and sum(n.startswith("index-") for n in names) > 1
    assert all(n in (run / "report.html").read_text(encoding="utf-8") for n in names - {"report.html"})


def test_paging_loads_further_cards_on_demand(built, page):
    open_report(page, built)
    first = shown_ids(page)
    assert first == [f"img-{r:06d}" for r in range(1, report.VIEW_ROWS + 1)]
    assert page.locator("#shown").text_content() == f"{report.VIEW_ROWS} of {ROWS} matching rows shown ({ROWS} rows)"
    assert not [s for s in data_scripts(page) if "/cards-" in s]  # the first cards are in the page itself
    page.click("#more")
    page.wait_for_function(f"() => document.querySelectorAll('#cards article.card').length === {2 * report.VIEW_ROWS}")
    assert shown_ids(page) == [f"img-{r:06d}" for r in range(1, 2 * report.VIEW_ROWS + 1)]
    assert len([s for s in data_scripts(page) if "/cards-" in s]) == report.VIEW_ROWS // report.PAGE_ROWS


def test_sort_and_filter_act_on_every_row(built, page):
    want = expected(ROWS)
    open_report(page, built)
    page.select_option("#sort", "loss")  # ascending: the lowest loss is the last succeeded row, on the last page
    page.wait_for_function("id => document.querySelector('#cards h2.id').textContent === id", arg=want["lowest_loss"])
    ids = shown_ids(page)
    assert len(ids) == report.VIEW_ROWS and ids[0] == want["lowest_loss"]
    rows = [int(i.split("-")[1]) for i in ids]
    assert rows == sorted(rows, reverse=True) and min(rows) > ROWS - 2 * report.VIEW_ROWS  # falling loss: last rows first
    page.click("#sort-dir")
    page.wait_for_function("() => document.querySelector('#cards h2.id').textContent === 'img-000001'")

    page.fill("#f-q", want["last"])  # one id, in the last page of cards
    page.wait_for_function("() => document.querySelectorAll('#cards article.card').length === 1")
    assert shown_ids(page) == [want["last"]] and page.locator("#shown").text_content() == f"1 of {ROWS} rows shown"
    page.fill("#f-q", "")
    page.select_option("#f-status", "failed")
    failed = [f"img-{i + 1:06d}" for i in range(ROWS) if i % 50 == 23 and i % 100 != 99]
    page.wait_for_function(f"() => document.getElementById('shown').textContent === '{len(failed)} of {ROWS} rows shown'")
    assert shown_ids(page) == failed  # rows without a loss come last in either direction, in row order
    assert page.eval_on_selector_all("#cards article.card", "els => els.every(e => e.classList.contains('st-failed'))")


def test_click_opens_the_full_image(built, page):
    open_report(page, built)
    thumb = page.locator("#cards article.card").first.locator("figure.f-output img")
    thumb.wait_for()
    page.wait_for_function("() => document.querySelector('#cards figure.f-output img').naturalWidth > 0")
    assert page.evaluate("document.querySelector('#cards figure.f-output img').naturalWidth") == report.OUTPUT_THUMB_PX
    thumb.click()
    page.wait_for_function("() => { const i = document.querySelector('#zoom img'); return i && i.complete && i.naturalWidth > 0; }")
    assert page.evaluate("[document.querySelector('#zoom img').naturalWidth, document.querySelector('#zoom img').naturalHeight]") == list(FULL_SIZE)
    page.keyboard.press("Escape")
    assert page.locator("#zoom").count() == 0


def test_a_copied_report_folder_opens_sorts_and_falls_back_to_thumbnails(built, page, tmp_path):
    """The report copied elsewhere as `nst report --local-dir` does (page, data scripts, thumbnails; no items beside it)."""
    copy = tmp_path / "copied-report"
    report.download_report(str(built), copy)
    assert sorted(p.name for p in (copy / report.DATA_DIR).iterdir()) == sorted(p.name for p in (built / report.DATA_DIR).iterdir())
    open_report(page, copy)
    page.select_option("#sort", "loss")
    want = expected(ROWS)
    page.wait_for_function("id => document.querySelector('#cards h2.id').textContent === id", arg=want["lowest_loss"])
    assert all(s.startswith(report.DATA_DIR + "/") for s in data_scripts(page))
    page.select_option("#sort", "row")
    page.wait_for_function("() => document.querySelector('#cards h2.id').textContent === 'img-000001'")
    page.locator("#cards figure.f-output img").first.click()
    page.wait_for_function("() => { const i = document.querySelector('#zoom img'); return i && i.complete && i.naturalWidth > 0; }")
    # The original is not beside the copy: the zoom shows the thumbnail and says so.
    assert page.evaluate("document.querySelector('#zoom img').naturalWidth") == report.OUTPUT_THUMB_PX
    assert re.search(r"thumbnail", page.locator("#zoom p").text_content())
