"""Imports run only downwards through the library's layers: server > engine > models > mckernels.

A lower layer that imports a higher one drags the whole stack (and its dependencies) into what
should stand alone: kernels are pure ops, models run without an engine, the engine without a
server. benchmarks/, evals/ and loadtests/ sit above all four and stay out of the wheel, so no
library module may need them. Each layer is checked in a fresh interpreter, so that what one
check imports cannot hide or fake a violation in another.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("benchmarks", "evals", "loadtests")
ABOVE = {
    "mckernels": ("models", "engine", "server"),
    "models": ("engine", "server"),
    "engine": ("server",),
    "server": (),
}

# Imports the package and every module under it, then reports what the interpreter holds.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
walked = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in walked:
    importlib.import_module(name)
ours = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
        if name.split(".")[0] in sys.argv[2:]}
print(json.dumps({"walked": walked, "loaded": sorted(sys.modules), "files": ours}))
"""


def import_everything(layer: str) -> dict:
    """Run IMPORT_ALL for `layer` in a child started in the repository root, so that this
    checkout's packages come before any installed copy."""
    res = subprocess.run([sys.executable, "-c", IMPORT_ALL, layer, *ABOVE, *SCRIPTS], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


@pytest.mark.parametrize("layer", list(ABOVE))
def test_a_layer_imports_nothing_above_it(layer):
    report = import_everything(layer)
    # an editable install elsewhere can still answer for a module this checkout lacks
    strays = {n: f for n, f in report["files"].items() if f and not Path(f).resolve().is_relative_to(ROOT)}
    assert not strays, f"modules loaded from outside {ROOT}: {strays}"
    assert report["walked"], f"no modules found under {layer}"
    forbidden = set(ABOVE[layer]) | set(SCRIPTS)
    offending = [name for name in report["loaded"] if name.split(".")[0] in forbidden]
    assert not offending, f"importing {layer} pulls in {offending}"


def test_the_check_sees_downward_imports():
    """Not vacuous: the engine's modules do load the models and the kernels beneath it."""
    tops = {name.split(".")[0] for name in import_everything("engine")["loaded"]}
    assert {"engine", "models", "mckernels"} <= tops
