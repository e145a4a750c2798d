#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU and CuPy, PyTorch (CUDA) and JAX (CUDA) installed.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# 1. The GPU tests (`pytest -m gpu`, four workers): the hand-written MLP on CuPy arrays, torch CUDA
#    tensors and JAX GPU arrays, and the torch/JAX adapters on the GPU, each compared with the float64
#    NumPy reference on the CPU (1e-10 in float64), including an MNIST-sized 784-512-512-10 network,
#    and the report's CNN and transformer against brute force.
# 2. The CNN benchmark on CUDA (benchmarks/cnn.py --device cuda --jax): the digits CNN, every field in
#    float64, in torch and in Flax through JAX, and the ReLU ResNet-8 in float32 (BackPACK beside them
#    where it is installed).
# 3. The MNIST-sized benchmark (benchmarks/speed.py --parts mnist --device gpu --dtypes float64):
#    `analyze` on 60,000 inputs with every GPU backend, time and peak memory (add float32 with
#    GPU_CHECK_DTYPES=float64,float32).
#
# Measured on an H200 (2026-11-28): tests 104 s on four workers (120 tests; JAX compiling the transformer's
# Hessian programs, 68 s, dominates), the CNN benchmark about 60 s, the MNIST-sized one about 40 s.
# -p no:benchmark: pytest-benchmark, where installed, warns under xdist, and the suite makes warnings errors.
#
# Each step stops after GPU_CHECK_STEP_TIMEOUT seconds (default 300), so that one slow step leaves the
# others their time on a short lease.
#
# Pure-Python wheels found in .whl/ (array-api-compat, and BackPACK with unfoldNd, for an offline machine) are installed first.
# Logs and results go to $OUT when it is set (else /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/fishercore-site
rm -rf "$site"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp}"
start=$SECONDS
{
    nvidia-smi -L || true
    python3 -c "import numpy, torch, jax, cupy; print('numpy', numpy.__version__, 'torch', torch.__version__, \
'jax', jax.__version__, jax.devices(), 'cupy', cupy.__version__)"
    # -P (PYTHONSAFEPATH for the test workers): the source folder must not shadow the installed package (fishercore.backends lives in backends/)
    # every step runs even when one before it fails (a GPU lease is short); the exit status is the first failure's
    status=0
    step() { timeout "${GPU_CHECK_STEP_TIMEOUT:-300}" "$@" || { s=$?; [ "$status" -ne 0 ] || status=$s; }; }
    # JAX takes the memory it needs, not 75 % of the GPU, so that four test workers share it
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    step env PYTHONSAFEPATH=1 FISHERCORE_BACKENDS=numpy,cupy,torch-cuda,jax-gpu python3 -m pytest tests -q -p no:cacheprovider -p no:benchmark \
        -m gpu -n 4 --dist loadfile --durations=5 "$@"
    echo "tests: $((SECONDS - start)) s"
    step env PYTHONPATH="$PYTHONPATH:benchmarks" python3 -P benchmarks/cnn.py --device cuda --repeat 3 --jax
    step python3 -P benchmarks/speed.py --parts mnist --device gpu --dtypes "${GPU_CHECK_DTYPES:-float64}" --out "$out"
    echo "total: $((SECONDS - start)) s"
    exit "$status"
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
