"""Small helpers shared by the engine tests (plain functions, no fixtures).

* :func:`sample_images_dir` / :func:`sample_image`: the real sample images of the
  ``nst_samples`` package (in the repository); a test that needs one fails with a
  clear reason when it is absent.
* :func:`psnr`: peak signal-to-noise ratio of two ``[3, H, W]`` tensors in [0, 1].
* :func:`stacked_targets`: per-item content/style targets stacked into one batch.
* :func:`make_state_dict` / :func:`torchvision_feature_shapes`: a seeded VGG-19 state dict in
  torchvision's layout (``features.{index}.weight``), for the weights-file tests.
* :class:`Webhook`: a real HTTP listener on 127.0.0.1 that records what is POSTed to it,
  with :meth:`Webhook.wait_for` (a condition and a timeout, never a sleep).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


def sample_images_dir() -> Path:
    """The folder of the ``nst_samples`` package."""
    import nst_samples

    return nst_samples.folder()


def sample_image(name: str) -> Path:
    """Path of a sample image; fails the calling test when it is not there (never a silent skip)."""
    path = sample_images_dir() / name
    if not path.is_file():
        pytest.fail(f"sample image {path} not found (the nst_samples package is incomplete)", pytrace=False)
    return path


def psnr(a, b) -> float:
    """PSNR in dB of two images in [0, 1] (both clamped first); inf when identical."""
    mse = float((a.clamp(0, 1) - b.clamp(0, 1)).double().square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def assert_quality_criterion(image, content, style, size: int, weights_id: str) -> None:
    """The engine's quality criterion, judged by a VGG-19 with other random weights: the Gram-matrix
    style distance to the painting falls >= 5x from the photo to the output ``image``, and the output's
    relu4_2 content distance to the photo stays below the painting's. ``content`` and ``style`` are the
    PIL images the output was made from at long side ``size``."""
    from nst_core import images, quality

    photo = images.resized_tensor(content, long_side=size)
    style_t = images.resized_tensor(style, long_side=size)
    height, width = photo.shape[1:]
    painting = images.resized_tensor(style, exact=(width, height))
    assert quality.judge_weights(weights_id) != weights_id
    q_out = quality.measure(image, photo, style_t, weights_id)
    q_photo = quality.measure(photo, photo, style_t, weights_id)
    q_painting = quality.measure(painting, photo, style_t, weights_id)
    ratio = q_photo.style_distance / q_out.style_distance
    figures = f"style photo {q_photo.style_distance:.4f} -> output {q_out.style_distance:.4f} (x{ratio:.1f}); content output {q_out.content_distance:.3f} vs painting {q_painting.content_distance:.3f}"
    assert ratio >= 5.0, figures
    assert q_out.content_distance < q_painting.content_distance, figures
    assert q_photo.content_distance == 0.0


def stacked_targets(network, params, contents, styles):
    """Content features and style Grams of each (content, style) pair, stacked as a batch."""
    import torch

    from nst_core import engine

    c = [engine.content_targets(network, t, params.content_layers) for t in contents]
    s = [engine.style_targets(network, t, params.style_layers) for t in styles]
    return (
        {k: torch.cat([t[k] for t in c]) for k in params.content_layers},
        {k: torch.cat([t[k] for t in s]) for k in params.style_layers},
    )


class Webhook:
    """A local HTTP endpoint that records the documents POSTed to it (``received``: headers and body)."""

    def __init__(self) -> None:
        received = self.received = []  # type: list[dict[str, Any]]
        arrived = self._arrived = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with arrived:
                    received.append({"path": self.path, "headers": dict(self.headers), "body": body.decode(errors="replace")})
                    arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/nst-failures"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> list[dict[str, Any]]:
        """The requests ``match`` accepts, as soon as there is one; [] after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                found = [r for r in self.received if match(r)]
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self._arrived.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def torchvision_feature_shapes() -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{index in features: (weight shape, bias shape)}`` for every convolution."""
    shapes, index, channels = {}, 0, 3
    for v in VGG19_CFG:
        if v == "M":
            index += 1
            continue
        shapes[index] = ((v, channels, 3, 3), (v,))
        channels = v
        index += 2  # conv, relu
    return shapes


def make_state_dict(seed: int, prefix: str = "features.") -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, (w_shape, b_shape) in torchvision_feature_shapes().items():
        state[f"{prefix}{index}.weight"] = torch.randn(w_shape, generator=g) * 0.05
        state[f"{prefix}{index}.bias"] = torch.randn(b_shape, generator=g) * 0.01
    return state
