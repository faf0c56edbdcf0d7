#!/usr/bin/env bash
# The GPU machine's benchmark of issue 12, in one go (< 5 minutes on one H200, 16 cores, 128 GiB):
#   make checkpoints on that machine's disk, measure the floors there (parallel read from page cache, pinned
#   host-to-device copy, write), run ckptavg with --device cuda and --device cpu (16 and 2 threads), check the
#   GPU outputs are byte-identical to the CPU outputs (cmp), run `pytest -m gpu`, and print one table.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine (python3 with CUDA torch; ckptavg from src/)
#   bash benchmarks/gpu.sh --small         # anywhere, in < 1 minute: tiny checkpoints, --device cpu only
#
# Sizes (full mode): one k=5 window at pythia-1b shapes (5 x 2.1 GB fp16 .bin) and a 160m trajectory cut to
# 12 checkpoints / 8 windows of k=5 (12 x 0.37 GB; the README's 2-core trajectory has 20 / 16): ~15 GB made at
# ~1 GB/s, and every ckptavg run over it a few seconds, so the whole script fits 5 minutes with room to spare.
# Env: PYTHON (default python3), DATA (default /tmp/ckptavg-gpu), CORES (default: nproc).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${DATA:-/tmp/ckptavg-gpu}
CORES=${CORES:-$(nproc)}
SMALL=0 REPEAT=2  # best of 2
[[ "${1:-}" == "--small" ]] && SMALL=1 REPEAT=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s.%N)
declare -A R  # results: name -> value
note() { echo "[gpu.sh $(printf %.0f "$(echo "$(date +%s.%N) - $T0" | bc)")s] $*" >&2; }
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$DATA/last.err"; local rc=$?; t1=$(date +%s.%N)
         [[ $rc == 0 ]] && printf %.2f "$(echo "$t1 - $t0" | bc)" || { echo "FAIL($rc)"; tail -3 "$DATA/last.err" >&2; }; }
best() { local b="" t; for _ in $(seq "$REPEAT"); do t=$(secs "$@"); [[ $t == FAIL* ]] && { echo "$t"; return; }
         [[ -z $b ]] || (( $(echo "$t < $b" | bc) )) && b=$t; done; echo "$b"; }
num() { [[ $1 =~ ^[0-9]*\.?[0-9]+$ ]] && (( $(echo "$1 > 0" | bc) )); }
ratio() { ! num "$1" || ! num "$2" && echo n/a || printf %.2f "$(echo "$1 / $2" | bc -l)"; }

if (( SMALL )); then
  # the "cuda" rows run with --device cpu, so every step of the script (cmp and the table included) runs here
  PRESET_1B=tiny; STEPS_1B=1000:5000:1000; PRESET_160=tiny; STEPS_160=1000:12000:1000; CUDA_AS=cpu
else
  PRESET_1B=pythia-1b; STEPS_1B=1000:5000:1000; PRESET_160=pythia-160m; STEPS_160=1000:12000:1000; CUDA_AS=cuda
fi
mkdir -p "$DATA"
note "making checkpoints in $DATA"
$PY benchmarks/make_checkpoints.py --preset $PRESET_1B --root "$DATA/w1b" --steps $STEPS_1B >&2 || exit 1
$PY benchmarks/make_checkpoints.py --preset $PRESET_160 --root "$DATA/t160" --steps $STEPS_160 >&2 || exit 1

inputs() { ls "$DATA/$1"/step*/pytorch_model.bin; }
read_floor() { inputs "$1" | xargs -P "$CORES" -n 1 cat > /dev/null; }  # parallel read, from page cache
write_floor() {  # the output's bytes, written and fsynced (ckptavg's outputs are made durable too)
  local mb=$(( $(du -sm "$(inputs "$1" | head -1)" | cut -f1) * $2 ))
  dd if=/dev/zero of="$DATA/write.floor" bs=1M count="$mb" conv=fsync status=none; rm -f "$DATA/write.floor"; }
