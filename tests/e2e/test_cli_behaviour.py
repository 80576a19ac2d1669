"""What the ``nst`` command tells a user, through the real installed script in a subprocess:
``--version``, typos in ``--set``, choices and switches in ``--help``, ``nst validate``'s exit
codes and JSON plan, and ``nst run``'s progress line, first failures and report location."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from helpers import sample_image

FAST = ["--set", "size=32", "--set", "iterations=3", "--set", "weights=random:0"]


def nst(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("nst")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "nst_cli.main"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command + argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def manifest(tmp_path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path = tmp_path / "m.csv"
    path.write_text("id,content_uri,style_uri\n" + "".join(f"{i},{c},{s}\n" for i, c, s in rows))
    return path


def test_version_is_the_installed_package_version(tmp_path):
    done = nst(["--version"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"nst {version('nst-bulk')}"


def test_a_typo_in_set_names_the_key_and_suggests_the_nearest(tmp_path):
    rows = manifest(tmp_path, [("a", str(sample_image("tubingen.jpg")), str(sample_image("starry_night.jpg")))])
    for command in (["run", str(rows), "-o", str(tmp_path / "out")], ["validate", str(rows)]):
        done = nst([*command, "--set", "sizee=256"], tmp_path)
        assert done.returncode == 2, done.stderr
        line = done.stderr.strip()
        assert line.count("\n") == 0 and "'sizee'" in line and "did you mean size" in line, line
    done = nst(["validate", str(rows), "--set", "zzzqqq=1"], tmp_path)
    assert done.returncode == 2 and "'zzzqqq'" in done.stderr and "--help" in done.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_choices_and_booleans_are_switches(tmp_path):
    done = nst(["stylize", "--help"], tmp_path)
    assert done.returncode == 0
    text = re.sub(r"\s+", " ", done.stdout)
    for choices in ("--pooling {avg,max}", "--precision {auto,fp32,bf16}", "--optimizer {lbfgs,adam}", "--color {none,luminance,histogram}"):
        assert choices in text, choices
    assert "--normalize-network, --no-normalize-network" in text
    out = str(tmp_path / "o.png")
    pair = [str(sample_image("tubingen.jpg")), str(sample_image("starry_night.jpg"))]
    refused = nst(["stylize", *pair, "-o", out, "--pooling", "mean"], tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "--pooling" in refused.stderr and "'avg' or 'max'" in refused.stderr
    switch = nst(["stylize", *pair, "-o", out, "--size", "32", "--iterations", "2", "--weights", "random:0", "-q", "--no-normalize-network"], tmp_path)
    assert switch.returncode == 0, switch.stderr
    assert Path(out).is_file()


def test_validate_exit_codes_say_whether_the_plan_would_fail(tmp_path):
    good = manifest(tmp_path, [("a", str(sample_image("tubingen.jpg")), str(sample_image("starry_night.jpg")))])
    done = nst(["validate", str(good), *FAST], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "inputs not checked" in done.stdout  # no --output: nothing was read
    done = nst(["validate", str(good), "--output", str(tmp_path / "out"), *FAST], tmp_path)
    assert done.returncode == 0 and "inputs not checked" not in done.stdout and "to do: 1 items" in done.stdout

    missing = manifest(tmp_path, [("a", str(sample_image("tubingen.jpg")), str(sample_image("starry_night.jpg"))),
                                  ("gone", str(tmp_path / "no-such.jpg"), str(sample_image("starry_night.jpg")))])  # fmt: skip
    assert nst(["validate", str(missing), *FAST], tmp_path).returncode == 0  # unread: it cannot know
    done = nst(["validate", str(missing), "--output", str(tmp_path / "out"), *FAST], tmp_path)
    assert done.returncode == 1, done.stdout
    assert "unreadable: row 2: content" in done.stdout and "file not found" in done.stdout

    done = nst(["validate", str(missing), "--output", str(tmp_path / "out"), "--json", *FAST], tmp_path)
    assert done.returncode == 1
    plan = json.loads(done.stdout)  # the JSON plan and nothing else on stdout
    assert plan["valid"] == 2 and plan["unreadable"] == 1 and plan["unreadable_rows"][0]["row"] == 2
    assert "file not found" in plan["unreadable_rows"][0]["reason"]

    bad = manifest(tmp_path, [("a", "", str(sample_image("starry_night.jpg")))])
    done = nst(["validate", str(bad), "--json"], tmp_path)
    assert done.returncode == 1 and json.loads(done.stdout)["invalid_rows"][0]["column"] == "content_uri"


def test_run_shows_progress_the_first_failures_and_where_the_report_is(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    rows = manifest(tmp_path, [
        ("a", str(sample_image("tubingen.jpg")), str(sample_image("starry_night.jpg"))),
        ("gone", str(tmp_path / "no-such.jpg"), str(sample_image("starry_night.jpg"))),
        ("empty", "", str(sample_image("shipwreck.jpg"))),
        ("b", str(sample_image("hoovertowernight.jpg")), str(sample_image("shipwreck.jpg"))),
    ])  # fmt: skip
    out = tmp_path / "out"
    done = nst(["run", str(rows), "-o", str(out), "--chunk-size", "1", *FAST], tmp_path, env={"PREFECT_API_URL": PREFECT_API_URL.value()})
    assert done.returncode == 1, done.stderr[-3000:]  # a row failed
    progress = re.findall(r"^rows (\d+)/4 done, (\d+) failed, (\d+) invalid", done.stderr, re.M)
    assert progress, done.stderr[-3000:]
    done_counts = [int(d) for d, _, _ in progress]
    assert done_counts == sorted(done_counts) and done_counts[-1] == 4 and len(set(done_counts)) > 1
    assert progress[-1][1:] == ("1", "1")
    assert "row 2 (gone) failed: content" in done.stdout and "file not found" in done.stdout
    assert "row 3 (empty) invalid: row 3, column content_uri" in done.stdout
    report = re.search(r"^report: +(\S+)$", done.stdout, re.M)
    assert report and Path(report.group(1)).is_file() and report.group(1).endswith("report.html")
    summary = json.loads(next(out.glob("runs/*/summary.json")).read_text())
    assert summary["report"] == report.group(1)
    assert [(f["row"], f["status"]) for f in summary["first_failures"]] == [(2, "failed"), (3, "invalid")]

