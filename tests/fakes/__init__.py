"""Test doubles: stand-ins for the systems around the gateway (llama-server), stdlib only.

They never import from scripts/: a fake is the independent counterpart of the code under test.
"""
