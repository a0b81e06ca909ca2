"""The whole chain through make at toy sizes (the chain_run fixture), then what a user sees.

The report's and the evals' contents are checked in test_report.py and test_eval.py."""

import os
import re
import shutil
import subprocess

from conftest import REPO, make, make_command

from common.models import EMBEDDED_DEFAULT


def test_second_make_all_does_nothing(chain_run):
    result = make("all", chain_run)
    assert result.returncode == 0
    assert "Nothing to be done for 'all'" in result.stdout
    assert "steps/" not in result.stdout  # no step ran


def test_make_all_printed_its_plan_first_and_kept_it(chain_run):
    """`make all` runs the plan before the chain (make plan's table, with no GPU and no setup) and keeps it in RUN, so
    the second `make all` has nothing to do (above)."""
    import json

    log = (chain_run.parent / "make-all.log").read_text()
    assert log.index("make plan: GPU=cpu") < log.index("steps/generate.py")
    plan = json.loads((chain_run / "plan.json").read_text())
    assert plan["num_samples"] == 12 and [s["step"] for s in plan["steps"]][:2] == ["generate", "judge"]


def test_bad_variables_list_the_valid_choices(tmp_path):
    result = make("help", tmp_path, GPU="v100")
    assert result.returncode != 0 and "GPU=v100 is not a tier; choose one of: a100 cpu h100 t4" in result.stderr
    result = make("help", tmp_path, MODEL="gpt2")
    assert result.returncode != 0 and "choose one of: llama mistral qwen smol" in result.stderr


