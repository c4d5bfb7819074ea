#!/usr/bin/env bash
# One prepared GPU check (run on a CUDA machine from the repository root):
#  1. the rule-math and training tests with every stage on CUDA;
#  2. every rule on the CNNs (vgg, resnet, dni_cnn) at K=4 on CIFAR-shaped synthetic data,
#     in-process on one GPU: samples/s and peak GPU memory, from summary.json.
# Needs torch with CUDA, pydantic, pyyaml, tqdm, scikit-learn, pillow, tensorboard, pytest.
# Wheels carried in .whl/ (machines without a package index) are installed to /tmp/site first.
set -euo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/pydantic*.whl \
    .whl/annotated_types*.whl .whl/typing_inspection*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu_check}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

DECOUPLED_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_rules_math.py tests/test_training.py 2>&1 | tail -3

for model in vgg resnet dni_cnn; do
  python3 -m decoupled compare --config configs/gpu_check.yaml model.name=$model name=gpu-$model \
    output.dir="$out/runs" train.progress=false >/dev/null
done
python3 - "$out/runs" <<'PY'
import json, pathlib, sys
print(f"{'model':8} {'run':15} {'samples/s':>10} {'x backprop':>10} {'peak MiB':>9} {'test acc':>8}")
for comp in sorted(pathlib.Path(sys.argv[1]).glob("*/comparison.json")):
    data = json.loads(comp.read_text())
    for r in data["runs"]:
        print(f"{data['name'][4:]:8} {r['label']:15} {r['samples_per_sec']:10.0f} {r['speed_ratio']['backprop']:10.2f}"
              f" {r['peak_memory_mb']:9.0f} {r['test_accuracy']:8.3f}")
PY
