#!/usr/bin/env bash
# The CUDA paths, in under 5 minutes on one GPU: fp16 training with the grad scaler, bf16, fp32,
# channels_last, EMA, the fp32 evaluation, the training-loop overhead bench, the fp32-vs-half
# ensemble benchmark, an online distillation in fp16 and a 2-fold cross-validation in bf16.
# Installs nothing: run it where torch and the project's dependencies are importable (PYTHONPATH=.
# from the repository root). Results (logs and JSON) go to $OUT (default: ./gpu_check_out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PY:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || true
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"

DATA="$OUT/demo"
[ -f "$DATA/train.csv" ] || $PY -m aicoss_cli demo-data "$DATA" --n-train 3000 --n-test 1000 --size 64 > /dev/null

for precision in fp16 bf16 fp32; do
  $PY -m aicoss_cli train recipes/demo.toml --data "$DATA" --out "$OUT/runs_$precision" \
      --set runtime.device=cuda --set runtime.precision=$precision --set runtime.channels_last=true \
      --set runtime.num_workers=4 --set optim.epochs=3 --set optim.ema_decay=0.999 > "$OUT/train_$precision.log" 2>&1
  tail -n 12 "$OUT/train_$precision.log"
done

# metrics.csv's val mAP (fp32 evaluation) equals predict --split val, also for a model trained in fp16
CKPT=$(ls "$OUT"/runs_fp16/demo/*/best.safetensors)
$PY -m aicoss_cli predict "$CKPT" --split val --out "$OUT/fp16_val.csv" --json > "$OUT/predict_fp16_val.json"

$PY bench/train_overhead.py --device cuda --precision bf16 --batch-size 256 --size 64 --steps 10 --rounds 3 \
    --workers 4 --json > "$OUT/train_overhead_cuda.json"
cat "$OUT/train_overhead_cuda.json"

CKPTS=$(ls "$OUT"/runs_*/demo/*/best.safetensors)
$PY -m aicoss_cli benchmark-fp16 $CKPTS --data "$DATA" --json > "$OUT/benchmark_fp16.json"
cat "$OUT/benchmark_fp16.json"

# distillation on CUDA: the three runs above teach one fp16 student online (each teacher resized on the
# device, in the eval precision), then a 2-fold cross-validation of the demo recipe in bf16
TEACHERS=$(for d in "$OUT"/runs_*/demo/*/; do printf -- '--teacher %s ' "$d"; done)
$PY -m aicoss_cli distill recipes/demo.toml --data "$DATA" --out "$OUT/runs_distill" $TEACHERS --unlabeled test \
    --set runtime.device=cuda --set runtime.precision=fp16 --set runtime.channels_last=true \
    --set runtime.num_workers=4 --set optim.epochs=3 > "$OUT/distill.log" 2>&1
tail -n 14 "$OUT/distill.log"
$PY -m aicoss_cli train recipes/demo.toml --data "$DATA" --out "$OUT/runs_cv" --folds 2 \
    --set runtime.device=cuda --set runtime.precision=bf16 --set runtime.num_workers=4 \
    --set optim.epochs=2 > "$OUT/cv.log" 2>&1
tail -n 10 "$OUT/cv.log"
