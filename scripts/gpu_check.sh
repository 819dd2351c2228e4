#!/usr/bin/env bash
# The GPU check: one command, on a machine with a CUDA GPU and no network, within about 8 minutes.
#
#   OUT=/path/to/results bash scripts/gpu_check.sh [--device cuda|cpu] [--skip-build]
#
# Steps (each with a time limit, all within GPU_CHECK_BUDGET_S; a step that fails or times out is
# recorded and the next one still runs):
#   1. setup    install the wheels carried in .whl/ (scripts/gpu_wheels.sh fetches them) into
#               /tmp/site, put it first on PYTHONPATH, report versions and unmet requirements
#   2. build    moe_runtime._C in place against this machine's torch (cuda: MOE_RUNTIME_FORCE_CUDA=1,
#               TORCH_CUDA_ARCH_LIST default 9.0)
#   3. tests    pytest -m device --device DEVICE: every device-parametrized test on DEVICE
#   4. reroute  bench reroute --device DEVICE (cuda: float32, then bfloat16)
#   5. offload  bench offload --tier cpu --device DEVICE (cuda: the full-size model; cpu: smoke)
# `--device cpu` rehearses the same steps on a machine without a GPU.
#
# Writes to $OUT (at most 8 plain files, none in folders): setup.log, tests.log, tests.xml,
# reroute.json, reroute_bf16.json, offload.json, bench.log, summary.json (every step's status,
# seconds and headline numbers). Exit status: 0 when every step passed, 1 otherwise, 2 bad usage.
set -uo pipefail

