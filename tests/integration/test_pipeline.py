"""The pipeline end to end: real SeaweedFS S3 server, real Prefect server, real engine (tiny sizes)."""

from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from nst_core import images, storage
from nst_core.params import StyleParams

TINY = StyleParams(size=32, iterations=4, weights="random:0", progress_every=2)
FAST = {"retries": 1, "retry_delay_s": 0.2}


class EngineSpy:
    """Counts the items the tasks hand to the real engine (the engine still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        import nst_run.execute as task_module

        self.calls = 0
        self._lock = threading.Lock()
        original = task_module.engine.stylize_batch

        def counting(jobs, **kwargs):
            with self._lock:
                self.calls += len(jobs)
            return original(jobs, **kwargs)

        monkeypatch.setattr(task_module.engine, "stylize_batch", counting)


def run_flow(**kwargs):
    from flows.stylize_manifest import stylize_manifest

    state = stylize_manifest(**{**FAST, "defaults": TINY, **kwargs}, return_state=True)
    return state, state.result(raise_on_failure=False)


def upload_samples(bucket: str, sample_images: Path) -> dict[str, str]:
    uris = {}
    for name in ("tubingen.jpg", "hoovertowernight.jpg", "starry_night.jpg", "shipwreck.jpg"):
        uri = f"s3://{bucket}/inputs/{name}"
        storage.write_bytes(uri, (sample_images / name).read_bytes(), "image/jpeg")
        uris[name] = uri
    return uris


def write_manifest(uri: str, header: list[str], rows: list[list[str]]) -> str:
    text = ",".join(header) + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
    storage.write_bytes(uri, text.encode(), "text/csv")
    return uri


def read_results(summary: dict) -> pd.DataFrame:
    csv_frame = pd.read_csv(io.BytesIO(storage.read_bytes(summary["results_csv"])), dtype=str, keep_default_na=False)
    parquet_frame = pd.read_parquet(io.BytesIO(storage.read_bytes(summary["results_parquet"])))
    assert list(csv_frame["id"]) == list(parquet_frame["id"])
    return csv_frame


@pytest.fixture
def s3_inputs(s3_bucket: str, sample_images: Path) -> tuple[str, dict[str, str]]:
    return s3_bucket, upload_samples(s3_bucket, sample_images)


def test_flow_end_to_end_on_s3(prefect_server, s3_inputs, monkeypatch):
    bucket, uris = s3_inputs
    spy = EngineSpy(monkeypatch)
    manifest = write_manifest(
        f"s3://{bucket}/manifests/run.csv",
        ["id", "content_uri", "style_uri", "style_weight", "meta_licence", "meta_split"],
        [
            ["a", uris["tubingen.jpg"], uris["starry_night.jpg"], "", "CC-BY", "train"],
            ["b", uris["hoovertowernight.jpg"], uris["shipwreck.jpg"], "100", "CC0", "test"],
            ["c", uris["tubingen.jpg"], uris["shipwreck.jpg"], "", "CC0", "train"],
        ],
    )
    output = f"s3://{bucket}/out"
    state, summary = run_flow(manifest_uri=manifest, output_uri=output)
    assert state.is_completed(), state.message
    assert summary["counts"] == {"succeeded": 3, "cached": 0, "done_elsewhere": 0, "in_progress_elsewhere": 0, "failed": 0, "invalid": 0}
    assert spy.calls == 3
    results = read_results(summary)
    assert list(results["id"]) == ["a", "b", "c"]
    assert list(results["row"]) == ["1", "2", "3"]
    assert set(results["status"]) == {"succeeded"}
    assert list(results["meta_licence"]) == ["CC-BY", "CC0", "CC0"]
    for _, result in results.iterrows():
        folder = storage.join(output, "items", result["item_id"])
        assert result["output_uri"] == storage.join(folder, "stylized.png")
        image = Image.open(io.BytesIO(storage.read_bytes(result["output_uri"])))
        assert max(image.size) == 32
        loss = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(folder, "loss.csv"))))
        assert len(loss) == 4 and {"total", "content", "style", "tv", "style:relu1_1"} <= set(loss.columns)
        assert storage.read_bytes(storage.join(folder, "loss.png"))[:8] == b"\x89PNG\r\n\x1a\n"
        meta = json.loads(storage.read_bytes(storage.join(folder, "meta.json")))
        assert meta["item_id"] == result["item_id"]
        assert meta["row"]["id"] == result["id"] and meta["row"]["meta_split"] == result["meta_split"]
        assert meta["inputs"]["content"]["uri"] == result["content_uri"]
        content_bytes = storage.read_bytes(result["content_uri"])
        assert meta["inputs"]["content"]["sha256"] == storage.sha256_bytes(content_bytes)
        assert meta["weights"]["id"] == "random:0" and meta["weights"]["random"] is True
        assert meta["iterations"] == 4 and meta["params"]["size"] == 32
        assert float(result["loss_total"]) == pytest.approx(meta["final_losses"]["total"])
    assert json.loads(storage.read_bytes(storage.join(output, "items", results["item_id"][1], "meta.json")))["params"]["style_weight"] == 100
    # The run folder also holds the incremental parts.
    assert any("/parts/results-" in uri for uri in storage.list_prefix(summary["run_folder"]))


def test_rerun_is_cached_force_redoes_duplicates_compute_once(prefect_server, s3_inputs, monkeypatch):
    bucket, uris = s3_inputs
    manifest = write_manifest(
        f"s3://{bucket}/m.csv",
        ["id", "content_uri", "style_uri"],
        [
            ["one", uris["tubingen.jpg"], uris["starry_night.jpg"]],
            ["dup", uris["tubingen.jpg"], uris["starry_night.jpg"]],  # same work as "one"
            ["two", uris["hoovertowernight.jpg"], uris["starry_night.jpg"]],
        ],
    )
    output = f"s3://{bucket}/out"
    spy = EngineSpy(monkeypatch)
    state, first = run_flow(manifest_uri=manifest, output_uri=output)
    assert state.is_completed() and spy.calls == 2
    results = read_results(first)
    assert results.loc[0, "item_id"] == results.loc[1, "item_id"] != results.loc[2, "item_id"]
    assert list(results["status"]) == ["succeeded"] * 3

    spy.calls = 0
    state, second = run_flow(manifest_uri=manifest, output_uri=output)
    assert spy.calls == 0
    assert second["counts"]["cached"] == 3
    assert second["run_folder"] != first["run_folder"]

    state, third = run_flow(manifest_uri=manifest, output_uri=output, force=True)
    assert spy.calls == 2 and third["counts"]["succeeded"] == 3


def test_bad_manifest_rows_reported_good_rows_done(prefect_server, tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[2]
    spy = EngineSpy(monkeypatch)
    state, summary = run_flow(manifest_uri=str(repo / "manifests" / "bad.csv"), output_uri=str(tmp_path), allow_local_paths=True)
    assert state.is_failed()  # two rows failed
    results = read_results(summary).set_index("row")
    expected = {
        "1": "succeeded", "2": "invalid", "3": "invalid", "4": "invalid", "5": "invalid",
        "6": "invalid", "7": "invalid", "8": "failed", "9": "failed", "10": "succeeded",
    }  # fmt: skip
    assert dict(results["status"]) == expected
    assert "row 2, column content_uri" in results.loc["2", "error"]
    assert "http" in results.loc["3", "error"]
    assert "column size" in results.loc["4", "error"]
    assert "column style_weight" in results.loc["5", "error"]
    assert "relu9_9" in results.loc["6", "error"]
    assert "duplicate id 'good-1'" in results.loc["7", "error"]
    assert "no_such_image.jpg" in results.loc["8", "error"]
    assert "not an image" in results.loc["9", "error"]
    assert spy.calls == 2  # rows 1 and 10; row 8 fails at fetch, row 9 while decoding
    assert summary["counts"] == {"succeeded": 2, "cached": 0, "done_elsewhere": 0, "in_progress_elsewhere": 0, "failed": 2, "invalid": 6}


def test_strict_fails_before_any_work(prefect_server, tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[2]
    spy = EngineSpy(monkeypatch)
    state, error = run_flow(manifest_uri=str(repo / "manifests" / "bad.csv"), output_uri=str(tmp_path), allow_local_paths=True, strict=True)
    assert state.is_failed()
    assert "strict" in str(error) and "6 invalid" in str(error)
    assert spy.calls == 0
    assert not (tmp_path / "items").exists() and not (tmp_path / "runs").exists()


def test_local_paths_refused_unless_allowed(prefect_server, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    state, error = run_flow(manifest_uri=str(repo / "manifests" / "samples.csv"), output_uri=str(tmp_path))
    assert state.is_failed() and "allow_local_paths" in str(error)


def test_missing_object_wrong_bucket_and_oversized_input_fail_alone(prefect_server, s3_inputs):
    bucket, uris = s3_inputs
    huge = f"s3://{bucket}/inputs/huge.jpg"  # larger than any image of max_pixels=1 could be: refused unread
    storage.write_bytes(huge, b"\xff\xd8" + bytes(images.max_file_bytes(1)))
    manifest = write_manifest(
        f"s3://{bucket}/m.csv",
        ["id", "content_uri", "style_uri", "max_pixels"],
        [
            ["ok", uris["tubingen.jpg"], uris["starry_night.jpg"], ""],
            ["missing", f"s3://{bucket}/inputs/nope.jpg", uris["starry_night.jpg"], ""],
            ["nobucket", "s3://no-such-bucket-nst/x.jpg", uris["starry_night.jpg"], ""],
            ["toolarge", huge, uris["starry_night.jpg"], "1"],
        ],
    )
    state, summary = run_flow(manifest_uri=manifest, output_uri=f"s3://{bucket}/out")
    assert state.is_failed()
    results = read_results(summary).set_index("id")
    assert results.loc["ok", "status"] == "succeeded"
    assert results.loc["missing", "status"] == "failed" and f"s3://{bucket}/inputs/nope.jpg" in results.loc["missing", "error"]
    assert results.loc["nobucket", "status"] == "failed" and "no-such-bucket-nst" in results.loc["nobucket", "error"]
    limit = f"{images.max_file_bytes(1):,}-byte limit"
    assert results.loc["toolarge", "status"] == "failed" and huge in results.loc["toolarge", "error"] and limit in results.loc["toolarge", "error"]


def test_wrong_credentials_clear_error_without_secret(prefect_server, s3_inputs, monkeypatch):
    bucket, uris = s3_inputs
    manifest = write_manifest(f"s3://{bucket}/m.csv", ["content_uri", "style_uri"], [[uris["tubingen.jpg"], uris["shipwreck.jpg"]]])
    wrong_secret = "WRONGsecretSENTINEL0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    storage.reset_clients()
    state, error = run_flow(manifest_uri=manifest, output_uri=f"s3://{bucket}/out")
    assert state.is_failed()
    assert isinstance(error, storage.AccessDenied), error
    assert manifest in str(error)
    assert wrong_secret not in str(error) and wrong_secret not in (state.message or "")


def test_cli_run_and_validate_exit_codes(prefect_server, tmp_path, capsys):
    from nst_cli.main import main

    repo = Path(__file__).resolve().parents[2]
    bad = str(repo / "manifests" / "bad.csv")
    assert main(["validate", bad]) == 1
    out = capsys.readouterr().out
    for row in (2, 3, 4, 5, 6, 7):
        assert f"row {row}, column" in out
    assert "4 valid, 6 invalid" in out

    unusable = tmp_path / "unusable.csv"
    unusable.write_text("content,style\na,b\n")
    assert main(["run", str(unusable), "--output", str(tmp_path / "o")]) == 2
    assert "missing required column(s) content_uri, style_uri" in capsys.readouterr().err

    samples = str(repo / "manifests" / "samples.csv")
    args = ["--set", "size=32", "--set", "iterations=3", "--set", "weights=random:0"]
    assert main(["run", samples, "--output", str(tmp_path / "out"), "--max-items", "2", *args]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  succeeded +2$", out, re.M) and "results.csv" in out and "elsewhere" not in out
    assert main(["validate", samples, "--output", str(tmp_path / "out"), *args]) == 0
    out = capsys.readouterr().out
    assert "already done (cached): 2" in out and "to do: 2 items" in out
    assert main(["run", bad, "--output", str(tmp_path / "bad"), *args]) == 1
    assert main(["run", samples, "--output", str(tmp_path / "x"), "--set", "size=-1"]) == 2
    capsys.readouterr()
    assert main(["run", samples, "--output", str(tmp_path / "x"), "--retries", "-1", "--lease-ttl-s", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--retries" in err and "--lease-ttl-s" in err and not (tmp_path / "x").exists()
