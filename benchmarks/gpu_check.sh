#!/usr/bin/env bash
# What a GPU user checks first, in under 8 minutes on one CUDA machine (random weights, nothing downloaded):
#   1. bf16 MFU of one training step of ViT-S + the LLaMA-7B-shaped frozen block (imagenet_deit_small_llama,
#      batch 256): the step's counted FLOPs / its median time / the GPU's peak dense bf16 FLOP/s;
#   2. the same with 2-rank NCCL DDP when the machine has 2 GPUs (time per step includes the all-reduce);
#   3. the video config's (ssv2_videomae_small_llama) peak memory at batch 24 (torch.cuda.max_memory_allocated over
#      a whole training step, measured after the warm-up), and its step time and MFU beside it.
# Each is `frozenlm bench --config ... --llm_random` (frozenlm.bench_config); the figures go to $OUT/*.json
# and a summary to stdout.
#
#   bash benchmarks/gpu_check.sh [--peak_tflops 989] [--out DIR]
#   bash benchmarks/gpu_check.sh --dry      # CPU, tiny shapes: checks the script itself (tests/test_bench.py)
#
# --peak_tflops: the GPU's dense bf16 tensor peak; default from the device name (H100/H200 SXM 989, A100 312,
# L40S 362, RTX 4090 165, RTX 3090 71; NVIDIA's datasheets), else it must be given.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY=0
PEAK=""
OUT=${OUT:-runs/gpu_check}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --peak_tflops) PEAK=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

json_list() { $PYTHON -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"; }
IMAGE_CONFIG=configs/imagenet_deit_small_llama.yaml
VIDEO_CONFIG=configs/ssv2_videomae_small_llama.yaml
if [ "$DRY" = 1 ]; then
  # Tiny shapes on the CPU: the same commands and the same summary code; a ViT-S of 2 blocks at 32 px with a
  # LLaMA-shaped block of width 64 (one layer, of 32),, batch 2; the "video" a 2-layer VideoMAE on 4 frames of 32 px.
  # GPU_CHECK_DRY_GPUS=2 also runs the DDP part (2 CPU processes, gloo).
  DEVICE=cpu; GPUS=${GPU_CHECK_DRY_GPUS:-0}; PEAK=${PEAK:-1}; IMAGE_BATCH=2; VIDEO_BATCH=2
  $PYTHON -c "import sys; from frozenlm.bench_config import write_lm_shape; write_lm_shape('llama', 64, 128, 2, 32, sys.argv[1])" "$OUT/tiny_lm"
  IMAGE_ARGS=("--model.llm.checkpoint=$OUT/tiny_lm" --model.img_size=32 --data.img_size=32 --model.patch_size=8
              '--model.backbone_kwargs={"depth": 2}' --data.num_workers=0)
  VIDEO_ARGS=("--model.llm.checkpoint=$OUT/tiny_lm" --model.num_frames=4 --data.num_frames=4 --model.img_size=32
              --data.img_size=32 --data.num_workers=0
              '--model.backbone_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}')
  DDP=(--trainer.devices=2 --trainer.strategy=ddp --trainer.accelerator=cpu)  # gloo: the same launcher as NCCL
else
  DEVICE=cuda
  GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
  if [ "$GPUS" -lt 1 ]; then echo "gpu_check.sh: no CUDA device (torch.cuda.device_count() is 0); --dry runs on the CPU" >&2; exit 2; fi
  IMAGE_BATCH=256; VIDEO_BATCH=24; IMAGE_ARGS=(); VIDEO_ARGS=()
  DDP=(--trainer.devices=2 --trainer.strategy=ddp)
fi
BENCH=($PYTHON -m frozenlm.cli bench --llm_random true --quiet true --device "$DEVICE" --threads "[1]")

echo "== 1. ViT-S + LLaMA-7B-shaped block, batch $IMAGE_BATCH, one device"
"${BENCH[@]}" --config "$IMAGE_CONFIG" --batch_size "$IMAGE_BATCH" \
  --args "$(json_list ${IMAGE_ARGS[@]+"${IMAGE_ARGS[@]}"})" --output "$OUT/image_1gpu.json"
if [ "$GPUS" -ge 2 ]; then
  echo "== 2. the same, 2-rank DDP (NCCL on GPUs), batch $IMAGE_BATCH per rank"
  "${BENCH[@]}" --config "$IMAGE_CONFIG" --batch_size "$IMAGE_BATCH" \
    --args "$(json_list ${IMAGE_ARGS[@]+"${IMAGE_ARGS[@]}"} "${DDP[@]}")" --output "$OUT/image_ddp2.json"
else
  echo "== 2. skipped: $GPUS GPU(s), DDP needs 2"
fi
echo "== 3. video config, peak memory at batch $VIDEO_BATCH"
"${BENCH[@]}" --config "$VIDEO_CONFIG" --batch_size "$VIDEO_BATCH" --loader_batches 1 \
  --args "$(json_list ${VIDEO_ARGS[@]+"${VIDEO_ARGS[@]}"})" --output "$OUT/video_peak.json"

$PYTHON - "$OUT" "$PEAK" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path

out, peak, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
PEAKS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "4090": 165, "3090": 71}
if not peak:
    import torch
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    if peak is None:
        sys.exit(f"gpu_check.sh: no known bf16 peak for {name}: pass --peak_tflops")
peak = float(peak) * 1e12
summary = {"device": device, "peak_tflops": peak / 1e12}
for name in ("image_1gpu", "image_ddp2"):
    path = out / f"{name}.json"
    if path.exists():
        row = json.loads(path.read_text())[0]
        step = row["timings"][0]
        summary[name] = {"batch": row["batch"], "step_ms": step["step_ms"], "tflops": step["step_tflops"],
                         "mfu": step["step_tflops"] * 1e12 / peak, "peak_mem_mib": row["peak_mem_mib"],
                         "weights": row["weights"]}
video = json.loads((out / "video_peak.json").read_text())[0]
step = video["timings"][0]
summary["video"] = {"config": video["config"], "batch": video["batch"], "peak_mem_mib": video["peak_mem_mib"],
                    "activation_mib_per_sample": video["activation_mib_per_sample"], "step_ms": step["step_ms"],
                    "mfu": step["step_tflops"] * 1e12 / peak}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
