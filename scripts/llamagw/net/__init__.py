"""net: the event loop's edge (transports, connections, upstream pool, relay). Not app."""
