#!/usr/bin/env bash
# Issue 17's GPU checks in one command, on one NVIDIA GPU with no internet; every result under $OUT.
#
#   bash benchmarks/gpu_issue17.sh                 # on the GPU machine, from the repository root: ~8 min on an H200
#   DRY_RUN=1 bash benchmarks/gpu_issue17.sh       # (or --cpu) every part tiny on the CPU; CUDA-only pieces skipped
#
# Parts, each under its own timeout (seconds: TIMEOUT_B, TIMEOUT_C, TIMEOUT_A) so one hang does not eat the rest:
#   b) balancers on the GPU at T = 40: benchmarks/balancing.py --device cuda --model resnet18 --tasks 40 (ratios to
#      equal weighting, aten ops and cudaStreamSynchronize / DtoH copies per step);
#   c) pytest -m gpu (Nash-MTL and CAGrad need cvxpy: checked first, said clearly when missing);
#   a) the transformer experiment's throughput and MFU: the bare PyTorch loop (benchmarks/transformer_reference.py)
#      against the template as configured (bf16-mixed, compiled) and its variants foreach / fused AdamW with
#      clipping, bf16-true weights, batch 256, d_model 1024, inductor CUDA graphs (benchmarks/gpu_throughput.py).
# PARTS="b c a" picks and orders them; PYTHON=... picks the interpreter (default: the first of .venv/bin/python,
# python3, python that imports torch with CUDA). Writes $OUT/summary.md (what ran, exit codes, seconds) and, per
# part, its full output (*.txt) and machine-readable results (*.csv, *.json, *.xml).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY_RUN="${DRY_RUN:-0}"
for arg in "$@"; do
    case "$arg" in
        --cpu | --dry-run) DRY_RUN=1 ;;
        *) echo "unknown argument $arg (use --cpu for the dry run)" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PARTS="${PARTS:-b c a}"
# Defaults sum to 9.5 min at most, ~8 expected on an H200; part a's last variants are the first to go if it runs
# long (its rows are written after every cell). PARTS=a TIMEOUT_A=600 runs the whole matrix alone.
if [ "$DRY_RUN" = 1 ]; then
    # A shared CPU: one thread per process (OpenMP workers spin when the cores are oversubscribed), long timeouts.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    TIMEOUT_B="${TIMEOUT_B:-300}"
    TIMEOUT_C="${TIMEOUT_C:-300}"
    TIMEOUT_A="${TIMEOUT_A:-900}"
fi
TIMEOUT_B="${TIMEOUT_B:-120}"
TIMEOUT_C="${TIMEOUT_C:-150}"
TIMEOUT_A="${TIMEOUT_A:-300}"
# The checkout need not be installed: the interpreter and every `python -m mtl_lightning` subprocess import it here.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.md"

pick_python() {
    local want_cuda=$1 candidate
    for candidate in ${PYTHON:-} .venv/bin/python python3 python; do
        command -v "$candidate" > /dev/null 2>&1 || [ -x "$candidate" ] || continue
        if [ "$want_cuda" = 1 ]; then
            "$candidate" -c "import torch, lightning, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
                > /dev/null 2>&1 && { echo "$candidate"; return 0; }
        else
            "$candidate" -c "import torch, lightning" > /dev/null 2>&1 && { echo "$candidate"; return 0; }
        fi
    done
    return 1
}

if [ "$DRY_RUN" = 1 ]; then
    PY="$(pick_python 0)" || { echo "no python with torch and lightning found" >&2; exit 1; }
    MODE="dry run on the CPU (tiny sizes; CUDA-only pieces skipped)"
else
    PY="$(pick_python 1)" || {
        echo "no python with torch, lightning and a CUDA device found (set PYTHON=..., or DRY_RUN=1 on a CPU)" >&2
        exit 1
    }
    MODE="GPU run"
fi

{
    echo "# Issue 17 GPU checks ($MODE)"
    echo
    echo "- started $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + local changes')"
    echo "- python: $PY"
    "$PY" - << 'EOF'
import importlib.util, platform, torch, lightning
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {lightning.__version__}, "
      f"python {platform.python_version()}, GPU: {gpu}")
for name in ("cvxpy", "quadprog", "torchjd"):
    print(f"- {name}: {'importable' if importlib.util.find_spec(name) else 'NOT importable'}")
EOF
    echo
    echo "| part | what | exit | seconds | output |"
    echo "| --- | --- | ---: | ---: | --- |"
} > "$SUMMARY"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"

# run PART LABEL SECONDS LOGFILE COMMAND...: one step under `timeout`, its output to LOGFILE and the screen.
run() {
    local part=$1 label=$2 seconds=$3 log=$4
    shift 4
    echo
    echo "=== [$part] $label (timeout ${seconds}s): $*"
    local start=$SECONDS
    timeout --kill-after=15 "$seconds" "$@" 2>&1 | grep --line-buffered -v '^USDT:' | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    local note=$rc
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="$rc (timed out)"
    echo "| $part | $label | $note | $took | $log |" >> "$SUMMARY"
    echo "=== [$part] $label: exit $note after ${took}s"
    return 0
}

