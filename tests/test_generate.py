import signal
import subprocess
import sys
import time

from conftest import REPO, read_lines, run_step

ARGS = ["--model", "embedded:smollm2", "--num-samples", "6", "--batch-size", "2", "--max-instruction-tokens", "48",
        "--max-response-tokens", "24", "--dtype", "bfloat16", "--seed", "3"]
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_records_are_instruction_response_pairs(tmp_path, smol):
    out = tmp_path / "gen.jsonl"
    run_step("generate", *ARGS, "--out", out)
    records = read_lines(out)
    assert [r["id"] for r in records] == [f"s3-{i:07d}" for i in range(6)]
    for r in records:
        assert r["instruction"].strip()
        assert not any(t in r["instruction"] + r["response"] for t in TEMPLATE_TOKENS)  # cut at the end of turn
        if r["instruction_finished"]:
            assert r["response"].strip() and 0 < r["response_tokens"] <= 24
        else:  # an instruction cut off at the token limit is not answered
            assert r["response"] == "" and r["response_finished"] is False
        assert r["settings"]["model"] == "embedded:smollm2" and r["settings"]["response_temperature"] == 0.0
    assert any(r["instruction_finished"] for r in records)
    assert len({r["instruction"] for r in records}) > 1  # sampled, not one instruction repeated
    assert not (tmp_path / "gen.jsonl.partial").exists()


def test_killed_run_resumes_to_the_same_records(tmp_path, smol):
    whole = tmp_path / "whole.jsonl"
    run_step("generate", *ARGS, "--out", whole)

    out = tmp_path / "killed.jsonl"
    partial = tmp_path / "killed.jsonl.partial"
    proc = subprocess.Popen([sys.executable, str(REPO / "steps" / "generate.py"), *ARGS, "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and len(partial.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(partial.read_text().splitlines())
    assert 2 <= written < 6, "the kill should land mid-run"
    assert not out.exists()  # an unfinished output never takes the final name
    with open(partial, "a") as f:
        f.write('{"id": "s3-00000')  # and a torn last line, as a crash mid-write leaves

    result = run_step("generate", *ARGS, "--out", out)
    assert "already written" in result.stderr
    assert read_lines(out) == read_lines(whole)  # same ids and texts, nothing duplicated or lost

    again = run_step("generate", *ARGS, "--out", out)  # a finished output is not generated again
    assert "generate:" not in again.stderr and read_lines(out) == read_lines(whole)


def test_partial_file_from_other_settings_is_refused(tmp_path, smol):
    out = tmp_path / "gen.jsonl"
    run_step("generate", *ARGS, "--out", out)
    result = run_step("generate", *ARGS[:-1], "4", "--out", out, check=False)  # another seed
    assert result.returncode == 2 and "other settings" in result.stderr and "Traceback" not in result.stderr


def test_missing_models_are_named_with_the_fix(tmp_path):
    out = tmp_path / "gen.jsonl"
    result = run_step("generate", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--out", out, check=False,
                      env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "meta-llama/Llama-3.1-8B-Instruct is not in the local cache" in result.stderr
    assert "embedded default" in result.stderr
    result = run_step("generate", "--model", str(tmp_path / "no-model"), "--out", out, check=False)
    assert result.returncode == 2 and "no-model: no such model directory" in result.stderr
    assert not out.exists()


def test_gated_error_names_the_license_page_and_token():
    import httpx2
    from common.models import explain_load_error
    from huggingface_hub.errors import GatedRepoError

    response = httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co/x"))
    message = explain_load_error("meta-llama/Llama-3.2-3B", GatedRepoError("403 gated repo", response=response))
    assert "https://huggingface.co/meta-llama/Llama-3.2-3B" in message and "HF_TOKEN" in message
