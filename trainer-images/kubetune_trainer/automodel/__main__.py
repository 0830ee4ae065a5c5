"""`python -m kubetune_trainer.automodel --config PATH`."""

from __future__ import annotations

import argparse
import os
import sys

from kubetune_trainer.common.config import DEFAULT_CONFIG_PATH, load_config
from kubetune_trainer.common.termination import run_with_termination_log


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer.automodel", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="trainer config file (docs/CONTRACT.md)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)

    from kubetune_trainer.automodel.distributed import torchrun_command
    from kubetune_trainer.automodel.settings import parse_settings

    command = torchrun_command(argv, parse_settings(cfg).parallel)
    if command is not None:
        print(f"kubetune-trainer: relaunching under torchrun: {' '.join(command)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.execv(command[0], command)

    from kubetune_trainer.automodel.train import train

    return train(cfg)


if __name__ == "__main__":
    run_with_termination_log(main)
