#!/usr/bin/env bash
# One prepared check on a GPU machine (run from the repository root):
#  1. the rule-math and training tests with every stage on CUDA;
#  2. every rule on the CNNs (vgg, resnet, dni_cnn) at K=4 on CIFAR-shaped synthetic data,
#     in-process on one GPU: samples/s and peak GPU memory, from summary.json;
#  3. the Ray runtime there: a worker on the GPU, bench_cpu.yaml with K=4 CPU workers on the
#     machine's cores, and coordinator-trained cDNI at K=4 with cores to spare.
# Needs torch with CUDA, pyyaml, tqdm, scikit-learn, pillow, tensorboard, pytest; pydantic and
# ray come as wheels in .whl/ on machines without a package index (installed to /tmp/site).
set -uo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
out="${OUT:-/tmp/gpu_check}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cpus', __import__('os').cpu_count())"

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== 1. tests on CUDA"
  DECOUPLED_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_rules_math.py tests/test_training.py 2>&1 | tail -2
fi

echo "== 2. every rule in-process on the GPU"
for model in vgg resnet dni_cnn; do
  python3 -m decoupled compare --config configs/gpu_check.yaml model.name=$model name=gpu-$model \
    output.dir="$out/runs" train.progress=false 2>&1 | grep -E "^error|Error" || true
done
table() {
python3 - "$@" <<'PY'
import json, pathlib, sys
print(f"{'config':14} {'run':15} {'samples/s':>10} {'x first':>8} {'peak MiB':>9} {'test acc':>8}")
for comp in sorted(pathlib.Path(sys.argv[1]).glob(sys.argv[2])):
    data = json.loads(comp.read_text())
    first = data["runs"][0]["samples_per_sec"]
    for r in data["runs"]:
        print(f"{data['name']:14} {r['label']:15} {r['samples_per_sec']:10.0f} {r['samples_per_sec'] / first:8.2f}"
              f" {r['peak_memory_mb']:9.0f} {r['test_accuracy']:8.3f}")
PY
}
table "$out/runs" "gpu-*/comparison.json"

echo "== 3a. a Ray worker on the GPU (single-worker schedule)"
python3 -m decoupled train --config configs/gpu_check.yaml runtime=ray split.stages=1 name=ray-gpu \
  method.name=backprop method.schedule=single output.dir="$out/runs" train.progress=false 2>&1 | tail -1

echo "== 3b. bench_cpu.yaml with K=4 CPU workers"
python3 -m decoupled compare --config configs/bench_cpu.yaml split.stages=4 train.device=cpu \
  cluster.gpus_per_worker=0 name=bench-k4 output.dir="$out/runs" train.progress=false 2>&1 | grep -E "^error|Error" || true
table "$out/runs" "bench-k4/comparison.json"

echo "== 3c. coordinator-trained cDNI at K=4 on digits, cores to spare, against in-process"
python3 - "$out/runs" <<'PY'
import sys
sys.path.insert(0, "tests")
import decoupled
from test_ray_runtime import digits
out = __import__("pathlib").Path(sys.argv[1])
cdni = {"name": "dni", "conditioned": True}
ray_run = decoupled.train(digits(out / "cdni", 4, method=cdni, cluster={"cpus_per_worker": 1}))
ref = decoupled.train(digits(out / "cdni-ref", 4, runtime="inprocess", method=cdni))
print("cdni K=4 ray", round(ray_run["test_accuracy"], 4), "inprocess", round(ref["test_accuracy"], 4),
      "dropped", [s.get("dropped_samples", 0) for s in ray_run["stage_stats"]])
PY
