"""``nst stylize`` and ``nst reconstruct``: outputs, exit codes and one-line errors.

Run in-process through ``nst_cli.main.main`` (fast) and once each way as a real
subprocess (the installed ``nst`` script), at 32 px with a few iterations and
seeded random weights.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import sample_image
from PIL import Image

from nst_cli.main import main
from nst_core.params import DEFAULT_STYLE_LAYERS

FAST = ["--size", "32", "--iterations", "3", "--weights", "random:0", "--device", "cpu", "-q"]
RANDOM_WARNING = "WARNING: weights=random:"


@pytest.fixture(scope="module")
def pair() -> tuple[str, str]:
    return str(sample_image("tubingen.jpg")), str(sample_image("starry_night.jpg"))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line of a refused invocation (besides the random-weights warning)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(RANDOM_WARNING)]
    assert len(lines) == 1, err
    assert lines[0].startswith("nst: error: "), err
    return lines[0]


def outputs(out: Path) -> list[Path]:
    root = out.with_suffix("")
    return [p for p in (out, Path(f"{root}.loss.csv"), Path(f"{root}.loss.png")) if p.exists()]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_stylize_writes_the_image_the_loss_table_and_the_plot(tmp_path, pair, capsys):
    out = tmp_path / "out.png"
    code, stdout, err = run(["stylize", *pair, "-o", str(out), *FAST], capsys)
    assert code == 0, err
    assert "Traceback" not in err and RANDOM_WARNING in err  # random weights are labelled
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 24) and image.mode == "RGB"
    header, rows = read_csv(tmp_path / "out.loss.csv")
    assert header == ["iteration", "total", "content", "style", "tv", *[f"style:{n}" for n in DEFAULT_STYLE_LAYERS]]
    assert [row["iteration"] for row in rows] == ["1", "2", "3"]
    assert all(float(row["total"]) > 0 for row in rows)
    with Image.open(tmp_path / "out.loss.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 100
    assert str(out) in stdout


@pytest.mark.parametrize("ext, fmt", [("jpg", "JPEG"), ("webp", "WEBP")])
def test_stylize_output_format_follows_the_extension(tmp_path, pair, capsys, ext, fmt):
    out = tmp_path / f"out.{ext}"
    code, _, err = run(["stylize", *pair, "-o", str(out), *FAST[:2], "--iterations", "1", *FAST[4:]], capsys)
    assert code == 0, err
    with Image.open(out) as image:
        assert image.format == fmt
    assert (tmp_path / "out.loss.csv").exists() and (tmp_path / "out.loss.png").exists()


@pytest.mark.parametrize("layers, weights", [("relu1_1|relu3_1", "0.25|0.75"), ("relu1_1,relu3_1", "0.25,0.75")], ids=["pipes", "commas"])
def test_list_flags_accept_pipes_and_commas(tmp_path, pair, capsys, layers, weights):
    out = tmp_path / "out.png"
    argv = ["stylize", *pair, "-o", str(out), *FAST, "--style-layers", layers, "--style-layer-weights", weights, "--content-layers", "relu2_1"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    header, rows = read_csv(tmp_path / "out.loss.csv")
    assert header == ["iteration", "total", "content", "style", "tv", "style:relu1_1", "style:relu3_1"]
    row = rows[0]
    assert float(row["style"]) == pytest.approx(0.25 * float(row["style:relu1_1"]) + 0.75 * float(row["style:relu3_1"]), rel=1e-4)


def _not_an_image(tmp_path: Path) -> str:
    path = tmp_path / "notes.jpg"
    path.write_text("not pixels\n")
    return str(path)


def _too_small(tmp_path: Path) -> str:
    path = tmp_path / "strip.png"
    Image.new("RGB", (40, 10), (200, 100, 50)).save(path)
    return str(path)


BAD_INPUTS = {
    # name: (how to build argv from (tmp_path, content, style, out), what the message must say)
    "not-an-image": (lambda t, c, s, o: ["stylize", _not_an_image(t), s, "-o", o, *FAST], ["notes.jpg", "not an image"]),
    "missing-file": (lambda t, c, s, o: ["stylize", str(t / "missing.jpg"), s, "-o", o, *FAST], ["missing.jpg"]),
    "unknown-layer": (lambda t, c, s, o: ["stylize", c, s, "-o", o, *FAST, "--style-layers", "relu1_1,relu9_9"], ["--style-layers", "relu9_9"]),
    "nan-weight": (lambda t, c, s, o: ["stylize", c, s, "-o", o, *FAST, "--style-weight", "nan"], ["--style-weight"]),
    "negative-size": (lambda t, c, s, o: ["stylize", c, s, "-o", o, *FAST, "--size", "-5"], ["--size"]),
    "gif-output": (lambda t, c, s, o: ["stylize", c, s, "-o", o.replace(".png", ".gif"), *FAST], [".gif"]),
    "too-small": (lambda t, c, s, o: ["stylize", _too_small(t), s, "-o", o, *FAST[2:], "--size", "40"], ["too small"]),
    "bad-weights-file": (lambda t, c, s, o: ["stylize", c, s, "-o", o, *FAST[:2], "--iterations", "1", "--weights", _not_an_image(t), "-q"], ["notes.jpg"]),
    "reconstruct-without-layers": (lambda t, c, s, o: ["reconstruct", c, "-o", o, *FAST], ["--content-layers", "--style-layers"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, pair, capsys, case):
    build, expected = BAD_INPUTS[case]
    out = tmp_path / "out.png"
    code, stdout, err = run(build(tmp_path, *pair, str(out)), capsys)
    assert code == 2, (case, err)
    line = error_line(err)
    for text in expected:
        assert text in line, (case, line)
    assert outputs(out) == [] and outputs(tmp_path / "out.gif") == []
    assert "wrote" not in stdout


@pytest.mark.parametrize("role", ["content", "style"])
def test_too_small_image_error_names_the_file(tmp_path, pair, capsys, role):
    small = _too_small(tmp_path)
    images = [small, pair[1]] if role == "content" else [pair[0], small]
    code, _, err = run(["stylize", *images, "-o", str(tmp_path / "out.png"), *FAST[2:], "--size", "40"], capsys)
    assert code == 2
    line = error_line(err)
    assert f"{role} image {small} (after resizing to 40 px" in line and "40x10 px is too small" in line, line


def test_imagenet_weights_offline_exit_2_naming_the_ways_out(tmp_path, pair, capsys, monkeypatch):
    import urllib.error

    import torch.hub

    from nst_core import network

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "urlopen", refuse)  # offline, even on a machine with a network
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    network.clear_cache()
    out = tmp_path / "out.png"
    try:
        code, stdout, err = run(["stylize", *pair, "-o", str(out), "--size", "32", "--iterations", "1", "--weights", "imagenet", "-q"], capsys)
    finally:
        network.clear_cache()
    assert code == 2, err
    line = error_line(err)  # one line: torch.hub's "Downloading: ..." note is kept off stdout and stderr
    assert "TORCH_HOME" in line and "--weights" in line and "random:" in line
    assert "urllib" not in err and "Downloading" not in stdout + err and outputs(out) == []


def test_stylize_says_when_the_divergence_guard_fired(tmp_path, pair, capsys):
    """A step of 3 diverges at 32 px (tests/unit/test_engine_stylize.py); the run says so and still ends well."""
    out = tmp_path / "out.png"
    argv = ["stylize", *pair, "-o", str(out), *FAST[:2], "--iterations", "16", "--lr", "3", "--tolerance", "0", *FAST[4:]]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "L-BFGS diverged at iteration" in stdout and "step halved" in stdout
    _, rows = read_csv(tmp_path / "out.loss.csv")
    totals = [float(row["total"]) for row in rows]
    assert len(totals) == 16 and f"total={min(totals):.4g}" in stdout  # the reported losses are the output image's


def test_reconstruct_from_content_layers(tmp_path, pair, capsys):
    out = tmp_path / "recon.png"
    code, _, err = run(["reconstruct", pair[0], "--content-layers", "relu1_1", "-o", str(out), *FAST[:2], "--iterations", "5", *FAST[4:]], capsys)
    assert code == 0, err
    with Image.open(out) as image:
        assert image.size == (32, 24)
    header, rows = read_csv(tmp_path / "recon.loss.csv")
    assert header == ["iteration", "total", "content", "style", "tv"]
    assert len(rows) == 5
    assert float(rows[-1]["content"]) < float(rows[0]["content"])  # from white noise towards the photo
    assert float(rows[0]["style"]) == 0.0


def test_reconstruct_from_style_layers(tmp_path, pair, capsys):
    out = tmp_path / "texture.png"
    code, _, err = run(["reconstruct", pair[1], "--style-layers", "relu1_1|relu2_1", "-o", str(out), *FAST], capsys)
    assert code == 0, err
    header, rows = read_csv(tmp_path / "texture.loss.csv")
    assert header == ["iteration", "total", "content", "style", "tv", "style:relu1_1", "style:relu2_1"]
    assert float(rows[-1]["style"]) < float(rows[0]["style"]) and float(rows[0]["content"]) == 0.0


def _nst_command() -> list[str]:
    script = Path(sys.executable).with_name("nst")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nst_cli.main"]


def _subprocess(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(_nst_command() + argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_nst_script_stylizes_in_a_real_process(tmp_path, pair):
    done = _subprocess(["stylize", *pair, "-o", "result.png", *FAST], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "result.png").exists() and (tmp_path / "result.loss.csv").exists() and (tmp_path / "result.loss.png").exists()
    assert "Traceback" not in done.stderr


def test_nst_script_refuses_bad_input_with_exit_2_in_a_real_process(tmp_path, pair):
    done = _subprocess(["stylize", *pair, "-o", "result.png", *FAST, "--content-layers", "relu4_9"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert "relu4_9" in error_line(done.stderr)
    assert list(tmp_path.iterdir()) == []
