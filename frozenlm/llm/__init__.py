"""Loading and wrapping frozen transformer blocks from pretrained language models."""

from frozenlm.llm.block import FrozenLMBlock, LLMConfig, apply_block, build_block
from frozenlm.llm.checkpoint import LMCheckpoint
from frozenlm.llm.families import FAMILIES, LMFamily
from frozenlm.llm.mixin import FrozenLMMixin, create_block

__all__ = [
    "FAMILIES", "FrozenLMBlock", "FrozenLMMixin", "LLMConfig", "LMCheckpoint", "LMFamily", "apply_block", "build_block",
    "create_block",
]
