"""Operating nst-bulk: the local stack (``stack.py``, ``make up``), the SeaweedFS launcher
shared with the tests (``seaweedfs.py``), deployments (``prefect.yaml``) and GPU-fleet recipes.

Not an installed package: run from the repository root (``python -m infra.stack up``).
"""
