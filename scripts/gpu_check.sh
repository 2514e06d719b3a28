#!/usr/bin/env bash
# The GPU check: the GPU benchmark (recipes/benchmark_gpu.py, Llama-3.1-8B-shaped LoRA and QLoRA) and the
# CUDA test tier (tests/test_cuda.py), in one call of at most 400 s (GPU_BUDGET) on one GPU: call it with a
# limit of 7 minutes (420 s). Every stage runs in its own process under its own timeout, each timeout
# inside the budget (a stage gets at most its cap and never the time the later stages' minimums need),
# and writes its results as it finishes; summary.md is rewritten after every stage, so a kill leaves a table.
#
#   bash scripts/gpu_check.sh            full: 32 layers, 2 warm-up + 5 measured steps, each layer
#                                        compiled (inductor; torchtune's figures are compiled)  (~5 min)
#   bash scripts/gpu_check.sh --quick    rerun: 4 layers, 1 + 2 steps, shorter caps, eager (~2.5 min)
#   bash scripts/gpu_check.sh --dry-run  CPU (gloo), tiny shapes (2 layers, hidden 64, vocab 256, seq 16,
#                                        1 warm-up step compiled with aot_eager + 1 step): every stage, so
#                                        that no import, path, flag or file error reaches the GPU; the CUDA
#                                        tier only collects (it skips on CPU).
#
# Stages (cap / minimum seconds, full | quick) and what each writes to $OUT (default runs/gpu_check):
#   wheels   60/0   | 60/0    .whl/*.whl (torchao) installed to /tmp/site; wheels.log (skipped if none / dry run)
#   args      -     |  -      args.log: the benchmark's flags parsed (dry run: those of every mode)
#   env      60/0   | 60/0    env.txt, env.json: torch, CUDA, GPU, torchao
#   base    120/40  | 45/20   bench_base.json, bench_base.log: the random base, written once (RAM when
#                             /dev/shm has room), reused by both variants and by a rerun with the same shape
#   bf16    150/60  | 50/30   gpu_bench_bfloat16.json/.md, bench_bfloat16.log  (a killed run leaves its
#   nf4     150/60  | 50/30   gpu_bench_nf4.json/.md, bench_nf4.log             row, marked incomplete;
#                             each variant's last step has the checkpointed inputs offloaded, its peak apart:
#                             benchmark_gpu.py --offloaded-step)
#                             then gpu_bench.json / gpu_bench.md: every variant so far
#   tier    150/60  | 90/45   cuda_tests.xml, cuda_tests.log, cuda_tests.json: the CUDA tier, in what is left
#   always                    stages.json (each stage: status, exit code, seconds, timeout), summary.md
# The worst case (every stage killed at its timeout) still ends inside the budget. The full run of
# 2026-12-04 (eager): 19 + 45 + 38 + 38 + 134 s; compiled, each variant took ~55-60 s.
# On the lent H200 machine (no network; torch 2.11, no torchao): carry wheels made here with
#   scripts/gpu_wheels.sh   (writes .whl/, ignored by git)   and call with carry [".whl"].
# Env: GPU_BUDGET (seconds), GPU_LAYERS, GPU_STEPS (override the mode's), GPU_BASE_ROOT (where the base
#   goes), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=full
for arg in "$@"; do
  case "$arg" in
    --quick) MODE=quick ;;
    --dry-run) MODE=dry-run ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (--quick, --dry-run, --help)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
rm -f "$OUT"/{args.log,env.txt,env.json,env.log,wheels.log,stages.json,summary.md,bench_base.json} \
      "$OUT"/cuda_tests.{xml,log,json} "$OUT"/bench_*.log "$OUT"/gpu_bench*.json "$OUT"/gpu_bench*.md
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
GRACE=5   # seconds between a stage's SIGTERM and SIGKILL

