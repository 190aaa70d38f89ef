"""Instruction / chat examples for SFT: one conversation that ends with the assistant's reply."""

import pandera.pandas as pa
from pandera.typing import Series

from schemas import checks


class InstructionSchema(pa.DataFrameModel):
    messages: Series[object]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]

    @pa.check("messages", element_wise=True, name="message_list")
    def _message_list(cls, x) -> bool:
        return checks.message_list(x)

    @pa.check("messages", element_wise=True, name="known_roles")
    def _known_roles(cls, x) -> bool:
        return checks.known_roles(x)

    @pa.check("messages", element_wise=True, name="non_empty_content")
    def _non_empty_content(cls, x) -> bool:
        return checks.non_empty_content(x)

    @pa.check("messages", element_wise=True, name="messages_max_chars")
    def _max_chars(cls, x) -> bool:
        return checks.messages_max_chars(x)

    @pa.check("messages", element_wise=True, name="has_user")
    def _has_user(cls, x) -> bool:
        return checks.has_user(x)

    @pa.check("messages", element_wise=True, name="ends_with_assistant")
    def _ends_with_assistant(cls, x) -> bool:
        return checks.ends_with("assistant")(x)

    class Config:
        strict = True
