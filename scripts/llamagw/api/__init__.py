"""api: what is served (routes, CORS, the Ollama API). May import wire, net, models; not app."""
