"""frozenlm: frozen transformer blocks from pretrained language models inside visual encoders.

`frozenlm.create_model(name)` builds a shipped config's plain model (`frozenlm.list_models()` names
them), `frozenlm.load_model(checkpoint)` gives a trained one; see [`registry`][frozenlm.registry].
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_model"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import frozenlm` (the CLI's start) stays free of torch.
    if name in __all__:
        from frozenlm import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'frozenlm' has no attribute {name!r}")
