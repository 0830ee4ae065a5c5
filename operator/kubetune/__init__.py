"""kubetune: LLM fine-tuning jobs as Kubernetes resources."""

__version__ = "0.1.0"
