"""bench/schedule_replay.py: the paged engine's scheduling replayed on the CPU with no-op steps."""

import json

import generation_speed  # bench/ on PYTHONPATH (tests/conftest.py)
import schedule_replay

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
