"""The run report: written by a real flow run, rebuilt by `nst report`, opened in headless Chromium.

One small real run (local paths, tiny sizes, random weights) is shared by the
tests of this module; the S3 test makes its own run on the SeaweedFS server.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from nst_core import storage
from nst_core.params import StyleParams

TINY = StyleParams(size=32, iterations=4, weights="random:0", progress_every=2)
FAST = {"retries": 0, "retry_delay_s": 0.1}
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
XSS_ID = '../x/<img src=q onerror="window.__xss=1">'
XSS_META = "<script>window.__xss=2</script>"


def write_manifest(path: Path, rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "content_uri", "style_uri", "style_weight", "meta_licence", "meta_note"])
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return str(path)


def run_flow(**kwargs) -> dict:
    from flows.stylize_manifest import stylize_manifest

    state = stylize_manifest(**{**FAST, "defaults": TINY, **kwargs}, return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), summary
    return summary


@pytest.fixture(scope="module")
def local_run(prefect_server, tmp_path_factory, sample_images) -> dict:
    """A real run: 3 stylised items (one with its own style weight), one failed row, one invalid row."""
    root = tmp_path_factory.mktemp("report-run")
    img = sample_images
    manifest = write_manifest(root / "manifest.csv", [
        ["a", str(img / "tubingen.jpg"), str(img / "starry_night.jpg"), "", "CC-BY", XSS_META],
        [XSS_ID, str(img / "hoovertowernight.jpg"), str(img / "shipwreck.jpg"), "100", "CC0", 'x" onmouseover="window.__xss=3'],
        ["c", str(img / "tubingen.jpg"), str(img / "shipwreck.jpg"), "", "CC0", "plain"],
        ["missing", str(img / "no_such.jpg"), str(img / "starry_night.jpg"), "", "CC0", "fails at fetch"],
        ["bad", str(img / "tubingen.jpg"), str(img / "starry_night.jpg"), "-3", "CC0", "invalid row"],
    ])  # fmt: skip
    summary = run_flow(manifest_uri=manifest, output_uri=str(root / "out"), allow_local_paths=True)
    assert summary["counts"] == {"succeeded": 3, "cached": 0, "done_elsewhere": 0, "in_progress_elsewhere": 0, "failed": 1, "invalid": 1}
    return summary


def test_flow_writes_report_and_markdown_artifact_names_it(local_run):
    report = Path(local_run["report"])
    assert report == Path(local_run["run_folder"]) / "report.html" and report.is_file()
    page = report.read_text(encoding="utf-8")
    # One card per manifest row, thumbnails linked relatively and present beside the page.
    assert page.count('<article class="card') == 5
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all(s.startswith("thumbs/") and (report.parent / s).is_file() for s in sources)
    assert len({s for s in sources if "/out-" in s}) == 3  # one output thumbnail per stylised item
    # Manifest values are escaped, never markup; the random-weights notice is loud.
    assert "<script>window.__xss" not in page and "&lt;script&gt;window.__xss=2&lt;/script&gt;" in page
    assert '<img src=q onerror' not in page and "onerror=&quot;window.__xss=1&quot;" in page
    assert 'role="alert"' in page and "UNTRAINED RANDOM WEIGHTS (random:0)" in page
    assert "Content-Security-Policy" in page and "default-src &#x27;none&#x27;" in page

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["stylize-summary"])))
    assert any(local_run["report"] in str(a.data) for a in artifacts)


def test_report_in_headless_chromium(local_run, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium")
    report = Path(local_run["report"])
    shots = REPO / "test-output"
    shots.mkdir(exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000}, offline=True,
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.goto(report.as_uri())
            cards = page.locator("article.card")
            assert cards.count() == 5
            assert page.locator("text=UNTRAINED RANDOM WEIGHTS").first.is_visible()
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=15_000)
            widths = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
            assert len(widths) == 3 * 3 + 1  # 3 items x (output, content, style) + the failed row's readable style image
            assert all(w > 0 for _, w in widths), widths
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(shots / "report.png"), full_page=True)
            assert page.evaluate("window.__xss") is None  # no injected handler ran

            def visible_ids() -> list[str]:
                return page.eval_on_selector_all("article.card:not([hidden]) h2.id", "els => els.map(e => e.textContent)")

            page.select_option("#f-status", "failed")
            assert visible_ids() == ["missing"]
            assert page.locator("#shown").text_content() == "1 of 5 rows shown"
            page.select_option("#f-status", "")
            shipwreck = page.eval_on_selector("#f-style", "s => Array.from(s.options).find(o => o.text.startsWith('shipwreck')).value")
            page.select_option("#f-style", shipwreck)
            assert sorted(visible_ids()) == sorted([XSS_ID, "c"])
            page.select_option("#f-style", "")
            page.select_option("#f-param", '["style_weight","100.0"]')
            assert visible_ids() == [XSS_ID]
            page.select_option("#f-param", "")
            page.fill("#f-sd", "1e9")  # a score filter hides the rows without a score
            assert sorted(visible_ids()) == sorted(["a", XSS_ID, "c"])
            page.fill("#f-sd", "")
            page.select_option("#sort", "sd")
            order = visible_ids()
            index = page.evaluate("JSON.parse(document.getElementById('nst-data').textContent).rows")
            by_id = {entry[0]: entry[5] for entry in index}  # the index's entries: id first, style distance sixth (report._RunView.row)
            assert order[:3] == sorted(order[:3], key=lambda i: by_id[i]) and sorted(order[3:]) == ["bad", "missing"]
            # Marks on the page become a decisions file for `nst review --from-file`.
            page.locator("article.card", has_text="plain").locator("button[data-act=keep]").click()
            assert page.locator("#pending").is_visible() and "1 decision" in page.locator("#pending-n").text_content()
            page.screenshot(path=str(shots / "report-marked.png"))
        finally:
            browser.close()
    assert not [m for m in problems if "Content Security Policy" in m or "Refused" in m or "Uncaught" in m], problems


def test_nst_report_rebuilds_from_stored_metadata(local_run, tmp_path, capsys):
    from nst_cli.main import main
    from nst_run import review

    # A copy of the whole output folder, report and thumbnails removed: as an old run would be.
    out = tmp_path / "out"
    shutil.copytree(Path(local_run["run_folder"]).parents[1], out)
    run = out / "runs" / local_run["run"]
    (run / "report.html").unlink()
    shutil.rmtree(run / "thumbs")
    review.record_decision(str(run), "c", "keep", "Ann <b>O'Neil</b>", note="good & sharp")
    assert main(["report", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.count('<article class="card') == 5
    assert all((run / s).is_file() for s in re.findall(r'<img src="([^"]+)"', page))
    assert "Ann &lt;b&gt;O&#x27;Neil&lt;/b&gt;" in page and "good &amp; sharp" in page
    assert str(tmp_path) not in "".join(re.findall(r'src="([^"]+)"', page))
    # --local-dir copies page and thumbnails; the copy opens as is.
    assert main(["report", str(run), "--local-dir", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "report.html").read_bytes() == (run / "report.html").read_bytes()
    assert sorted(p.name for p in (tmp_path / "copy" / "thumbs").iterdir()) == sorted(p.name for p in (run / "thumbs").iterdir())
    assert main(["report", str(out)]) == 2  # an output folder, not a run
    assert "not a run" in capsys.readouterr().err


def test_s3_run_report_copied_locally_review_and_export(prefect_server, s3_bucket, s3_env, sample_images, tmp_path, capsys):
    from nst_cli.main import main

    for name in ("tubingen.jpg", "starry_night.jpg", "shipwreck.jpg"):
        storage.write_bytes(f"s3://{s3_bucket}/in/{name}", (sample_images / name).read_bytes(), "image/jpeg")
    text = (
        "id,content_uri,style_uri,meta_licence\n"
        f"one,s3://{s3_bucket}/in/tubingen.jpg,s3://{s3_bucket}/in/starry_night.jpg,CC-BY\n"
        f"two,s3://{s3_bucket}/in/tubingen.jpg,s3://{s3_bucket}/in/shipwreck.jpg,CC0\n"
    )
    storage.write_bytes(f"s3://{s3_bucket}/m.csv", text.encode(), "text/csv")
    summary = run_flow(manifest_uri=f"s3://{s3_bucket}/m.csv", output_uri=f"s3://{s3_bucket}/out")
    run_uri = summary["run_folder"]
    assert summary["report"] == f"{run_uri}/report.html" and storage.exists(summary["report"])

    local = tmp_path / "local-report"
    assert main(["report", run_uri, "--local-dir", str(local)]) == 0
    page = (local / "report.html").read_text(encoding="utf-8")
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 2 * 3 and all((local / s).is_file() for s in images)

    assert main(["review", run_uri, "one", "--decision", "keep", "--reviewer", "ann"]) == 0
    assert main(["review", run_uri, "two", "--decision", "reject", "--reviewer", "ann"]) == 0
    dest = f"s3://{s3_bucket}/datasets/v1"
    assert main(["export", run_uri, dest, "--only", "kept"]) == 0
    capsys.readouterr()
    keys = storage.list_prefix(dest + "/")
    names = sorted(k.removeprefix(dest + "/") for k in keys)
    assert len(names) == 5 and names[:2] == [".nst-export.json", "README.md"]  # the record of what the export wrote
    assert re.fullmatch(r"images/([0-9a-f]{2})/one-\1[0-9a-f]{10}\.png", names[2]) and names[3:] == ["metadata.jsonl", "metadata.parquet"]
    lines = [json.loads(x) for x in storage.read_bytes(f"{dest}/metadata.jsonl").decode().splitlines()]
    assert [r["id"] for r in lines] == ["one"] and lines[0]["meta_licence"] == "CC-BY"
    assert lines[0]["content_uri"] == f"s3://{s3_bucket}/in/tubingen.jpg"

    # No credential or signature in anything stored in the bucket.
    secrets = [s3_env.secret_key, s3_env.access_key, "X-Amz-", "Signature=", "AWSAccessKeyId"]
    for key in storage.list_prefix(f"s3://{s3_bucket}/out/") + keys:
        if key.endswith((".json", ".html", ".csv", ".jsonl", ".md", ".parquet")):
            data = storage.read_bytes(key)
            assert not [s for s in secrets if s.encode() in data], key


def test_report_and_export_ignore_exactly_the_execution_parameters():
    """The report and the export ignore params.EXECUTION_FIELDS (params imports no torch, so both import it)."""
    from nst_core import params
    from nst_run import export, report

    assert report._IGNORED_PARAMS == export._IGNORED_PARAMS == params.EXECUTION_FIELDS
