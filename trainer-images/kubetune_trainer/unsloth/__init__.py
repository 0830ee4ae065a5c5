"""The Unsloth trainer: single-GPU LoRA / full-weight SFT on unsloth + trl.

`mapping` is pure (spec -> Unsloth/trl kwargs, and what the device changes);
`train` runs it; `python -m kubetune_trainer.unsloth --config FILE` is the
image's entrypoint. Importing this package imports neither torch nor unsloth.
"""
