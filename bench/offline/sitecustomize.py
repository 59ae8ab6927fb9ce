"""Put on PYTHONPATH by bench/gpu_check.sh: datasets and trl become absent, as on the GPU machine.

So a module-level import of either on the script's path fails in the CPU dry run too, instead of first on the
GPU. A None entry in sys.modules makes ``import`` raise ModuleNotFoundError and ``importlib.util.find_spec``
return None, which is how transformers and peft decide an optional package is not installed.
"""

import sys

for name in ("datasets", "trl"):
    sys.modules[name] = None
