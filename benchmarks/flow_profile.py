"""Where a flow run's time goes: the sample manifest at 128 px through the real flow, with the
task-level steps timed (fetch, optimisation, quality score, loss plot, store, report).

    .venv/bin/python benchmarks/flow_profile.py

Prints the flow's wall time and seconds spent in each step (summed over items).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false"); os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
sys.path.insert(0, str(REPO))
import flows.stylize_manifest as fm
import nst_run.execute as ts
from nst_core.params import StyleParams

T = {}
def wrap(mod, name):
    f = getattr(mod, name)
    def w(*a, **k):
        t = time.perf_counter()
        try: return f(*a, **k)
        finally: T[name] = T.get(name, 0) + time.perf_counter() - t
    setattr(mod, name, w)
for n in ("_fetch_images", "_store"): wrap(ts, n)
wrap(ts.engine, "stylize_batch"); wrap(ts.quality, "measure_result"); wrap(ts.history, "to_png")
wrap(fm, "build_run_report")
out = tempfile.mkdtemp()
t = time.perf_counter()
st = fm.stylize_manifest(manifest_uri=str(REPO / "manifests" / "samples.csv"), output_uri=out, defaults=StyleParams(size=128, weights="random:0"), allow_local_paths=True, return_state=True)
s = st.result()
print("flow wall_time_s", s["wall_time_s"], "call", time.perf_counter() - t)
print({k: round(v, 2) for k, v in T.items()})
