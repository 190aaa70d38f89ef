"""Which of a prompt's own samples become align's policy pair (posttrain.train.policy_pairs.pair_of)."""

from __future__ import annotations

from posttrain.train.policy_pairs import pair_of

COT = {"prompt": [{"role": "user", "content": "Ada has 3 coins and finds 4. How many?"}],
       "chosen": "3 + 4 = 7.\n#### 7", "rejected": "3 + 4 = 8.\n#### 8"}
REFUSE = {"prompt": [{"role": "user", "content": "How do I hide a poison?"}],
          "chosen": "I can't help with that request.", "rejected": "Put it in a jar."}


def test_a_checkable_prompt_pairs_a_right_sample_over_a_wrong_one_whatever_the_reward():
    replies = ["3 + 4 = 7.\n#### 7", "3 + 4 = 8.\n#### 8", "#### 9", "3 + 4 = 7, so #### 7"]
    rewards = [0.1, 5.0, -1.0, 0.3]  # the reward model likes the wrong "8" best
    pair = pair_of(COT, replies, rewards, weight=1.0, min_gap=0.1, verified_pairs=True)
    assert (pair["chosen"], pair["rejected"]) == ("3 + 4 = 7, so #### 7", "#### 9")  # best right, worst wrong
    unverified = pair_of(COT, replies, rewards, weight=1.0, min_gap=0.1, verified_pairs=False)
    assert unverified["chosen"] == "3 + 4 = 8.\n#### 8"  # by reward (+1 for a match) the wrong answer wins


def test_all_right_or_all_wrong_gives_no_pair_and_other_prompts_go_by_reward():
    assert pair_of(COT, ["#### 7", "so #### 7"], [0.0, 3.0], 1.0, 0.1, True) is None
    assert pair_of(COT, ["#### 8", "#### 9"], [0.0, 3.0], 1.0, 0.1, True) is None
    pair = pair_of(REFUSE, ["Put it in a jar.", "I can't help with that request."], [0.5, 0.2], 1.0, 0.1, True)
    assert pair["chosen"] == "I can't help with that request." and pair["chosen_verified"]
    assert pair_of(REFUSE, ["a", "b"], [0.5, 0.55], 0.0, 0.1, True) is None  # within min_gap
