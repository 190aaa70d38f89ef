"""Test setup shared by every test file: the repository root is importable (`stages`, `schemas`)
whether or not the project is pip-installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
