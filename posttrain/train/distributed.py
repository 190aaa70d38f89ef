"""Work before training, shared out over the processes of a multi-process launch (posttrain.train.launch).

The trainers shard their own batches. What a stage computes before it trains (the policy's samples to rank,
rft's samples to check, the teacher's answers) is shared out here: each process takes its contiguous share
of the inputs and the results are gathered on every process in the inputs' order, so every rank holds what
one process would have computed. A file the stage keeps for a resumed run is written by the main process
alone, and the others wait for it. In one plain process (WORLD_SIZE unset or 1) every helper is a plain
call: the same work, the same results, no accelerate state.

Under `accelerate launch` the process group would otherwise start when the trainer's arguments are built;
accelerate's PartialState starts it here with the same backend (gloo on CPU processes) and the trainer's
default timeout, and the trainer then reuses it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

from posttrain.core.files import is_main_process, read_jsonl, write_jsonl

TIMEOUT_S = 1800  # transformers' ddp_timeout default: a rank may wait this long for a slower one's share


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _state():
    """accelerate's PartialState (a singleton): the first call starts the process group."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=TIMEOUT_S))


def split_work(fn: Callable[[list], list], items: list, desc: str) -> list:
    """fn(items), each process computing fn on its contiguous share of `items` (PartialState's
    split_between_processes) and the shares gathered on every process in order (gather_object).

    fn maps a list to a list whose parts follow the input's parts (fn(a + b) == fn(a) + fn(b)): one result per
    item, or results filtered item by item. Every process must call it (the gather is collective).
    """
    if world_size() == 1:
        return fn(items)
    from accelerate.utils import gather_object

    state = _state()
    with state.split_between_processes(items) as share:
        share = list(share)
        print(f"[{desc}] rank {state.process_index} of {state.num_processes}: {len(share)} of {len(items)}",
              flush=True)
        out = fn(share) if share else []
    return gather_object(out)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first; the others wait for it, then run it (and find what it wrote)."""
    if world_size() == 1:
        yield
        return
    with _state().main_process_first():
        yield


def wait_for_everyone() -> None:
    if world_size() > 1:
        _state().wait_for_everyone()


def cached_rows(path: Path, compute: Callable[[], list[dict]]) -> list[dict]:
    """Rows kept in `path` so that a resumed run trains on the same ones: read back if there; else compute()
    (every process together: it may split_work) and written whole (temp file + rename) by the main process;
    no process goes on before the file is there."""
    if path.exists():  # the same answer on every rank when compute() gathers: nothing writes it before then
        rows = read_jsonl(path)
    else:
        rows = compute()
        if is_main_process():
            tmp = path.with_name(path.name + ".tmp")
            write_jsonl(tmp, rows)
            tmp.replace(path)
    wait_for_everyone()  # on either path, so that every rank meets the same barriers
    return rows