def tiny_generator(out):
    """A two-layer random model with the embedded default's tokenizer and chat template: a step runs on it at once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(EMBEDDED_DEFAULT)
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in EMBEDDED_DEFAULT.iterdir():
        if f.name.startswith(("tokenizer", "generation_config", "chat_template")):
            shutil.copy(f, out)
    return out


def test_every_step_records_the_one_dtype_decision(chain_run, tmp_path, monkeypatch):
    """The cpu tier's DTYPE=auto is decided once (bf16 only on a CPU with native bf16) and each output says what it
    ran in: generation and scoring settings, the trainers' mixed precision, eval settings. Set to the other dtype,
    DTYPE reaches every step that loads a model, and a step runs and records it."""
    import json

    import generate
    import torch
    from conftest import read_lines

    from common.precision import dtype_name, resolve_dtype

    decided = dtype_name(resolve_dtype("auto"))
    first = lambda path: json.loads((chain_run / path).read_text().splitlines()[0])  # noqa: E731
    assert first("generated.jsonl")["settings"]["dtype"] == decided
    assert first("scored.jsonl")["dtype"] == decided
    for adapter in ("sft", "dpo"):
        config = json.loads((chain_run / adapter / "training_config.json").read_text())
        assert (config["bf16"], config["fp16"]) == (decided == "bfloat16", False)
    for model in ("base", "sft", "dpo"):
        assert json.loads((chain_run / "eval" / f"{model}.json").read_text())["settings"]["dtype"] == decided

    other = "float32" if decided == "bfloat16" else "bfloat16"
    dry = subprocess.run([*make_command("all", tmp_path / "dry", DTYPE=other), "-n"], capture_output=True, text=True)
    commands = dry.stdout.replace("\\\n", " ").splitlines()
    loading = [c for c in commands if re.search(r"steps/(generate|judge|preference|sft|dpo|eval)\.py", c)]
    assert len(loading) == 8 and all(f"--dtype {other} " in c for c in loading), loading  # eval: one a JSON

    engines = []
    monkeypatch.setattr(generate, "load_engine", lambda *a, real=generate.load_engine, **k: engines.append(
        real(*a, **k)) or engines[-1])
    out = tmp_path / "generated.jsonl"
    generate.main(["--model", str(tiny_generator(tmp_path / "tiny")), "--out", str(out), "--num-samples", "1",
                   "--max-instruction-tokens", "2", "--max-response-tokens", "2", "--dtype", other])
    assert read_lines(out)[0]["settings"]["dtype"] == other
    assert engines[0].model.dtype == getattr(torch, other)  # and the model ran in it


# ---- Settings stamps (env/settings.mk): an output follows the settings that shape it -------------------------------

EVALS = ["eval"]  # one process for base, SFT and DPO (it skips a model whose JSON holds the same evaluation)
# What `make -n all` runs on the finished test chain when a setting upstream of everything changes.
AFTER_GENERATE = sorted(["generate", "judge", "filter", "preference", "sft", "dpo", "eval", "report", "dataset"])


def would_run(run, target="all", **changed):
    """The steps `make -n TARGET` would run on the finished run `run` with `changed` settings, sorted, each once (make
    -n prints the eval's one command for each stale JSON: the first run of it brings the others up to date). make -n
    writes nothing, settings stamps included."""
    result = subprocess.run([*make_command(target, run, **changed), "-n"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = []
    for line in result.stdout.splitlines():
        if step := re.search(r"steps/(\w+)\.py", line):
            steps.append(step[1])
    return sorted(set(steps))


def stamps(run):
    """Each settings stamp of `run`: its text and mtime."""
    return {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in (run / ".settings").iterdir()}


def test_a_changed_setting_redoes_its_output_and_what_follows_and_only_that(chain_run):
    """make -n on the finished chain: a setting redoes the outputs it shapes and those that follow from them, and
    nothing else (`make eval TASKS=...` on a finished run redoes the evals and the report)."""
    before = stamps(chain_run)
    assert would_run(chain_run) == []  # unchanged: up to date, and so by make -q
    assert subprocess.run([*make_command("all", chain_run), "-q"]).returncode == 0
    assert would_run(chain_run, HUB_REPO="me/model", PY="python3") == []  # shapes no output

    assert would_run(chain_run, TASKS="mc_local") == sorted(EVALS + ["report", "plan"])
    assert would_run(chain_run, "eval", TASKS="mc_local") == EVALS
    assert would_run(chain_run, LIMIT="2") == sorted(EVALS + ["report", "plan"])
    assert would_run(chain_run, NUM_SAMPLES="13") == sorted(AFTER_GENERATE + ["plan"])
    assert would_run(chain_run, GENERATE_ARGS="--response-temperature 0") == AFTER_GENERATE
    assert would_run(chain_run, PREFERENCE_ARGS="--temperature 0.5") == \
        sorted(["preference", "dpo", "eval", "report", "dataset"])
    assert would_run(chain_run, SFT_ARGS="--max_steps 3 --save_steps 1") == sorted(["sft", "dpo", "eval", "report"])
    # make -n and -q wrote no stamp: the next unchanged make has nothing to do
    assert {name: stamp for name, stamp in stamps(chain_run).items() if name in before} == before
    assert "TASKS=ifeval_local,mc_local\nEVAL_BATCH=4\n" in before["eval"][0]  # the settings, readable


def test_a_changed_tier_yaml_redoes_training_and_what_follows(chain_run, tmp_path):
    """SFT_CONFIG's content, not only its name, is part of the SFT stamp; its comments are not."""
    run, config = tmp_path / "run", tmp_path / "sft.yaml"
    shutil.copytree(chain_run, run, ignore=shutil.ignore_patterns("*.safetensors"))  # copy2 keeps the times
    shutil.copy(REPO / "env" / "cpu" / "sft.yaml", config)
    for stamp in (run / ".settings").iterdir():  # as if the chain had run with SFT_CONFIG=config
        times = stamp.stat()
        stamp.write_text(stamp.read_text().replace("env/cpu/sft.yaml", str(config)))
        os.utime(stamp, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert would_run(run, SFT_CONFIG=config) == []
    config.write_text("# a comment reworded, a blank line added\n\n" + config.read_text())
    assert would_run(run, SFT_CONFIG=config) == []  # the checksum leaves comments out
    config.write_text(config.read_text().replace("max_length: 512", "max_length: 256"))
    assert would_run(run, SFT_CONFIG=config) == sorted(["sft", "dpo", "eval", "report", "plan"])


def test_a_new_adapter_redoes_its_eval_and_only_what_follows(chain_run, tmp_path):
    """An adapter written after its eval (the step renames a new directory into place) is evaluated again; a new SFT
    adapter also retrains DPO on it. make -n and -q: nothing runs (which models the eval redoes, tests/test_eval.py)."""
    run = tmp_path / "run"
    shutil.copytree(chain_run, run, ignore=shutil.ignore_patterns("*.safetensors", "cache"))  # copy2 keeps the times
    assert subprocess.run([*make_command("eval", run), "-q"]).returncode == 0
    os.utime(run / "dpo")  # now: newer than eval/dpo.json
    assert would_run(run, "eval") == ["eval"]
    assert subprocess.run([*make_command("eval", run), "-q"]).returncode == 1
    os.utime(run / "sft")
    assert would_run(run, "eval") == ["dpo", "eval"]


def test_a_run_made_before_settings_stamps_is_kept_and_a_change_then_redoes_eval_alone(chain_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chain_run, run, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(run / ".settings")
    # PY=false: a step that ran would fail at once
    adopted = make("all", run, PY="false", PYTHON="false")
    assert adopted.returncode == 0 and "steps/" not in adopted.stdout, adopted.stdout + adopted.stderr
    assert {mtime for _, mtime in stamps(run).values()} == {0}  # dated 1970: they make nothing stale
    assert subprocess.run([*make_command("all", run), "-q"]).returncode == 0

    changed = subprocess.run([*make_command("eval", run, PY="false", TASKS="mc_local"), "-k"],  # -k: try each eval
                             capture_output=True, text=True)
    assert changed.returncode != 0  # PY=false
    assert "settings of eval changed: TASKS=mc_local\n" in changed.stdout
    evals = re.findall(r"steps/eval\.py .*--tasks mc_local .*--out-dir (\S+) --adapter sft=\S+ --adapter dpo=\S+",
                       changed.stdout)
    assert evals == [f"{run}/eval"] * 3 and len(re.findall(r"steps/\w+\.py", changed.stdout)) == 3  # one a JSON
    assert "TASKS=mc_local\n" in (run / ".settings" / "eval").read_text()


def makefile_definitions():
    """Each variable the Makefile defines, with its continuation lines joined."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    return {m[1]: m[2] for m in re.finditer(r"^([A-Z_]+) *[:?]?= *(.*)$", text, re.M)}


def step_rules():
    """(targets, prerequisites, recipe) of each Makefile rule whose recipe runs a step and writes under RUN."""
    lines = (REPO / "Makefile").read_text().replace("\\\n", " ").splitlines()  # continuation lines joined
    for i, line in enumerate(lines):
        if line.startswith("$(RUN)/") and (rule := re.match(r"(.*?) *&?: *(.*)$", line)):
            recipe = []
            for follow in lines[i + 1:]:
                if not follow.startswith("\t"):
                    break
                recipe.append(follow)
            if "steps/" in " ".join(recipe) or "$(EVAL)" in " ".join(recipe) or "$(PLAN)" in " ".join(recipe):
                yield rule[1], rule[2], " ".join(recipe)


def test_every_step_rule_has_a_stamp_holding_what_its_recipe_passes():
    """env/settings.mk lists each step's settings by hand: every variable a step's recipe passes is in it, less where
    the output goes, which Python runs it, a launcher that merges shards into the same records, and the eval's time
    estimate (EVAL_COST)."""
    defined = makefile_definitions()
    composite = {"EVAL", "PLAN", "POLICY_ARGS", "LAUNCH_TRAINING"}  # expanded to the variables they hold
    exempt = {"RUN", "PY", "PYTHON", "CHECK_CUDA", "LAUNCH_SHARDED"}

    def passed(text):
        names = set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", text))
        return set().union(*(passed(defined[n]) if n in composite else {n} for n in names)) if names else set()

    rules = list(step_rules())
    stamp_of = {targets: re.findall(r"\$\(RUN\)/\.settings/([\w-]+)", prerequisites)
                for targets, prerequisites, _ in rules}
    assert all(len(names) == 1 for names in stamp_of.values()), stamp_of  # each rule has its one stamp
    names = sorted({names[0] for names in stamp_of.values()})
    assert len(rules) == 12 and names == ["dataset", "dpo", "eval", "filter", "generate", "judge", "merge", "plan",
                                          "preference", "report", "report-png", "sft"]
    show = f"show-settings: ; @$(foreach s,{' '.join(names)},echo $(s) $(SETTINGS.$(s));) echo cuda $(CUDA_STEPS)"
    listed = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", f"--eval={show}", "show-settings",
                             "GPU=cpu", "PREF_POLICY=sft"], capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0]: set(line.split()[1:]) for line in listed.splitlines()}
    for targets, _, recipe in rules:
        name = stamp_of[targets][0]
        # a GPU tier without a GPU stops before the stamp too, where it stops before the step
        assert ("$(CHECK_CUDA)" in recipe) == (name in listed["cuda"]), f"{targets}: CUDA_STEPS"
        missing = passed(recipe) - exempt - ({"EVAL_COST"} if name == "eval" else set()) - listed[name]
        assert not missing, f"{targets}: its recipe passes {sorted(missing)}, not in SETTINGS.{name} (env/settings.mk)"


def test_two_turn_conversations_go_through_the_chain(chain_run):
    """The test chain runs with TURNS=2 (its recipe ends a turn at a sentence): generate writes each conversation,
    the filter keeps it whole, SFT trains every record with its turns counted, and the dataset's `messages` and the
    report say the same."""
    import json
    from collections import Counter

    from conftest import read_lines

    generated = read_lines(chain_run / "generated.jsonl")
    assert all(r["settings"]["turns"] == 2 for r in generated)
    two = [r for r in generated if len(r["conversation"]) == 4]
    assert len(two) >= 6, [len(r["conversation"]) for r in generated]  # 12 of 12 on bf16 and fp32 CPUs
    assert all([m["role"] for m in r["conversation"]] == ["user", "assistant"] * 2 for r in two)
    assert all(r["conversation"][:2] == [{"role": "user", "content": r["instruction"]},
                                         {"role": "assistant", "content": r["response"]}] for r in generated)

    kept = {r["id"]: r for r in read_lines(chain_run / "filtered.jsonl")}
    turns = json.loads((chain_run / "sft" / "training_config.json").read_text())
    counted = Counter(str(len(r["conversation"]) // 2) for r in kept.values())  # user turns: records
    assert sum(turns["train_turns"].values()) == turns["train_records"] and turns["train_turns"].get("2", 0) > 0
    assert all(turns["train_turns"][n] <= counted[n] for n in turns["train_turns"])

    published = [*read_lines(chain_run / "dataset" / "sft" / "train.jsonl"),
                 *read_lines(chain_run / "dataset" / "sft" / "test.jsonl")]
    assert len(published) == len(kept)
    assert all(p["messages"] == kept[p["id"]]["conversation"] for p in published)
    phrase = "of 2 turns: " + str(counted["2"]) + " record"
    assert phrase in (chain_run / "report.md").read_text()
    assert phrase in (chain_run / "dataset" / "README.md").read_text()
