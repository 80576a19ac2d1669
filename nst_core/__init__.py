"""nst_core: the engine of bulk neural style transfer (Gatys et al., 2015).

Pure PyTorch + Pillow: this package's maths imports neither Prefect nor boto3.
``nst_core.storage`` (bytes by URI) is the one module that talks to S3, and only
callers above the engine (CLI, Prefect tasks) use it.
"""

from nst_core.engine import ENGINE_VERSION, IterationInfo, StyleResult, stylize
from nst_core.params import StyleParams

__all__ = ["ENGINE_VERSION", "IterationInfo", "StyleParams", "StyleResult", "stylize"]
