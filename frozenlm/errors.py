"""The errors a user can fix: each message says what is wrong, names the file or setting, and the fix."""

from __future__ import annotations


class FrozenLMError(Exception):
    """Base of the errors whose message is the whole story (a missing dataset, a damaged file, an
    unwritable output, a non-finite loss): the console script prints it as one line, exit status 2."""


class ConfigurationError(FrozenLMError):
    """The configuration cannot be turned into a run (a class raised while being built from it, settings
    that contradict each other, or the checkpoint to resume is damaged); the message is the reason."""
