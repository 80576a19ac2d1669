"""Hostile and broken input (issue 8): manifests, cells, images and parameters that users
(or attackers) get wrong, each refused with a reason that names the row, column, file or
field, and none able to stop the good rows, crash a batch or write outside the output prefix.

Real parts only: the SeaweedFS S3 server, a Prefect server, the sample images, the real
engine (32 px, 2 iterations, ``random:0`` weights). Related coverage elsewhere, not repeated:

* ``test_pipeline.py``: ``manifests/bad.csv`` through the flow (missing ``content_uri``,
  ``http://``, negative size, NaN style weight, unknown layer, duplicate id, missing file,
  not an image), ``strict``, local manifests refused, missing object / bucket, wrong credentials.
* ``test_engine_images.py``: not an image, zero bytes, truncated PNG/JPEG, a 65,000 x 65,000
  header-only PNG, ``max_pixels``, CMYK TIFF, 16-bit greyscale, animated GIF, EXIF orientation.
* ``test_engine_cli.py``: ``nst stylize`` with an unknown layer, NaN weight, negative size.
* ``test_controls.py``: bad blend weights, masks, colour mode, counts per style.
* ``test_engine_network.py``: a pickle that runs code (refused, never run: ``weights_only``),
  a state dict of the wrong shape or missing a tensor, corrupt weights files.
* ``test_report.py`` / ``test_review_export.py``: hostile ids and ``meta_*`` escaped in the
  report, safe file names in exports.
"""

from __future__ import annotations

import csv
import io
import random
import re
import struct
import time
import tracemalloc
import zlib

import pandas as pd
import pytest
from helpers import sample_image
from PIL import Image, PngImagePlugin
from pydantic import ValidationError

from nst_core import images, storage
from nst_core.errors import ImageError
from nst_core.params import StyleParams
from nst_run.manifest import ManifestError, load_manifest, parse_manifest

TINY = StyleParams(size=32, iterations=2, weights="random:0", progress_every=1)
FAST = {"retries": 1, "retry_delay_s": 0.2}
FORMULA = '=HYPERLINK("http://evil.example/x","click")'
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


# ============================================================================ manifests, validated without running

COLUMNS = [
    "id", "content_uri", "style_uri", "size", "iterations", "optimizer", "lr", "weights", "weights_sha256",
    "content_weight", "style_weight", "tv_weight", "init", "seed", "content_layers", "style_layers",
    "style_layer_weights", "pooling", "output_format", "device", "precision", "max_pixels", "scales", "scale_iterations",
    "style_blend_weights", "style_masks", "color", "normalize_network", "loss_normalization", "progress_every",
    "save_every", "style_scale", "tolerance", "meta_note", "meta_source",
]  # fmt: skip
IN = "s3://nst-inputs"
PRESIGNED = f"https://nst-inputs.s3.amazonaws.com/s.jpg?X-Amz-Credential=AKIAHOSTILE%2F2025&X-Amz-Signature=HOSTILESIG{'0' * 40}"

