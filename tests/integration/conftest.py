"""Make ``lightning_models`` and ``combination_matrix`` importable here and in the spawned rank processes (they
inherit sys.path), and the distributed tests' ``helpers`` (``run_ranks``)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
sys.path.insert(0, os.path.dirname(__file__))
