#!/usr/bin/env bash
# Retrain PNet on the realistic scenes on a bare GPU machine (torch + numpy + scipy only),
# then measure the models' throughput there. From the project root, with the GalSim asset
# library built beforehand (python -m training.detector_assets) and carried:
#   OUT=/some/dir bash training/gpu_train.sh [time budget for training, s]
# Writes $OUT/detector.pt, detector.json, detector.jsonl, train.log, gpu_models_{shipped,new}.json.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
budget=${1:-330}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, numpy, scipy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cpus', __import__('os').cpu_count())"
python3 -m benchmarks.gpu_models --device cuda --seconds 4 --out "$OUT/gpu_models_shipped.json" > /dev/null &
wait
python3 -m training.train_detector --generator scenes --assets training/assets/detector_assets.npz \
  --device cuda --workers 14 --batch 64 --lr 2e-3 --time-budget-s "$budget" \
  --init survey_proc/models/detector.pt --val-tiles 1024 --val-every 1000 --bn-batches 32 \
  --out "$OUT/detector.pt" --log "$OUT/detector.jsonl" 2>&1 | grep -v UserWarning | tee "$OUT/train.log"
python3 -m benchmarks.gpu_models --device cuda --seconds 4 --detector "$OUT/detector.pt" --out "$OUT/gpu_models_new.json"
