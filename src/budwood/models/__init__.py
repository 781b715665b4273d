"""Base models: loading by name, local directory or hub id, and fingerprints."""
