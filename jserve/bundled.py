"""Paths of the models bundled in the package: trained on the Python standard library
(``scripts/train_tiny_model.py``), so ``LLM()`` completes Python code offline on a fresh install.

``BUNDLED_MODEL``: the target (4 layers, trained with an early exit after layer 2, ``early_exit_layer`` in its
config.json). ``BUNDLED_DRAFT_MODEL``: a 1-layer draft with the same tokenizer, for draft-model speculation.
"""

from pathlib import Path

BUNDLED_MODEL = Path(__file__).parent / "assets" / "tiny-pycoder"
BUNDLED_DRAFT_MODEL = Path(__file__).parent / "assets" / "tiny-pycoder-draft"
