"""The llama-gguf-inference gateway package."""
