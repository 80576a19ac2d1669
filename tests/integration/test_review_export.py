"""Review decisions and dataset export on real runs (local paths; the S3 path is in test_report.py).

Two real runs share this module: the first stylises three items (one with a
hostile manifest id), the second has the same pairs under other ids, so its
items are all cached: the same images, produced by two runs.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from nst_core.params import StyleParams
from nst_run import results, review

TINY = StyleParams(size=32, iterations=4, weights="random:0", progress_every=2)
HOSTILE_ID = "../../etc/<b>passwd</b>"


def _manifest(path: Path, rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "content_uri", "style_uri", "style_weight", "meta_licence", "meta_split"])
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return str(path)


def _run(manifest: str, output: str) -> dict:
    from flows.stylize_manifest import stylize_manifest

    state = stylize_manifest(manifest, output, defaults=TINY, allow_local_paths=True, retries=0, retry_delay_s=0.1, return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), summary
    return summary


@pytest.fixture(scope="module")
def two_runs(prefect_server, tmp_path_factory, sample_images) -> tuple[Path, str, str]:
    """(output folder, run 1 name, run 2 name): run 2 holds the same items as run 1 under other ids."""
    root = tmp_path_factory.mktemp("review-runs")
    img = sample_images
    pairs = [
        (str(img / "tubingen.jpg"), str(img / "starry_night.jpg"), "", "CC-BY 4.0"),
        (str(img / "hoovertowernight.jpg"), str(img / "shipwreck.jpg"), "100", "CC0"),
        (str(img / "tubingen.jpg"), str(img / "shipwreck.jpg"), "", "public domain"),
    ]
    ids1 = ["a", HOSTILE_ID, "c"]
    first = _run(_manifest(root / "m1.csv", [[i, c, s, w, lic, "train"] for i, (c, s, w, lic) in zip(ids1, pairs, strict=True)]
                           + [["broken", str(img / "nope.jpg"), pairs[0][1], "", "CC0", "x"]]), str(root / "out"))  # fmt: skip
    assert first["counts"] == {"succeeded": 3, "cached": 0, "done_elsewhere": 0, "in_progress_elsewhere": 0, "failed": 1, "invalid": 0}
    second = _run(_manifest(root / "m2.csv", [[i, c, s, w, lic, "test"] for i, (c, s, w, lic) in zip(["a2", "b2", "c2"], pairs, strict=True)]),
                  str(root / "out"))  # fmt: skip
    assert second["counts"]["cached"] == 3
    return root / "out", first["run"], second["run"]


@pytest.fixture
def out(two_runs, tmp_path) -> Path:
    """A private copy of the output folder, so each test records its own decisions."""
    copy = tmp_path / "out"
    shutil.copytree(two_runs[0], copy)
    return copy


def test_two_reviewers_decisions_both_survive(two_runs, out):
    from nst_run.report import build_report

    run = str(out / "runs" / two_runs[1])
    same_moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    alice = review.record_decision(run, "a", "keep", "Alice", note="crisp", now=same_moment)
    bob = review.record_decision(run, "a", "reject", "Bob", note="muddy", now=same_moment)
    # Same reviewer, same instant, other verdict: a second object, not an overwrite.
    bob_again = review.record_decision(run, "a", "reject", "Bob", note="still muddy", now=same_moment)
    assert len({alice.uri, bob.uri, bob_again.uri}) == 3
    stored = sorted((out / "runs" / two_runs[1] / "decisions").rglob("*.json"))
    assert len(stored) == 3 and all(p.parent.name == alice.item_id for p in stored)
    assert json.loads(Path(alice.uri).read_text())["reviewer"] == "Alice"

    # Many reviewers at once, same item: every decision is kept.
    threads = [threading.Thread(target=review.record_decision, args=(run, "c", "keep", f"r{i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    decisions = review.load_decisions(run)
    assert len(decisions[alice.item_id]) == 3 and len(decisions[review.resolve_target(results.open_run(run), "c")[0]]) == 8
    assert review.verdict(decisions[alice.item_id]) == "disputed"
    latest = review.latest_per_reviewer(decisions[alice.item_id])
    assert {d.reviewer: d.decision for d in latest} == {"Alice": "keep", "Bob": "reject"}

    # Alice changes her mind later: her latest decision counts, her earlier one stays stored.
    review.record_decision(run, alice.item_id[:10], "reject", "alice ")
    decisions = review.load_decisions(run)
    assert len(decisions[alice.item_id]) == 4 and review.verdict(decisions[alice.item_id]) == "rejected"

    page = Path(build_report(run)).read_text(encoding="utf-8")
    assert "<b>Alice</b>" in page and "<b>Bob</b>" in page
    assert page.count("<b>Bob</b>") >= 1 and "all 4 decisions" in page and "still muddy" in page and "crisp" in page


def test_review_cli_and_bulk_file(two_runs, out, capsys):
    from nst_cli.main import main

    run = str(out / "runs" / two_runs[1])
    assert main(["review", run, HOSTILE_ID, "--decision", "keep", "--reviewer", "ann", "--note", "ok"]) == 0
    assert "keep   by ann" in capsys.readouterr().out
    assert main(["review", run, "nope", "--decision", "keep", "--reviewer", "ann"]) == 2
    assert "no row with id or item id 'nope'" in capsys.readouterr().err
    assert main(["review", run, "broken", "--decision", "keep", "--reviewer", "ann"]) == 2
    assert "no output image" in capsys.readouterr().err
    assert main(["review", run, "a", "--decision", "keep"]) == 2  # no reviewer
    with pytest.raises(SystemExit) as exc:
        main(["review", run, "a", "--decision", "maybe", "--reviewer", "ann"])
    assert exc.value.code == 2

    # The file the report page saves: checked whole before anything is stored.
    bulk = {"format": review.BULK_FORMAT, "run": two_runs[1], "reviewer": "page user",
            "decisions": [{"item_id": "", "id": "a", "decision": "keep"}, {"id": "c", "decision": "reject", "note": "n"}]}  # fmt: skip
    path = out / "decisions.json"
    path.write_text(json.dumps({**bulk, "decisions": bulk["decisions"] + [{"id": "zzz", "decision": "keep"}]}))
    assert main(["review", run, "--from-file", str(path)]) == 2
    assert sum(len(v) for v in review.load_decisions(run).values()) == 1
    path.write_text(json.dumps(bulk))
    assert main(["review", run, "--from-file", str(path)]) == 0
    decided = {d.ids[0]: (d.decision, d.reviewer) for ds in review.load_decisions(run).values() for d in ds}
    assert decided == {HOSTILE_ID: ("keep", "ann"), "a": ("keep", "page user"), "c": ("reject", "page user")}
    path.write_text(json.dumps({**bulk, "run": "another-run"}))
    assert main(["review", run, "--from-file", str(path)]) == 2


def test_export_round_trip_only_kept(two_runs, out, tmp_path, capsys):
    from nst_cli.main import main

    run = str(out / "runs" / two_runs[1])
    for target, decision in (("a", "keep"), (HOSTILE_ID, "keep"), ("c", "reject")):
        review.record_decision(run, target, decision, "ann")
    review.record_decision(run, "a", "keep", "bob")
    dest = tmp_path / "dataset"
    assert main(["export", run, str(dest), "--only", "kept"]) == 0
    assert "exported 2 image(s)" in capsys.readouterr().out

    lines = [json.loads(x) for x in (dest / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(["a", HOSTILE_ID])  # kept ones once each; rejected c absent
    files = sorted(p.relative_to(dest).as_posix() for p in (dest / "images").rglob("*") if p.is_file())
    assert files == sorted(r["file_name"] for r in lines) and len(files) == 2
    for r in lines:
        assert r["file_name"].startswith("images/") and ".." not in r["file_name"] and "<" not in r["file_name"]
        # One folder per first two hex digits of the item id: the content address alone places the image.
        assert (dest / r["file_name"]).resolve().parent == (dest / "images" / r["item_id"][:2]).resolve()
        source = out / "items" / r["item_id"] / "stylized.png"
        assert (dest / r["file_name"]).read_bytes() == source.read_bytes()
        assert r["decision"] == "kept" and r["weights_id"] == "random:0" and r["weights_random"] is True
        assert r["meta_split"] == "train" and r["size"] == 32 and r["style_distance"] > 0
        assert r["content_sha256"] and r["style_uri"].endswith((".jpg",))
    by_id = {r["id"]: r for r in lines}
    assert by_id["a"]["meta_licence"] == "CC-BY 4.0" and by_id[HOSTILE_ID]["style_weight"] == 100
    assert {x["reviewer"] for x in by_id["a"]["reviews"]} == {"ann", "bob"}
    assert by_id[HOSTILE_ID]["file_name"].startswith(f"images/{by_id[HOSTILE_ID]['item_id'][:2]}/etc_b_passwd_b-")

    table = pd.read_parquet(dest / "metadata.parquet")
    assert len(table) == 2 and table["file_name"].is_unique and sorted(table["id"]) == sorted(by_id)
    assert list(table.columns) == list(lines[0].keys())
    card = (dest / "README.md").read_text(encoding="utf-8")
    assert "configs:" in card and "- metadata.parquet" in card and "- images/*/*" in card and "untrained random VGG-19 weights" in card
    assert "CC-BY 4.0" in card and "meta_licence" in card and "<b>" not in card

    # Without --only every finished item is there, with its verdict.
    everything = tmp_path / "all"
    assert main(["export", run, str(everything)]) == 0
    table = pd.read_parquet(everything / "metadata.parquet")
    assert dict(zip(table["id"], table["decision"], strict=True)) == {"a": "kept", HOSTILE_ID: "kept", "c": "rejected"}


def test_two_runs_of_the_same_items_export_each_image_once(two_runs, out, tmp_path):
    from nst_run.export import export_dataset

    runs = [str(out / "runs" / name) for name in two_runs[1:]]
    dest = tmp_path / "both"
    result = export_dataset(runs, str(dest))
    assert result.images == 3 and result.written == 3
    assert len([p for p in (dest / "images").rglob("*") if p.is_file()]) == 3
    lines = [json.loads(x) for x in (dest / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 3 and len({r["item_id"] for r in lines}) == 3
    a = next(r for r in lines if r["id"] == "a")
    assert [(s["run"], s["id"]) for s in a["sources"]] == [(two_runs[1], "a"), (two_runs[2], "a2")]
    assert len(pd.read_parquet(dest / "metadata.parquet")) == 3

    # Again, runs in the other order, into the same folder: the images are there already, under the same
    # names (the earliest run's ids name them), so nothing is written and nothing is left over.
    again = export_dataset(list(reversed(runs)), str(dest))
    assert (again.images, again.written, again.already_there, again.stale) == (3, 0, 3, [])
    assert (dest / "metadata.jsonl").read_text(encoding="utf-8").splitlines() == [json.dumps(r, ensure_ascii=False) for r in lines]


def test_hostile_ids_make_safe_file_names():
    from nst_run.export import image_file_name, safe_stem

    item = "ab" * 32
    for raw in ("../../x", "/etc/passwd", "..", ".", "", "CON", "a\\b", "é<script>", "x" * 500, "\u202etxt.exe"):
        name = image_file_name(raw, item, "png")
        assert name.startswith(f"images/{item[:2]}/")
        stem = name.removeprefix(f"images/{item[:2]}/")
        assert "/" not in stem and "\\" not in stem and not stem.startswith(".") and ".." not in stem
        assert len(stem) <= 80 + 1 + 12 + 4 and stem.endswith(f"-{item[:12]}.png")
    assert safe_stem("CON") != "CON" and safe_stem("") == "item"
