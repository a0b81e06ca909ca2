"""bench/schedule_replay.py: the paged engine's scheduler replayed on the CPU with no model, against the engine."""

import json

import generation_speed  # bench/ on PYTHONPATH (tests/conftest.py)
import pytest
import schedule_replay
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.generation import fastgen
from common.generation.sampling import Sampling

SMALL = ["--requests", "48", "--cap", "256", "--median", "40", "--prompt-min", "4", "--prompt-max", "40",
         "--slots", "8", "--admit", "0.125"]


def prompt_tokens(argv):
    prompts, _ = generation_speed.workload(schedule_replay.parse_args(argv))
    return sum(map(len, prompts))


def test_every_row_runs_to_its_length_and_the_queue_refills_the_slots(capsys):
    report = schedule_replay.main(SMALL)
    assert report["prefill_tokens"] == prompt_tokens(SMALL) and report["preempted"] == 0
    assert report["most_rows"] == 8 and report["prefills"] > 1
    steps = {int(b): n for b, n in report["steps_per_slot_bucket"].items()}
    # one token per live row a step: at least the useful tokens over the rows a step holds at most
    assert sum(steps.values()) >= report["useful_tokens"] / 8
    assert json.loads(capsys.readouterr().out) == report


def test_rows_that_outgrow_the_pages_give_them_back_and_are_prefilled_again():
    tight = SMALL + ["--pages", "12"]  # eleven 64-token pages for eight rows of up to ~300 tokens
    report = schedule_replay.main(tight)
    assert report["preempted"] > 0
    assert report["prefill_tokens"] > prompt_tokens(tight)  # the resumed rows' tokens so far, prefilled again


def test_a_device_run_prices_the_replay(tmp_path):
    report = schedule_replay.main(SMALL)
    steps = {int(b): n for b, n in report["steps_per_slot_bucket"].items()}
    run = {"mean_keys_per_slot_bucket": {}, "step_ms_per_slot_bucket": {str(b): 2.0 for b in steps},
           "prefill_s": 1.0, "prefill_tokens": report["prefill_tokens"] * 2,
           "steps_per_slot_bucket": {"8": 100}, "wall_s": 12.5, "decode_replay_s": 10.0}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"results": [{"variant": "baseline"}, run]}))
    estimate = schedule_replay.main(SMALL + ["--device-run", str(path)])["estimate"]
    assert estimate["decode_s"] == round(2.0 * sum(steps.values()) / 1000, 1)
    assert estimate["prefill_s"] == 0.5  # half the device run's prompt tokens
    assert estimate["other_s"] == round(1.5 / 100 * sum(steps.values()), 1)  # its 1.5 s beyond steps and prefills


def test_resumed_rows_and_rows_ending_as_they_are_preempted_end_at_their_lengths():
    """Short rows of very different lengths in ten pages: rows are preempted and resumed into slots that held other
    rows (the processors must not see the last row's tokens: EndAt counts them), and one preempted row had ended in
    the step the GPU ran while the host looked (it is finished, not resumed). replay() asserts every row's length."""
    argv = ["--requests", "400", "--cap", "256", "--median", "20", "--sigma", "1.2", "--prompt-min", "4",
            "--prompt-max", "40", "--slots", "8", "--admit", "0.125", "--pages", "10"]
    report = schedule_replay.main(argv)
    assert report["preempted"] > 0 and report["ended_when_preempted"] > 0


def engine_run(argv):
    """The same workload through SlotGenerator itself, its decoding step and prefill made no-ops (zero logits) and
    EndAt ending each row at its drawn length: (stats, (slot bucket, keys read) per step)."""
    args = schedule_replay.parse_args(argv)
    # EndAt reads a row's end from its first token (prompt length + drawn length, at least 4): no id below that
    eos, pad, fill, vocab = 1, 0, 2, 16
    config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    generator = fastgen.SlotGenerator(LlamaForCausalLM(config).eval(), pad, slots=args.slots, graphs=False,
                                      compiled=False, pages=args.pages, admit_fraction=args.admit)
    generator.prefill_tokens = args.prefill_tokens
    steps = []

    def no_op_step(slots, length):
        generator.logits[:slots].zero_()
        steps.append((slots, int((generator.cache.positions[:slots] + 1).sum())))

    def no_op_prefill(assignments):
        generator.stats["prefills"] += 1
        generator.stats["prefill_tokens"] += sum(len(ids) for _, ids in assignments)
        return torch.zeros(len(assignments), vocab)

    generator.forward_step, generator.prefill = no_op_step, no_op_prefill
    prompts, targets = generation_speed.workload(args)
    prompts = [[p[0]] + [fill] * (len(p) - 1) for p in prompts]
    sampling = Sampling(max_new_tokens=args.cap, temperature=0, stop_token_ids=(eos,))
    rows, _ = generator.generate(prompts, sampling, extra_processors=[generation_speed.EndAt(eos, pad)])
    assert [len(r) for r in rows] == [t + 1 for t in targets]
    return generator.stats, steps


@pytest.mark.parametrize("extra", [[], ["--pages", "12"], ["--requests", "200", "--median", "20", "--sigma", "1.2",
                                                            "--pages", "10"]])
def test_the_replay_schedules_as_the_engine_does_step_for_step(extra):
    """The replay drives the scheduler without the engine: every step's bucket and keys, every prefill, admission,
    preemption and the most rows in flight equal the engine's own on the same workload, with and without pages to
    spare."""
    argv = SMALL + extra
    stats, steps, _ = schedule_replay.replay(schedule_replay.parse_args(argv))
    engine_stats, engine_steps = engine_run(argv)
    assert steps == engine_steps
    keys = ("prefills", "prefill_tokens", "admitted", "preempted", "ended_when_preempted", "most_rows")
    assert {k: stats[k] for k in keys} == {k: engine_stats[k] for k in keys}
    if extra:
        assert stats["preempted"] > 0
