"""The report page as a template: assets from package data, every value escaped, the CSP true to the assets.

A run folder written by hand (results table and summary only: rows that failed or were invalid,
so no image is needed) is enough to render the page; the real runs' reports are tested in
tests/integration/test_report.py.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import tomllib
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path

from nst_run import report

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "nst_run" / "report"
NOW = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
HOSTILE_ID = """<img src=x onerror="window.__x=1">'&"""
HOSTILE_META = "</script><script>window.__x=2</script>"


def write_run(root: Path, hostile_last: bool = False) -> str:
    folder = root / "out" / "runs" / "20260102T030400000000Z-hand-made"
    folder.mkdir(parents=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "row", "status", "error", "item_id", "meta_note"])
    rows = [
        [HOSTILE_ID, 1, "failed", 'style <b>"x"</b> could not be read', "", HOSTILE_META],
        ["plain", 2, "invalid", "row 2, column size: too small", "", "ok & fine"],
    ]
    writer.writerows(rows[::-1] if hostile_last else rows)
    (folder / "results.csv").write_text(buffer.getvalue(), encoding="utf-8")
    (folder / "summary.json").write_text(json.dumps({"run": folder.name, "random_weights": True, "wall_time_s": 3.0}), encoding="utf-8")
    return str(folder)


def page_of(tmp_path: Path) -> str:
    target = report.build_report(write_run(tmp_path), now=NOW)
    return Path(target).read_text(encoding="utf-8")


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def test_inline_style_and_script_are_the_static_files_and_the_csp_hashes_them(tmp_path):
    page = page_of(tmp_path)
    css = (PACKAGE / "static" / "report.css").read_text(encoding="utf-8")
    js = (PACKAGE / "static" / "report.js").read_text(encoding="utf-8")
    assert re.search(r"<style>(.*?)</style>", page, re.S).group(1) == css
    assert re.findall(r"<script>(.*?)</script>", page, re.S) == [js]
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1).replace("&#x27;", "'")
    # Scripts: the inline one by hash, and the data scripts beside the page (report-files/) as 'self'.
    assert f"style-src {sha256_source(css)};" in csp and f"script-src {sha256_source(js)} 'self';" in csp
    assert "default-src 'none'" in csp


def test_every_value_from_the_run_is_escaped(tmp_path):
    page = page_of(tmp_path)
    assert page.startswith("<!doctype html>\n") and page.endswith("</html>\n")
    # Only the page's own two scripts; the hostile cells appear escaped, never as markup.
    assert page.count("<script") == 2 and "onerror=\"window" not in page and "<b>\"x" not in page
    assert "&lt;img src=x onerror=&quot;window.__x=1&quot;&gt;&#x27;&amp;&amp;" not in page  # escaped once, not twice
    assert 'title="&lt;img src=x onerror=&quot;window.__x=1&quot;&gt;&#x27;&amp;"' in page
    assert "&lt;/script&gt;&lt;script&gt;window.__x=2&lt;/script&gt;" in page
    assert "style &lt;b&gt;&quot;x&quot;&lt;/b&gt; could not be read" in page and "ok &amp; fine" in page
    # The embedded data: JSON with < > & escaped, so no value can end its script element.
    data = re.search(r'<script type="application/json" id="nst-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data and ">" not in data and "&" not in data
    assert [entry[0] for entry in json.loads(data)["rows"]] == [HOSTILE_ID, "plain"]  # the index: each row's id first
    assert 'role="alert"' in page and "UNTRAINED RANDOM WEIGHTS" in page


def test_values_in_the_data_scripts_are_escaped_as_on_the_page(tmp_path):
    """The hostile row's card and index entry in report-files/ (one card on the page, one per script, a tiny cap)."""
    run = Path(write_run(tmp_path, hostile_last=True))
    report.build_report(str(run), now=NOW, view_rows=1, page_rows=1, max_file_bytes=4)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.count('<article class="card') == 1 and HOSTILE_ID not in page
    scripts = {p.name: p.read_text(encoding="utf-8") for p in (run / report.DATA_DIR).iterdir()}
    calls = {name: re.fullmatch(r"nstReport\.(cards|index)\((\d+),(.*)\);\n", text, re.S) for name, text in scripts.items()}
    assert all(calls.values()) and all(name in page for name in scripts), scripts
    cards = [html for m in calls.values() if m.group(1) == "cards" for html in json.loads(m.group(3))]
    assert len(cards) == 1 and 'title="&lt;img src=x onerror=&quot;window.__x=1&quot;&gt;&#x27;&amp;"' in cards[0]
    assert "&lt;/script&gt;&lt;script&gt;window.__x=2&lt;/script&gt;" in cards[0] and "<b>" not in cards[0] and "onerror=\"" not in cards[0]
    entries = [e for m in calls.values() if m.group(1) == "index" for e in json.loads(m.group(3))]
    assert [e[0] for e in entries] == [HOSTILE_ID]  # its id, as data; the script's text has no < > & at all
    assert not [t for t in scripts.values() if t.startswith("nstReport.index") and re.search("[<>&]", t)]


def test_the_page_is_the_same_when_built_again(tmp_path):
    first = page_of(tmp_path / "a")
    second = page_of(tmp_path / "b")
    assert first.replace(str(tmp_path / "a"), "") == second.replace(str(tmp_path / "b"), "")


def test_templates_and_static_files_are_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["nst_run.report"]
    files = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    assert sorted(files) == sorted(["templates/report.html.j2", "templates/parts.html.j2", "static/report.css", "static/report.js"])
    assert all(any(fnmatch(f, pattern) for pattern in patterns) for f in files), (files, patterns)
