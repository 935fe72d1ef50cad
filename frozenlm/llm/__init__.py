"""Loading and wrapping frozen transformer blocks from pretrained language models."""

from frozenlm.llm.block import FrozenLMBlock, LLMConfig, build_block
from frozenlm.llm.checkpoint import LMCheckpoint
from frozenlm.llm.families import FAMILIES, LMFamily
from frozenlm.llm.mixin import FrozenLMMixin

__all__ = ["FAMILIES", "FrozenLMBlock", "FrozenLMMixin", "LLMConfig", "LMCheckpoint", "LMFamily", "build_block"]
