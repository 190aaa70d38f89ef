"""Preference pairs: a prompt (messages ending with the user's turn) and two different replies."""

import pandera.pandas as pa
from pandera.typing import DataFrame, Series

from schemas import checks


class PreferenceSchema(pa.DataFrameModel):
    prompt: Series[object]  # [{"role", "content"}, ...] ending with the user's turn
    chosen: Series[str]  # the preferred final assistant reply
    rejected: Series[str]

    @pa.check("prompt", element_wise=True, name="message_list")
    def _message_list(cls, x) -> bool:
        return checks.message_list(x)

    @pa.check("prompt", element_wise=True, name="known_roles")
    def _known_roles(cls, x) -> bool:
        return checks.known_roles(x)

    @pa.check("prompt", element_wise=True, name="non_empty_content")
    def _non_empty_content(cls, x) -> bool:
        return checks.non_empty_content(x)

    @pa.check("prompt", element_wise=True, name="messages_max_chars")
    def _messages_max_chars(cls, x) -> bool:
        return checks.messages_max_chars(x)

    @pa.check("prompt", element_wise=True, name="has_user")
    def _has_user(cls, x) -> bool:
        return checks.has_user(x)

    @pa.check("prompt", element_wise=True, name="ends_with_user")
    def _ends_with_user(cls, x) -> bool:
        return checks.ends_with("user")(x)

    @pa.check("chosen", "rejected", element_wise=True, name="non_empty")
    def _non_empty(cls, x) -> bool:
        return checks.non_empty(x)

    @pa.check("chosen", "rejected", element_wise=True, name="max_chars")
    def _max_chars(cls, x) -> bool:
        return checks.max_chars(x)

    @pa.dataframe_check(name="chosen_ne_rejected")
    def _differ(cls, df: DataFrame) -> Series[bool]:
        def differ(c, r) -> bool:
            return not (isinstance(c, str) and isinstance(r, str)) or c.strip() != r.strip()
        return Series([differ(c, r) for c, r in zip(df["chosen"], df["rejected"])], index=df.index, dtype=bool)

    class Config:
        strict = True
