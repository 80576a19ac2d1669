"""VGG-19 with named layers, and every way of getting its weights.

The real architecture (torchvision's ``vgg19().features``) is used throughout;
weights are seeded random (``random:N``) or state dicts written by the tests:
a torchvision-style ``vgg19-dcbb9e9d.pth`` in a prepared ``TORCH_HOME`` for the
``imagenet`` path, local files for the path form, and broken or hostile files
for the refusals.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_state_dict, torchvision_feature_shapes
from torch import nn

from nst_core import layers, network, weights
from nst_core.errors import WeightsError


# torchvision's VGG-19 ("E") configuration, written out independently of nst_core.
def suggests_an_unsafe_load(message: str) -> bool:
    """Whether a message advises ``weights_only=False`` (torch's own text: "with `weights_only` set to `False`")."""
    return bool(re.search(r"weights_only`?\s*(=|set to)\s*`?False", message)) or "Re-running" in message


def conv_names() -> list[str]:
    return [n for n in layers.LAYER_NAMES if n.startswith("conv")]


@pytest.fixture
def fresh_cache():
    """For tests of loading: start from an empty network cache and leave none behind."""
    network.clear_cache()
    yield
    network.clear_cache()


@pytest.fixture(scope="module")
def vgg() -> network.Network:
    """random:0 VGG-19 (avg pooling) for the architecture tests: loaded once for the module."""
    return network.load_network("random:0", pooling="avg")


@pytest.fixture(scope="module")
def vgg_max(vgg) -> network.Network:
    return network.load_network("random:0", pooling="max")


@pytest.fixture(scope="module")
def state_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], str]:
    """A torchvision-keyed VGG-19 features state dict on disk, its tensors and its sha256."""
    state = make_state_dict(seed=7)
    path = tmp_path_factory.mktemp("weights") / "vgg19-features.pth"
    torch.save(state, path)
    return path, state, hashlib.sha256(path.read_bytes()).hexdigest()


def assert_loaded(net: network.Network, state: dict[str, torch.Tensor], prefix: str = "features.") -> None:
    layers = net.features.layers
    for index, name in zip(torchvision_feature_shapes(), conv_names(), strict=True):
        assert torch.equal(layers[name].weight.cpu(), state[f"{prefix}{index}.weight"]), name
        assert torch.equal(layers[name].bias.cpu(), state[f"{prefix}{index}.bias"]), name


# --- the architecture ----------------------------------------------------------------------


def test_every_layer_is_addressable_by_name(vgg_max):
    names = layers.LAYER_NAMES
    assert len(names) == 37 and len(set(names)) == 37
    assert names[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1")
    assert names[-3:] == ("conv5_4", "relu5_4", "pool5")
    assert "relu4_2" in names and "conv3_4" in names
    net = vgg_max
    assert list(net.features.layers.keys()) == list(names)
    shapes = iter(torchvision_feature_shapes().values())
    for name, module in net.features.layers.items():
        kind = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}[name[:4]]
        assert isinstance(module, kind), name
        if kind is nn.Conv2d:
            assert tuple(module.weight.shape) == next(shapes)[0], name
            assert module.padding == (1, 1) and module.kernel_size == (3, 3)
    # all 37 at once, each with the right shape on a 32 px input
    out = net.features(torch.rand(1, 3, 32, 32), names)
    assert set(out) == set(names)
    assert out["relu1_1"].shape == (1, 64, 32, 32)
    assert out["pool1"].shape == (1, 64, 16, 16)
    assert out["relu4_2"].shape == (1, 512, 4, 4)
    assert out["pool5"].shape == (1, 512, 1, 1)


def test_unknown_layer_is_refused(vgg):
    net = vgg
    with pytest.raises(KeyError, match="relu9_9"):
        net.features(torch.rand(1, 3, 16, 16), ["relu9_9"])
    with pytest.raises(KeyError):
        layers.layer_index("conv0_1")


def test_min_image_side_follows_the_poolings():
    assert layers.min_image_side(["relu1_1"]) == 1
    assert layers.min_image_side(["relu2_1"]) == 2
    assert layers.min_image_side(["relu3_1", "relu1_1"]) == 4
    assert layers.min_image_side(["relu5_1"]) == 16
    assert layers.min_image_side(["pool5"]) == 32


