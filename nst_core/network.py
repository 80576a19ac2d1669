"""VGG-19 feature extractor with named layers, and the ways to load its weights.

The network is torchvision's ``vgg19().features`` (16 convolutions, 5 pools),
re-labelled so every layer has the name the paper uses::

    conv1_1 relu1_1 conv1_2 relu1_2 pool1
    conv2_1 relu2_1 conv2_2 relu2_2 pool2
    conv3_1 relu3_1 ... conv3_4 relu3_4 pool3
    conv4_1 relu4_1 ... conv4_4 relu4_4 pool4
    conv5_1 relu5_1 ... conv5_4 relu5_4 pool5

Weights are named by a string (the ``weights`` style parameter):

* ``imagenet``: torchvision's ``VGG19_Weights.IMAGENET1K_V1`` through
  torchvision's own loader and cache (``$TORCH_HOME/hub/checkpoints``).
  torch.hub's "Downloading: ..." note is kept off the console (it would sit
  beside the one-line error of an offline machine; a download that succeeds
  still shows it).
* ``random:SEED``: seeded random initialisation, for tests and offline runs.
* a local path to a state dict (torchvision's ``features.N.weight`` keys, or
  bare ``N.weight`` keys), loaded with ``weights_only=True``: a file that
  holds anything but tensors (a pickle that would import and run code) is
  refused before anything in it runs, and a corrupt one is called so; neither
  message suggests ``weights_only=False``. Remote files (``s3://``) are
  fetched to a local cache by the caller first.

Networks are cached per process: loading happens once per
(weights, device, normalisation) and every pooling variant shares the same
parameters.

The normalised network (``normalize_network``, Gatys et al. 2015: "We
normalized the network by scaling the weights such that the mean activation of
each convolutional filter over images and positions is equal to one") is a
separate cached trunk: :func:`normalize_trunk` rescales each convolution's
filter ``c`` (weights and bias) by ``1 / mu_c``, where ``mu_c`` is the mean of
``relu(conv)`` channel ``c`` over the calibration images
(:func:`calibration_images`) and all positions. A ReLU network is positively
homogeneous, so (with the next convolution's input weights scaled by ``mu_c``
in turn) every activation becomes ``a_c / mu_c``: the scale of each channel
changes and nothing else. The means are measured with the trunk's own max
pooling (the network as trained, as in the paper); the average-pooling variant
shares the rescaled filters, so its means are exactly 1 in block 1 and below 1
deeper (average pooling passes on less than max pooling does). A channel that
(almost) never fires on the calibration set is scaled as if its mean were
:data:`MEAN_FLOOR` times its layer's median, so its mean ends below 1.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import pickle
import pickletools
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from nst_core.errors import WeightsError
from nst_core.layers import LAYER_NAMES
from nst_core.weights import WeightsSpec, sha256_file, weights_id

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's file name for VGG19_Weights.IMAGENET1K_V1 in the hub cache.
IMAGENET_FILE = "vgg19-dcbb9e9d.pth"


def _build_features() -> nn.Sequential:
    """torchvision's VGG-19 convolutional trunk, with named children.

    Built with torchvision's own ``make_layers`` for config "E" (what ``vgg19().features`` is), without
    the 120M-parameter classifier whose random initialisation alone takes seconds.
    """
    from torchvision.models.vgg import cfgs, make_layers

    trunk = make_layers(cfgs["E"], batch_norm=False)
    layers: dict[str, nn.Module] = {}
    for name, module in zip(LAYER_NAMES, trunk, strict=True):
        if isinstance(module, nn.ReLU):
            # Not in-place: the conv output before it may be a requested feature.
            module = nn.ReLU(inplace=False)
        layers[name] = module
    return nn.Sequential(OrderedDict(layers))


def _random_state_dict(features: nn.Sequential, seed: int) -> dict[str, Tensor]:
    """Deterministic He-normal conv weights (torchvision's own init) from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, module in features.named_children():
        if isinstance(module, nn.Conv2d):
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            std = (2.0 / fan_out) ** 0.5
            state[f"{name}.weight"] = torch.randn(module.weight.shape, generator=gen) * std
            state[f"{name}.bias"] = torch.zeros(module.out_channels)
    return state


def _imagenet_state_dict() -> dict[str, Tensor]:
    """Fetch ImageNet weights through torchvision's loader and cache, or explain why not.

    With the file already in the cache, torchvision loads it (``weights_only=True``) and prints
    nothing. Otherwise torch.hub announces the download on the console before trying; that note is
    held back and shown only if the download succeeds, so an offline machine gets one line: ours.
    """
    from torchvision.models import VGG19_Weights

    weights = VGG19_Weights.IMAGENET1K_V1
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub_dir / os.path.basename(weights.url)
    if cached.is_file():
        try:
            return weights.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:  # a corrupt or hostile file in the cache: say so, not "could not be downloaded"
            raise WeightsError(f"weights imagenet: the cached file {_load_failure(str(cached), exc)}") from None
    note = io.StringIO()
    try:
        with contextlib.redirect_stdout(note), contextlib.redirect_stderr(note):
            state = weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # urllib errors, socket errors, HTTP errors...
        reason = type(exc).__name__
        raise WeightsError(
            f"ImageNet VGG-19 weights are not in torchvision's cache ({cached}) "
            f"and could not be downloaded ({reason}). Ways out: copy {cached.name} into {hub_dir} "
            "(or point TORCH_HOME at a cache that has it); pass --weights PATH or s3://... to a "
            "VGG-19 state dict; or use --weights random:SEED for an offline smoke run."
        ) from None
    sys.stderr.write(note.getvalue())  # it did download: where it went is worth knowing
    return state


_IDENTIFIER = re.compile(r"[A-Za-z_][\w.]*")
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")
_SCAN_BYTES = 16 << 20


def _pickled_global(path: str) -> str | None:
    """The first ``module.name`` a plain pickle file imports (read with :mod:`pickletools`, never unpickled).

    For a file that is a pickle, not a torch.save archive: torch's weights-only reader stops at
    the pickle framing before it reaches the import, so the import is looked for here.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(_SCAN_BYTES)
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            if isinstance(arg, str) and opcode.name not in ("GLOBAL", "INST"):
                strings = (strings + [arg])[-2:]
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                module, _, name = arg.partition(" ")
            elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                module, name = strings
            else:
                continue
            if _IDENTIFIER.fullmatch(module) and _IDENTIFIER.fullmatch(name):
                return f"{module}.{name}"
            return None
    except Exception:  # the end of the data, or not a pickle at all
        return None
    return None


# OSErrors about the file itself; others (torch's zip reader raises EINVAL on a corrupt archive) are about its content.
_FILE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOENT, errno.EIO})


def _load_failure(path: str, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, as the tail of one line.

    Never repeats torch's own text, which suggests ``weights_only=False``: that would run the file.
    """
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return f"{path}: empty file (0 bytes)"
    text = str(exc)
    imported = None
    if isinstance(exc, pickle.UnpicklingError):
        found = _GLOBAL_IN_MESSAGE.search(text)
        imported = found.group(1) if found else _pickled_global(path)
    if imported is not None and imported.split(".")[0] in ("torch", "collections"):
        # What tensors pickle to: a plain pickle of a state dict, which torch.load does not read.
        return f"{path}: not a PyTorch state dict (a plain pickle, not written by torch.save; read with weights_only=True)"
    if imported is not None:
        return (
            f"{path} refused: it holds objects other than tensors (it imports {imported}); "
            "read with weights_only=True, nothing in it was run"
        )
    if isinstance(exc, OSError) and exc.errno in _FILE_ERRNOS:  # the file itself, not its content
        reason = text.strip().splitlines()[0][:200] if text.strip() and "weights_only" not in text else type(exc).__name__
        return f"{path}: cannot be read ({reason})"
    # Anything else came from parsing: random bytes fed to the unpickler raise IndexError, TypeError, ... too.
    return f"{path}: not a PyTorch state dict (corrupt, truncated or not written by torch.save; read with weights_only=True)"


_DIGESTS: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> (inode, size, mtime), sha256


def _file_digest(path: str) -> str:
    """The sha256 of a weights file, hashed again whenever the file changed (new inode, size or mtime)."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path}: not found")
    st = os.stat(path)
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    memo = _DIGESTS.get(path)
    if memo is None or memo[0] != stamp:
        memo = (stamp, sha256_file(path))
        _DIGESTS[path] = memo
    return memo[1]


def _file_state_dict(path: str, expected_sha256: str | None) -> dict[str, Tensor]:
    """The state dict in ``path``, from bytes read once and checked against ``expected_sha256``.

    Hashing and loading the same bytes means the network always matches the id
    it is cached and recorded under, even when the file is replaced meanwhile.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise WeightsError(f"weights file {path}: not found") from None
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise WeightsError(f"weights file {path}: sha256 is {actual}, expected {expected_sha256}")
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"weights file {_load_failure(path, exc)}") from None
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise WeightsError(f"weights file {path}: expected a dict of tensors, got {type(loaded).__name__}")
    return loaded


