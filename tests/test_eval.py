"""Evaluation: the offline tasks, task-name checks, the chat template, adapters' effect on the scores, results per
model cached by make, and `make compare`."""

import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter

from conftest import CHAIN_VARS, REPO, make, read_lines, run_step

TASKS_DIR = REPO / "data" / "tasks"


def test_mc_local_is_a_loglikelihood_task_in_mmlu_hellaswag_format():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert {"ifeval_local", "mc_local"} <= set(manager.all_tasks)
    task = manager.load(["mc_local"])["tasks"]["mc_local"]
    assert task.OUTPUT_TYPE == "multiple_choice"
    assert [m["metric"] for m in task.config.metric_list] == ["acc", "acc_norm"]
    docs = list(task.test_docs())
    rows = read_lines(TASKS_DIR / "mc_local" / "mc_local.jsonl")
    assert 40 <= len(docs) == len(rows) <= 60
    assert len({r["query"] for r in rows}) == len(rows)  # no repeated question
    for doc, row in zip(docs, rows):
        assert task.doc_to_text(doc) == row["query"]
        assert task.doc_to_choice(doc) == row["choices"] and len(row["choices"]) == 4
        assert task.doc_to_target(doc) == row["label"]
    # the right answer sits at each position equally often, so "always A" scores chance
    assert set(Counter(r["label"] for r in rows).values()) == {len(rows) // 4}
    kinds = Counter(r["kind"] for r in rows)
    assert kinds["knowledge"] >= 15 and kinds["completion"] >= 15


def test_unknown_task_names_are_refused_before_the_model_loads(tmp_path):
    # The model does not exist: the task check has to come first for this message to appear.
    result = run_step("eval", "--model", tmp_path / "no-such-model", "--tasks", "mc_local,hellaswg",
                      "--out", tmp_path / "x.json", check=False)
    assert result.returncode == 2
    message = result.stderr
    assert "unknown lm-eval task(s): hellaswg." in message
    assert "ifeval_local, mc_local" in message  # the offline tasks are listed
    assert "hellaswag" in message.split("Known tasks like 'hellaswg':")[1]  # and the closest real names
    assert "Traceback" not in message and not (tmp_path / "x.json").exists()


def test_both_offline_tasks_ran_for_base_sft_and_dpo(chain_run):
    import lm_eval

    for name, adapter in (("base", None), ("sft", "sft"), ("dpo", "dpo")):
        result = json.loads((chain_run / "eval" / f"{name}.json").read_text())
        assert (result["adapter"] or "").endswith(adapter or "") and (result["adapter"] is None) == (adapter is None)
        assert result["tasks"] == ["ifeval_local", "mc_local"]  # the cpu tier's TASKS
        for task in result["tasks"]:
            assert result["n_samples"][task]["effective"] == 4  # LIMIT=4
        ifeval = result["results"]["ifeval_local"]
        for key in ("prompt_level_strict_acc,none", "inst_level_strict_acc,none", "prompt_level_loose_acc,none"):
            assert 0.0 <= ifeval[key] <= 1.0
        mc = result["results"]["mc_local"]  # log-likelihood: 4 questions, so multiples of 1/4
        for key in ("acc,none", "acc_norm,none"):
            assert mc[key] * 4 == int(mc[key] * 4)
            assert mc[key.replace(",", "_stderr,")] >= 0
        assert result["versions"]["lm_eval"] == lm_eval.__version__  # the installed one
        # SmolLM2 has its own template and training kept it: all three are prompted with the same one
        assert result["settings"]["chat_template"] == "model's own"
        assert result["settings"]["chat_template_sha256"] == sha256_16(smol_template())
        assert result["requests"]["total"] == 4 + 4 * 4 and result["loglikelihoods"]["mc_local"]["count"] == 16
        assert result["requests"]["by_fast_engine"] == 4  # IFEval's prompts went through the engine (LoRA too)
        assert result["requests"]["by_packed_scorer"] == 16  # and every choice through the packed scorer


def sha256_16(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def smol_template():
    from common.models import load_tokenizer

    return load_tokenizer("embedded:smollm2").chat_template


def eval_args(run_dir, stage, out, tasks="mc_local"):
    """The chain's eval command line for one stage (as recorded in its JSON), into `out` with a cache of its own."""
    recorded = json.loads((run_dir / "eval" / f"{stage}.json").read_text())
    settings = recorded["settings"]
    args = ["--model", recorded["model"], "--tasks", tasks, "--batch-size", settings["batch_size"],
            "--dtype", settings["dtype"], "--max-gen-toks", settings["max_gen_toks"], "--limit", recorded["limit"],
            "--seed", recorded["seed"], "--gen-rows", settings["gen_rows"], "--out", out, "--cache-dir", out.parent / "cache"]
    return args + (["--adapter", recorded["adapter"]] if recorded["adapter"] else [])


def test_adapters_change_the_loglikelihoods_and_a_repeated_base_run_does_not(chain_run, tmp_path):
    sums = {stage: json.loads((chain_run / "eval" / f"{stage}.json").read_text())["loglikelihoods"]["mc_local"]
            for stage in ("base", "sft", "dpo")}
    assert {s["count"] for s in sums.values()} == {16}  # 4 questions x 4 choices, each scored
    assert len({s["sha256"] for s in sums.values()}) == 3  # SFT and DPO each moved the scores off the base's
    run_step("eval", *eval_args(chain_run, "base", tmp_path / "base.json"))  # a fresh cache: recomputed
    again = json.loads((tmp_path / "base.json").read_text())
    assert again["requests"]["answered"] == 16 and again["loglikelihoods"]["mc_local"] == sums["base"]


def test_adapters_switched_on_one_load_answer_as_separate_loads(chain_run, tmp_path):
    """The chain evaluated base, SFT and DPO from one load (DPO's adapter put on after SFT's); DPO alone, loaded
    fresh with its adapter only, gives the same log-likelihoods and the same per-example scores."""
    chained = json.loads((chain_run / "eval" / "dpo.json").read_text())
    assert chained["time"]["models_this_load"] == 3  # the chain's one recipe evaluated all three
    run_step("eval", *eval_args(chain_run, "dpo", tmp_path / "dpo.json", tasks="ifeval_local,mc_local"))
    alone = json.loads((tmp_path / "dpo.json").read_text())
    assert alone["time"]["models_this_load"] == 1 and alone["requests"]["from_cache"] == 0
    assert alone["loglikelihoods"] == chained["loglikelihoods"]
    assert alone["examples"] == chained["examples"] and alone["key"] == chained["key"]


def test_the_three_models_answer_the_same_random_sample(chain_run):
    evals = {stage: json.loads((chain_run / "eval" / f"{stage}.json").read_text()) for stage in ("base", "sft", "dpo")}
    base = evals["base"]
    assert base["limit"] == "4" and base["seed"] == 0
    assert base["sample"] == {"ifeval_local": {"n": 4, "of": 57, "seed": 0}, "mc_local": {"n": 4, "of": 48, "seed": 0}}
    ids = {task: base["examples"][task]["doc_id"] for task in ("ifeval_local", "mc_local")}
    for stage in ("sft", "dpo"):
        assert evals[stage]["sample"] == base["sample"]
        assert {task: evals[stage]["examples"][task]["doc_id"] for task in ids} == ids
    assert all(len(v) == 4 and v != [0, 1, 2, 3] for v in ids.values())  # drawn, not the first four
    from common.eval_requests import draw

    assert ids["mc_local"] == draw({"mc_local": 48}, 4, 0)["mc_local"]  # the draw the step records
    mc = base["examples"]["mc_local"]  # per-example scores that add up to lm-eval's own
    assert sum(mc["acc,none"]) / 4 == base["results"]["mc_local"]["acc,none"]
    inst = base["examples"]["ifeval_local"]["inst_level_strict_acc,none"]
    assert sum(map(sum, inst)) / sum(map(len, inst)) == base["results"]["ifeval_local"]["inst_level_strict_acc,none"]


def test_a_base_model_without_a_chat_template_is_prompted_with_its_adapters_template(smol, tmp_path):
    # A stand-in for Mistral-7B-v0.1: the embedded model with its chat template removed (weights linked, not copied).
    base = tmp_path / "no-template"
    base.mkdir()
    for f in smol.iterdir():
        if f.name != "chat_template.jinja":
            (base / f.name).symlink_to(f)
    config = json.loads((smol / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").unlink()
    (base / "tokenizer_config.json").write_text(json.dumps(config))

    from common.generation.chat import DEFAULT_CHAT_TEMPLATE, prepare_tokenizer
    from common.models import load_tokenizer

    assert load_tokenizer(str(base)).chat_template is None
    adapter = tmp_path / "adapter"  # what SFT saves next to the adapter: the tokenizer as training prepared it
    prepare_tokenizer(load_tokenizer(str(base))).save_pretrained(adapter)

    import eval as eval_step

    def template(adapter_dir):
        args = eval_step.parse_args(["--model", str(base), "--out", str(tmp_path / "x.json")])
        return eval_step.eval_tokenizer(args, str(adapter_dir) if adapter_dir else None)[1]

    expected = {"chat_template": "project default", "chat_template_sha256": sha256_16(DEFAULT_CHAT_TEMPLATE)}
    assert template(None) == template(adapter) == expected

    out = tmp_path / "eval" / "base.json"  # and lm-eval prompts the base model with it
    run_step("eval", "--model", base, "--tasks", "mc_local", "--limit", 1, "--batch-size", 4, "--dtype", "float32",
             "--out", out)
    result = json.loads(out.read_text())
    assert {k: result["settings"][k] for k in expected} == expected
    assert result["results"]["mc_local"]["acc,none"] in (0.0, 1.0)


def test_a_second_make_eval_runs_nothing(chain_run):
    variables = {**CHAIN_VARS, "RUN": str(chain_run), "PY": sys.executable}
    question = subprocess.run(["make", "-q", "-C", str(REPO), "eval", "report",
                               *[f"{k}={v}" for k, v in variables.items()]], capture_output=True, text=True)
    assert question.returncode == 0, question.stdout + question.stderr  # make -q: everything is up to date
    result = make("eval", chain_run)
    assert result.returncode == 0 and "steps/eval.py" not in result.stdout
    assert "Nothing to be done for 'eval'" in result.stdout


def set_scores(run_dir, stage, value):
    path = run_dir / "eval" / f"{stage}.json"
    data = json.loads(path.read_text())
    data["results"]["mc_local"]["acc,none"] = value
    path.write_text(json.dumps(data))


def test_compare_evaluates_only_missing_models_and_tables_every_run(chain_run, tmp_path):
    runs = tmp_path / "runs"
    smol, qwen = runs / "smol-cpu", runs / "qwen-cpu"
    shutil.copytree(chain_run, smol)  # copy2 keeps the times make compares
    shutil.copytree(chain_run, qwen)  # stands in for a second model, finished
    # ... made with MODEL=qwen: a run without settings stamps is taken as made with the settings it is next run with
    shutil.rmtree(qwen / ".settings")
    (smol / "eval" / "dpo.json").unlink()
    for stage, value in (("base", 0.25), ("sft", 0.5), ("dpo", 1.0)):
        set_scores(qwen, stage, value)

    result = make("compare", chain_run, RUNS_DIR=runs, COMPARE="smol qwen")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evals_run = [line for line in result.stdout.splitlines() if "steps/eval.py" in line]
    assert len(evals_run) == 1 and f"--adapter dpo={smol}/dpo" in evals_run[0]  # one command for smol's three
    assert "eval: dpo from one load of" in result.stdout  # which evaluated only the missing one
    assert "base.json is up to date" in result.stdout and "sft.json is up to date" in result.stdout
    assert (smol / "eval" / "dpo.json").exists()

    table = (runs / "compare-cpu.md").read_text()
    for run_dir, name in ((smol, "smol"), (qwen, "qwen")):
        base = json.loads((run_dir / "eval" / "base.json").read_text())["results"]["mc_local"]
        for stage in ("base", "sft", "dpo"):
            mc = json.loads((run_dir / "eval" / f"{stage}.json").read_text())["results"]["mc_local"]
            cell = f"{mc['acc,none']:.3f} ± {mc['acc_stderr,none']:.3f}"
            if stage != "base":
                cell += f" ({mc['acc,none'] - base['acc,none']:+.3f})"
            row = next(line for line in table.splitlines() if line.startswith(f"| {name} | {stage} |"))
            assert cell in [c.strip() for c in row.strip("|").split("|")], (row, cell)
    assert "| qwen | dpo | " in table and "1.000 ± " in table and "(+0.750)" in table
    assert "mc_local acc" in table and "ifeval_local prompt_level_strict_acc" in table
    assert "different tasks or LIMITs" not in table

    again = make("compare", chain_run, RUNS_DIR=runs, COMPARE="smol qwen")
    assert again.returncode == 0 and "steps/eval.py" not in again.stdout  # all cached now


def test_compare_warns_when_runs_were_evaluated_differently(chain_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(chain_run / "eval", other / "eval")
    for stage in ("base", "sft", "dpo"):
        path = other / "eval" / f"{stage}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "limit": 2.0}))
    out = tmp_path / "compare.md"
    run_step("compare", "--run", f"a={chain_run}", "--run", f"b={other}", "--out", out)
    assert "different tasks or LIMITs" in out.read_text()
    missing = run_step("compare", "--run", f"c={tmp_path / 'nothing'}", "--out", out, check=False)
    assert missing.returncode == 2 and "eval/base.json: missing" in missing.stderr


def test_without_punkt_offline_the_stand_in_is_said_in_one_line(monkeypatch, capsys):
    """Offline (no punkt_tab installed, the download refused), IFEval's sentence checks fall back to the stand-in in
    data/nltk_data: the step says so in one line of its own, without nltk's urlopen error. A stand-in nltk module:
    the real one, first imported under capsys, would keep the test's stream (closed after it) as its error stream."""
    import types

    import eval as eval_step

    def refused(info, quiet=False, raise_on_error=False, print_error_to=sys.stderr, **kwargs):
        print("[nltk_data] Error loading punkt_tab: <urlopen error refused>", file=print_error_to)
        print("[nltk_data] Downloading package punkt_tab", file=sys.stdout)
        return False

    def missing(name, *args, **kwargs):
        raise LookupError(name)

    nltk = types.SimpleNamespace(data=types.SimpleNamespace(find=missing, path=[]), download=refused)
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    assert eval_step.ensure_punkt().startswith("offline stand-in")
    assert nltk.data.path == [str(REPO / "data" / "nltk_data")]
    out, err = capsys.readouterr()
    assert "[nltk_data]" not in out + err
    assert err.count("\n") == 1 and "stand-in in data/nltk_data" in err
