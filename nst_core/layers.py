"""The VGG-19 layer names (``conv1_1`` ... ``pool5``) and what follows from them; no torch here.

:mod:`nst_core.params` validates the layer fields against these names, and the
stored-run layer (manifests, reports) needs them without importing PyTorch.
"""

from __future__ import annotations

# Channels of each convolution block, from torchvision's VGG-19 ("E") config.
_BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


def _layer_names() -> tuple[str, ...]:
    names: list[str] = []
    for block, (_, convs) in enumerate(_BLOCKS, start=1):
        for i in range(1, convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return tuple(names)


LAYER_NAMES: tuple[str, ...] = _layer_names()
"""Every addressable layer, in forward order (37 names)."""

def layer_index(name: str) -> int:
    """Position of a named layer in the forward pass (raises KeyError)."""
    try:
        return LAYER_NAMES.index(name)
    except ValueError:
        raise KeyError(f"unknown VGG-19 layer {name!r}; known layers: {', '.join(LAYER_NAMES)}") from None


def layer_channels(name: str) -> int:
    """Feature maps at a named layer (``relu3_1``: 256), from the block it is in (raises KeyError)."""
    layer_index(name)
    block = int(name.removeprefix("conv").removeprefix("relu").removeprefix("pool")[0])
    return _BLOCKS[block - 1][0]


def downsampling_before(name: str) -> int:
    """How many 2x poolings an image passes through before reaching ``name``."""
    return sum(1 for n in LAYER_NAMES[: layer_index(name) + 1] if n.startswith("pool"))


def min_image_side(layers: list[str] | tuple[str, ...]) -> int:
    """Smallest image side whose feature map at every one of ``layers`` is >= 1 px.

    Each pooling halves the side (floor), so ``k`` poolings need ``2**k`` px.
    """
    return 2 ** max((downsampling_before(n) for n in layers), default=0)
