"""arena: a Gradio chat and blind A/B arena over the lineage's models; votes become preference data `prepare` reads.

The browser test starts the real command (`python -m posttrain.serving.arena`) on a free localhost port with the tiny
lifecycle's models and drives Debian's chromium through chromedriver (selenium, no browser download): the
arena's two replies, a vote and its row in the votes file, then a chat turn.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (make install-test installs them where apt-get runs as root)")
# A tiny model after 6 steps answers greedily with whitespace only (an empty reply, which is no preference pair);
# sampling gives the browser test two non-empty, different answers to vote on.
SAMPLED = ["--temperature", "0.7", "--max-new-tokens", "16"]
ROUND = {"prompt": "What is 1 plus 2?", "model_a": "models/sft", "model_b": "models/cpt", "reply_a": "3",
         "reply_b": "four"}


def test_a_streamed_reply_ends_as_generate_s_reply(lifecycle):
    from posttrain.core.runtime import set_seed
    from posttrain.model.loading import load_model, load_tokenizer
    from posttrain.serving.arena import stream_reply
    from posttrain.serving.generate import reply

    sft = lifecycle["workdir"] / "models/sft"
    model, tok = load_model(sft), load_tokenizer(sft)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    assert list(stream_reply(model, tok, messages, 8))[-1] == reply(model, tok, messages, 8)  # greedy
    set_seed(0)
    parts = list(stream_reply(model, tok, messages, 16, temperature=0.7))
    set_seed(0)
    assert parts[-1] == reply(model, tok, messages, 16, temperature=0.7) != ""
    assert len(parts) > 1  # it arrived piece by piece


def test_votes_are_preference_pairs_prepare_reads_and_ties_go_aside(tmp_path):
    from posttrain.data.readers import read_source
    from posttrain.serving.arena import VoteLog

    votes, ties = tmp_path / "feedback/arena.jsonl", tmp_path / "feedback/arena_ties.jsonl"
    log = VoteLog(votes, ties)
    assert log.record(ROUND, "A") == votes
    assert log.record(ROUND, "B") == votes
    assert log.record(ROUND, "tie") == ties
    assert log.record(ROUND, "both_bad") == ties
    assert log.record({**ROUND, "reply_b": " 3 "}, "A") == ties  # the same answer twice: no pair to learn from
    assert log.record({**ROUND, "reply_a": ""}, "B") == ties  # an empty answer fails the contract

    table = read_source(votes, "preference")  # extra columns (vote, models, time) are ignored by the reader
    prompt = [{"role": "user", "content": "What is 1 plus 2?"}]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in table.rows] == [(prompt, "3", "four"),
                                                                               (prompt, "four", "3")]
    first = json.loads(votes.read_text().splitlines()[0])
    assert (first["vote"], first["chosen_model"], first["rejected_model"]) == ("A", "models/sft", "models/cpt")
    assert (first["model_a"], first["model_b"]) == ("models/sft", "models/cpt")
    datetime.fromisoformat(first["time"])
    ids = [json.loads(line)["id"] for path in (votes, ties) for line in path.read_text().splitlines()]
    assert len(set(ids)) == 6 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)  # each vote its own id
    log.record(ROUND, "A", vote_id="given")
    assert json.loads(votes.read_text().splitlines()[-1])["id"] == "given"
    aside = [json.loads(line) for line in ties.read_text().splitlines()]
    assert [r["vote"] for r in aside] == ["tie", "both_bad", "A", "B"]
    assert "chosen_ne_rejected" in aside[2]["reason"] and "non_empty" in aside[3]["reason"]
    assert (aside[0]["reply_a"], aside[0]["reply_b"]) == ("3", "four")


def test_a_torn_last_line_is_moved_aside_and_a_whole_one_kept(tmp_path):
    from posttrain.serving.arena import VoteLog

    votes, ties = tmp_path / "arena.jsonl", tmp_path / "ties.jsonl"
    whole = json.dumps({"prompt": "kept", "chosen": "x", "rejected": "y"})
    torn = '{"prompt": "cut off by a cra'  # what a writer killed in the middle of its write leaves
    votes.write_text(whole + "\n" + torn)
    VoteLog(votes, ties).record(ROUND, "A")
    first, line = votes.read_text().splitlines()  # valid JSONL again: prepare reads it
    assert first == whole and json.loads(line)["chosen"] == "3"
    assert (tmp_path / "arena.jsonl.torn").read_text() == torn + "\n"  # kept aside, not thrown away

    votes.write_text(whole)  # a whole last line without its newline (an editor's save) stays
    VoteLog(votes, ties).record(ROUND, "B")
    first, line = votes.read_text().splitlines()
    assert first == whole and json.loads(line)["chosen"] == "four"

    votes.write_text(torn)  # a torn line alone: the file is cut to nothing before the vote
    VoteLog(votes, ties).record(ROUND, "A")
    assert [json.loads(line)["chosen"] for line in votes.read_text().splitlines()] == ["3"]
    assert (tmp_path / "arena.jsonl.torn").read_text() == (torn + "\n") * 2


def test_bad_invocations_explain_themselves(tmp_path, monkeypatch):
    from posttrain.serving.arena import main

    monkeypatch.chdir(tmp_path)  # no models/ here
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="no such model folder"):
        main(["--models", "models/nope", "models/sft"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer at {url} in {timeout:.0f} s:\n{log.read_text()}")


def _chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless as root; no background connections (this machine's network is closed, and nothing may leave it).
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request, to check where they went
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a given driver: no Selenium Manager


def _requested_urls(driver) -> set[str]:
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.add((message["params"].get("request") or message["params"])["url"])
    return urls


@needs_browser
def test_arena_and_chat_in_a_headless_browser(lifecycle, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from posttrain.data.readers import read_source

    workdir = lifecycle["workdir"]
    votes, ties, log = tmp_path / "votes.jsonl", tmp_path / "ties.jsonl", tmp_path / "app.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "posttrain.serving.arena", "--models", "models/sft", "models/cpt",
               "--votes", str(votes), "--ties", str(ties), "--port", str(port), *SAMPLED]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    driver = None
    try:
        _wait_until_serving(url, proc, log)
        driver = _chromium(tmp_path / "chromium")
        wait = WebDriverWait(driver, 120)
        css = driver.find_element
        driver.get(url)

        # the arena: one prompt, two anonymous answers, a vote
        wait.until(lambda d: d.find_elements(By.XPATH, "//button[@role='tab' and normalize-space()='Arena']"))
        driver.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Arena']").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#arena-prompt textarea").is_displayed())
        css(By.CSS_SELECTOR, "#arena-prompt textarea").send_keys("Tell me about the sea.")
        css(By.CSS_SELECTOR, "#arena-send").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vote-a").is_enabled())  # both answers are in
        reply_a = css(By.CSS_SELECTOR, "#reply-a textarea").get_property("value")
        reply_b = css(By.CSS_SELECTOR, "#reply-b textarea").get_property("value")
        assert reply_a.strip() and reply_b.strip() and reply_a != reply_b, (reply_a, reply_b)
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#reply-a [data-testid=block-info], "
                                                                        "#reply-b [data-testid=block-info]")]
        assert labels == ["Model A", "Model B"]  # anonymous until the vote
        assert "models/" not in css(By.TAG_NAME, "body").text
        driver.save_screenshot(str(tmp_path / "arena.png"))
        css(By.CSS_SELECTOR, "#vote-a").click()
        wait.until(lambda d: "Recorded" in d.find_element(By.CSS_SELECTOR, "#arena-status").text)
        assert not css(By.CSS_SELECTOR, "#vote-b").is_enabled()  # one vote a round
        status = css(By.CSS_SELECTOR, "#arena-status").text

        table = read_source(votes, "preference")
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in table.rows] == [
            ([{"role": "user", "content": "Tell me about the sea."}], reply_a, reply_b)]
        row = json.loads(votes.read_text())
        assert {row["model_a"], row["model_b"]} == {"models/sft", "models/cpt"}
        assert (row["vote"], row["chosen_model"]) == ("A", row["model_a"])
        assert re.fullmatch(r"[0-9a-f]{32}", row["id"]) and row["id"] in status  # the page names the vote it wrote
        revealed = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#reply-a [data-testid=block-info], "
                                                                          "#reply-b [data-testid=block-info]")]
        assert revealed == [f"Model A: {row['model_a']}", f"Model B: {row['model_b']}"]
        assert not ties.exists()

        # the chat tab: a message and the model's reply
        css(By.XPATH, "//button[@role='tab' and normalize-space()='Chat']").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#chat-input textarea").is_displayed())
        css(By.CSS_SELECTOR, "#chat-input textarea").send_keys("What is 1 plus 2?")
        css(By.CSS_SELECTOR, "#chat-send").click()
        wait.until(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user]")]
                   == ["What is 1 plus 2?"])
        wait.until(lambda d: any(e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")))

        # nothing left this machine: every request the page made went to the app
        outside = {u for u in _requested_urls(driver)
                   if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).hostname != "127.0.0.1"}
        assert not outside, outside
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
