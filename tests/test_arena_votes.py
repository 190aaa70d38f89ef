"""Arena votes under a crowd: concurrent voters (threads and processes) and a killed app.

Every vote goes through the app's own handler, `Arena.arena_vote` (what a vote button calls), on an Arena whose
models are never loaded (a vote needs only the round's answers). The handler's status line names the vote's id;
the files must then hold every confirmed id exactly once, as valid JSON lines, and nothing else. The kill test
SIGKILLs a voting process mid-stream, again and again, and checks that no confirmed vote is missing, that at
most the one vote in flight per kill is unaccounted for, and that no line is torn. Figures: docs/arena.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
from argparse import Namespace
from collections import Counter
from pathlib import Path

import pytest

VOTERS, VOTES_EACH = 8, 50  # 400 votes
CAST = ["A", "B", "A", "B", "tie", "both_bad"]  # mostly pairs, some ties: both files are written
ID = re.compile(r"\(vote `([0-9a-f]{32})`\)")


def _arena(tmp_path: Path):
    from posttrain.serving.arena import Arena

    return Arena(Namespace(models=["models/sft", "models/cpt"], max_loaded=2, votes=tmp_path / "arena.jsonl",
                           ties=tmp_path / "arena_ties.jsonl", max_new_tokens=8, temperature=0.0, top_p=1.0))


def _round(voter: int, n: int) -> dict:
    return {"prompt": f"voter {voter} round {n}: which is better?", "model_a": "models/sft", "model_b": "models/cpt",
            "reply_a": f"answer a {voter}.{n}", "reply_b": f"answer b {voter}.{n}", "done": True, "voted": False}


def _vote(arena, voter: int, n: int) -> str:
    """Cast one vote through the handler; the id its status line confirms."""
    *_, round_, _a, _b, _t, _bb, status = arena.arena_vote(CAST[n % len(CAST)], _round(voter, n))
    assert round_["voted"]
    return ID.search(status).group(1)


def _on_disk(tmp_path: Path) -> list[dict]:
    """Every line of both files as JSON (a torn or malformed line fails here)."""
    rows = []
    for name in ("arena.jsonl", "arena_ties.jsonl"):
        path = tmp_path / name
        if path.exists():
            data = path.read_bytes()
            assert not data or data.endswith(b"\n"), f"{name}: the last line has no newline"
            for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise AssertionError(f"{name}:{i}: not JSON ({e}): {line[:200]!r}") from None
    assert not (tmp_path / "arena.jsonl.torn").exists() and not (tmp_path / "arena_ties.jsonl.torn").exists()
    return rows


def _check_exactly_once(tmp_path: Path, confirmed: list[str], expected: int) -> None:
    from posttrain.data.readers import read_source

    rows = _on_disk(tmp_path)
    assert len(confirmed) == len(set(confirmed)) == expected
    ids = Counter(r["id"] for r in rows)
    assert ids == Counter(confirmed)  # each confirmed vote once, and nothing else
    for r in rows:  # each row is its own round's vote, not a mix of two
        voter, n = map(int, re.match(r"voter (\d+) round (\d+)", r["prompt"][0]["content"]).groups())
        assert r["vote"] == CAST[n % len(CAST)]
        answers = {r.get("chosen"), r.get("rejected"), r.get("reply_a"), r.get("reply_b")} - {None}
        assert answers == {f"answer a {voter}.{n}", f"answer b {voter}.{n}"}
    pairs = sum(r["vote"] in ("A", "B") for r in rows)
    assert len(read_source(tmp_path / "arena.jsonl", "preference").rows) == pairs  # prepare reads them all


def test_eight_threads_cast_400_votes_each_on_disk_exactly_once(tmp_path):
    arena = _arena(tmp_path)
    _vote(arena, -1, 0)  # warm-up (pandas, gradio's components), then start from empty files
    for name in ("arena.jsonl", "arena_ties.jsonl"):
        (tmp_path / name).unlink(missing_ok=True)
    confirmed: list[str] = []
    failures: list[BaseException] = []
    start = threading.Barrier(VOTERS)

    def voter(v: int) -> None:
        try:
            start.wait()
            for n in range(VOTES_EACH):
                confirmed.append(_vote(arena, v, n))  # list.append is atomic
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=voter, args=(v,)) for v in range(VOTERS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    assert not failures, failures[0]
    _check_exactly_once(tmp_path, confirmed, VOTERS * VOTES_EACH)
    print(f"\n{VOTERS} threads, {len(confirmed)} votes in {seconds:.2f} s: {len(confirmed) / seconds:.0f} votes/s, "
          "0 lost, 0 duplicated")


class _Forked:
    """A child process forked from this one, running `target(*args)` and leaving by os._exit: neither
    multiprocessing's exit path nor pytest's handlers run in the child (either turned a finished voter's exit
    code into 1 in a long-lived pytest worker). The children inherit the imports: no 8 s start each."""

    def __init__(self, target, args: tuple, err: Path):
        self.target, self.args, self.err, self.pid, self.exitcode = target, args, err, None, None

    def start(self) -> None:
        sys.stdout.flush(), sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                self.target(*self.args)
                code = 0
            except BaseException:  # noqa: BLE001 - written out for the parent's assert
                self.err.write_text(traceback.format_exc())
            finally:
                os._exit(code)

    def join(self) -> None:
        _, status = os.waitpid(self.pid, 0)
        self.exitcode = os.waitstatus_to_exitcode(status)


def _fork():
    if not hasattr(os, "fork"):
        pytest.skip("needs fork (Linux, macOS)")
    return _Forked


def _process_voter(tmp_path: Path, first: int, threads: int, each: int, report: int) -> None:
    """A voting process: `threads` voters, numbered from `first`; each confirmed id is written to `report`."""
    arena = _arena(tmp_path)
    failures: list[str] = []

    def voter(v: int) -> None:
        try:
            for n in range(each):
                vote_id = _vote(arena, v, n)
                os.write(report, f"{vote_id}\n".encode())  # 33 bytes into a pipe: one atomic write
        except BaseException:  # noqa: BLE001 - raised below, in the process's thread
            failures.append(traceback.format_exc())

    workers = [threading.Thread(target=voter, args=(first + i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if failures:
        raise RuntimeError("\n".join(failures))


def _child_errors(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("voter-*.err")))[-4000:]


def _read_ids(fd: int) -> list[str]:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data.decode().split()


def test_four_processes_of_two_voters_cast_400_votes_each_on_disk_exactly_once(tmp_path):
    ctx = _fork()
    _vote(_arena(tmp_path / "warm"), -1, 0)  # import and warm up here once: the children inherit it
    read, write = os.pipe()
    procs = [ctx(_process_voter, (tmp_path, 2 * p, 2, VOTES_EACH, write), tmp_path / f"voter-{2 * p}.err")
             for p in range(4)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    os.close(write)
    confirmed = _read_ids(read)  # until every child has exited
    for p in procs:
        p.join()
    seconds = time.perf_counter() - t0
    os.close(read)
    assert [p.exitcode for p in procs] == [0] * 4, _child_errors(tmp_path)
    _check_exactly_once(tmp_path, confirmed, VOTERS * VOTES_EACH)
    print(f"\n4 processes x 2 threads, {len(confirmed)} votes in {seconds:.2f} s: "
          f"{len(confirmed) / seconds:.0f} votes/s, 0 lost, 0 duplicated")


def test_killing_the_app_mid_stream_loses_at_most_the_vote_in_flight(tmp_path):
    ctx = _fork()
    _vote(_arena(tmp_path / "warm"), -1, 0)
    rng = random.Random(0)
    confirmed: list[str] = []
    in_flight_written = 0
    kills = 10
    t0 = time.perf_counter()
    for k in range(kills):  # every run appends to the same files, after the last run's kill
        read, write = os.pipe()
        proc = ctx(_process_voter, (tmp_path, 100 + k, 1, 10_000, write), tmp_path / f"voter-{100 + k}.err")
        proc.start()
        os.close(write)
        target, seen = rng.randint(2, 12), b""
        while seen.count(b"\n") < target:
            chunk = os.read(read, 4096)
            assert chunk, f"the voter exited early ({proc.exitcode}): {_child_errors(tmp_path)}"
            seen += chunk
        time.sleep(rng.uniform(0, 0.004))  # somewhere in the next vote: building it, writing it, fsyncing it
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        ids = (seen + b"".join(iter(lambda: os.read(read, 65536), b""))).decode().split()
        os.close(read)
        confirmed += ids
        on_disk = {r["id"] for r in _on_disk(tmp_path)}
        assert set(confirmed) <= on_disk  # no vote the page confirmed is lost
        unconfirmed = on_disk - set(confirmed)
        assert len(unconfirmed) <= in_flight_written + 1  # at most the vote in flight, written before its report
        in_flight_written = len(unconfirmed)
    seconds = time.perf_counter() - t0
    rows = _on_disk(tmp_path)
    assert len(rows) == len({r["id"] for r in rows}) == len(confirmed) + in_flight_written
    lost = kills - in_flight_written  # each kill had one vote in flight; those not on disk are lost
    print(f"\n{kills} SIGKILLs, {len(confirmed)} confirmed votes, all on disk, no torn line; of the {kills} votes in "
          f"flight {in_flight_written} reached the disk, {lost} were lost ({seconds:.1f} s)")
