"""nst_run: the stored run, as plain functions (no Prefect anywhere in it).

Modules, each one concern:

* ``paths``: every stored path (item folder, ``meta.json``, ``loss.csv``, the image, snapshots,
  run folder, results parts/tables, ``summary.json``, ``report.html``, thumbnails, decisions).
* ``manifest``: the CSV manifest parsed and validated row by row.
* ``items``: ``item_id`` (content address) and ``meta.json``.
* ``lease``: item leases across concurrent runs. ``status``: the row statuses.
* ``planning``: ``Work``/``Outcome``, resolving rows to items, batch planning.
* ``execute``: the device pool, batched optimisation with OOM halving, outputs, the lease loop
  (the one module here that imports torch: nothing else in this package imports it).
* ``results``: the results table's writer and reader side by side (``open_run``).
* ``review``: review decisions. ``report``: the run report (Jinja2 template). ``export``: datasets.

Nothing is imported here, so ``import nst_run.report`` stays free of torch.
"""
