#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU and CuPy, PyTorch (CUDA) and JAX (CUDA) installed.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Runs every test parametrized over a GPU backend — the hand-written MLP on CuPy arrays, torch
# CUDA tensors and JAX GPU arrays, and the torch/JAX adapters on the GPU — each compared with the
# float64 NumPy reference on the CPU (1e-10). Pure-Python wheels found in .whl/ (array-api-compat,
# for an offline machine) are installed first. Output also goes to $OUT/gpu_check.log when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/fishercore-site
rm -rf "$site"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
log="${OUT:-/tmp}/gpu_check.log"
{
    nvidia-smi -L || true
    python3 -c "import numpy, torch, jax, cupy; print('numpy', numpy.__version__, 'torch', torch.__version__, \
'jax', jax.__version__, jax.devices(), 'cupy', cupy.__version__)"
    # -P: the source folder must not shadow the installed package (fishercore.backends lives in backends/)
    FISHERCORE_BACKENDS=numpy,cupy,torch-cuda,jax-gpu python3 -P -m pytest tests -q -p no:cacheprovider \
        -k "cupy or cuda or gpu" --durations=5 "$@"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
