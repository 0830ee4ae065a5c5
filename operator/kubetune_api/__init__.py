"""kubetune's API: the one typed contract between the operator, `kubetune run` and the trainers.

pydantic only (no kopf, no torch), so that every side installs the same models:
the job specs (`automodel`, `unsloth`), the entities (`entities`), the status
(`status`), the trainer config file (`trainer_config`) and every name shared
across the boundary (`constants`). The CRDs are generated from these models.
"""
