#!/usr/bin/env bash
# The GPU measurements of issues 4 and 6, one part per device call (each under its 10-minute
# limit), results under $OUT. The GPU image's python3 has torch, triton, transformers and peft;
# nothing here needs tritonserver.
#
#   OUT=... bash benchmarks/gpu_plan.sh serving   # h200: bf16/fp16 parity (mixed steps, varlen
#                                                 #   attention), S2 n=5/1000 with the mixing A/B (~7 min)
#   OUT=... bash benchmarks/gpu_plan.sh s1        # h200: S1 n=5/2000, decode step vs floor, a
#                                                 #   prefill-step profile (~5 min)
#   OUT=... bash benchmarks/gpu_plan.sh kernels   # h200: kernel table, then the prefill sweep (~5 min)
#   OUT=... bash benchmarks/gpu_plan.sh gmv       # h200: a mixed step's q,k,v LoRA point, all rows on MBGMM vs
#                                                 #   decode rows on MBGMV; S2 n=5/1000 with that A/B (~7 min)
#   OUT=... bash benchmarks/gpu_plan.sh tp        # h200-x2: TP parity, TP=2 with/without LoRA collectives,
#                                                 #   Llama-13B S4 at a saturating 40 req/s (~8 min)
#   OUT=... bash benchmarks/gpu_plan.sh tp1       # h200-x2: TP=1 on the same trace (scaling), then a
#                                                 #   TP=2/TP=1 prefill-step profile (~5 min)
#   OUT=... bash benchmarks/gpu_plan.sh tp4       # h200-x4: Llama-30B S5 on 4 GPUs, with/without LoRA
#                                                 #   collectives (~8 min)
#   OUT=... bash benchmarks/gpu_plan.sh tpsplit   # h200-x2: mixed steps (64 decoding requests) profiled at
#                                                 #   TP=2 and TP=1, decode rows on MBGMM vs MBGMV (item 17, ~6 min)
#   OUT=... bash benchmarks/gpu_plan.sh fence     # h200: parity with a pool under pressure, S2 n=5/1000 with
#                                                 #   the adapter-copy fence A/B and a profile of n=1000 (~9 min)
#   OUT=... bash benchmarks/gpu_plan.sh eager     # h200: parity, an eager mixed step's host and GPU time, host
#                                                 #   time by op (~4 min)
#   OUT=... bash benchmarks/gpu_plan.sh s1fence   # h200: the eager step, S1 n=5/2000 with the fence A/B (~7 min)
#   OUT=... bash benchmarks/gpu_plan.sh gather    # h200: S2 n=5/1000 with the A/B of gathering admissions for 4
#                                                 #   steps (admit_gather_steps; ~7 min)
#   OUT=... bash benchmarks/gpu_plan.sh gather8   # h200: S1 n=5/2000 then S2 n=5/1000 on the default (4 steps)
#                                                 #   with the A/B of 8 steps (~9 min)
#   OUT=... bash benchmarks/gpu_plan.sh onepage   # h200: quick kernel sweep with page ids hoisted or not, the
#                                                 #   kernel table both ways, the decode step both ways (~8 min)
#   OUT=... bash benchmarks/gpu_plan.sh kregs     # h200: decode kernels' registers and spills, the quick sweep,
#                                                 #   the kernel table (~3 min)
#   OUT=... bash benchmarks/gpu_plan.sh pdl       # h200: bf16 parity, kernel table and decode step with the expand
#                                                 #   as a programmatic dependent launch and without (~6 min)
#   OUT=... bash benchmarks/gpu_plan.sh small     # h200: MBGMV shapes for decode batches <= 64, then the decode
#                                                 #   step and the kernel table with the best of them and without (~5 min)
#   OUT=... bash benchmarks/gpu_plan.sh beside    # h200: bf16 parity, the decode step with LoRA shrinks beside the
#                                                 #   base GEMMs and without, S2 n=1000 / ceiling at 60 req/s (~8 min)
#   OUT=... bash benchmarks/gpu_plan.sh server    # h200 (carry .gpu_carry): the real tritonserver against the in-process
#                                                 #   engine on one trace at a saturating 60 req/s, S2 n=100 (~4 min)
#   OUT=... bash benchmarks/gpu_plan.sh profile   # h200: the decode step at B=64 and 128, and its GPU time by
#                                                 #   kernel (torch.profiler over graph replays, ~2 min)
#   OUT=... bash benchmarks/gpu_plan.sh final     # h200: the kernel table, the decode step against its floor, S2
#                                                 #   n=1000 and the ceiling at a saturating 60 req/s (~8 min)
#
# A fresh machine matters for the compile checks: Triton's disk cache hides compiles on a
# machine that has already run the same kernels (BENCHMARKS.md item 13).
#
# Then copy the JSON into benchmarks/results/ (suffix _h200 / tp_h200x2/), run
# benchmarks/summarize.py, and write the numbers, command, device and date into BENCHMARKS.md.
# In every serving JSON check extra.kernel_compiles == 0 first (kernels/launch.py), then
# extra.prefill_ms_per_step / decode_ms_per_step: where the time went.
set -uo pipefail
usage() { sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
part="${1:-}"
case "$part" in serving|s1|kernels|gmv|tp|tp1|tp4|tpsplit|fence|eager|s1fence|gather|gather8|onepage|kregs|pdl|final|small|beside|profile|server) ;; *) usage; exit 2 ;; esac
: "${OUT:?set OUT to the folder for the results}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
failed=0
# One step: its own time limit, its log beside the results; a failing step does not stop the
# others (each device call is too dear to lose the rest of it to one failure).
step() {
  local limit=$1 name=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || failed=1
}
case "$part" in
  serving)
    step 150 gpu_parity python3 benchmarks/gpu_parity.py --out "$OUT"
    step 400 slora_s2 python3 benchmarks/slora_bench.py --setting S2 --n 5,1000 --rate 30 --duration 15 --ab-mix --out "$OUT"
    ;;
  s1)
    step 330 slora_s1 python3 benchmarks/slora_bench.py --setting S1 --n 5,2000 --rate 30 --duration 15 --out "$OUT"
    step 220 decode_step python3 benchmarks/decode_step.py --batch 1,64,128,256 --ctx 512 --out "$OUT"
    # Where a single-GPU prefill step's time goes (host enqueue against device), S2 ranks.
    step 150 prefill_profile python3 benchmarks/tp_profile.py --out "$OUT" --tp 1 --model dummy:llama-7b \
      --ranks 64,32,16,8
    ;;
  kernels)
    step 200 kernel_bench python3 benchmarks/kernel_bench.py --out "$OUT"
    step 340 kernel_sweep python3 benchmarks/kernel_bench.py --sweep --out "$OUT"
    ;;
  gmv)
    step 150 kernel_mixed python3 benchmarks/kernel_bench.py --mixed --out "$OUT"
    step 420 slora_s2_gmv python3 benchmarks/slora_bench.py --setting S2 --n 5,1000 --rate 30 --duration 15 --ab-gmv \
      --suffix _gmv --out "$OUT"
    ;;
  fence)
    step 120 gpu_parity python3 benchmarks/gpu_parity.py --out "$OUT"
    step 450 slora_s2 python3 benchmarks/slora_bench.py --setting S2 --n 5,1000 --rate 30 --duration 15 --ab-fence \
      --profile n1000 --out "$OUT"
    ;;
  eager)
    step 150 gpu_parity python3 benchmarks/gpu_parity.py --out "$OUT"
    step 300 eager_step python3 benchmarks/eager_step.py --out "$OUT"
    ;;
  s1fence)
    step 150 eager_step python3 benchmarks/eager_step.py --out "$OUT"
    step 420 slora_s1 python3 benchmarks/slora_bench.py --setting S1 --n 5,2000 --rate 30 --duration 15 --ab-fence \
      --out "$OUT"
    ;;
  gather)
    step 560 slora_s2 python3 benchmarks/slora_bench.py --setting S2 --n 5,1000 --rate 30 --duration 15 --gather 0 \
      --ab-gather 4 --out "$OUT"
    ;;
  gather8)
    step 290 slora_s1 python3 benchmarks/slora_bench.py --setting S1 --n 5,2000 --rate 30 --duration 15 --ab-gather 8 \
      --out "$OUT"
    step 290 slora_s2 python3 benchmarks/slora_bench.py --setting S2 --n 5,1000 --rate 30 --duration 15 --ab-gather 8 \
      --out "$OUT"
    ;;
  onepage)
    echo '{"gmv": {"one_page": false}, "gmm": {"one_page": false}}' > "$OUT/per_block.json"
    step 240 kernel_sweep python3 benchmarks/kernel_bench.py --sweep --quick --out "$OUT"
    step 90 kernel_bench python3 benchmarks/kernel_bench.py --only lora --out "$OUT"
    SLORA_LORA_TUNING="$OUT/per_block.json" step 90 kernel_bench_per_block \
      python3 benchmarks/kernel_bench.py --only lora --out "$OUT/per_block"
    step 100 decode_step python3 benchmarks/decode_step.py --batch 64,256 --ctx 512 --prefill-len 0 --out "$OUT"
    SLORA_LORA_TUNING="$OUT/per_block.json" step 100 decode_step_per_block \
      python3 benchmarks/decode_step.py --batch 64,256 --ctx 512 --prefill-len 0 --out "$OUT/per_block"
    ;;
  kregs)
    step 60 kernel_regs python3 benchmarks/kernel_bench.py --regs --out "$OUT"
    step 240 kernel_sweep python3 benchmarks/kernel_bench.py --sweep --quick --out "$OUT"
    step 90 kernel_bench python3 benchmarks/kernel_bench.py --only lora --out "$OUT"
    ;;
  pdl)
    echo '{"gmv": {"pdl": false}, "gmm": {"pdl": false}}' > "$OUT/no_pdl.json"
    step 150 gpu_parity python3 benchmarks/gpu_parity.py --out "$OUT"
    step 90 kernel_bench python3 benchmarks/kernel_bench.py --only lora --out "$OUT"
    SLORA_LORA_TUNING="$OUT/no_pdl.json" step 90 kernel_bench_no_pdl \
      python3 benchmarks/kernel_bench.py --only lora --out "$OUT/no_pdl"
    step 100 decode_step python3 benchmarks/decode_step.py --batch 64,128,256 --ctx 512 --prefill-len 0 --out "$OUT"
    SLORA_LORA_TUNING="$OUT/no_pdl.json" step 100 decode_step_no_pdl \
      python3 benchmarks/decode_step.py --batch 64,128,256 --ctx 512 --prefill-len 0 --out "$OUT/no_pdl"
    ;;
  small)
    step 240 kernel_sweep_small python3 benchmarks/kernel_bench.py --sweep --small --out "$OUT"
    step 100 decode_step python3 benchmarks/decode_step.py --batch 16,64,128 --ctx 512 --prefill-len 0 --out "$OUT"
    SLORA_LORA_TUNING="$OUT/lora_tuning_small.json" step 100 decode_step_small \
      python3 benchmarks/decode_step.py --batch 16,64,128 --ctx 512 --prefill-len 0 --out "$OUT/small"
    SLORA_LORA_TUNING="$OUT/lora_tuning_small.json" step 60 kernel_bench_small \
      python3 benchmarks/kernel_bench.py --only lora --out "$OUT/small"
    ;;
  beside)
    step 150 gpu_parity python3 benchmarks/gpu_parity.py --out "$OUT"
    step 100 decode_step python3 benchmarks/decode_step.py --batch 16,64,128,256 --ctx 512 --prefill-len 0 --out "$OUT"
    step 100 decode_step_one_stream python3 benchmarks/decode_step.py --batch 16,64,128,256 --ctx 512 --prefill-len 0 \
      --no-lora-beside --out "$OUT/one_stream"
    step 200 slora_s2_r60 python3 benchmarks/slora_bench.py --setting S2 --n 1000 --rate 60 --duration 10 \
      --suffix _r60 --out "$OUT"
    ;;
  server)
    # needs tritonserver and a numpy < 2 Python: carry .gpu_carry (see gpu_server_setup.sh)
    bash benchmarks/gpu_server_setup.sh "${CARRY:-.gpu_carry}" || exit 1
    SLORA_PYTRITON_SITE=/tmp/ts step 400 server_bench /tmp/venv/bin/python benchmarks/server_bench.py --setting S2 \
      --n 100 --rate 60 --duration 10 --out "$OUT"
    ;;
  profile)
    step 150 decode_step python3 benchmarks/decode_step.py --batch 64,128 --ctx 512 --prefill-len 0 \
      --profile 64,128 --out "$OUT"
    ;;
  final)
    step 120 kernel_bench python3 benchmarks/kernel_bench.py --out "$OUT"
    step 150 decode_step python3 benchmarks/decode_step.py --batch 1,64,128,256 --ctx 512 --out "$OUT"
    step 300 slora_s2_r60 python3 benchmarks/slora_bench.py --setting S2 --n 1000 --rate 60 --duration 10 \
      --suffix _r60 --out "$OUT"
    ;;
  tp)
    step 560 tp_bench python3 benchmarks/tp_bench.py --out "$OUT/tp" --phases parity,tp,tp_skip --budget 540
    ;;
  tp1)
    step 300 tp_bench_tp1 python3 benchmarks/tp_bench.py --out "$OUT/tp" --phases tp1 --budget 290
    step 240 tp_profile python3 benchmarks/tp_profile.py --out "$OUT" --tp 2,1
    ;;
  tp4)
    step 560 tp_bench python3 benchmarks/tp_bench.py --out "$OUT/tp4" --tp 4 --model dummy:llama-30b --setting S5 \
      --phases tp,tp_skip --budget 540
    ;;
  tpsplit)
    step 420 tp_profile_mixed python3 benchmarks/tp_profile.py --out "$OUT/tp_mixed" --tp 2,1 --decode-rows 64 \
      --requests 4 --tokens 200
    ;;
esac
exit $failed
