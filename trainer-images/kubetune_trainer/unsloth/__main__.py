"""`python -m kubetune_trainer.unsloth --config /etc/kubetune/config.json` (the image's entrypoint)."""

from __future__ import annotations

import argparse

from kubetune_trainer.common import load_config, run_with_termination_log
from kubetune_trainer.common.config import DEFAULT_CONFIG_PATH


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer.unsloth", description="Run an UnslothJob from its mounted trainer config."
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="the trainer config file (docs/CONTRACT.md)")
    options = parser.parse_args(argv)
    # Imported here so that a config error is reported before torch/unsloth load.
    from kubetune_trainer.unsloth.train import run

    run(load_config(options.config), handle_signals=True)
    return 0


if __name__ == "__main__":
    run_with_termination_log(main)
