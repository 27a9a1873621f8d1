"""llamagw: the gateway's library. Empty on purpose: `import llamagw.config` loads no more."""
