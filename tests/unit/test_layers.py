"""The layering of DESIGN.md: the engine and the algorithm objects import without Lightning (checked in a fresh
interpreter where any ``lightning`` import fails), so only the adapters, callbacks and launchers know Lightning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ENGINE_MODULES = ("engine", "options", "combinations", "replica", "rounds", "compressed_rounds", "inprocess",
                  "gradients", "scaling", "pacing", "topology", "compress", "topk", "group_max", "aggregate", "comm",
                  "traffic", "hierarchy")
KERNEL_MODULES = ("quant_kernels",)  # engine layer too, but they import Triton: checked where it is installed
PACKAGE = Path(__file__).resolve().parents[2] / "lightning_dopt"

SCRIPT = f"""
import importlib, importlib.util, sys, types

class NoLightning:
    def find_spec(self, name, path=None, target=None):
        if name == "lightning" or name.startswith(("lightning.", "pytorch_lightning")):
            raise ImportError("imported " + name)

sys.meta_path.insert(0, NoLightning())
package = types.ModuleType("lightning_dopt")  # the modules alone, without the package __init__ (which registers)
package.__path__ = [{str(PACKAGE)!r}]
sys.modules["lightning_dopt"] = package
for name in {ENGINE_MODULES!r}:
    importlib.import_module("lightning_dopt." + name)
if importlib.util.find_spec("triton") is not None:
    for name in {KERNEL_MODULES!r}:
        importlib.import_module("lightning_dopt." + name)
"""


def test_engine_and_algorithm_objects_import_without_lightning() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_module_is_in_a_layer() -> None:
    adapters = {"__init__", "strategy", "simulation", "signals", "checkpoint_files", "callbacks", "launchers"}
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == adapters | set(ENGINE_MODULES) | set(KERNEL_MODULES), "a new module: add it to its layer here and in docs/strategy.md"
