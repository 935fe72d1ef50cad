"""frozenlm: frozen transformer blocks from pretrained language models inside visual encoders."""

__version__ = "0.1.0"
