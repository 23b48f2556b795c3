#!/usr/bin/env bash
# One call on a lent GPU machine (run from the repo root with that machine's python3, which has CUDA JAX, torch
# and transformers): the model / sampler / scoring / loss tests on the GPU, then the sample and score benches
# (jopd vs transformers on the same chip). Full logs under $OUT (or ./device_out).
set -uo pipefail
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import jax, torch, transformers; print(jax.__version__, jax.devices(), torch.__version__, transformers.__version__)"
# Single-chip machine: the simulated-mesh tests need 8 devices and stay on CPU runs.
tests=(tests/test_qwen3.py tests/test_lora.py tests/test_sampler.py tests/test_scoring.py tests/test_losses.py)
echo "== tests, default matmul precision"
python3 -m pytest "${tests[@]}" -q -k "not mesh" -p no:cacheprovider 2>&1 | tee "$out/tests_default.log" | tail -25
echo "== tests, JAX_DEFAULT_MATMUL_PRECISION=highest"
JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest "${tests[@]}" -q -k "not mesh" -p no:cacheprovider 2>&1 \
  | tee "$out/tests_highest.log" | tail -8
echo "== benches"
python3 -m bench.sample --repeats 3 --hf_repeats 2 2>&1 | tee "$out/sample.log" | grep -v '^{'
python3 -m bench.score --repeats 5 2>&1 | tee "$out/score.log" | grep -v '^{'
