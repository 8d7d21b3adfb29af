#!/usr/bin/env bash
# The GPU check, on a machine with one CUDA GPU (H100-class: under 8 minutes). Each figure is printed with
# its ratio to a baseline measured in the same run:
#   1. the demo chain end to end with device: cuda, bf16 and torch.compile (Snakemake, default profile);
#   2. stage-1 training tokens/s and MFU of the `base` preset (219M), against a nanoGPT-style reference
#      (benchmarks/train_throughput.py);
#   3. faiss-gpu K-means on an ImageNet-base-sized sample (D 768, K 8192; faiss's own subsample of
#      256 x K is 2.1M vectors, here 1M), against faiss on the CPU (benchmarks/kmeans.py);
#   4. sampling images/s of the base preset with the KV cache, against recomputing the prefix
#      (benchmarks/sampling.py).
#     bash benchmarks/gpu_check.sh            # from the repository root, after `make setup`
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
# faiss-cpu and faiss-gpu-cu12 install the same module: the GPU build for this check
python -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() else 1)" 2>/dev/null \
    || { pip uninstall -q -y faiss-cpu && pip install -q faiss-gpu-cu12; }
pip install -q -e '.[bench]'
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== 1. the demo chain on the GPU (bf16, compile), against the same chain on the CPU in fp32"
python - "$work" <<'EOF'
import sys, yaml
config = yaml.safe_load(open("config/config.yaml"))
gpu = {**config, "experiment": "demo-gpu", "device": "cuda"}
for section in ("encoder", "vq", "stage1", "stage2"):
    gpu[section] = {**config[section], "precision": "bf16"}
for section in ("stage1", "stage2"):
    gpu[section]["compile"] = True
open(f"{sys.argv[1]}/demo-gpu.yaml", "w").write(yaml.safe_dump(gpu, sort_keys=False))
open(f"{sys.argv[1]}/demo-cpu.yaml", "w").write(yaml.safe_dump({**config, "experiment": "demo-cpu"}, sort_keys=False))
EOF
for run in cpu gpu; do
    start=$(date +%s.%N)
    snakemake --profile workflow/profiles/default --cores all -d "$work" --configfile "$work/demo-$run.yaml" >"$work/$run.log" 2>&1 \
        || { tail -50 "$work/$run.log"; exit 1; }
    eval "seconds_$run=$(python -c "import time; print(time.time() - $start)")"
done
python - "$work" "$seconds_cpu" "$seconds_gpu" <<'EOF'
import json, sys
work, cpu, gpu = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
metrics = json.load(open(f"{work}/results/demo-gpu/metrics.json"))
print(f"demo chain: CPU fp32 {cpu:.0f} s, GPU bf16 + compile {gpu:.0f} s: {cpu / gpu:.2f}x; "
      f"GPU run FID {metrics['fid']:.2f}, IS {metrics['inception_score']:.2f}")
EOF

echo "== 2. stage-1 training, base preset (219M), K=8192, 256 tokens"
python benchmarks/train_throughput.py --preset base --vocab 8192 --batch 64 --device cuda --compile --steps 10

echo "== 3. K-means, D=768, K=8192, 1M vectors: faiss on the GPU against faiss on the CPU"
python benchmarks/kmeans.py --dim 768 --k 8192 --n 1048576 --iterations 3 --repeats 1

echo "== 4. stage-1 sampling, base preset: KV cache against recomputation"
python benchmarks/sampling.py --preset base --vocab 8192 --batch 64 --device cuda --repeats 2
