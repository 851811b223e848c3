#!/usr/bin/env bash
# GPU checks, for a machine with CUDA GPUs (CI has none; run this whenever one is lent):
#   1. the CUDA-only tests (codecs stay on the device, one host sync per encode);
#   2. a bf16-mixed training run of the vision recipe on one GPU (quick.yaml, one epoch);
#   3. the same with 16 simulated workers on that GPU (SimulatedStrategy: in-process rounds on CUDA tensors);
#   4. codec throughput on the GPU next to an fp32 clone (benchmarks/codec_throughput.py; JSON kept), with the fused
#      Triton kernels of BlockQuantCodec(fused=True) timed next to torch ops (their CUDA tests run in check 1);
#   5. with >= 2 GPUs: a 2-rank NCCL run of gossip_local (one epoch), and one with hierarchy=node (its node groups).
# Logs and JSON go to $OUT (default runs/gpu_check); the summary lists each check's status and time, then the codec
# table. Every check has a time limit (GPU_CHECK_LIMIT seconds, default 900); the exit status is 1 if any check
# failed, 2 if no GPU is visible. On a machine without a package registry: DOPT_SKIP_INSTALL=1 (scripts/_env.sh).
DOPT_EXTRAS="dev"
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
set +e
OUT=${OUT:-runs/gpu_check}
LIMIT=${GPU_CHECK_LIMIT:-900}
mkdir -p "$OUT"
SUMMARY=()
FAILED=0

check() {  # check NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "[gpu_check] $name: $*"
  timeout --kill-after=30 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  if [[ $code -eq 0 ]]; then status=PASS; else status="FAIL (exit $code$([[ $code -eq 124 ]] && echo ", timed out"))"; FAILED=1; fi
  SUMMARY+=("$(printf '%-16s %-28s %5d s   %s' "$name" "$status" $((SECONDS - start)) "$OUT/$name.log")")
}

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [[ "${GPUS:-0}" -lt 1 ]]; then
  echo "[gpu_check] no CUDA GPU visible to torch ($("$PY" -c "import torch; print(torch.__version__)")): nothing to check"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.csv" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, [torch.cuda.get_device_name(i) for i in range($GPUS)])" \
  > "$OUT/torch.txt" 2>&1

VISION=("$PY" -m recipes.vision fit --config recipes/vision/configs/quick.yaml --trainer.accelerator=gpu
        --trainer.precision=bf16-mixed --trainer.max_epochs=1 --trainer.logger=false)
check cuda_tests "$LIMIT" "$PY" -m pytest -q -rs -k cuda tests/unit
check vision_bf16 "$LIMIT" "${VISION[@]}" --trainer.devices=1
check simulated_bf16 "$LIMIT" "${VISION[@]}" --config recipes/vision/configs/strategies/simulated.yaml
check codecs "$LIMIT" "$PY" benchmarks/codec_throughput.py --sizes 16000000 268435456 --min-run-time 0.5 \
  --json "$OUT/codecs.json"
if [[ "$GPUS" -ge 2 ]]; then
  check nccl_gossip "$LIMIT" "${VISION[@]}" --trainer.devices=2
  # hierarchy=node on one node of 2 GPUs: NCCL subgroups (node all-reduce every step, shard broadcasts at rounds)
  check nccl_node "$LIMIT" "${VISION[@]}" --trainer.devices=2 --config recipes/vision/configs/strategies/gossip_node.yaml
fi

echo
echo "[gpu_check] $(cat "$OUT/torch.txt"); $GPUS GPU(s)"
printf '%s\n' "${SUMMARY[@]}"
grep -h "test accuracy\|test_acc" "$OUT"/vision_bf16.log "$OUT"/simulated_bf16.log 2>/dev/null | tail -n 4
grep "^|" "$OUT/codecs.log" 2>/dev/null
exit $FAILED
