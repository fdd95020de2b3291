"""Corpora every machine can build: Python's standard-library sources and synthetic
retrieval (passkey) documents."""
