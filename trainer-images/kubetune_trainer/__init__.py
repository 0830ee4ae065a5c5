"""kubetune's trainer package: shared pieces (`common`, `data`) and one subpackage per backend.

The operator mounts one JSON config file into the pod (docs/CONTRACT.md); each
backend's entrypoint reads it and nothing else.
"""
