"""How many parameters a downloaded model has, from its safetensors headers alone.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that
gives every tensor's shape, so the count costs one small read per file, not the weights.
The operator's memory check uses it for a Model whose spec states no `parameters`."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

# A header is a few hundred KB even for the largest checkpoints; a bigger one is not safetensors.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def safetensors_parameters(directory: Path) -> int | None:
    """The elements of every tensor in the directory's *.safetensors files (sharded
    checkpoints included), or None when there are none or one cannot be read."""
    total = 0
    files = sorted(directory.rglob("*.safetensors"))
    if not files:
        return None
    for path in files:
        try:
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > MAX_HEADER_BYTES:
                    return None
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total
