"""What every model config shares: building it from a task's flat hyper-parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from frozenlm.llm import LLMConfig

Config = TypeVar("Config", bound="FromHParams")


class FromHParams:
    """Mixed into a model config dataclass: `from_hparams`."""

    @classmethod
    def from_hparams(cls: type[Config], values: Mapping[str, Any], **overrides: Any) -> Config:
        """The config from a task's hyper-parameters (the fields they hold), then `overrides`; an `llm` dict
        (as hyper-parameters store it) becomes an [`LLMConfig`][frozenlm.llm.LLMConfig]."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in dict(values).items() if k in names} | overrides
        if isinstance(fields.get("llm"), Mapping):
            fields["llm"] = LLMConfig(**fields["llm"])
        return cls(**fields)