run_avg() {  # scenario device(cuda|cpu) threads
  local out="$DATA/out/$1-$2-$3" extra=(--threads "$3") device=$2
  [[ $2 == cuda ]] && device=$CUDA_AS
  rm -rf "$out"
  case $1 in
    w1b) $PY -m ckptavg lawa "$DATA/w1b" --steps 5000:5000 --k 5 --out "$out" --device "$device" -q "${extra[@]}" ;;
    t160) $PY -m ckptavg lawa "$DATA/t160" --steps 5000:12000 --k 5 --out "$out" --device "$device" -q "${extra[@]}" ;;
  esac
}
same_bytes() {  # scenario: every weight file of the cuda output equals the cpu (16 threads) output's
  local a="$DATA/out/$1-cpu-$CORES" b="$DATA/out/$1-cuda-$CORES" f n=0
  [[ -d $a && -d $b ]] || { echo "n/a (a run failed)"; return; }
  for f in $(cd "$a" && find . -name '*.safetensors' | sort); do cmp -s "$a/$f" "$b/$f" || { echo "DIFFER($f)"; return; }; n=$((n+1)); done
  (( n > 0 )) && echo "identical($n files)" || echo "no files"
}

for s in w1b t160; do
  note "$s: floors"
  R[$s.in]=$(du -scb $(inputs $s) | tail -1 | cut -f1)
  cat $(inputs $s) > /dev/null  # warm the page cache
  R[$s.read]=$(best read_floor $s)
  outs=$([[ $s == w1b ]] && echo 1 || echo 8)
  R[$s.write]=$(best write_floor $s $outs)
  for d in cuda cpu; do
    if [[ $d == cuda ]]; then
      note "$s: ckptavg --device $CUDA_AS (the cuda row)"; R[$s.cuda]=$(best run_avg $s cuda "$CORES")
    else
      for t in $(printf '%s\n' "$CORES" 2 | sort -un); do note "$s: ckptavg --device cpu, $t threads"; R[$s.cpu$t]=$(best run_avg $s cpu $t); done
    fi
  done
  R[$s.cmp]=$(same_bytes $s)
  rm -rf "$DATA/out"
done

if (( SMALL )); then
  R[h2d]="n/a (--small)"; R[pytest]="n/a (--small)"
else
  note "pinned host-to-device bandwidth"
  R[h2d]=$($PY - <<'PYEOF'
import torch
x = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True); y = torch.empty_like(x, device="cuda")
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for _ in range(2): y.copy_(x, non_blocking=True)
s.record(); [y.copy_(x, non_blocking=True) for _ in range(5)]; e.record(); e.synchronize()
print(f"{5 * x.numel() / (s.elapsed_time(e) / 1e3) / 1e9:.1f} GB/s")
PYEOF
  )
  note "pytest -m gpu"
  $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > "$DATA/pytest.log" 2>&1
  R[pytest]="$(tail -1 "$DATA/pytest.log")"
fi

gb() { printf %.2f "$(echo "${R[$1.in]} / 1000000000" | bc -l)"; }
floor() { local a=${R[$1.read]} b=${R[$1.write]}; [[ $a == FAIL* || $b == FAIL* ]] && echo FAIL && return
          (( $(echo "$a > $b" | bc) )) && echo "$a" || echo "$b"; }
echo
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "machine: ${gpu:-no GPU}, $CORES cores, torch $($PY -c 'import torch; print(torch.__version__)')"
echo "pinned host-to-device copy: ${R[h2d]}; pytest -m gpu: ${R[pytest]}"
echo
echo "| scenario | inputs | read floor ($CORES-way) | write floor | --device cuda$( ((SMALL)) && echo ' (--small: cpu stand-in)') | cuda / max(floors) (target <= 1.3) | cpu $CORES threads | cpu 2 threads | 2-thread / $CORES-thread time (target >= 4) | cuda vs cpu bytes |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for s in w1b t160; do
  name=$([[ $s == w1b ]] && echo "one k=5 window, $PRESET_1B" || echo "8 k=5 windows, $PRESET_160 (12 inputs)")
  c=${R[$s.cuda]:-n/a}
  echo "| $name | $(gb $s) GB | ${R[$s.read]} s | ${R[$s.write]} s | $c s | $(ratio "$c" "$(floor $s)") | ${R[$s.cpu$CORES]} s | ${R[$s.cpu2]} s | $(ratio "${R[$s.cpu2]}" "${R[$s.cpu$CORES]}") | ${R[$s.cmp]} |"
done
note "done"
