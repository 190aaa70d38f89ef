"""The DVC stages: one module each, `run(cfg) -> metrics` and a `python -m stages.<name>` CLI, over posttrain/."""