FULL_BENCH=(--layers "${GPU_LAYERS:-32}" --steps "${GPU_STEPS:-5}" --warmup 2 --offloaded-step --compile)
QUICK_BENCH=(--layers "${GPU_LAYERS:-4}" --steps "${GPU_STEPS:-2}" --warmup 1 --offloaded-step)
DRY_BENCH=(--tiny --device cpu --offloaded-step --compile aot_eager --warmup 1)
case "$MODE" in
  full)    BUDGET=${GPU_BUDGET:-400} BENCH=("${FULL_BENCH[@]}")
           CAP_BASE=120 MIN_BASE=40 CAP_VAR=150 MIN_VAR=60 CAP_TIER=150 MIN_TIER=60 ;;
  quick)   BUDGET=${GPU_BUDGET:-170} BENCH=("${QUICK_BENCH[@]}")
           CAP_BASE=45 MIN_BASE=20 CAP_VAR=50 MIN_VAR=30 CAP_TIER=90 MIN_TIER=45 ;;
  dry-run) BUDGET=${GPU_BUDGET:-150} BENCH=("${DRY_BENCH[@]}")
           CAP_BASE=60 MIN_BASE=15 CAP_VAR=60 MIN_VAR=15 CAP_TIER=60 MIN_TIER=15 ;;
esac
DEADLINE=$(( SECONDS + BUDGET - 5 ))   # 5 s for the bookkeeping between stages
STAGES=()                              # one JSON object per finished stage
FAILED=0

stage_timeout() {  # CAP MIN_AFTER: the stage's timeout, never past what later stages' minimums need
  local left=$(( DEADLINE - SECONDS - $2 - GRACE ))
  echo $(( $1 < left ? $1 : left ))
}

record() {  # NAME STATUS RC SECONDS TIMEOUT (0: none, an instant stage)
  STAGES+=("{\"stage\": \"$1\", \"status\": \"$2\", \"rc\": $3, \"seconds\": $4, \"timeout\": $5}")
  [ "$2" = ok ] || [ "$2" = "not needed" ] || FAILED=1
  local IFS=,
  printf '[%s]\n' "${STAGES[*]}" > "$OUT/stages.json.tmp" && mv "$OUT/stages.json.tmp" "$OUT/stages.json"
  echo "== $1: $2 (exit $3, ${4} s$( (( $5 > 0 )) && echo " of a $5 s timeout"); ${SECONDS} s of ${BUDGET} s used)"
  summary
}

run_stage() {  # NAME TIMEOUT LOG CMD...: run CMD under TIMEOUT, its output to LOG, then record it
  local name=$1 t=$2 log=$3; shift 3
  if (( t < 10 )); then
    echo "skipped: no time left in the ${BUDGET} s budget" > "$log"
    record "$name" skipped -1 0 0; return
  fi
  local start=$SECONDS rc status
  timeout -k "$GRACE" "$t" "$@" > "$log" 2>&1; rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  grep -v -E "Failed to load|(^|\]:)W[0-9]{4} |warnings.warn|Warning:|Writing model shards" "$log" | tail -n 8 \
    | cut -c1-300 | sed 's/^/   /'
  record "$name" "$status" "$rc" $(( SECONDS - start )) "$t"
}

summary() {  # summary.md from whatever exists now
  {
    echo "# GPU check ($MODE, $(date -u +%F))"; echo
    [ -f "$OUT/env.txt" ] && { sed 's/^/    /' "$OUT/env.txt"; echo; }
    echo "| stage | status | exit | seconds | timeout |"; echo "|---|---|---|---|---|"
    "$PY" - "$OUT/stages.json" <<'PY'
import json, sys
for s in json.load(open(sys.argv[1])):
    print(f"| {s['stage']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['timeout']} |")
PY
    echo; echo "## Benchmark"; echo
    if [ -f "$OUT/gpu_bench.md" ]; then cat "$OUT/gpu_bench.md"; else echo "no benchmark rows (yet)"; fi
    echo; echo "## CUDA tier"; echo
    if [ -s "$OUT/cuda_tests.log" ]; then echo "    $(tail -n 1 "$OUT/cuda_tests.log")"
    elif [ -f "$OUT/cuda_tests.log" ]; then echo "no output (see the stage table)"; else echo "not run (yet)"; fi
  } > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
}

echo "gpu_check.sh $MODE: budget ${BUDGET} s, results in $OUT"

# wheels: torchao for the lent machine (built for its Python; not installable here, so not in the dry run)
if [ "$MODE" != dry-run ] && compgen -G ".whl/*.whl" > /dev/null; then
  run_stage wheels "$(stage_timeout 60 $(( MIN_BASE + 2 * MIN_VAR + MIN_TIER )))" "$OUT/wheels.log" \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
  echo "no .whl/ wheels to install (or dry run)" > "$OUT/wheels.log"
  record wheels "not needed" 0 0 0
fi

