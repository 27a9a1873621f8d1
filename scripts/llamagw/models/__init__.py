"""Many models on one worker: llama-server router mode behind the gateway."""
