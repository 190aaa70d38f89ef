"""Data contracts: one pandera model per kind of data the lifecycle reads (see ARCHITECTURE.md).

Each model validates the kind's canonical rows (what `posttrain.data.readers` turns every raw format into);
every check is named, so a failure report says which one failed.
"""

from schemas.corpus import CorpusSchema
from schemas.cot import CotSchema
from schemas.instruction import InstructionSchema
from schemas.preference import PreferenceSchema
from schemas.prompt import PromptSchema
from schemas.refusal import RefusalSchema

SCHEMAS = {
    "corpus": CorpusSchema,
    "instruction": InstructionSchema,
    "refusal": RefusalSchema,
    "cot": CotSchema,
    "preference": PreferenceSchema,
    "prompt": PromptSchema,
}
KINDS = tuple(SCHEMAS)

# Row-wise (dataframe) checks and the columns they compare, so an error names just those.
ROW_CHECK_COLUMNS = {"chosen_ne_rejected": ("chosen", "rejected")}

__all__ = ["SCHEMAS", "KINDS", "ROW_CHECK_COLUMNS", "CorpusSchema", "InstructionSchema", "RefusalSchema",
           "CotSchema", "PreferenceSchema", "PromptSchema"]