def _to_named(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Map torchvision keys (``features.0.weight`` or ``0.weight``) to ``conv1_1.weight``."""
    named: dict[str, Tensor] = {}
    for key, value in state.items():
        bare = key.removeprefix("features.")
        index, _, leaf = bare.partition(".")
        if key.startswith("classifier."):
            continue
        if index.isdigit() and int(index) < len(LAYER_NAMES):
            named[f"{LAYER_NAMES[int(index)]}.{leaf}"] = value
        elif index in LAYER_NAMES:
            named[bare] = value
        else:
            raise WeightsError(f"weights {source}: unexpected key {key!r} (not a VGG-19 features layer)")
    return named


def _load_into(features: nn.Sequential, state: dict[str, Tensor], source: str) -> None:
    expected = features.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise WeightsError(f"weights {source}: missing {len(missing)} VGG-19 tensors (first: {missing[0]})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"weights {source}: {key} has shape {tuple(state[key].shape)}, VGG-19 needs {tuple(tensor.shape)}"
            )
        if not state[key].is_floating_point():
            # load_state_dict would cast it silently: integer weights are (almost) all 0, an all-zero
            # network whose every item "succeeds" with a flat loss; complex ones would lose a part.
            raise WeightsError(f"weights {source}: {key} holds {str(state[key].dtype).removeprefix('torch.')} values, VGG-19 needs floating-point ones")
        if not torch.isfinite(state[key]).all():
            raise WeightsError(f"weights {source}: {key} contains NaN or infinite values")
    features.load_state_dict({k: state[k] for k in expected})


CALIBRATION_IMAGES, CALIBRATION_SIZE, CALIBRATION_SEED = 8, 128, 0
MEAN_FLOOR = 0.1
"""A channel whose mean is below this fraction of its layer's median is normalised as if at the floor."""


def calibration_images(count: int = CALIBRATION_IMAGES, size: int = CALIBRATION_SIZE, seed: int = CALIBRATION_SEED) -> Tensor:
    """The fixed image set the network is normalised on: ``[count, 3, size, size]`` in [0, 1].

    Seeded colour noise with a 1/f amplitude spectrum (the spectrum of natural
    images), the colour channels correlated as in photographs, stretched to
    [0, 1] per image. ImageNet images cannot be shipped here, and the set must
    not depend on the run's inputs (the normalised network is computed once
    per weights), so it is generated.
    """
    gen = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    amplitude = 1.0 / torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / size)
    mixing = torch.tensor([[0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.2, 0.3, 0.5]])
    out = []
    for _ in range(count):
        phase = torch.rand(3, size, size // 2 + 1, generator=gen) * 2 * torch.pi
        spectrum = amplitude * torch.polar(torch.ones_like(phase), phase)
        noise = torch.fft.irfft2(spectrum, s=(size, size))  # [3, size, size]
        base = torch.randn(1, 3, generator=gen) @ mixing  # a random colour cast per image
        img = torch.einsum("ij,jhw->ihw", mixing, noise) + 0.2 * base.view(3, 1, 1) * noise.std()
        low, high = img.amin(), img.amax()
        out.append((img - low) / (high - low))
    return torch.stack(out)


@torch.no_grad()
def normalize_trunk(trunk: nn.Sequential, images: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> dict[str, Tensor]:
    """Rescale ``trunk``'s convolutions in place so each channel's mean ReLU activation over ``images`` is 1.

    With ``mu_l`` the per-channel mean of ``relu(conv_l)`` of the original network over the images
    and positions, every activation becomes ``a_l / mu_l``::

        W_l[o, i] <- W_l[o, i] * mu_{l-1}[i] / mu_l[o],    b_l[o] <- b_l[o] / mu_l[o]

    (``mu_0 = 1`` for the pixels). ReLU and pooling (max or average) commute with a positive
    per-channel scale, so which units fire, and where, does not change. A channel that (almost)
    never fires on the images, ``mu < MEAN_FLOOR * median(mu_l)``, is divided by that floor
    instead: dividing by its tiny mean would blow it up wherever it does fire (seen with random
    weights, whose deep layers have such channels; on images that fire them, they dominated the
    Gram matrices by 10^7). Returns the divisor used per convolution.
    """
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    means: dict[str, Tensor] = {}
    for name, module in trunk.named_children():
        x = module(x)
        if isinstance(module, nn.Conv2d):
            mu = torch.relu(x).mean(dim=(0, 2, 3))
            means[name] = mu.clamp_min(MEAN_FLOOR * float(mu.median()))
    previous = torch.ones(3)
    for name, module in trunk.named_children():
        if isinstance(module, nn.Conv2d):
            mu = means[name]
            module.weight.mul_(previous.view(1, -1, 1, 1) / mu.view(-1, 1, 1, 1))
            module.bias.div_(mu)
            previous = mu
    return means


def channel_means(features: VGGFeatures, images: Tensor, layers: list[str] | tuple[str, ...]) -> dict[str, Tensor]:
    """Mean activation of every channel of ``layers`` over ``images`` and positions (for checks)."""
    with torch.no_grad():
        feats = features(images.to(features.mean.device), layers)
    return {name: f.mean(dim=(0, 2, 3)).cpu() for name, f in feats.items()}


class VGGFeatures(nn.Module):
    """The VGG-19 trunk with named layers; returns the features asked for.

    The input is an RGB batch in [0, 1]; it is normalised with the weights' own
    mean and std inside the module, so callers never see normalised pixels. The
    forward pass stops after the deepest requested layer.
    """

    def __init__(self, trunk: nn.Sequential, pooling: str, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        layers: dict[str, nn.Module] = {}
        for name, module in trunk.named_children():
            if name.startswith("pool") and pooling == "avg":
                # The paper: "replacing the max-pooling operation by average pooling
                # improves the gradient flow and one obtains slightly more appealing results".
                module = nn.AvgPool2d(kernel_size=2, stride=2)
            layers[name] = module
        self.layers = nn.ModuleDict(layers)
        self.pooling = pooling
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, image: Tensor, names: set[str] | frozenset[str] | list[str] | tuple[str, ...]) -> dict[str, Tensor]:
        wanted = set(names)
        unknown = wanted - set(LAYER_NAMES)
        if unknown:
            raise KeyError(f"unknown VGG-19 layers: {sorted(unknown)}")
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        out: dict[str, Tensor] = {}
        for name, module in self.layers.items():
            if not wanted - out.keys():
                break  # nothing deeper is needed
            x = module(x)
            if name in wanted:
                out[name] = x
        return out


@dataclass(frozen=True)
class Network:
    """A loaded network and what identifies it."""

    features: VGGFeatures
    weights: str
    weights_id: str
    device: torch.device
    normalized: bool = False  # filters rescaled by normalize_trunk (normalize_network)
    precision: str = "fp32"  # how the engine runs the convolutions: "fp32" or "bf16" (see resolve_precision)

    @property
    def is_random(self) -> bool:
        return self.weights_id.startswith("random:")

    def at_precision(self, precision: str) -> Network:
        """This network (the same modules) computing at ``precision``, ``fp32`` or ``bf16``."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' here, got {precision!r} (resolve 'auto' first)")
        return self if precision == self.precision else replace(self, precision=precision)


_CACHE: dict[tuple[str, str, str, str, bool], Network] = {}  # (spec, weights id, device, pooling, normalised)
_TRUNKS: dict[tuple[str, str, bool], tuple[nn.Sequential, str]] = {}  # (weights id, device, normalised)
_LOCK = threading.Lock()


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cpu`` and ``cuda:N`` are taken as given, and
    ``cuda`` (and ``auto`` on a GPU machine) is the current GPU by its index: one GPU has one name in
    every cache and lock keyed by it (``cuda`` and ``cuda:0`` would be two)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively: CUDA GPUs with bf16 tensor cores (Ampere
    on; not the emulation older GPUs offer), and CPUs with bf16 dot-product instructions (AVX512-BF16
    or AMX) that oneDNN uses. Elsewhere bf16 would be emulated, no faster than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # true from plain AVX512 on (emulated there)
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
    flags = _cpu_flags()
    return onednn and (flags is None or bool(flags & {"avx512_bf16", "amx_bf16"}))


def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where there is none to read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is ``bf16`` where :func:`native_bf16`, else ``fp32``; ``fp32`` and ``bf16`` are taken as given.

    On an AVX512-BF16 CPU bf16 made an iteration 1.5-1.6x faster (64-256 px, ``benchmarks/engine.py``)
    for a judged quality within 4 % of fp32's (README, Benchmark figures); ``fp32`` is there when
    that matters, and for hardware where bf16 would be emulated.
    """
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return precision


def load_network(
    weights: str = "imagenet",
    *,
    pooling: str = "avg",
    device: str | torch.device = "cpu",
    weights_path: str | None = None,
    weights_sha256: str | None = None,
    normalize: bool = False,
) -> Network:
    """Load (once per process) VGG-19 with the given weights, pooling and device.

    ``weights_path`` is the local copy of a remote weights file (``s3://``);
    the caller fetches it. For a local-path ``weights`` it may be omitted.
    ``normalize``: the normalised network (:func:`normalize_trunk`, computed on
    the CPU once per weights and process, so every device gets the same filters).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    spec = WeightsSpec.parse(weights)
    local = weights_path or spec.path
    if spec.kind == "file" and local and "://" in local and not local.startswith("file://"):
        raise WeightsError(f"weights {weights}: remote weights must be fetched to a local file first")
    if local and local.startswith("file://"):
        local = local.removeprefix("file://")
    with _LOCK:
        # Keyed by what the weights are (a file: the sha256 of its bytes now), never by where they are:
        # a file replaced during a run is loaded again, and never serves the old network under a new id.
        if spec.kind == "file":
            assert local is not None
            wid = "sha256:" + _file_digest(local)
            if weights_sha256 is not None and wid != "sha256:" + weights_sha256.lower():
                raise WeightsError(f"weights file {local}: sha256 is {wid.removeprefix('sha256:')}, expected {weights_sha256}")
        else:
            wid = weights_id(weights)
        key = (weights, wid, str(dev), pooling, normalize)
        if key in _CACHE:
            return _CACHE[key]
        trunk_key = (wid, str(dev), normalize)
        if trunk_key not in _TRUNKS:
            trunk = _build_features()
            if spec.kind == "imagenet":
                state, source = _imagenet_state_dict(), "imagenet"
            elif spec.kind == "random":
                state, source = _random_state_dict(trunk, spec.seed or 0), weights
            else:
                assert local is not None
                state, source = _file_state_dict(local, wid.removeprefix("sha256:")), local
            named = state if spec.kind == "random" else _to_named(state, source)
            _load_into(trunk, named, source)
            if normalize:
                normalize_trunk(trunk, calibration_images())
            trunk.to(dev)
            _TRUNKS[trunk_key] = (trunk, wid)
        trunk, wid = _TRUNKS[trunk_key]
        features = VGGFeatures(trunk, pooling, IMAGENET_MEAN, IMAGENET_STD).to(dev)
        net = Network(features=features, weights=weights, weights_id=wid, device=dev, normalized=normalize)
        _CACHE[key] = net
        return net


def clear_cache() -> None:
    """Forget every loaded network (tests use it to exercise loading again)."""
    with _LOCK:
        _CACHE.clear()
        _TRUNKS.clear()
        _DIGESTS.clear()
