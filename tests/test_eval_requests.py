"""The eval's sample (common/eval_requests.py): LIMIT drawn at random, stratified by subtask, the same for every
model and run; per-task overrides; EVAL_COST's estimate."""

import pytest

from common import OptionError
from common.eval_requests import allocate, draw, eval_seconds, parse_cost, parse_limit, sample_count, task_limit

SUBJECTS = {"algebra": 100, "anatomy": 135, "law": 1534, "virology": 166}  # four MMLU subjects' sizes


def test_limit_text_gives_a_default_and_per_task_overrides():
    assert parse_limit("") == {}
    spec = parse_limit("1000,ifeval=all,hellaswag=0.5")
    assert spec == {"*": 1000, "ifeval": None, "hellaswag": 0.5}
    assert [task_limit(spec, t) for t in ("mmlu", "ifeval", "hellaswag")] == [1000, None, 0.5]
    assert task_limit(parse_limit("ifeval=all"), "mmlu") is None  # no default: every document
    for bad in ("0", "-3", "1.5", "ten", "1000,1000", "ifeval=0"):
        with pytest.raises(OptionError, match="LIMIT"):
            parse_limit(bad)


def test_counts_and_a_stratified_allocation_in_proportion_to_size():
    assert [sample_count(817, x) for x in (None, 100, 0.5, 5000)] == [817, 100, 409, 817]
    counts = allocate(SUBJECTS, 387)  # 1/5 of 1935
    assert sum(counts.values()) == 387
    assert counts == {"algebra": 20, "anatomy": 27, "law": 307, "virology": 33}  # each within one of size/5
    assert allocate(SUBJECTS, 2) == {name: 1 for name in SUBJECTS}  # one a subject at least: none drops out
    assert allocate(SUBJECTS, 10_000) == SUBJECTS
    assert allocate({"a": 3, "b": 1000}, 500) == {"a": 1, "b": 499}  # 1.5 and 498.5: the tie to the larger remainder order


def test_the_draw_depends_on_seed_and_task_only_and_leaves_out_whole_tasks():
    picked = draw(SUBJECTS, 387, seed=0)
    assert picked == draw(dict(reversed(SUBJECTS.items())), 387, seed=0)  # order of the subjects: no matter
    assert {k: len(v) for k, v in picked.items()} == allocate(SUBJECTS, 387)
    for name, ids in picked.items():
        assert ids == sorted(set(ids)) and ids[-1] < SUBJECTS[name]
    assert picked["law"][:5] != [0, 1, 2, 3, 4]  # random, not the first documents
    assert draw(SUBJECTS, 387, seed=1) != picked
    assert draw({"ifeval": 541}, None, seed=0) == {}  # all: left out of lm-eval's samples, so it runs whole
    assert draw({"truthfulqa_mc2": 817}, 1000, seed=0) == {}


def test_the_cost_estimate_adds_log_likelihood_and_generated_tokens():
    cost = parse_cost("2e-6,5e-5")
    assert eval_seconds(1_000_000, 100_000, cost) == pytest.approx(2 + 5)
    with pytest.raises(OptionError, match="LL_S,TOKEN_S"):
        parse_cost("0.1")
