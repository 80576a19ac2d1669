"""The engine's version, recorded in every ``meta.json`` (torch-free, for the stored-run layer)."""

ENGINE_VERSION = "2"
"""Algorithm version: bumped only when the same inputs would give a different image.

2: the returned image is each item's best (lowest total loss), not its last iterate, and the
L-BFGS divergence guard (:func:`nst_core.engine.optimise`).
"""
