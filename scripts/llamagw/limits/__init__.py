"""limits: keys, rate and concurrency limits, admission. Imports config and errors only."""
