#!/usr/bin/env bash
# Issue 14's GPU checks in one prepared run, for a session lent a device machine (one NVIDIA GPU, about
# ten minutes of it): the CUDA tests first, then the GPU benchmarks, each under its own time limit so
# that one that hangs does not eat the others' time. Here, once:
#
#     make device-wheels                 # .whl/: Python 3.12 wheels of what the GPU image lacks (~39 MB)
#
# then the device tool's run, from the repository root:
#
#     run(command="bash benchmarks/device/run.sh", carry=[".whl"], timeout_s=560)
#
# Steps (all by default; name some to rerun only those): env, tests, engine, memory, throughput;
# throughput-heuristic (not by default) is the throughput step with cuDNN's autotuner off
# (NST_CUDNN_BENCHMARK=0): items that stop early change a batch's shape, and each new shape is
# searched again; run it in the same lease to compare.
# Everything lands in $OUT (the device tool brings it back): run.log (every step's output) and the
# benchmarks' JSON: engine-gpu.json, memory-gpu.json, throughput-gpu-512.json. Copy what is worth
# keeping into benchmarks/results/ with the GPU's name and the commit (e.g. engine-h100-<sha>.json).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
LOG=$OUT/run.log
PY=${PYTHON:-python3}
STEPS=${*:-env tests engine memory throughput}

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nst-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/nst-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the project from the working tree (not installed there)
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_HOME=${PREFECT_HOME:-$(mktemp -d)} PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120

# step NAME SECONDS COMMAND...: run it under its limit, its output to the log and the terminal.
step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== $name rc=${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$LOG"
}

step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git log -1 --format='commit %h %s' 2>/dev/null; \
    $PY -c 'import torch, prefect, pydantic; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), \"bf16\", torch.cuda.is_bf16_supported(), \"prefect\", prefect.__version__, \"pydantic\", pydantic.__version__)'"
step tests 150 env NST_REQUIRE_CUDA=1 $PY -m pytest tests/gpu -q -rA -p no:cacheprovider
step engine 120 $PY benchmarks/engine.py --device cuda --sizes 256,512 --rounds 3 --json "$OUT/engine-gpu.json"
step memory 60 $PY benchmarks/memory.py --device cuda --sizes 256,512 --json "$OUT/memory-gpu.json"
step throughput 180 $PY benchmarks/throughput.py --device cuda --size 512 --copies 16 --json "$OUT/throughput-gpu-512.json"
step throughput-heuristic 180 env NST_CUDNN_BENCHMARK=0 $PY benchmarks/throughput.py --device cuda --size 512 --copies 16 --json "$OUT/throughput-gpu-512-heuristic.json"
echo "== done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
