"""Chain-of-thought examples: question, step-by-step rationale, and the final answer alone."""

import pandera.pandas as pa
from pandera.typing import Series

from schemas import checks


class CotSchema(pa.DataFrameModel):
    question: Series[str]
    rationale: Series[str]
    answer: Series[str]

    @pa.check("question", "rationale", "answer", element_wise=True, name="non_empty")
    def _non_empty(cls, x) -> bool:
        return checks.non_empty(x)

    @pa.check("question", "rationale", "answer", element_wise=True, name="max_chars")
    def _max_chars(cls, x) -> bool:
        return checks.max_chars(x)

    @pa.check("answer", element_wise=True, name="no_answer_marker")
    def _no_marker(cls, x) -> bool:
        return not isinstance(x, str) or "####" not in x  # the answer alone, the marker split off

    class Config:
        strict = True
