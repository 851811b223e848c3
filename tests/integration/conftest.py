"""Make ``lightning_models`` importable here and in the spawned rank processes (they inherit sys.path)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
