"""Refusal examples: a harmful request and the refusal the model should give."""

import pandera.pandas as pa
from pandera.typing import Series

from schemas import checks


class RefusalSchema(pa.DataFrameModel):
    prompt: Series[str]
    response: Series[str]

    @pa.check("prompt", "response", element_wise=True, name="non_empty")
    def _non_empty(cls, x) -> bool:
        return checks.non_empty(x)

    @pa.check("prompt", "response", element_wise=True, name="max_chars")
    def _max_chars(cls, x) -> bool:
        return checks.max_chars(x)

    class Config:
        strict = True
