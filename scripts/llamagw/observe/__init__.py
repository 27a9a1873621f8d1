"""observe: metrics and the access log, fed by app.py. Imports the stdlib only."""
