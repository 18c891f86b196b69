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
    return make_world(seed=0, n_pretrain=2000, n_sft=1000, n_compare=300, n_ppo=200, n_eval=200, n_dev=48)


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
    sets = {"sft": sft, "compare": world.compare_prompts, "ppo": world.ppo_prompts, "eval": ev, "dev": world.dev_prompts}
    assert [len(s) for s in sets.values()] == [1000, 300, 200, 200, 48]
    assert len(world.pretrain) == 2000
    for name, s in sets.items():
        if name != "sft":  # the world has fewer prompts than demonstrations: SFT reuses its own
            assert len(set(s)) == len(s), f"{name} repeats a prompt"
    assert len(set(Counter(r["task"] for r in world.sft).values())) == 1  # every family equally demonstrated
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(sets[a]) & set(sets[b]), f"{a} and {b} share prompts"


def test_every_set_covers_every_family(world):
    all_names = {f.name for f in FAMILIES}
    assert {e["task"] for e in world.eval_items} == all_names
    assert {r["task"] for r in world.sft} == all_names
    for prompts in (world.compare_prompts, world.ppo_prompts, world.dev_prompts):
        assert {parse_prompt(p)[0].name for p in prompts} == all_names


def test_eval_prompts_not_in_pretraining(world):
    corpus = "\n".join(world.pretrain)
    assert not any(e["prompt"] in corpus for e in world.eval_items)
    assert any(p in corpus for p in world.ppo_prompts)  # other prompts do appear, with their answers


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
    assert answer_for("What is the number after 20?") is None  # numbers 0-20 only
    assert answer_for("What is the letter before a?") is None  # no answer, so not a prompt of the world
    assert answer_for("What is 7 plus 5?") is None


def test_known_answers():
    assert answer_for("What is the number after 19?") == "The number after 19 is 20."
    assert answer_for("Tell me the number before 10.") == "The number before 10 is 9."
    assert answer_for("Give me the letter after k.") == "The letter after k is l."
    assert answer_for("Name the letter before b.") == "The letter before b is a."
    assert answer_for("Is the number 37 odd or even?") == "The number 37 is odd."
    assert answer_for("Tell me the first letter of apple.") == "The first letter of apple is a."
    assert answer_for("Name the last letter of apple.") == "The last letter of apple is e."
    assert answer_for("How many letters has the word apple?") == "The word apple has 5 letters."


def test_every_answer_restates_its_question():
    """Every prompt contains, verbatim, the phrase its canonical answer restates before the claim
    ("the number after 4" in "What is the number after 4?" and "The number after 4 is 5."): a
    model this small copies a phrase it has just read far more reliably than one it must rephrase."""
    rng = random.Random(0)
    for fam in FAMILIES:
        for _ in range(20):
            p = fam.sample_prompt(rng)
            restated = fam.answer(p).rsplit(" is ", 1)[0].rsplit(" has ", 1)[0]
            phrase = restated.removeprefix("The ").split(" of ", 1)[-1]
            assert phrase in p, (p, fam.answer(p))


def test_pretrain_is_plain_statements(world):
    for doc in world.pretrain[:500]:
        assert doc and "\n" not in doc
        assert "User" not in doc and "Assistant" not in doc and "Sure" not in doc


def test_sft_style_mixture(world):
    """Per family: its slip_rate of the demonstrations wrong, the rest split by STYLE_MIX."""
    for fam in FAMILIES:
        recs = [r for r in world.sft if r["task"] == fam.name]
        counts = Counter(r["style"] for r in recs)
        assert set(counts) == set(STYLE_MIX) | ({"wrong"} if fam.slip_rate else set())
        assert abs(counts["wrong"] / len(recs) - fam.slip_rate) < 0.01, fam.name
        correct = len(recs) - counts["wrong"]
        for style, frac in STYLE_MIX.items():
            assert abs(counts[style] / correct - frac) < 0.05, (fam.name, style)
    labeler = SimulatedLabeler(noise=0.0)
    for rec in world.sft:
        p, a = _reply(rec)
        assert rec["messages"][0]["role"] == "user" and rec["messages"][1]["role"] == "assistant"
        assert labeler.is_correct(p, a) == (rec["style"] != "wrong"), (rec["style"], p, a)
    # Wrong demonstrations are each family's characteristic slip, not noise: a pattern the SFT
    # model can pick up and the labeler's comparisons can teach the reward model to catch.
    for rec in (r for r in world.sft if r["style"] == "wrong"):
        p, a = _reply(rec)
        fam, args = parse_prompt(p)
        assert fam.slip(args) in a, (p, a)


