"""nst_core: the engine of bulk neural style transfer (Gatys et al., 2015), and storage.

The engine (``network``, ``losses``, ``optim``, ``color``, ``engine``, ``quality``,
``images``, ``history``, ``params``) is PyTorch + Pillow and imports neither Prefect
nor boto3; ``storage`` (bytes by URI) is the one module that talks to S3. The
torch-free modules (``params``, ``layers``, ``weights``, ``version``, ``images``'s
decoding, ``storage``, ``errors``) are what the stored-run layer (``nst_run``) uses
without importing PyTorch.

The names below load lazily, so ``import nst_core.storage`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nst_core.engine import IterationInfo, StyleResult, stylize
    from nst_core.params import StyleParams
    from nst_core.version import ENGINE_VERSION

__all__ = ["ENGINE_VERSION", "IterationInfo", "StyleParams", "StyleResult", "stylize"]


def __getattr__(name: str) -> Any:
    if name == "StyleParams":
        from nst_core.params import StyleParams

        return StyleParams
    if name == "ENGINE_VERSION":
        from nst_core.version import ENGINE_VERSION

        return ENGINE_VERSION
    if name in ("IterationInfo", "StyleResult", "stylize"):
        from nst_core import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'nst_core' has no attribute {name!r}")
