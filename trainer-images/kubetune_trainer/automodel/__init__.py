"""The Automodel trainer: our own loop on torch + transformers + peft with PyTorch-native parallelism.

Entrypoint: `python -m kubetune_trainer.automodel --config /etc/kubetune/config.json`
(single process, under torchrun, or in a PyTorchJob pod, see `distributed`).
"""
