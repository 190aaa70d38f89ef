"""Pipeline stages: one module per stage, each with `run(cfg) -> metrics` and a `python -m stages.<name>` CLI."""

import os

# Nothing downloads at run time: models and data come from this repo or local paths.
# Export HF_HUB_OFFLINE=0 to let a stage fetch a Hugging Face id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
