"""The demo world and its simulated labeler behave as the demo relies on.

The demo's held-out numbers only mean something if the prompt sets are truly
disjoint, the answers are recomputable, the SFT data has the intended uneven
style mix, and the labeler orders responses the way its docstring promises.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from fastgpt.demo.labeler import SimulatedLabeler, flatten_ranking, rank_file
from fastgpt.demo.world import (
    FAMILIES,
    FAMILY_BY_NAME,
    STYLE_MIX,
    answer_for,
    make_world,
    parse_prompt,
    result_for,
    write_world,
)


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0, n_pretrain=2000, n_sft=1000, n_compare=300, n_ppo=200, n_eval=200)


def _reply(rec: dict) -> tuple[str, str]:
    return rec["messages"][0]["content"], rec["messages"][1]["content"]


# -- world -------------------------------------------------------------------

def test_seed_determinism():
    a = make_world(seed=3, n_pretrain=300, n_sft=200, n_compare=50, n_ppo=50, n_eval=50)
    b = make_world(seed=3, n_pretrain=300, n_sft=200, n_compare=50, n_ppo=50, n_eval=50)
    c = make_world(seed=4, n_pretrain=300, n_sft=200, n_compare=50, n_ppo=50, n_eval=50)
    assert a == b
    assert a.sft != c.sft and a.eval_items != c.eval_items


def test_sizes_and_prompt_sets_disjoint(world):
    sft = [_reply(r)[0] for r in world.sft]
    ev = [e["prompt"] for e in world.eval_items]
    sets = {"sft": sft, "compare": world.compare_prompts, "ppo": world.ppo_prompts, "eval": ev}
    assert [len(s) for s in sets.values()] == [1000, 300, 200, 200]
    assert len(world.pretrain) == 2000
    for name, s in sets.items():
        assert len(set(s)) == len(s), f"{name} repeats a prompt"
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(sets[a]) & set(sets[b]), f"{a} and {b} share prompts"


def test_every_set_covers_every_family(world):
    all_names = {f.name for f in FAMILIES}
    assert {e["task"] for e in world.eval_items} == all_names
    assert {r["task"] for r in world.sft} == all_names
    for prompts in (world.compare_prompts, world.ppo_prompts):
        assert {parse_prompt(p)[0].name for p in prompts} == all_names


def test_eval_prompts_not_in_pretraining(world):
    corpus = "\n".join(world.pretrain)
    assert not any(e["prompt"] in corpus for e in world.eval_items)


def test_prompts_short_and_parse_to_one_family():
    rng = random.Random(0)
    for fam in FAMILIES:
        for _ in range(50):
            p = fam.sample_prompt(rng)
            assert len(p) < 60
            owners = [f.name for f in FAMILIES if f.parse(p) is not None]
            assert owners == [fam.name], (p, owners)


def test_answer_for_agrees_with_generator(world):
    for item in world.eval_items:
        assert answer_for(item["prompt"]) == item["answer"]
        assert result_for(item["prompt"]) == item["result"]
    rng = random.Random(1)
    for fam in FAMILIES:
        for _ in range(30):
            p = fam.sample_prompt(rng)
            assert answer_for(p) == fam.answer(p)
            assert fam.demonstration(p, "canonical", rng) == answer_for(p)
    assert answer_for("What is the meaning of life?") is None
    assert answer_for("What colour is a spaceship?") is None


def test_known_answers():
    assert answer_for("What is 7 plus 5?") == "7 plus 5 is 12."
    assert answer_for("Subtract 3 from 10.") == "10 minus 3 is 7."
    assert answer_for("Reverse the word cat.") == "The reverse of cat is tac."
    assert answer_for("Write dog in capitals.") == "The word dog in capitals is DOG."
    assert answer_for("How many letters are in apple?") == "The word apple has 5 letters."
    assert answer_for("Sort 7 3 1.") == "7 3 1 sorted is 1 3 7."
    assert answer_for("What is the smallest of 4 9 2?") == "The smallest of 4 9 2 is 2."
    assert answer_for("What colour is a banana?") == "A banana is yellow."
    assert answer_for("What is the capital of France?") == "The capital of France is Paris."
    assert answer_for("What does a cow say?") == "A cow says moo."


def test_pretrain_is_plain_statements(world):
    for doc in world.pretrain[:500]:
        assert doc and "\n" not in doc
        assert "User" not in doc and "Assistant" not in doc and "Sure" not in doc


def test_sft_style_mixture(world):
    counts = Counter(r["style"] for r in world.sft)
    assert set(counts) == set(STYLE_MIX)
    for style, frac in STYLE_MIX.items():
        assert abs(counts[style] / len(world.sft) - frac) < 0.01, style
    labeler = SimulatedLabeler(noise=0.0)
    for rec in world.sft:
        p, a = _reply(rec)
        assert rec["messages"][0]["role"] == "user" and rec["messages"][1]["role"] == "assistant"
        assert labeler.is_correct(p, a) == (rec["style"] != "wrong"), (rec["style"], p, a)
    # The labeler's favourite style must be a minority, or PPO has nothing to do.
    canonical = sum(_reply(r)[1] == answer_for(_reply(r)[0]) for r in world.sft)
    assert canonical / len(world.sft) < 0.4


def test_write_world_roundtrip(world, tmp_path):
    paths = write_world(world, tmp_path)
    assert set(paths) == {"pretrain", "sft", "compare_prompts", "ppo_prompts", "eval"}

    def rows(name):
        return [json.loads(line) for line in paths[name].read_text(encoding="utf-8").splitlines()]

    assert [r["text"] for r in rows("pretrain")] == world.pretrain
    assert rows("sft") == world.sft
    assert [r["prompt"] for r in rows("compare_prompts")] == world.compare_prompts
    assert [r["prompt"] for r in rows("ppo_prompts")] == world.ppo_prompts
    assert rows("eval") == world.eval_items


# -- labeler -----------------------------------------------------------------

P = "What is 7 plus 5?"
CANON = "7 plus 5 is 12."
VERBOSE = "Sure! Let me think. 7 plus 5 is 12. I hope this helps!"
TERSE = "12"
REPEAT = "Sure! Let me think. 7 plus 5 is 12. 7 plus 5 is 12. 7 plus 5 is 12."
WRONG = "7 plus 5 is 13."


def test_quality_ordering():
    lab = SimulatedLabeler(noise=0.0)
    q = {name: lab.quality(P, r, True) for name, r in
         {"canon": CANON, "terse": TERSE, "verbose": VERBOSE, "repeat": REPEAT, "wrong": WRONG}.items()}
    assert q["canon"] > q["terse"] > q["verbose"] > q["repeat"] > q["wrong"]
    assert lab.quality(P, CANON, False) < lab.quality(P, CANON, True) - 1.5
    assert lab.quality(P, VERBOSE, True) > lab.quality(P, CANON, False)
    assert lab.quality(P, "", True) < lab.quality(P, WRONG, True)


def test_correctness_rules():
    lab = SimulatedLabeler()
    assert lab.is_correct(P, CANON) and lab.is_correct(P, TERSE) and lab.is_correct(P, VERBOSE)
    assert lab.is_correct(P, "12.") and lab.is_correct(P, "7 plus 5 is 12")
    assert not lab.is_correct(P, WRONG)
    assert not lab.is_correct(P, "7 plus 5 is 12. 7 plus 5 is 13.")
    assert not lab.is_correct(P, "")
    assert not lab.is_correct("Who are you?", "12")
    assert lab.is_correct("Write cat in capitals.", "The word cat in capitals is CAT.")
    assert not lab.is_correct("Write cat in capitals.", "The word cat in capitals is Cat.")
    assert lab.is_correct("Sort 7 3 1.", "1, 3, 7")
    assert lab.is_correct("Count the letters in fish.", "The word fish has 4 letters.")
    assert lab.is_correct("What colour is the sky?", "blue")
    assert lab.is_correct("What does a dog say?", "A dog says woof.")
    assert not lab.is_correct("Reverse the word cat.", "The reverse of cat is cat.")


def test_wrong_demos_are_wrong_for_every_family():
    lab = SimulatedLabeler()
    rng = random.Random(0)
    for fam in FAMILIES:
        for _ in range(40):
            p = fam.sample_prompt(rng)
            assert not lab.is_correct(p, fam.demonstration(p, "wrong", rng)), p
            for style in ("canonical", "verbose", "terse", "repetitive"):
                assert lab.is_correct(p, fam.demonstration(p, style, rng)), (p, style)


def test_is_on_format():
    lab = SimulatedLabeler()
    assert lab.is_on_format(VERBOSE, True)
    assert not lab.is_on_format(CANON, False)
    assert not lab.is_on_format("   ", True)
    assert not lab.is_on_format("12\nUser: and 3 plus 4?", True)
    assert not lab.is_on_format("12 <|user|>", True)


def test_rank_is_permutation_with_ties():
    lab = SimulatedLabeler(noise=0.0)
    responses = [WRONG, CANON, VERBOSE, CANON, TERSE]
    ranking = lab.rank(P, responses, [True] * 5)
    assert ranking == [[1, 3], 4, 2, 0]
    noisy = SimulatedLabeler(seed=5, noise=0.5)
    for _ in range(200):
        r = noisy.rank(P, responses, [True, True, True, False, True])
        assert sorted(flatten_ranking(r)) == list(range(5))


def test_rank_is_seeded():
    resp = [CANON, VERBOSE, WRONG, TERSE]
    a = [SimulatedLabeler(seed=7).rank(P, resp, [True] * 4) for _ in range(1)]
    runs = []
    for _ in range(2):
        lab = SimulatedLabeler(seed=7)
        runs.append([lab.rank(P, resp, [True] * 4) for _ in range(50)])
    assert runs[0] == runs[1] and a[0] == runs[0][0]


@pytest.mark.parametrize("k", [2, 4, 6])
def test_noise_agreement_in_range(k):
    lab = SimulatedLabeler(seed=0)
    truth = SimulatedLabeler(noise=0.0)
    rng = random.Random(k)
    fam = FAMILY_BY_NAME["add"]
    styles = ["canonical", "verbose", "terse", "repetitive", "wrong"]
    agree = total = 0
    for _ in range(600):
        p = fam.sample_prompt(rng)
        resp = [fam.demonstration(p, rng.choice(styles), rng) for _ in range(k)]
        fin = [rng.random() < 0.8 for _ in range(k)]
        q = [truth.quality(p, r, f) for r, f in zip(resp, fin)]
        pos = {i: n for n, i in enumerate(flatten_ranking(lab.rank(p, resp, fin)))}
        for i in range(k):
            for j in range(i + 1, k):
                if abs(q[i] - q[j]) > 1e-9:
                    total += 1
                    agree += (pos[i] < pos[j]) == (q[i] > q[j])
    assert 0.78 <= agree / total <= 0.90  # ~84% at the default noise 0.15


def test_evaluate_hand_made():
    lab = SimulatedLabeler()
    items = [
        {"prompt": P, "task": "add", "answer": CANON},
        {"prompt": "Reverse the word cat.", "task": "reverse", "answer": "The reverse of cat is tac."},
        {"prompt": "What colour is snow?", "task": "colour", "answer": "Snow is white."},
        {"prompt": "What is the capital of Peru?", "task": "capital", "answer": "The capital of Peru is Lima."},
    ]
    responses = [CANON, "tac", "Snow is black.", "The capital of Peru is Lima. User: thanks"]
    finished = [True, True, True, False]
    m = lab.evaluate(items, responses, finished)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["format_compliance"] == pytest.approx(0.75)  # wrong but well-formed still counts
    assert m["mean_length"] == pytest.approx(sum(map(len, responses)) / 4)
    expected = sum(lab.quality(it["prompt"], r, f) for it, r, f in zip(items, responses, finished)) / 4
    assert m["labeler_score"] == pytest.approx(expected)
    assert m["per_task"] == {"add": 1.0, "capital": 1.0, "colour": 0.0, "reverse": 1.0}


def test_win_rate_hand_made():
    lab = SimulatedLabeler()
    prompts = [P, P, P, P]
    a = [CANON, VERBOSE, CANON, WRONG]
    b = [VERBOSE, CANON, CANON, TERSE]
    out = lab.win_rate(prompts, a, [True] * 4, b, [True, True, True, True])
    assert (out["wins"], out["losses"], out["ties"]) == (1, 2, 1)
    assert out["win_rate"] == pytest.approx(1 / 3)
    out = lab.win_rate([P], [CANON], [True], [CANON], [False])
    assert out["wins"] == 1 and out["win_rate"] == 1.0


def test_rank_file_appends(tmp_path):
    comparisons = tmp_path / "comparisons.jsonl"
    rows = [
        {"prompt": P, "responses": [WRONG, CANON, VERBOSE], "finished": [True, True, True]},
        {"prompt": "What does a cow say?", "responses": ["moo", "A cow says moo."], "finished": [True, False]},
    ]
    comparisons.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    rankings = tmp_path / "out" / "rankings.jsonl"
    lab = SimulatedLabeler(noise=0.0)
    assert rank_file(comparisons, rankings, lab) == 2
    assert rank_file(comparisons, rankings, lab) == 2
    out = [json.loads(line) for line in rankings.read_text(encoding="utf-8").splitlines()]
    assert len(out) == 4
    assert out[0] == {**rows[0], "ranking": [1, 2, 0]}
    assert out[1]["ranking"] == [0, 1]


def test_two_labelers_agree_like_instructgpt_labelers():
    """Calibration of the default noise: InstructGPT's labelers agreed on 73-77% of pairs."""
    truth = SimulatedLabeler(noise=0.0)
    a, b = SimulatedLabeler(seed=1), SimulatedLabeler(seed=2)
    rng = random.Random(0)
    styles = ["canonical", "verbose", "terse", "repetitive", "wrong"]
    agree = total = 0
    for fam in FAMILY_BY_NAME.values():
        for _ in range(40):
            p = fam.sample_prompt(rng)
            resp = [fam.demonstration(p, s, rng) for s in styles]
            fin = [True] * len(resp)
            ranks = [{i: n for n, g in enumerate(lab.rank(p, resp, fin)) for i in (g if isinstance(g, list) else [g])}
                     for lab in (a, b)]
            q = [truth.quality(p, r, f) for r, f in zip(resp, fin)]
            for i in range(len(resp)):
                for j in range(i + 1, len(resp)):
                    if abs(q[i] - q[j]) > 1e-9:
                        total += 1
                        agree += (ranks[0][i] < ranks[0][j]) == (ranks[1][i] < ranks[1][j])
    assert 0.72 <= agree / total <= 0.80


def test_builtin_data_fills_only_what_is_missing_one_folder_per_world(tmp_path):
    """The commands' default data: the built-in corpus and demonstrations, named by size and seed
    so that another world never reuses a folder; data a user gave is left alone."""
    from fastgpt.data import load_meta
    from fastgpt.demo.builtin import fill_builtin_data
    from fastgpt.stages.configs import PretrainConfig, RewardConfig, SFTConfig
    a = fill_builtin_data(PretrainConfig(out_dir=str(tmp_path), builtin_documents=40, seed=2))
    b = fill_builtin_data(PretrainConfig(out_dir=str(tmp_path), builtin_documents=60, seed=2))
    assert a.data != b.data and load_meta(a.data)["documents"]["train"] + load_meta(a.data)["documents"]["val"] == 40
    assert fill_builtin_data(PretrainConfig(out_dir=str(tmp_path), data="mine")).data == "mine"
    sft = fill_builtin_data(SFTConfig(out_dir=str(tmp_path), seed=4))
    assert sft.data.endswith("sft-seed4.jsonl") and len(open(sft.data).readlines()) == len(make_world(4, n_pretrain=0).sft)
    assert fill_builtin_data(RewardConfig(out_dir=str(tmp_path))).data == ""  # rankings have no built-in default
