"""Prompts for distillation and online RL, with a reference answer where one is known."""

import pandera.pandas as pa
from pandera.typing import Series

from schemas import checks


class PromptSchema(pa.DataFrameModel):
    prompt: Series[str]
    answer: Series[str] = pa.Field(nullable=True)

    @pa.check("prompt", "answer", element_wise=True, name="non_empty")
    def _non_empty(cls, x) -> bool:
        return checks.non_empty(x)

    @pa.check("prompt", "answer", element_wise=True, name="max_chars")
    def _max_chars(cls, x) -> bool:
        return checks.max_chars(x)

    class Config:
        strict = True
