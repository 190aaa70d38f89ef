"""Corpus: raw domain text for continued pretraining."""

import pandera.pandas as pa
from pandera.typing import Series

from schemas import checks


class CorpusSchema(pa.DataFrameModel):
    text: Series[str]

    @pa.check("text", element_wise=True, name="non_empty")
    def _non_empty(cls, x) -> bool:
        return checks.non_empty(x)

    @pa.check("text", element_wise=True, name="max_chars")
    def _max_chars(cls, x) -> bool:
        return checks.max_chars(x)

    class Config:
        strict = True