# Every way a user breaks a row: (name, cells to change, expected column, what the reason must say).
# The special cell value "<previous id>" repeats the id of the row before (a duplicate id).
BROKEN: list[tuple[str, dict[str, str], str, str]] = [
    ("missing content", {"content_uri": ""}, "content_uri", "content_uri is empty"),
    ("blank content", {"content_uri": "   "}, "content_uri", "content_uri is empty"),
    ("missing style", {"style_uri": ""}, "style_uri", "style_uri is empty"),
    ("http", {"content_uri": "http://example.com/a.jpg"}, "content_uri", "unsupported storage scheme 'http'"),
    ("https presigned", {"style_uri": PRESIGNED}, "style_uri", "unsupported storage scheme 'https'"),
    ("ftp", {"style_uri": "ftp://files.example.com/s.jpg"}, "style_uri", "unsupported storage scheme 'ftp'"),
    ("gs", {"content_uri": "gs://bucket/a.jpg"}, "content_uri", "unsupported storage scheme 'gs'"),
    ("bucket name case", {"content_uri": "s3://Bad_Bucket/a.jpg"}, "content_uri", "invalid S3 bucket name 'Bad_Bucket'"),
    ("bucket name short", {"content_uri": "s3://ab/a.jpg"}, "content_uri", "invalid S3 bucket name 'ab'"),
    ("bucket name empty", {"content_uri": "s3:///a.jpg"}, "content_uri", "invalid S3 bucket name ''"),
    ("bucket is an ip", {"style_uri": "s3://192.168.0.1/s.jpg"}, "style_uri", "invalid S3 bucket name"),
    ("one slash", {"content_uri": "s3:/nst-inputs/a.jpg"}, "content_uri", "malformed URI (write s3://...)"),
    ("no slash", {"style_uri": "s3:nst-inputs/s.jpg"}, "style_uri", "malformed URI (write s3://...)"),
    ("bucket only", {"content_uri": "s3://nst-inputs"}, "content_uri", "names no object"),
    ("prefix only", {"content_uri": "s3://nst-inputs/dir/"}, "content_uri", "names no object"),
    ("s3 query", {"style_uri": f"{IN}/s.jpg?versionId=7"}, "style_uri", "take no query string"),
    ("local absolute", {"content_uri": "/etc/passwd"}, "content_uri", "allow_local_paths is off"),
    ("local relative", {"content_uri": "../../secret/a.jpg"}, "content_uri", "allow_local_paths is off"),
    ("file uri", {"style_uri": "file:///etc/shadow"}, "style_uri", "allow_local_paths is off"),
    ("formula uri", {"content_uri": FORMULA}, "content_uri", "allow_local_paths is off"),
    ("two contents", {"content_uri": f"{IN}/a.jpg|{IN}/b.jpg"}, "content_uri", "lists several URIs"),
    ("control char uri", {"content_uri": f"{IN}/a\x07.jpg"}, "content_uri", "control or invisible"),
    ("line separator uri", {"style_uri": f"{IN}/s\u2028.jpg"}, "style_uri", "control or invisible"),
    ("too long uri", {"content_uri": f"{IN}/{'k' * 2100}.jpg"}, "content_uri", "longer than 2048"),
    ("nine styles", {"style_uri": "|".join(f"{IN}/s{k}.jpg" for k in range(9))}, "style_uri", "1 to 8"),
    ("empty style in list", {"style_uri": f"{IN}/a.jpg||{IN}/b.jpg"}, "style_uri", "(style 2 of 3) is empty"),
    ("duplicate id", {"id": "<previous id>"}, "id", "duplicate id"),
    ("long id", {"id": "x" * 201}, "id", "at most 200"),
    ("bidi id", {"id": "invoice\u202egnp.exe"}, "id", "control or invisible"),
    ("tab id", {"id": "a\tb"}, "id", "control or invisible"),
    ("size text", {"size": "abc"}, "size", "valid integer, unable to parse string as an integer (got 'abc')"),
    ("size float", {"size": "12.5"}, "size", "valid integer"),
    ("size exponent", {"size": "1e3"}, "size", "valid integer"),
    ("size negative", {"size": "-64"}, "size", "greater than or equal to 16 (got '-64')"),
    ("size nan", {"size": "nan"}, "size", "valid integer"),
    ("size inf", {"size": "inf"}, "size", "valid integer"),
    ("size absurd", {"size": "1000000"}, "size", "less than or equal to 8192"),
    ("size formula", {"size": "=1+1"}, "size", "(got '=1+1')"),
    ("style weight nan", {"style_weight": "nan"}, "style_weight", "finite number"),
    ("style weight inf", {"style_weight": "inf"}, "style_weight", "finite number"),
    ("content weight -inf", {"content_weight": "-inf"}, "content_weight", "finite number"),
    ("style weight overflow", {"style_weight": "1e400"}, "style_weight", "finite number"),
    ("tv weight negative", {"tv_weight": "-1"}, "tv_weight", "greater than or equal to 0"),
    ("content weight negative", {"content_weight": "-0.5"}, "content_weight", "greater than or equal to 0"),
    ("iterations absurd", {"iterations": "1000000000"}, "iterations", "less than or equal to 100000"),
    ("iterations huge", {"iterations": "9" * 30}, "iterations", "less than or equal to 100000"),
    ("iterations negative", {"iterations": "-5"}, "iterations", "greater than or equal to 0"),
    ("iterations text", {"iterations": "ten"}, "iterations", "valid integer"),
    ("lr zero", {"lr": "0"}, "lr", "greater than 0"),
    ("lr nan", {"lr": "NaN"}, "lr", "finite number"),
    ("seed negative", {"seed": "-1"}, "seed", "greater than or equal to 0"),
    ("seed hex", {"seed": "0x1F"}, "seed", "valid integer"),
    ("unknown style layer", {"style_layers": "relu1_1|relu9_9"}, "style_layers", "unknown VGG-19 layer 'relu9_9'"),
    ("unknown content layer", {"content_layers": "fc7"}, "content_layers", "unknown VGG-19 layer 'fc7'"),
    ("layer twice", {"style_layers": "relu1_1|relu1_1"}, "style_layers", "listed twice"),
    ("no layers at all", {"content_layers": "|", "style_layers": "|"}, "style_layers", "at least one of content_layers and style_layers"),
    ("optimizer enum", {"optimizer": "sgd"}, "optimizer", "'lbfgs' or 'adam'"),
    ("pooling enum", {"pooling": "min"}, "pooling", "'avg' or 'max'"),
    ("output format enum", {"output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
    ("color enum", {"color": "sepia"}, "color", "'none', 'luminance' or 'histogram'"),
    ("normalisation enum", {"loss_normalization": "none"}, "loss_normalization", "'target' or 'paper'"),
    ("device", {"device": "tpu"}, "device", "should match pattern"),
    ("precision", {"precision": "fp16"}, "precision", "'auto', 'fp32' or 'bf16'"),
    ("boolean", {"normalize_network": "maybe"}, "normalize_network", "valid boolean"),
    ("too many scales", {"scales": "0.1|0.2|0.3|0.4|0.5|0.6|0.7|0.8|1"}, "scales", "at most 8 items"),
    ("too few scales", {"scales": "|"}, "scales", "at least 1 item"),
    ("scale out of range", {"scales": "0.5|2"}, "scales", "between 0.05 and 1"),
    ("scale inf", {"scales": "0.5|inf"}, "scales", "finite number"),
    ("stage count", {"scale_iterations": "5|5"}, "scale_iterations", "scale_iterations has 2 values for 1 scales"),
    ("layer weight count", {"style_layer_weights": "1|2"}, "style_layer_weights", "has 2 values for 5 style_layers"),
    ("layer weight nan", {"style_layer_weights": "nan|1|1|1|1"}, "style_layer_weights", "finite number"),
    ("blend weight count", {"style_blend_weights": "1|2"}, "style_blend_weights", "has 2 values for 1 styles"),
    ("mask count", {"style_masks": f"{IN}/m1.png|{IN}/m2.png"}, "style_masks", "has 2 values for 1 styles"),
    ("mask http", {"style_masks": "http://x/m.png"}, "style_masks", "unsupported storage scheme 'http'"),
    ("weights spec", {"weights": "random:abc"}, "weights", "non-negative integer seed"),
    ("weights http", {"weights": "http://models.example/vgg.pth"}, "weights", "unsupported storage scheme 'http'"),
    ("weights local", {"weights": "/opt/models/vgg.pth"}, "weights", "allow_local_paths is off"),
    ("weights sha", {"weights_sha256": "xyz"}, "weights_sha256", "should match pattern"),
    ("init http", {"init": "http://x/i.png"}, "init", "unsupported storage scheme 'http'"),
    ("init traversal", {"init": "../../etc/passwd"}, "init", "allow_local_paths is off"),
    ("max pixels", {"max_pixels": "0"}, "max_pixels", "greater than or equal to 1"),
    ("progress every", {"progress_every": "0"}, "progress_every", "greater than or equal to 1"),
    ("save every", {"save_every": "-1"}, "save_every", "greater than or equal to 0"),
    ("style scale", {"style_scale": "0"}, "style_scale", "greater than 0"),
    ("tolerance", {"tolerance": "2"}, "tolerance", "less than or equal to 1"),
    ("too many cells", {"<cells>": "+1"}, "*", f"has {len(COLUMNS) + 1} cells, the header has {len(COLUMNS)}"),
    ("too few cells", {"<cells>": "3"}, "*", f"has 3 cells, the header has {len(COLUMNS)}"),
]
N_ROWS = 10_000
BROKEN_EVERY = 100  # rows 50, 150, 250, ...: 1 %


def _good_cells(number: int) -> dict[str, str]:
    """A valid row, in one of several shapes (blank cells, own parameters, two styles, odd but valid ids)."""
    cells = dict.fromkeys(COLUMNS, "")
    cells.update(id=f"item-{number:05d}", content_uri=f"{IN}/content/{number % 50}.jpg", style_uri=f"{IN}/styles/{number % 7}.jpg")
    cells["meta_source"] = f"batch {number // 1000}"
    if number % 10 == 1:
        cells.update(size="32", iterations="5", style_layers="relu1_1|relu2_1", weights="random:0", style_weight="1e4")
    if number % 13 == 2:
        cells["meta_note"] = FORMULA  # pass-through text: kept as written, escaped in the results CSV
    if number % 17 == 3:
        cells.update(style_uri=f"{IN}/styles/a.jpg|{IN}/styles/b.jpg", style_blend_weights="1|3")
    if number % 19 == 4:
        cells["content_uri"] = f"{IN}/my photos/a, b ({number}).jpg"  # spaces, comma, parentheses in a key
    if number % 97 == 5:
        cells["id"] = f"../../etc/{number}"  # ids are labels, never paths: valid (see the flow test below)
    if number % 89 == 6:
        cells["id"] = f"é-{number}-日本"
    if number % 23 == 7:
        cells.update(scales="0.5|1", scale_iterations="3|2", optimizer="adam", lr="0.05", color="luminance")
    return cells


def hostile_manifest() -> tuple[bytes, dict[int, tuple[str, str, str]], dict[int, str]]:
    """10,000 rows, 1 % broken: (CSV bytes, {row: (case, column, reason)}, {row: id} of the good rows)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    broken: dict[int, tuple[str, str, str]] = {}
    good: dict[int, str] = {}
    previous_id = ""
    for number in range(1, N_ROWS + 1):
        cells = _good_cells(number)
        if number % BROKEN_EVERY == BROKEN_EVERY // 2:
            name, changes, column, reason = BROKEN[(number // BROKEN_EVERY) % len(BROKEN)]
            changes = {k: previous_id if v == "<previous id>" else v for k, v in changes.items()}
            broken[number] = (name, column, reason)
            row = [cells[c] for c in COLUMNS]
            if "<cells>" in changes:
                row = row + ["extra"] if changes["<cells>"] == "+1" else row[: int(changes["<cells>"])]
            else:
                cells.update(changes)
                row = [cells[c] for c in COLUMNS]
            writer.writerow(row)
            continue
        good[number] = cells["id"]
        previous_id = cells["id"]
        writer.writerow([cells[c] for c in COLUMNS])
    return buffer.getvalue().encode("utf-8"), broken, good


@pytest.fixture(scope="module")
def hostile() -> tuple[bytes, dict[int, tuple[str, str, str]], dict[int, str]]:
    return hostile_manifest()


def test_every_kind_of_broken_row_is_used():
    assert len(BROKEN) < N_ROWS // BROKEN_EVERY  # 100 broken rows cover every case at least once
    _, broken, good = hostile_manifest()
    assert len(broken) == N_ROWS // BROKEN_EVERY and len(good) == N_ROWS - len(broken)
    assert {name for name, _, _ in broken.values()} == {name for name, _, _, _ in BROKEN}


def test_10k_row_manifest_every_broken_row_invalid_with_row_column_reason(s3_bucket, hostile):
    data, broken, good = hostile
    uri = f"s3://{s3_bucket}/manifests/hostile.csv"
    storage.write_bytes(uri, data, "text/csv")
    started = time.perf_counter()
    manifest = load_manifest(uri, defaults=TINY, allow_local_paths=False)
    elapsed = time.perf_counter() - started
    print(f"validated {N_ROWS} rows in {elapsed:.2f} s")
    assert elapsed < 30  # generous (about 1 s here); guards against anything quadratic per row

    assert manifest.total == N_ROWS
    assert {r.row: r.id for r in manifest.rows} == good  # every good row valid, nothing else
    found = {bad.row: bad for bad in manifest.invalid}
    assert sorted(found) == sorted(broken)
    for number, (name, column, reason) in broken.items():
        bad = found[number]
        assert bad.column == column, (name, bad.error)
        assert reason in bad.reason, (name, bad.error)
        assert bad.error.startswith(f"row {number}, column {column}: "), (name, bad.error)
        assert "\n" not in bad.error and len(bad.error) < 500, (name, bad.error)
        assert "Traceback" not in bad.error and "pydantic" not in bad.error, (name, bad.error)
        assert "HOSTILESIG" not in bad.error and "X-Amz" not in bad.error, (name, bad.error)  # presigned query cut
    # the meta_* columns are carried for invalid rows too (results table)
    assert all(bad.meta.get("meta_source", "").startswith("batch ") for bad in manifest.invalid if bad.column != "*")
    # odd but valid rows keep what they said
    rows = {r.row: r for r in manifest.rows}
    assert rows[2].meta["meta_note"] == FORMULA
    assert rows[5].id == "../../etc/5"
    assert rows[4].content_uri == f"{IN}/my photos/a, b (4).jpg"
    assert rows[3].style_uris == (f"{IN}/styles/a.jpg", f"{IN}/styles/b.jpg") and rows[3].params.blend_weights(2) == (0.25, 0.75)
    assert rows[1].params.size == 32 and rows[1].params.style_layers == ("relu1_1", "relu2_1")
    assert rows[30].params.size == TINY.size  # blank cells take the run's defaults


def test_nst_validate_prints_every_broken_row_and_exits_1(s3_bucket, hostile, capsys):
    from nst_cli.main import main

    data, broken, _ = hostile
    uri = f"s3://{s3_bucket}/manifests/hostile.csv"
    storage.write_bytes(uri, data, "text/csv")
    code = main(["validate", uri, "--no-local-paths", "--set", "size=32", "--set", "weights=random:0"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert f"{N_ROWS} rows, {N_ROWS - len(broken)} valid, {len(broken)} invalid" in captured.out
    lines = [line.strip() for line in captured.out.splitlines() if line.strip().startswith("invalid: ")]
    assert len(lines) == len(broken)
    for line, (number, (name, column, reason)) in zip(lines, sorted(broken.items()), strict=True):
        assert line.startswith(f"invalid: row {number}, column {column}: "), (name, line)
        assert reason in line, (name, line)
    assert "HOSTILESIG" not in captured.out + captured.err
    assert captured.err == ""


# --- the file as a whole ------------------------------------------------------------------------------


def _small_manifest(rows: int = 1000) -> list[str]:
    lines = ["id,content_uri,style_uri,meta_note"]
    lines += [f"r{k},{IN}/c{k}.jpg,{IN}/s.jpg,note {k}" for k in range(1, rows + 1)]
    return lines


def test_non_utf8_manifest_is_one_clear_error_naming_the_line():
    lines = _small_manifest()
    data = "\n".join(lines).encode()
    latin1 = data.replace(b"note 500\n", "caf\u00e9 500\n".encode("latin-1"))  # line 501 (row 500)
    with pytest.raises(ManifestError) as info:
        parse_manifest(latin1, source="m.csv", allow_local_paths=False)
    message = str(info.value)
    assert message.startswith("manifest m.csv: not UTF-8 text: invalid byte 0xe9 at line 501")
    assert "save the manifest as UTF-8" in message and "\n" not in message
    assert not isinstance(info.value, UnicodeDecodeError) and info.value.__cause__ is None

    # Windows-1252 smart quotes on two lines: the first is named, the count of others given.
    cp1252 = data.replace(b"note 10\n", "\u201cnote\u201d 10\n".encode("cp1252")).replace(b"note 900\n", "\u2013 900\n".encode("cp1252"))
    with pytest.raises(ManifestError, match=r"invalid byte 0x93 at line 11 .*\(2 lines have such bytes\)"):
        parse_manifest(cp1252, source="m.csv")

    # UTF-16 (spreadsheet "Unicode text"): said so, not "binary content".
    with pytest.raises(ManifestError, match="UTF-16 text; save the manifest as UTF-8"):
        parse_manifest("\n".join(lines).encode("utf-16"), source="m.csv")
    # A UTF-8 byte-order mark (spreadsheet "CSV UTF-8") is fine, and so is UTF-8 beyond ASCII.
    assert len(parse_manifest(b"\xef\xbb\xbf" + data.replace(b"note 7\n", "caf\u00e9 \u65e5\u672c 7\n".encode()), allow_local_paths=False).rows) == 1000
    # A quote left open swallows the rest of the file: one error naming where.
    broken_quote = data.replace(b"r300,", b'"r300,')
    with pytest.raises(ManifestError, match="not a valid CSV file at line"):
        parse_manifest(broken_quote, source="m.csv")


def test_nst_validate_non_utf8_exit_2_one_line(tmp_path, capsys):
    from nst_cli.main import main

    path = tmp_path / "latin1.csv"
    path.write_bytes("\n".join(_small_manifest(20)).encode().replace(b"note 20", "\u00e9t\u00e9 20".encode("latin-1")))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nst: error: manifest ")
    assert "not UTF-8 text: invalid byte 0xe9 at line 21" in err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err


# ============================================================================ parameters


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"size": float("nan")}, "size", "finite number"),
        ({"size": float("inf")}, "size", "finite number"),
        ({"size": -64}, "size", "greater than or equal to 16"),
        ({"size": 10**6}, "size", "less than or equal to 8192"),
        ({"iterations": 10**9}, "iterations", "less than or equal to 100000"),
        ({"iterations": -1}, "iterations", "greater than or equal to 0"),
        ({"style_weight": float("nan")}, "style_weight", "finite number"),
        ({"style_weight": float("inf")}, "style_weight", "finite number"),
        ({"content_weight": float("-inf")}, "content_weight", "finite number"),
        ({"content_weight": -1.0}, "content_weight", "greater than or equal to 0"),
        ({"tv_weight": -1e-9}, "tv_weight", "greater than or equal to 0"),
        ({"style_weight": 1e13}, "style_weight", "less than or equal to 1000000000000"),
        ({"lr": float("nan")}, "lr", "finite number"),
        ({"lr": -0.1}, "lr", "greater than 0"),
        ({"style_scale": float("inf")}, "style_scale", "finite number"),
        ({"tolerance": float("nan")}, "tolerance", "finite number"),
        ({"scales": "0.5|nan"}, "scales", "finite number"),
        ({"scales": [0.5, float("inf")]}, "scales", "finite number"),
        ({"scale_iterations": "3|-1"}, "scale_iterations", "between 0 and 100000"),
        ({"scale_iterations": "3|2", "scales": "1"}, "scale_iterations", "2 values for 1 scales"),
        ({"style_layer_weights": "1|inf|1|1|1"}, "style_layer_weights", "finite number"),
        ({"style_layer_weights": "1|-1|1|1|1"}, "style_layer_weights", "finite and >= 0"),
        ({"style_layer_weights": "1|1", "style_layers": "relu1_1"}, "style_layer_weights", "2 values for 1 style_layers"),
        ({"style_blend_weights": "nan|1"}, "style_blend_weights", "finite number"),
        ({"style_layers": "relu1_1|relu6_1"}, "style_layers", "unknown VGG-19 layer 'relu6_1'"),
        ({"content_layers": "RELU4_2"}, "content_layers", "unknown VGG-19 layer 'RELU4_2'"),
        ({"content_layers": [], "style_layers": []}, "style_layers", "at least one of content_layers and style_layers"),
        ({"max_pixels": -1}, "max_pixels", "greater than or equal to 1"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
    ],
)
def test_style_params_refuse_bad_numbers_naming_the_field(values, field, message):
    with pytest.raises(ValidationError) as info:
        StyleParams(**values)
    (error,) = info.value.errors()
    assert error["loc"][0] == field and message in error["msg"], error


CLI_CASES = {
    # flag and value -> what the one error line must say
    "size-inf": (["--size", "inf"], "--size:"),
    "iterations-absurd": (["--iterations", "1000000000"], "--iterations: Input should be less than or equal to 100000"),
    "iterations-negative": (["--iterations", "-3"], "--iterations: Input should be greater than or equal to 0"),
    "content-weight-negative": (["--content-weight", "-1"], "--content-weight: Input should be greater than or equal to 0"),
    "style-weight-inf": (["--style-weight", "inf"], "--style-weight: Input should be a finite number"),
    "tv-weight-minus-inf": (["--tv-weight=-inf"], "--tv-weight: Input should be a finite number"),
    "lr-nan": (["--lr", "nan"], "--lr: Input should be a finite number"),
    "scales-inf": (["--scales", "0.5|inf"], "--scales"),
    "layer-weights-nan": (["--style-layer-weights", "nan,1,1,1,1"], "--style-layer-weights"),
    "layer-weights-count": (["--style-layer-weights", "1,1"], "--style-layer-weights: style_layer_weights has 2 values for 5 style_layers"),
    "stage-count": (["--scale-iterations", "5,5"], "--scale-iterations: scale_iterations has 2 values for 1 scales"),
    "unknown-content-layer": (["--content-layers", "fc7"], "--content-layers: unknown VGG-19 layer 'fc7'"),
    "no-layers": (["--content-layers", ",", "--style-layers", ","], "--style-layers: at least one of"),
    "max-pixels-zero": (["--max-pixels", "0"], "--max-pixels"),
    "optimizer-enum": (["--optimizer", "sgd"], "--optimizer"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_nst_stylize_refuses_bad_numbers_exit_2_one_line(tmp_path, capsys, case):
    from nst_cli.main import main

    flags, expected = CLI_CASES[case]
    out = tmp_path / "out.png"
    fast = ["--size", "32", "--iterations", "2", "--weights", "random:0", "--device", "cpu", "-q"]
    argv = ["stylize", str(sample_image("tubingen.jpg")), str(sample_image("starry_night.jpg")), "-o", str(out), *fast, *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING: weights=random:")]
    assert len(lines) == 1 and lines[0].startswith("nst: error: invalid parameters: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


# ============================================================================ images

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes] | None, extra: bytes = b"") -> bytes:
    """A PNG written by hand (modes Pillow cannot write: 16-bit RGB/RGBA), or header-only when ``rows`` is None."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"".join(b"\0" + r for r in rows))) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra + idat + _chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _red_png(extra_before_idat: bytes = b"", extra_after_idat: bytes = b"") -> bytes:
    """A 32x24 red PNG (Pillow-written) with extra chunks spliced in before/after its image data."""
    data = _encoded(Image.new("RGB", (32, 24), (200, 30, 30)), "PNG")
    head, rest = data[:33], data[33:]  # signature + IHDR | the rest
    iend = rest.rindex(b"IEND") - 4
    return head + extra_before_idat + rest[:iend] + extra_after_idat + rest[iend:]


def _peak_python_bytes(fn) -> tuple[object, int]:
    """Run fn; return its result and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_wrong_extensions_content_decides(tmp_path):
    png_as_jpg = tmp_path / "photo.jpg"
    png_as_jpg.write_bytes(_encoded(Image.new("RGB", (20, 10), (0, 128, 255)), "PNG"))
    assert images.load_image(png_as_jpg).getpixel((0, 0)) == (0, 128, 255)
    jpg_as_png = tmp_path / "photo.png"
    jpg_as_png.write_bytes(_encoded(Image.new("RGB", (20, 10), (0, 128, 255)), "JPEG", quality=100))
    assert images.load_image(jpg_as_png).size == (20, 10)
    text_as_png = tmp_path / "readme.png"
    text_as_png.write_text("# not pixels\n" * 20)
    with pytest.raises(ImageError) as info:
        images.load_image(text_as_png)
    assert str(info.value) == f"{text_as_png}: not an image file in a supported format (PNG, JPEG, WebP, GIF, TIFF, BMP, PPM)"


@pytest.mark.parametrize(
    "kind",
    ["eps", "ico", "svg", "psd", "html"],
)
def test_formats_outside_the_allow_list_are_refused_unopened(kind):
    # EPS matters most: Pillow's EPS loader runs Ghostscript on the file.
    data = {
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(x) print showpage\n",
        "ico": _encoded(Image.new("RGB", (16, 16), (1, 2, 3)), "ICO"),
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "psd": b"8BPS\x00\x01" + b"\x00" * 40,
        "html": b"<!doctype html><img src=x onerror=alert(1)>",
    }[kind]
    with pytest.raises(ImageError, match="not an image file in a supported format"):
        images.load_image(data, name=f"input.{kind}")
    assert images.header_size(data) is None


def _pillow_images_made() -> int:
    """How many images Pillow's core has allocated in this process (each decode makes one)."""
    return Image.core.get_stats()["new_count"]


def test_65000_px_wide_headers_are_refused_before_decoding():
    png = _png(65_000, 1_000, 8, 2, rows=None)  # header only: a decode would fail as truncated
    jpeg = bytearray(_encoded(Image.new("RGB", (16, 16)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    struct.pack_into(">HH", jpeg, sof + 5, 65_000, 65_000)  # SOF0: height, width
    for data, size in ((png, (65_000, 1_000)), (bytes(jpeg), (65_000, 65_000))):
        made = _pillow_images_made()
        assert images.header_size(data) == size
        with pytest.raises(ImageError) as info:
            images.load_image(data, name="wide")
        assert _pillow_images_made() == made  # nothing was decoded, not even by header_size
        message = str(info.value)
        assert f"{size[0]}x{size[1]}" in message and "max_pixels=40,000,000" in message and "\n" not in message
    _, peak = _peak_python_bytes(lambda: pytest.raises(ImageError, images.load_image, png, name="wide"))
    assert peak < 2_000_000, peak


def _zero_png(side: int) -> bytes:
    """A genuine side x side greyscale PNG of zeros: tiny on disk, side**2 bytes once decoded."""
    squeeze = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    idat = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_a_real_decompression_bomb_is_refused_without_decoding():
    """A genuine 8,000 x 8,000 PNG (64 MP, ~60 KB on disk): measured from its header, refused from it."""
    bomb = _zero_png(8_000)
    assert len(bomb) < 200_000
    made = _pillow_images_made()
    # header_size (used to plan batches, on every input) once decoded every PNG through getexif(): 64 MB here,
    # gigabytes for a bigger bomb, in the resolve task's 8 threads.
    assert images.header_size(bomb) == (8_000, 8_000)
    with pytest.raises(ImageError, match="8000x8000 = 64,000,000 pixels exceeds max_pixels=40,000,000"):
        images.load_image(bomb, name="bomb.png")
    assert _pillow_images_made() == made
    # under a larger max_pixels it is an ordinary (black) image
    assert images.load_image(bomb, name="bomb.png", max_pixels=64_000_000).getpixel((0, 0)) == (0, 0, 0)
    assert _pillow_images_made() > made


def test_header_size_reads_png_orientation_without_decoding():
    image = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    data = _encoded(image, "PNG", exif=exif.tobytes())
    assert data.index(b"eXIf") < data.index(b"IDAT")
    made = _pillow_images_made()
    assert images.header_size(data) == (20, 40)
    assert images.header_size(_encoded(image, "PNG")) == (40, 20)
    assert _pillow_images_made() == made
    # an eXIf chunk after the pixels can only be read by decoding: no size for planning, the right image still
    start = data.index(b"eXIf") - 4
    chunk = data[start : start + 12 + int.from_bytes(data[start : start + 4], "big")]
    rest = data.replace(chunk, b"")
    late = rest[: rest.rindex(b"IEND") - 4] + chunk + rest[rest.rindex(b"IEND") - 4 :]
    assert images.header_size(late) is None
    assert images.load_image(late, name="late.png").size == (20, 40)


HUGE = 50_000_000


@pytest.mark.parametrize(
    "case",
    ["tEXt before pixels", "tEXt after pixels", "zTXt bomb before pixels", "zTXt bomb after pixels", "iTXt bomb", "80 x 0.9 MB tEXt"],
)
def test_png_with_huge_text_chunks_loads_its_pixels_without_the_text(case):
    """Oversized text is skipped before Pillow parses it: no refusal, no 50 MB (or 150 MB) of text in memory."""
    text = {
        "tEXt before pixels": lambda: (_chunk(b"tEXt", b"Comment\0" + b"A" * HUGE), b""),
        "tEXt after pixels": lambda: (b"", _chunk(b"tEXt", b"Comment\0" + b"A" * HUGE)),
        "zTXt bomb before pixels": lambda: (_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * HUGE, 9)), b""),
        "zTXt bomb after pixels": lambda: (b"", _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * HUGE, 9))),
        "iTXt bomb": lambda: (_chunk(b"iTXt", b"Comment\0\x01\x00en\0\0" + zlib.compress(b"A" * HUGE, 9)), b""),
        "80 x 0.9 MB tEXt": lambda: (b"".join(_chunk(b"tEXt", b"k%d\0" % k + b"A" * 900_000) for k in range(80)), b""),
    }[case]()
    data = _red_png(*text)
    image, peak = _peak_python_bytes(lambda: images.load_image(data, name="meta.png"))
    assert image.size == (32, 24) and image.getpixel((5, 5)) == (200, 30, 30)
    assert peak < 32_000_000, f"{case}: {peak / 1e6:.0f} MB of Python allocations while loading"  # kept text <= 8 MB
    assert images.header_size(data) == (32, 24)


def test_huge_text_chunk_in_a_file_on_disk(tmp_path):
    path = tmp_path / "comment.png"
    path.write_bytes(_red_png(_chunk(b"tEXt", b"Comment\0" + b"A" * HUGE)))
    image, peak = _peak_python_bytes(lambda: images.load_image(path))
    assert image.getpixel((0, 0)) == (200, 30, 30) and peak < 16_000_000, peak


def test_small_png_text_is_still_read_xmp_orientation_honoured():
    """Ordinary text chunks are kept: an XMP packet (compressed iTXt) that rotates the image still does."""
    image = Image.new("RGB", (40, 20), (220, 0, 0))
    image.paste((0, 0, 220), (20, 0, 40, 20))
    info = PngImagePlugin.PngInfo()
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    info.add_itxt("XML:com.adobe.xmp", xmp, zip=True)
    info.add_text("Comment", "small and kept")
    out = images.load_image(_encoded(image, "PNG", pnginfo=info), name="xmp.png")
    assert out.size == (20, 40) and out.getpixel((10, 5))[0] > 150  # rotated: the red half on top


def test_cmyk_jpeg_16_bit_rgb_png_and_animated_png():
    cmyk = _encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100)  # red, Adobe-inverted on disk
    assert images.load_image(cmyk, name="cmyk.jpg").getpixel((8, 8)) == (255, 0, 0)
    rgb16 = _png(2, 1, 16, 2, [struct.pack(">HHHHHH", 0x1234, 0x8000, 0xFFFF, 0, 0, 0)])
    with Image.open(io.BytesIO(rgb16)) as raw:
        assert raw.mode == "RGB"  # Pillow reads 16-bit RGB as 8-bit RGB
    assert images.load_image(rgb16, name="rgb16.png").getpixel((0, 0)) == (0x12, 0x80, 0xFF)
    rgba16 = _png(1, 1, 16, 6, [struct.pack(">HHHH", 0xFFFF, 0, 0, 0x8000)])  # half-transparent red over white
    r, g, b = images.load_image(rgba16, name="rgba16.png").getpixel((0, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    apng = io.BytesIO()
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:], duration=40)
    with Image.open(io.BytesIO(apng.getvalue())) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    assert images.load_image(apng.getvalue(), name="anim.png").getcolors() == [(48, (255, 0, 0))]  # the first frame


