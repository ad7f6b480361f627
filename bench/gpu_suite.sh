#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py): decode tokens/s against the HBM roofline, and a TOPD
# step's tokens/s and MFU at 4k and 8k tokens, on one H100/H200 with random-weight Qwen3-1.7B
# (student) / Qwen3-8B (teacher).
#
#   pip install -e ".[gpu]"
#   bash bench/gpu_suite.sh                  # H200 defaults (4.8 TB/s, 989 TFLOP/s)
#   bash bench/gpu_suite.sh --gpu h100       # H100 SXM defaults (3.35 TB/s)
#   bash bench/gpu_suite.sh --tiny           # tiny models on CPU: checks the script (about a minute, compile-bound)
# Other flags: python bench/gpu_suite.py --help. Results also as JSON with --json FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=0
for arg in "$@"; do
  case "$arg" in --tiny|--dry-run) tiny=1 ;; esac
done
if [ "$tiny" = 1 ]; then
  # 1 device is enough; keep XLA off the GPU so the check runs anywhere
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
else
  backend=$(python -c "import jax; print(jax.default_backend())")
  if [ "$backend" != "gpu" ]; then
    echo "gpu_suite: jax sees backend '$backend', not a GPU (pip install -e \".[gpu]\"; or --tiny for a CPU check)" >&2
    exit 2
  fi
fi
exec python bench/gpu_suite.py "$@"