def test_write_world_roundtrip(world, tmp_path):
    paths = write_world(world, tmp_path)
    assert set(paths) == {"pretrain", "sft", "compare_prompts", "ppo_prompts", "eval", "dev_prompts"}

    def rows(name):
        return [json.loads(line) for line in paths[name].read_text(encoding="utf-8").splitlines()]

    assert [r["text"] for r in rows("pretrain")] == world.pretrain
    assert rows("sft") == world.sft
    assert [r["prompt"] for r in rows("compare_prompts")] == world.compare_prompts
    assert [r["prompt"] for r in rows("ppo_prompts")] == world.ppo_prompts
    assert rows("eval") == world.eval_items
    assert [r["prompt"] for r in rows("dev_prompts")] == world.dev_prompts


# -- labeler -----------------------------------------------------------------

P = "What is the number after 11?"
CANON = "The number after 11 is 12."
VERBOSE = "Sure! Let me think. The number after 11 is 12. I hope this helps!"
TERSE = "12"
REPEAT = "Sure! Let me think. The number after 11 is 12. The number after 11 is 12. The number after 11 is 12."
WRONG = "The number after 11 is 10."


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
    assert lab.is_correct(P, "12.") and lab.is_correct(P, "The number after 11 is 12")
    assert not lab.is_correct(P, WRONG)
    assert not lab.is_correct(P, "The number after 11 is 12. The number after 11 is 13.")
    assert not lab.is_correct(P, "")
    assert not lab.is_correct("Who are you?", "12")
    assert lab.is_correct("How many letters has the word fish?", "It has 4 letters.")
    assert lab.is_correct("How many letters has the word fish?", "The word fish has 4 letters.")
    assert lab.is_correct("What is the last letter of fish?", "The last letter of fish is h.")
    assert not lab.is_correct("What is the last letter of fish?", "The last letter of fish is f.")
    assert lab.is_correct("Is the number 8 odd or even?", "even")
    assert not lab.is_correct("Is the number 8 odd or even?", "The number 8 is odd.")
    assert lab.is_correct("Which is the letter after y?", "The letter after y is z.")
    assert not lab.is_correct("Which is the letter after y?", "The letter after y is Z.")


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
    assert not lab.is_on_format("12\nUser: and after 12?", True)
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
    fam = FAMILY_BY_NAME["next_number"]
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
        {"prompt": P, "task": "next_number", "answer": CANON},
        {"prompt": "What is the last letter of cat?", "task": "last_letter", "answer": "The last letter of cat is t."},
        {"prompt": "Is the number 9 odd or even?", "task": "parity", "answer": "The number 9 is odd."},
        {"prompt": "What is the letter after c?", "task": "next_letter", "answer": "The letter after c is d."},
    ]
    responses = [CANON, "t", "The number 9 is even.", "The letter after c is d. User: thanks"]
    finished = [True, True, True, False]
    m = lab.evaluate(items, responses, finished)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["format_compliance"] == pytest.approx(0.75)  # wrong but well-formed still counts
    assert m["mean_length"] == pytest.approx(sum(map(len, responses)) / 4)
    expected = sum(lab.quality(it["prompt"], r, f) for it, r, f in zip(items, responses, finished)) / 4
    assert m["labeler_score"] == pytest.approx(expected)
    assert m["per_task"] == {"last_letter": 1.0, "next_letter": 1.0, "next_number": 1.0, "parity": 0.0}


def test_judge_is_the_noiseless_labeler():
    """The gold judge PPO calls scores exactly like the labeler's noiseless quality."""
    lab = SimulatedLabeler(seed=3)
    prompts = [P, P, [{"role": "user", "content": P}]]
    responses, finished = [CANON, WRONG, CANON], [True, True, False]
    out = lab.judge(prompts, responses, finished)
    assert out["score"] == [lab.quality(P, r, f) for r, f in zip(responses, finished)]
    assert out["accuracy"] == [1.0, 0.0, 1.0] and out["format"] == [1.0, 1.0, 0.0]


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
        {"prompt": "What is the number after 3?", "responses": ["4", "The number after 3 is 4."], "finished": [True, False]},
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


def test_rm_agreement_splits_correctness_and_style_pairs():
    from fastgpt.demo.evaluate import rm_agreement
    lab = SimulatedLabeler(noise=0.0)
    samples = [(CANON, True), (WRONG, True), (VERBOSE, True), (TERSE, True)]
    # the labeler: canon > terse > verbose (correct, by style), all > wrong
    rewards = [2.0, 1.0, 0.0, 3.0]  # the RM: wrong above verbose, terse above canon
    out = rm_agreement([P], samples, rewards, 4, lab)
    assert (out["correctness_pairs"], out["style_pairs"], out["pairs"]) == (3, 3, 6)
    assert out["correctness_accuracy"] == pytest.approx(2 / 3)  # canon > wrong, terse > wrong; verbose < wrong
    assert out["style_accuracy"] == pytest.approx(2 / 3)  # canon > verbose, terse > verbose; canon < terse
    assert out["accuracy"] == pytest.approx(4 / 6)


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