def test_fuzzed_images_fail_only_with_image_error():
    """Seeded random corruption of real PNG/JPEG/GIF/TIFF/WebP/BMP files: a clean image or an ImageError, nothing else."""
    base = Image.open(sample_image("tubingen.jpg")).convert("RGB").resize((40, 30))
    seeds = [_encoded(base, fmt, **opts) for fmt, opts in (
        ("PNG", {}), ("JPEG", {}), ("GIF", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_deflate"}), ("WEBP", {}), ("BMP", {}),
    )]  # fmt: skip
    rng = random.Random(8)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.6:
                data[pos] = rng.randrange(256)
            elif op < 0.8:
                del data[pos : pos + rng.randint(1, 64)]
            else:
                data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        try:
            images.load_image(bytes(data), name="fuzz", max_pixels=4_000_000)
            outcomes["ok"] += 1
        except ImageError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("fuzz: ")
            outcomes["refused"] += 1
        images.header_size(bytes(data))  # never raises
    assert outcomes["ok"] > 20 and outcomes["refused"] > 20, outcomes


# ============================================================================ through the flow (S3, Prefect)


def _run_flow(**kwargs):
    from flows.stylize_manifest import stylize_manifest

    state = stylize_manifest(**{**FAST, "defaults": TINY, **kwargs}, return_state=True)
    return state, state.result(raise_on_failure=False)


def _write_csv(uri: str, header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    storage.write_bytes(uri, buffer.getvalue().encode(), "text/csv")
    return uri


def test_flow_hostile_cells_paths_and_images(prefect_server, s3_bucket, sample_images):
    """A handful of hostile rows through the real flow: each good row done, each bad one alone with its reason,
    formulas neutralised in the CSV results, and every object the run wrote under the output prefix."""
    inputs = f"s3://{s3_bucket}/inputs"
    for name in ("tubingen.jpg", "starry_night.jpg", "shipwreck.jpg"):
        storage.write_bytes(f"{inputs}/{name}", (sample_images / name).read_bytes(), "image/jpeg")
    small = Image.open(sample_images / "hoovertowernight.jpg").convert("RGB").resize((40, 30))
    uploads = {
        "png-named.jpg": _encoded(small, "PNG"),
        "notes.png": b"these are words, not pixels\n" * 10,
        "cut.jpg": _encoded(small, "JPEG")[:400],
        "bomb.png": _png(65_000, 65_000, 8, 2, rows=None),
        "comment-bomb.png": _red_png(_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * HUGE, 9))),
        "empty.jpg": b"",
    }
    for name, data in uploads.items():
        storage.write_bytes(f"{inputs}/{name}", data)
    content, style = f"{inputs}/tubingen.jpg", f"{inputs}/starry_night.jpg"
    header = ["id", "content_uri", "style_uri", "meta_note", "meta_formula"]
    rows = [
        [FORMULA, content, style, FORMULA, "+cmd|' /C calc'!A0"],          # 1 formula id and meta: succeeds
        ["../../etc", f"{inputs}/png-named.jpg", style, "@SUM(1+1)", "-2+3"],  # 2 traversal id, PNG named .jpg: succeeds
        ["../../../../outside/x", f"{inputs}/comment-bomb.png", f"{inputs}/shipwreck.jpg", "\t=1", "ok"],  # 3 succeeds
        ["http", "http://example.com/a.jpg", style, "", ""],                 # 4 invalid: content_uri
        ["https-style", content, "https://example.com/s.jpg", "", ""],       # 5 invalid: style_uri
        ["local", "/etc/hosts", style, "", ""],                               # 6 invalid: local path
        ["file-uri", content, "file:///etc/passwd", "", ""],                  # 7 invalid: local path
        ["not-an-image", f"{inputs}/notes.png", style, "", ""],               # 8 failed: not an image
        ["truncated", f"{inputs}/cut.jpg", style, "", ""],                     # 9 failed: truncated
        ["bomb", f"{inputs}/bomb.png", style, "", ""],                        # 10 failed: max_pixels
        ["empty", f"{inputs}/empty.jpg", style, "", ""],                      # 11 failed: 0 bytes
    ]  # fmt: skip
    manifest = _write_csv(f"s3://{s3_bucket}/manifests/hostile.csv", header, rows)
    output = f"s3://{s3_bucket}/runs/team-a/out"
    before = set(storage.list_prefix(f"s3://{s3_bucket}/"))

    state, summary = _run_flow(manifest_uri=manifest, output_uri=output)
    assert state.is_failed(), state.message  # some items failed; the run itself finished
    assert isinstance(summary, dict), summary
    counts = {k: v for k, v in summary["counts"].items() if v}
    assert counts == {"succeeded": 3, "failed": 4, "invalid": 4}

    # Every object the run wrote is under the output prefix, whatever the ids said.
    written = sorted(set(storage.list_prefix(f"s3://{s3_bucket}/")) - before)
    assert written and all(uri.startswith(output + "/") for uri in written), [u for u in written if not u.startswith(output + "/")]
    assert not any("/../" in uri or "/etc" in uri or "outside" in uri for uri in written)
    assert {uri.removeprefix(output + "/").split("/", 1)[0] for uri in written} == {"items", "runs", "input-hashes"}
    records = [uri.removeprefix(output + "/input-hashes/") for uri in written if "/input-hashes/" in uri]
    assert records and all(re.fullmatch(r"[0-9a-f]{2}/[0-9a-f]{64}\.json", r) for r in records), records  # named by hashes, never by the URIs

    # results.csv: formulas neutralised in every cell; the same table in Parquet keeps the values as written.
    raw = storage.read_bytes(summary["results_csv"]).decode()
    table = list(csv.reader(io.StringIO(raw)))
    head, body = table[0], table[1:]
    assert len(body) == len(rows)
    for line in body:
        for column, cell in zip(head, line, strict=True):
            assert not cell.startswith(FORMULA_STARTS), (column, cell)
    by_row = {int(line[head.index("row")]): dict(zip(head, line, strict=True)) for line in body}
    assert by_row[1]["id"] == "'" + FORMULA and by_row[1]["meta_note"] == "'" + FORMULA
    assert by_row[1]["meta_formula"] == "'+cmd|' /C calc'!A0"
    assert by_row[2]["meta_note"] == "'@SUM(1+1)" and by_row[2]["meta_formula"] == "'-2+3"
    assert by_row[3]["meta_note"] == "'\t=1"
    for part in [u for u in written if "/parts/results-" in u]:  # the incremental parts too
        for line in list(csv.reader(io.StringIO(storage.read_bytes(part).decode())))[1:]:
            assert not any(cell.startswith(FORMULA_STARTS) for cell in line), line
    parquet = pd.read_parquet(io.BytesIO(storage.read_bytes(summary["results_parquet"]))).set_index("row")
    assert parquet.loc[1, "id"] == FORMULA and parquet.loc[2, "id"] == "../../etc"

    status = {row: cells["status"] for row, cells in by_row.items()}
    assert status == {1: "succeeded", 2: "succeeded", 3: "succeeded", 4: "invalid", 5: "invalid", 6: "invalid", 7: "invalid",
                      8: "failed", 9: "failed", 10: "failed", 11: "failed"}  # fmt: skip
    error = {row: cells["error"] for row, cells in by_row.items()}
    assert error[4].startswith("row 4, column content_uri: ") and "'http'" in error[4]
    assert error[5].startswith("row 5, column style_uri: ") and "'https'" in error[5]
    assert error[6].startswith("row 6, column content_uri: ") and "allow_local_paths is off" in error[6]
    assert error[7].startswith("row 7, column style_uri: ") and "allow_local_paths is off" in error[7]
    assert error[8] == f"{inputs}/notes.png: not an image file in a supported format (PNG, JPEG, WebP, GIF, TIFF, BMP, PPM)"
    assert error[9].startswith(f"{inputs}/cut.jpg: cannot ") and "truncated" in error[9]  # cut inside its header
    assert error[10].startswith(f"{inputs}/bomb.png: 65000x65000") and "max_pixels" in error[10]
    assert error[11] == f"{inputs}/empty.jpg: empty file (0 bytes)"
    for row in (1, 2, 3):
        image = Image.open(io.BytesIO(storage.read_bytes(by_row[row]["output_uri"])))
        assert max(image.size) == 32


