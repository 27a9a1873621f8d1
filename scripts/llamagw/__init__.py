"""llama-gguf-inference gateway package: empty on purpose, so an entry imports only what it names."""