usage() { echo "usage: OUT=DIR bash scripts/gpu_check.sh [--device cuda|cpu] [--skip-build]" >&2; exit 2; }
DEVICE=cuda
BUILD=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --device) [[ $# -ge 2 && ( $2 == cuda || $2 == cpu ) ]] || usage; DEVICE=$2; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    *) usage ;;
  esac
done
[[ -n ${OUT:-} ]] || { echo "gpu_check: set OUT to the results folder" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$SECONDS
SITE=${GPU_CHECK_SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export MOE_RUNTIME_CACHE=${MOE_RUNTIME_CACHE:-/tmp/moe-gpu-check-cache}
PY=${PYTHON:-python3}
STATUS=()

# run NAME LIMIT_S LOG CMD...: runs CMD within min(LIMIT_S, what is left of the budget), appends its
# output to LOG, and records "NAME status seconds".
run() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "== $name: skipped, out of time" | tee -a "$log"
    STATUS+=("$name skipped 0")
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local state=passed
  ((rc == 124 || rc == 137)) && state=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && state="failed(rc=$rc)"
  echo "== $name: $state in $((SECONDS - t0))s" | tee -a "$log"
  STATUS+=("$name $state $((SECONDS - t0))")
}

# 1. setup ------------------------------------------------------------------------------------
setup() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    # the wheels are for the GPU machine's Python (3.12); a rehearsal elsewhere installs those that fit
    local wheels
    mapfile -t wheels < <("$PY" - .whl/*.whl <<'PYEOF'
import sys
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
supported = set(sys_tags())
for path in sys.argv[1:]:
    if parse_wheel_filename(path.rsplit("/", 1)[-1])[3] & supported:
        print(path)
    else:
        print(f"skipped (not for this Python): {path}", file=sys.stderr)
PYEOF
)
    ((${#wheels[@]})) || return 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
      || return 1
  else
    echo "no wheels in .whl/: using the installed packages"
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" - <<'PYEOF'
import importlib.metadata as md, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
wanted = ["torch>=2.9", "transformers>=5.20,<6", "safetensors>=0.4", "tokenizers>=0.21", "numpy>=1.24",
          "psutil>=5.9", "tqdm>=4.66", "matplotlib>=3.8", "accelerate>=1.0", "peft>=0.17", "hypothesis>=6.100",
          "pytest>=8"]
for dist in ("transformers", "peft"):
    wanted += [r for r in (md.requires(dist) or []) if "extra ==" not in r]
unmet = []
for text in wanted:
    req = Requirement(text) if Requirement else None
    name = req.name if req else text.split(">")[0].split("=")[0].split("<")[0]
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        unmet.append(f"{text} (missing)")
        continue
    if req and version not in req.specifier:
        unmet.append(f"{text} (found {version})")
print("versions:", ", ".join(f"{n} {md.version(n)}" for n in ("transformers", "peft", "accelerate", "tokenizers")))
print("unmet requirements:", "; ".join(unmet) if unmet else "none")
PYEOF
}
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export -f setup
export PY SITE
run setup 90 "$OUT/setup.log" bash -c setup

# 2. build ------------------------------------------------------------------------------------
if ((BUILD)); then
  if [[ $DEVICE == cuda ]]; then
    run build 240 "$OUT/setup.log" env MOE_RUNTIME_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
      MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
  else
    run build 400 "$OUT/setup.log" env MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace
  fi
fi
run import 60 "$OUT/setup.log" "$PY" -c "
import torch, moe_runtime.ops as ops
ops.load_extension()
kernels = [k for k in ('CPU', 'CUDA') if torch._C._dispatch_has_kernel_for_dispatch_key('moe_runtime::reroute_permute', k)]
print('moe_runtime._C loaded; reroute_permute kernels:', kernels)
assert '$DEVICE'.upper() in kernels, 'no $DEVICE kernel of reroute_permute (was the extension built with CUDA?)'
"

# 3. tests ------------------------------------------------------------------------------------
# the files that hold device-parametrized tests (a module that fails to import elsewhere is reported,
# not fatal); -m device keeps their device tests
DEVICE_TESTS=(tests/ops/test_reroute.py tests/ops/test_segmented_experts.py tests/runtime/test_mixed_batch.py
  tests/runtime/test_offload.py tests/runtime/test_offload_bench.py tests/runtime/test_reroute_bench.py
  tests/tuning/test_train_step.py)
run tests 270 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -m device --device "$DEVICE" \
  --continue-on-collection-errors -o addopts="-ra" --junitxml="$OUT/tests.xml" --durations=15 "${DEVICE_TESTS[@]}"

# 4-5. benchmarks -----------------------------------------------------------------------------
if [[ $DEVICE == cuda ]]; then
  run reroute 90 "$OUT/bench.log" "$PY" -m moe_runtime bench reroute --device cuda --repeats 5 --json "$OUT/reroute.json"
  run reroute_bf16 90 "$OUT/bench.log" "$PY" -m moe_runtime bench reroute --device cuda --dtype bfloat16 --repeats 5 \
    --json "$OUT/reroute_bf16.json"
  run offload 240 "$OUT/bench.log" "$PY" -m moe_runtime bench offload --tier cpu --device cuda --offload-size full \
    --json "$OUT/offload.json"
else
  run reroute 240 "$OUT/bench.log" "$PY" -m moe_runtime bench reroute --device cpu --repeats 1 --json "$OUT/reroute.json"
  run offload 240 "$OUT/bench.log" "$PY" -m moe_runtime bench offload --tier cpu --device cpu --offload-size smoke \
    --json "$OUT/offload.json"
fi

# summary -------------------------------------------------------------------------------------
"$PY" - "$OUT" "$DEVICE" "$((SECONDS - START))" "${STATUS[@]}" <<'PYEOF'
import json, re, sys
from pathlib import Path

out, device, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
steps = {}
for line in sys.argv[4:]:
    name, state, took = line.split()
    steps[name] = {"status": state, "seconds": int(took)}
summary = {"device": device, "seconds": seconds, "steps": steps}
tests = out / "tests.log"
if tests.exists():
    tail = [l for l in tests.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
    summary["tests"] = tail[-1].strip("= ") if tail else None
keys = {
    "reroute": ["device", "dtype", "adapters", "latency_ratio_vs_base", "latency_ratio_vs_base_runtime",
                "speedup_vs_swap", "memory_ratio_vs_ideal", "mixed_tokens_per_s", "base_tokens_per_s"],
    "reroute_bf16": ["device", "dtype", "adapters", "latency_ratio_vs_base", "speedup_vs_swap"],
    "offload": ["tier", "device", "budget", "tokens_per_s", "tokens_per_s_resident", "tokens_per_s_accelerate",
                "speedup_vs_accelerate", "tokens_match_resident", "tokens_match_accelerate", "hit_rate",
                "bound_fraction", "peak_gpu_bytes", "disk_bandwidth_bytes_per_s", "bandwidth_measures"],
}
for name, fields in keys.items():
    path = out / f"{name}.json"
    if path.exists():
        data = json.loads(path.read_text())
        summary[name] = {k: data.get(k) for k in fields}
    if name == "offload" and path.exists() and summary[name]["tokens_per_s_resident"]:
        o = summary[name]
        o["offload_vs_resident"] = o["tokens_per_s"] / o["tokens_per_s_resident"]
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PYEOF

failed=$(printf '%s\n' "${STATUS[@]}" | awk '$2 != "passed"' | wc -l)
echo "gpu_check: ${#STATUS[@]} steps, $failed not passed, $((SECONDS - START))s; results in $OUT"
((failed == 0))
