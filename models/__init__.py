"""Model definitions (Qwen3, LoRA, Hugging Face conversion); nothing about training."""