skip() {
    echo "| $1 | $2 | - | - | skipped: $3 |" >> "$SUMMARY"
    echo "=== [$1] $2: skipped: $3"
}

part_b() {
    if [ "$DRY_RUN" = 1 ]; then
        run b "balancers, ResNet-18, tiny, CPU" "$TIMEOUT_B" balancing_resnet18.txt \
            "$PY" benchmarks/balancing.py --device cpu --model resnet18 --tasks 3 --methods UPGrad PCGrad \
            --image-size 16 --batch-size 4 --repeats 2 --min-time 0 --min-steps 1 --op-steps 1 --threads 1 \
            --no-parameter-mode --markdown --out "$OUT/balancing_resnet18.csv"
    else
        # Representation mode (every method's default), 10 paired rounds: the image step is ~10 ms, so 0.05 s a side.
        run b "balancers, ResNet-18 64x64 batch 128, T=40, cuda" "$TIMEOUT_B" balancing_resnet18.txt \
            "$PY" benchmarks/balancing.py --device cuda --model resnet18 --tasks 40 --no-parameter-mode \
            --repeats 10 --min-time 0.05 --op-steps 2 --markdown --out "$OUT/balancing_resnet18.csv"
    fi
}

part_c() {
    if ! "$PY" -c "import cvxpy" > /dev/null 2>&1; then
        echo "!!! cvxpy is NOT importable by $PY: the Nash-MTL and CAGrad gpu tests will fail." \
            "Install the solvers extra first: pip install 'mtl_lightning[solvers]' (or a wheel of cvxpy carried along)" \
            | tee "$OUT/cvxpy_missing.txt"
        echo "- **cvxpy NOT importable**: Nash-MTL / CAGrad gpu tests cannot pass" >> "$SUMMARY"
    fi
    if [ "$DRY_RUN" = 1 ]; then
        run c "pytest -m gpu (collect only: the tests need CUDA)" "$TIMEOUT_C" pytest_gpu.txt \
            "$PY" -m pytest tests -m gpu --collect-only -q -p no:cacheprovider
    else
        run c "pytest -m gpu" "$TIMEOUT_C" pytest_gpu.txt \
            "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --durations=15 \
            --junitxml="$OUT/pytest_gpu.xml"
    fi
}

part_a() {
    # Most telling first: the experiment as configured, then the variants that share its compiled graph (cached).
    local variants="compile foreach fused bf16_true batch256 wide cudagraphs"
    if [ "$DRY_RUN" = 1 ]; then
        skip a "bare PyTorch loop (transformer_reference.py)" "CUDA only"
        skip a "compile, cudagraphs, batch256 variants" "CUDA only (the dry run runs four others eager)"
        run a "transformer variants, tiny, CPU" "$TIMEOUT_A" throughput.txt \
            "$PY" benchmarks/gpu_throughput.py --cpu-smoke --experiments transformer \
            --variants foreach fused bf16_true wide --steps 2 --timeout 300 \
            --extra "--model.init_args.compile false" --out "$OUT/throughput.json"
        return
    fi
    # The bare loop first: its ~40 s must not be lost to a later cell that hangs. Batch 128 and compile, as the
    # experiment; 20k sequences are enough for 38 steps and generate 5x faster than the experiment's 100k.
    run a "bare loop, batch 128, compile" 90 bare_loop.txt \
        "$PY" benchmarks/transformer_reference.py --batch-size 128 --compile --steps 30 --warmup 8
    # shellcheck disable=SC2086
    run a "template: compile (the experiment) + variants" "$((TIMEOUT_A - 90))" throughput.txt \
        "$PY" benchmarks/gpu_throughput.py --experiments transformer --variants $variants --steps 30 --warmup 8 \
        --timeout 120 --extra "--data.init_args.num_samples 20000" --out "$OUT/throughput.json"
}

total_start=$SECONDS
for part in $PARTS; do
    case "$part" in
        a) part_a ;;
        b) part_b ;;
        c) part_c ;;
        *) echo "unknown part $part (a, b or c)" >&2 ;;
    esac
done
{
    echo
    echo "- finished after $((SECONDS - total_start)) s"
    for f in balancing_resnet18.txt throughput.txt bare_loop.txt pytest_gpu.txt; do
        [ -f "$OUT/$f" ] || continue
        echo
        echo "## $f (last lines)"
        echo
        echo '```'
        tail -n 60 "$OUT/$f"
        echo '```'
    done
} >> "$SUMMARY"
echo
echo "all parts done in $((SECONDS - total_start)) s; results in $OUT (start with $SUMMARY)"
