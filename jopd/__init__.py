"""jopd: on-policy distillation of Qwen3 models in JAX."""
