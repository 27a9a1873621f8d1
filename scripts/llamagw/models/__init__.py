"""models: what llama-server serves (GGUF header; catalog, router later). Stdlib and errors."""
