"""llama-gguf-inference gateway package."""