@pytest.mark.parametrize(
    "wanted, deepest",
    [(["relu1_1"], "relu1_1"), (["relu2_1"], "relu2_1"), (["conv1_1", "relu4_2"], "relu4_2"), (["relu5_1", "relu1_1"], "relu5_1")],
)
def test_forward_stops_after_the_deepest_requested_layer(vgg, wanted, deepest):
    net = vgg
    called: list[str] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, _o, name=name: called.append(name))
        for name, module in net.features.layers.items()
    ]
    try:
        out = net.features(torch.rand(1, 3, 32, 32), wanted)
    finally:
        for h in handles:
            h.remove()
    assert set(out) == set(wanted)
    assert called == list(layers.LAYER_NAMES[: layers.layer_index(deepest) + 1])


def test_avg_and_max_pooling_share_weights_and_differ_in_pooling(vgg, vgg_max):
    avg, mx = vgg, vgg_max
    assert avg is not mx
    assert isinstance(avg.features.layers["pool3"], nn.AvgPool2d)
    assert isinstance(mx.features.layers["pool3"], nn.MaxPool2d)
    assert avg.features.layers["conv2_1"].weight is mx.features.layers["conv2_1"].weight
    x = torch.rand(1, 3, 32, 32)
    fa = avg.features(x, ["relu1_2", "pool1", "relu2_1"])
    fm = mx.features(x, ["relu1_2", "pool1", "relu2_1"])
    torch.testing.assert_close(fa["relu1_2"], fm["relu1_2"], rtol=0, atol=0)
    torch.testing.assert_close(fa["pool1"], F.avg_pool2d(fa["relu1_2"], 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fm["pool1"], F.max_pool2d(fm["relu1_2"], 2), rtol=0, atol=0)
    assert not torch.allclose(fa["relu2_1"], fm["relu2_1"])
    with pytest.raises(ValueError, match="pooling"):
        network.VGGFeatures(nn.Sequential(), "median", (0.0,) * 3, (1.0,) * 3)


def test_parameters_are_frozen_but_the_input_gets_gradients(vgg):
    net = vgg
    params = list(net.features.parameters())
    assert len(params) == 32  # 16 convolutions, weight + bias
    assert all(not p.requires_grad for p in params)
    assert not net.features.training
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    net.features(x, ["relu3_1"])["relu3_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in params)


def test_input_is_normalised_with_the_weights_mean_and_std(vgg):
    net = vgg
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 12, 10)
    conv = net.features.layers["conv1_1"]
    want = F.conv2d((x - mean) / std, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(net.features(x, ["conv1_1"])["conv1_1"], want, rtol=1e-5, atol=1e-5)
    # and not the unnormalised input
    assert not torch.allclose(net.features(x, ["conv1_1"])["conv1_1"], F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-3)


def test_network_is_loaded_once_per_process(fresh_cache):
    a = network.load_network("random:0")
    b = network.load_network("random:0", pooling="avg", device="cpu")
    assert a is b
    network.clear_cache()
    c = network.load_network("random:0")
    assert c is not a
    torch.testing.assert_close(c.features.layers["conv3_1"].weight, a.features.layers["conv3_1"].weight, rtol=0, atol=0)


def test_precision_auto_is_bf16_exactly_where_the_device_has_it():
    cpu = torch.device("cpu")
    assert network.resolve_precision("auto", cpu) == ("bf16" if network.native_bf16(cpu) else "fp32")
    assert network.resolve_precision("fp32", cpu) == "fp32"
    assert network.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="'auto', 'fp32' or 'bf16'"):
        network.resolve_precision("fp16", cpu)


def test_native_bf16_on_this_cpu_follows_its_instruction_set():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = set(next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split())
    # bf16 dot products in hardware, or not (plain AVX512 would emulate them: no faster than fp32)
    assert network.native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_a_network_at_another_precision_shares_its_modules(net):
    half = net.at_precision("bf16")
    assert half.features is net.features and (net.precision, half.precision) == ("fp32", "bf16")
    assert net.at_precision("fp32") is net and half.at_precision("bf16") is half
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        net.at_precision("auto")


def test_random_weights_are_seeded_and_labelled(fresh_cache):
    a = network.load_network("random:3")
    wa = {n: a.features.layers[n].weight.clone() for n in conv_names()}
    network.clear_cache()
    b = network.load_network("random:3")
    c = network.load_network("random:4")
    for n in conv_names():
        assert torch.equal(b.features.layers[n].weight, wa[n]), n
        assert not torch.equal(c.features.layers[n].weight, wa[n]), n
    assert a.weights_id == "random:3" and c.weights_id == "random:4"
    assert a.is_random and c.is_random
    # He-normal scale (torchvision's init): std = sqrt(2 / fan_out)
    w = b.features.layers["conv3_2"].weight
    assert float(w.std()) == pytest.approx((2.0 / (256 * 9)) ** 0.5, rel=0.05)


@pytest.mark.parametrize("text", ["random:", "random:x", "random:-1", ""])
def test_bad_weights_names_are_refused(text):
    with pytest.raises(ValueError):
        weights.WeightsSpec.parse(text)


# --- imagenet through torchvision's loader and cache ------------------------------------------


@pytest.fixture
def no_download(monkeypatch):
    """torch.hub's download fails as it does offline, even on a machine with a network."""
    import torch.hub

    attempts: list[str] = []

    def refuse(url, *args, **kwargs):
        attempts.append(str(getattr(url, "full_url", url)))
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    return attempts


def test_imagenet_weights_load_from_a_prepared_torch_home(fresh_cache, tmp_path, monkeypatch, state_file, no_download, capfd):
    path, state, _ = state_file
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copyfile(path, checkpoints / network.IMAGENET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    capfd.readouterr()
    net = network.load_network("imagenet")
    assert net.weights_id == "imagenet:IMAGENET1K_V1" and not net.is_random
    assert_loaded(net, state)
    assert no_download == []  # served from the cache, nothing fetched
    assert capfd.readouterr() == ("", "")  # and nothing printed


def test_imagenet_weights_missing_offline_give_one_clear_error(fresh_cache, tmp_path, monkeypatch, no_download, capfd):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    capfd.readouterr()
    with pytest.raises(WeightsError) as info:
        network.load_network("imagenet")
    err = info.value
    message = str(err)
    assert "\n" not in message
    assert network.IMAGENET_FILE in message and str(tmp_path) in message
    assert "TORCH_HOME" in message and "--weights" in message and "random:" in message
    assert err.__cause__ is None and err.__suppress_context__  # no urllib traceback chained
    assert no_download, "torchvision's own loader was not the one asked"
    assert list((tmp_path / "hub" / "checkpoints").glob("*")) == []  # no partial file left behind
    assert capfd.readouterr() == ("", "")  # torch.hub's "Downloading: ..." note kept off the console


def test_a_corrupt_imagenet_file_in_the_cache_is_called_corrupt(fresh_cache, tmp_path, monkeypatch, no_download):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / network.IMAGENET_FILE).write_bytes(os.urandom(4096))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as info:
        network.load_network("imagenet")
    message = str(info.value)
    assert str(checkpoints / network.IMAGENET_FILE) in message and "not a PyTorch state dict" in message
    assert "downloaded" not in message and not suggests_an_unsafe_load(message) and "\n" not in message
    assert no_download == []


# --- a state dict by local path --------------------------------------------------------------


def test_local_state_dict_loads_with_and_without_sha256(fresh_cache, state_file):
    path, state, sha = state_file
    net = network.load_network(str(path))
    assert_loaded(net, state)
    assert net.weights_id == f"sha256:{sha}"
    network.clear_cache()
    net = network.load_network(str(path), weights_sha256=sha.upper())
    assert_loaded(net, state)
    network.clear_cache()
    net = network.load_network("file://" + str(path))
    assert_loaded(net, state)


def test_local_state_dict_with_the_wrong_sha256_is_refused(fresh_cache, state_file):
    path, _, sha = state_file
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    with pytest.raises(WeightsError, match="sha256") as info:
        network.load_network(str(path), weights_sha256=wrong)
    assert str(path) in str(info.value) and wrong in str(info.value)


def test_bare_index_keys_and_classifier_keys_are_accepted(fresh_cache, tmp_path):
    state = make_state_dict(seed=8, prefix="")
    state_with_classifier = {**{f"features.{k}": v for k, v in state.items()}, "classifier.0.bias": torch.zeros(4096)}
    torch.save(state, tmp_path / "bare.pth")
    torch.save(state_with_classifier, tmp_path / "full.pth")
    assert_loaded(network.load_network(str(tmp_path / "bare.pth")), state, prefix="")
    assert_loaded(network.load_network(str(tmp_path / "full.pth")), state, prefix="")


def test_wrong_shaped_state_dict_is_refused_naming_the_key(fresh_cache, tmp_path):
    state = make_state_dict(seed=9)
    state["features.12.weight"] = torch.zeros(256, 256, 1, 1)  # conv3_2 with a 1x1 kernel
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        network.load_network(str(path))
    message = str(info.value)
    assert "conv3_2.weight" in message and "(256, 256, 1, 1)" in message and str(path) in message
    assert "\n" not in message


def test_state_dict_missing_a_tensor_is_refused(fresh_cache, tmp_path):
    state = make_state_dict(seed=9)
    del state["features.34.bias"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match="conv5_4.bias"):
        network.load_network(str(tmp_path / "short.pth"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_a_state_dict_of_non_floating_tensors_is_refused_not_loaded_as_zeros(fresh_cache, tmp_path, dtype):
    """Integer weights (e.g. a float state dict cast with .long()) are almost all 0: loaded, they made a
    network whose every feature is zero, and every item "succeeded" with a flat loss."""
    state = {k: (v * 4).to(dtype) if dtype is not torch.complex64 else v.to(dtype) for k, v in make_state_dict(seed=9).items()}
    path = tmp_path / f"{str(dtype).removeprefix('torch.')}.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        network.load_network(str(path))
    message = str(info.value)
    assert str(path) in message and "conv1_1.weight" in message and str(dtype).removeprefix("torch.") in message
    assert "floating" in message and "\n" not in message


def test_a_half_precision_state_dict_still_loads(fresh_cache, tmp_path):
    state = {k: v.half() for k, v in make_state_dict(seed=9).items()}
    torch.save(state, tmp_path / "half.pth")
    assert_loaded(network.load_network(str(tmp_path / "half.pth")), {k: v.float() for k, v in state.items()})


CORRUPT_FILES = {
    # kind: what the one line says (and never torch's own advice to load with weights_only=False)
    "garbage": "not a PyTorch state dict",
    "text": "not a PyTorch state dict",
    "truncated": "not a PyTorch state dict",
    "truncated-legacy": "not a PyTorch state dict",
    "pickled-tensors": "not written by torch.save",
    "empty": "empty file (0 bytes)",
    "not-a-dict": "expected a dict of tensors, got list",
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", list(CORRUPT_FILES))
def test_corrupt_weights_files_are_refused(fresh_cache, tmp_path, state_file, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("not weights\n")
    elif kind == "truncated":
        data = state_file[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-legacy":
        torch.save(state_file[1], tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
        data = (tmp_path / "legacy.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickled-tensors":  # pickle.dump of a state dict, not torch.save
        with open(path, "wb") as fh:
            pickle.dump(state_file[1], fh)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save([torch.zeros(3)], path)
    with pytest.raises(WeightsError) as info:
        network.load_network(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert CORRUPT_FILES[kind] in message, message
    assert not suggests_an_unsafe_load(message) and "holds objects" not in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_random_bytes_are_called_not_a_state_dict(fresh_cache, tmp_path):
    """Random bytes reach the unpickler with any error type (IndexError, TypeError, ...); each is one clear line."""
    import random

    rng = random.Random(0)
    path = tmp_path / "random.pth"
    for i in range(150):
        head = (b"\x80\x02", b"\x80\x05", b"PK\x03\x04", b"")[i % 4]  # pickle, zip, or nothing in front
        path.write_bytes(head + rng.randbytes(rng.randint(1, 4096)))
        with pytest.raises(WeightsError) as info:
            network.load_network(str(path))
        message = str(info.value)
        assert "not a PyTorch state dict" in message or "holds objects other than tensors" in message, (i, message)
        assert "\n" not in message and not suggests_an_unsafe_load(message)


def test_missing_weights_file_is_refused(fresh_cache, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        network.load_network(str(tmp_path / "nope.pth"))


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile weights file would do."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch '{self.sentinel}'",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "torch.save-legacy", "pickle", "pickle-protocol-0"])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(fresh_cache, tmp_path, writer):
    def write(sentinel: Path, path: Path) -> Path:
        payload = {"features.0.weight": _RunsCode(sentinel)}
        if writer.startswith("torch.save"):
            torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch.save")
        else:
            with open(path, "wb") as fh:
                pickle.dump(payload, fh, protocol=0 if writer.endswith("-0") else None)
        return path

    sentinel = tmp_path / "SENTINEL"
    path = write(sentinel, tmp_path / "hostile.pth")
    with pytest.raises(WeightsError) as info:
        network.load_network(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "refused: it holds objects other than tensors" in message and f"{os.system.__module__}.system" in message
    assert "weights_only=True" in message and not suggests_an_unsafe_load(message)  # never the advice that would run it
    assert not sentinel.exists()
    # control: an unrestricted load of such a file really does run the command
    control = tmp_path / "CONTROL"
    write(control, tmp_path / "control.pth")
    if writer.startswith("torch.save"):
        torch.load(tmp_path / "control.pth", weights_only=False)
    else:
        with open(tmp_path / "control.pth", "rb") as fh:
            pickle.load(fh)
    assert control.exists()


def test_remote_weights_need_a_local_copy():
    with pytest.raises(WeightsError, match="fetched"):
        network.load_network("s3://bucket/vgg19.pth")
