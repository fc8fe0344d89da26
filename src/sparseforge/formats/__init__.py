"""Saving and loading artifacts: Hugging Face safetensors checkpoints plus sparseforge.json."""
