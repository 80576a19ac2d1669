"""nst_core: the engine of bulk neural style transfer (Gatys et al., 2015).

Pure PyTorch + Pillow: this package's maths imports neither Prefect nor boto3.
``nst_core.storage`` (bytes by URI) is the one module that talks to S3, and only
callers above the engine (CLI, Prefect tasks) use it.

The names below load lazily, so ``import nst_core.storage`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nst_core.engine import ENGINE_VERSION, IterationInfo, StyleResult, stylize
    from nst_core.params import StyleParams

__all__ = ["ENGINE_VERSION", "IterationInfo", "StyleParams", "StyleResult", "stylize"]


def __getattr__(name: str) -> Any:
    if name == "StyleParams":
        from nst_core.params import StyleParams

        return StyleParams
    if name in ("ENGINE_VERSION", "IterationInfo", "StyleResult", "stylize"):
        from nst_core import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'nst_core' has no attribute {name!r}")
