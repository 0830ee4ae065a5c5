"""The kubetune API: pydantic models are the single source of truth for the CRDs,
the CLI's validation and the operator's re-validation."""