def test_flow_local_paths_refused_when_off_and_allowed_when_on(prefect_server, s3_bucket, sample_images, tmp_path):
    style = f"s3://{s3_bucket}/inputs/starry_night.jpg"
    storage.write_bytes(style, (sample_images / "starry_night.jpg").read_bytes())
    local = str(sample_images / "tubingen.jpg")
    manifest = _write_csv(f"s3://{s3_bucket}/m.csv", ["id", "content_uri", "style_uri"], [["local", local, style]])
    state, summary = _run_flow(manifest_uri=manifest, output_uri=f"s3://{s3_bucket}/out")
    assert summary["counts"]["invalid"] == 1
    state, summary = _run_flow(manifest_uri=manifest, output_uri=f"s3://{s3_bucket}/out", allow_local_paths=True)
    assert summary["counts"]["succeeded"] == 1 and state.is_completed()
    # an output prefix on local disk is refused too when local paths are off
    state, error = _run_flow(manifest_uri=manifest, output_uri=str(tmp_path / "out"))
    assert state.is_failed() and "allow_local_paths is off" in str(error)
    assert not (tmp_path / "out").exists()


def test_flow_non_utf8_manifest_fails_with_one_clear_message(prefect_server, s3_bucket):
    uri = f"s3://{s3_bucket}/manifests/latin1.csv"
    storage.write_bytes(uri, "\n".join(_small_manifest(50)).encode().replace(b"note 30", "caf\u00e9 30".encode("latin-1")))
    state, error = _run_flow(manifest_uri=uri, output_uri=f"s3://{s3_bucket}/out")
    assert state.is_failed()
    assert isinstance(error, ManifestError), repr(error)
    assert f"manifest {uri}: not UTF-8 text: invalid byte 0xe9 at line 31" in str(error)
    assert "not UTF-8" in (state.message or "") and "UnicodeDecodeError" not in (state.message or "")
    assert not storage.list_prefix(f"s3://{s3_bucket}/out/")
