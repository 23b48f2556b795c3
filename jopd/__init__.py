"""jopd: on-policy distillation of Qwen3 models in JAX."""
import os

# XLA:CPU sends each matmul to YNNPACK on its own instead of fusing the neighbouring reductions and elementwise
# ops into YNNPACK subgraphs: the fused subgraphs ran the attention softmax several times slower (bench model,
# bf16: train step 10.5 -> 8.2 s, sampling 1,059 -> 1,104 tok/s at batch 16, scoring 2,795 -> 3,067 tok/s;
# docs/performance.md). It only takes effect if set before JAX starts its CPU backend (importing jopd first is
# enough), touches no other backend, and a user's own choice of the flag wins.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_YNN_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT").strip()
