"""Drop buildah's layer cache of superseded builds, keep the cache of the current ones.

`buildah build --layers` keeps an unnamed image per Dockerfile step: the cache that makes a
warm build take seconds. When a step changes (a new pin, a new COPY before the pip step),
the old chain stays behind: gigabytes per trainer image, and `buildah rmi --prune` would
drop the current chain's cache too. This removes exactly the unnamed images whose top
layer is in no named image's layer chain: those no current image is built on.

Reads containers/storage's overlay metadata (images.json, layers.json) under buildah's
GraphRoot; removes with `buildah rmi`. Prints what it freed.
Usage: python3 hack/prune-image-cache.py [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def graph_root() -> Path:
    info = json.loads(subprocess.run(["buildah", "info"], capture_output=True, text=True, check=True).stdout)
    return Path(info["store"]["GraphRoot"])


def stale_images(images: list[dict[str, object]], layers: list[dict[str, object]]) -> list[str]:
    """Unnamed images whose top layer no named image is built on."""
    parent = {str(layer["id"]): layer.get("parent") for layer in layers}
    kept: set[str] = set()
    for image in images:
        if image.get("names"):
            layer = image.get("layer")
            while isinstance(layer, str) and layer not in kept:
                kept.add(layer)
                layer = parent.get(layer)
    return [str(i["id"]) for i in images if not i.get("names") and i.get("layer") not in kept]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed")
    args = parser.parse_args()
    root = graph_root()
    images_file, layers_file = root / "overlay-images" / "images.json", root / "overlay-layers" / "layers.json"
    if not images_file.is_file() or not layers_file.is_file():
        print(f"prune-image-cache: no overlay storage under {root}; nothing to do", file=sys.stderr)
        return 0
    stale = stale_images(json.loads(images_file.read_text()), json.loads(layers_file.read_text()))
    if args.dry_run or not stale:
        print(f"prune-image-cache: {len(stale)} superseded cache image(s)", file=sys.stderr)
        for image in stale:
            print(image)
        return 0
    removed = subprocess.run(["buildah", "rmi", *stale], capture_output=True, text=True, check=False)
    if removed.returncode != 0:
        print(f"prune-image-cache: buildah rmi failed: {removed.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"prune-image-cache: removed {len(stale)} superseded cache image(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