# args: the benchmark's flags as the stages below pass them (in the dry run: every mode's), parsed; no torch
check_args() {  # each argument: one mode's flags, space-separated
  local flags f
  for flags in "$@"; do
    read -r -a f <<< "$flags"
    "$PY" recipes/benchmark_gpu.py --out "$OUT" "${f[@]}" --write-base --check-args &&
    "$PY" recipes/benchmark_gpu.py --out "$OUT" "${f[@]}" --frozen-dtypes nf4 --require-base --time-limit 60 \
      --check-args || return 1
  done
}
ARGS=("${BENCH[*]}")
[ "$MODE" = dry-run ] && ARGS=("${FULL_BENCH[*]}" "${QUICK_BENCH[*]}" "${DRY_BENCH[*]}")
start=$SECONDS
check_args "${ARGS[@]}" > "$OUT/args.log" 2>&1; rc=$?
record args "$( ((rc == 0)) && echo ok || echo failed)" "$rc" $(( SECONDS - start )) 0

run_stage env "$(stage_timeout 60 $(( MIN_BASE + 2 * MIN_VAR + MIN_TIER )))" "$OUT/env.log" \
  "$PY" - "$OUT" "$MODE" <<'PY'
import json, sys
import torch
env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "gpus": torch.cuda.device_count()}
try:
    import torchao
    env["torchao"] = torchao.__version__
except Exception as e:  # noqa: BLE001
    env["torchao"] = f"missing: {e}"
for name in ("transformers", "peft", "safetensors"):
    try:
        env[name] = __import__("importlib.metadata", fromlist=["x"]).version(name)
    except Exception as e:  # noqa: BLE001
        env[name] = f"missing: {e}"
json.dump(env, open(f"{sys.argv[1]}/env.json", "w"), indent=2)
open(f"{sys.argv[1]}/env.txt", "w").write(" ".join(f"{k} {v}" for k, v in env.items()) + "\n")
print(env)
if sys.argv[2] != "dry-run" and not env["cuda"]:
    sys.exit("no CUDA device visible: the benchmark stages will fail and the CUDA tier will only skip")
PY

BENCH_PY=("$PY" recipes/benchmark_gpu.py --out "$OUT" "${BENCH[@]}")
run_stage base "$(stage_timeout "$CAP_BASE" $(( 2 * MIN_VAR + MIN_TIER )))" "$OUT/bench_base.log" \
  "${BENCH_PY[@]}" --write-base
for dtype in bfloat16 nf4; do
  after=$MIN_TIER; [ "$dtype" = bfloat16 ] && after=$(( MIN_TIER + MIN_VAR ))
  t=$(stage_timeout "$CAP_VAR" "$after")
  run_stage "$dtype" "$t" "$OUT/bench_$dtype.log" \
    "${BENCH_PY[@]}" --frozen-dtypes "$dtype" --require-base --time-limit $(( t > 20 ? t - 15 : t ))
  "$PY" recipes/benchmark_gpu.py --out "$OUT" --combine > /dev/null 2>&1  # also after a kill
  summary
done

# The CUDA tier: real on a GPU; on the CPU (dry run) it skips, which proves that it collects.
TIER_ENV=()
[ "$MODE" = dry-run ] && TIER_ENV=(env CUDA_VISIBLE_DEVICES=)
run_stage tier "$(stage_timeout "$CAP_TIER" 0)" "$OUT/cuda_tests.log" \
  "${TIER_ENV[@]}" "$PY" -m pytest -q -rs tests/test_cuda.py --junitxml="$OUT/cuda_tests.xml"
"$PY" - "$OUT" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
out = sys.argv[1]
stage = [s for s in json.load(open(f"{out}/stages.json")) if s["stage"] == "tier"][0]
res = {"status": stage["status"], "rc": stage["rc"], "seconds": stage["seconds"]}
try:
    root = ET.parse(f"{out}/cuda_tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    res.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    res["cases"] = {f"{c.get('classname')}::{c.get('name')}": ("skipped" if c.find("skipped") is not None else
                    "failed" if c.find("failure") is not None or c.find("error") is not None else "passed")
                    for c in suite.iter("testcase")}
except (OSError, ET.ParseError) as e:
    res["junit"] = f"unreadable: {e}"
json.dump(res, open(f"{out}/cuda_tests.json", "w"), indent=2)
PY
summary
cat "$OUT/summary.md"
exit $FAILED
