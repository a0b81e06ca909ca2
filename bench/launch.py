"""GPU check of the multi-process training path (issue 5): `make sft dpo` through `accelerate launch`, on one GPU.

Multi-GPU machines are withheld, so this runs what one GPU can: the Makefile's sft and dpo targets with the training
launcher that NPROC>1 makes (`accelerate launch --multi_gpu`, which starts torch.distributed.run: a distributed
process group, DDP, the main process writing the adapter), here torch.distributed.run with one process; then
with FSDP (ACCELERATE_CONFIG=env/accelerate/fsdp.yaml), once with the a100 tier's settings and once with the h100's.
The model is SmolLM2-135M's architecture, randomly initialised (no weights reach the GPU machine), with SmolLM2's
tokenizer; the data is synthetic. It checks that each make run succeeds and writes the adapter (with its LoRA
tensors), the resolved config and the curves, and that a second make has nothing to do.

    python bench/launch.py --out OUT        # writes OUT/launch-<gpu>.json
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance
import training_speed as bench  # bench/training_speed.py: model building and synthetic data

REPO = bench.REPO
TRAIN_ARGS = "--logging_steps 1 --log_level info"
RUNS = {  # name: extra make variables (overriding --tier's)
    "ddp": {},
    # FSDP is for models whose activations don't fit without checkpointing either: the a100 tier's settings
    # (gradient checkpointing, no compile).
    "fsdp": {"ACCELERATE_CONFIG": "env/accelerate/fsdp.yaml", "GPU": "a100"},
    # and with the h100 tier's (no checkpointing; each layer compiled in place, here by accelerate after sharding)
    "fsdp-compiled": {"ACCELERATE_CONFIG": "env/accelerate/fsdp.yaml"},
}


def write_run_inputs(run_dir, tokenizer_dir):
    """generated.jsonl, filtered.jsonl and preference.jsonl, oldest first, so make starts at sft."""
    from transformers import AutoTokenizer

    words = bench.single_token_words(AutoTokenizer.from_pretrained(tokenizer_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    bench.write_data("small_sft", run_dir / "filtered.jsonl", words, spec=("sft", 96, (16, 64), (32, 256)))
    bench.write_data("small_dpo", run_dir / "preference.jsonl", words, seed=1, spec=("dpo", 64, (16, 64), (32, 256)))
    (run_dir / "generated.jsonl").write_text((run_dir / "filtered.jsonl").read_text())
    now = time.time()
    for age, name in ((30, "generated.jsonl"), (20, "filtered.jsonl"), (10, "preference.jsonl")):
        os.utime(run_dir / name, (now - age, now - age))


def make(targets, variables, log_path, dry=False):
    cmd = ["make", "-C", str(REPO), *(["-q"] if dry else []), *targets,
           *(f"{k}={v}" for k, v in variables.items())]
    t = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    return {"cmd": " ".join(cmd), "rc": rc, "elapsed_s": round(time.time() - t, 1)}


def adapter_tensors(path):
    """What the saved adapter holds: a wrapper's name in a key (FSDP's checkpoint wrapper, torch.compile's _orig_mod)
    would leave it unloadable, and an all-zero lora_B would mean nothing trained reached the file."""
    if not path.exists():
        return None
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    pattern = re.compile(r"base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.weight")
    return {"tensors": len(tensors), "unexpected_names": sorted(k for k in tensors if not pattern.fullmatch(k))[:5],
            "lora_B_nonzero": sum(int(v.abs().sum() > 0) for k, v in tensors.items() if ".lora_B." in k)}


def outputs(run_dir, log_path):
    """What the run left: files of each adapter directory, its losses and margins, and the launcher's own lines."""
    found = {}
    for step in ("sft", "dpo"):
        d = run_dir / step
        if not d.is_dir():
            found[step] = None
            continue
        history = json.loads((d / "log_history.json").read_text()) if (d / "log_history.json").exists() else []
        found[step] = {
            "files": sorted(p.name for p in d.iterdir()),
            "adapter": adapter_tensors(d / "adapter_model.safetensors"),
            "losses": [h["loss"] for h in history if "loss" in h],
            "margins": [h["rewards/margins"] for h in history if "rewards/margins" in h],
            "partial_left": (run_dir / f"{step}.partial").exists(),
        }
    text = log_path.read_text(errors="replace")
    found["log_lines"] = sorted({m.strip() for m in re.findall(
        r"(?:DDP constructor|FSDP|Total train batch size|Computing reference log probs for train dataset: 100%)[^\n]{0,120}",
        text)})[:20]
    found["log_tail"] = text[-3000:]
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--work", default="/tmp/bench-launch")
    p.add_argument("--tier", default="h100")
    p.add_argument("--tokenizer", default=str(REPO / ".benchtok"))
    p.add_argument("--only", default="", help="comma-separated run names: " + ",".join(RUNS))
    p.add_argument("--steps", default="--max_steps 6 --save_steps 3", help="flags given to both steps")
    a = p.parse_args()

    import torch
    from timing import gpu_slug

    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    model_dir = work / "model"
    if not (model_dir / "bench_meta.json").exists():
        bench.build_model("smollm2-135m", model_dir, a.tokenizer)
    deps = work / "deps-installed"  # the GPU machine has its packages: make's install target is marked done
    deps.touch()
    report = {"gpu": gpu, "versions": bench.installed_versions(bench.BENCH_PACKAGES), "tier": a.tier,
              **provenance(), "runs": []}
    out_file = out / f"launch-{gpu_slug(gpu)}.json"
    for name, variables in RUNS.items():
        if a.only and name not in a.only.split(","):
            continue
        run_dir = work / name
        write_run_inputs(run_dir, a.tokenizer)
        # accelerate refuses --multi_gpu with one process; what it starts then is torch.distributed.run, used here.
        launcher = (f"{sys.executable} -m accelerate.commands.launch --num_processes 1 --config_file "
                    f"{variables['ACCELERATE_CONFIG']}" if "ACCELERATE_CONFIG" in variables else
                    f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 1")
        step_args = f"{a.steps} {TRAIN_ARGS}"
        make_vars = {"GPU": a.tier, "MODEL": "llama", "MODEL_ID": str(model_dir), "RUN": str(run_dir),
                     "PY": sys.executable, "DEPS": str(deps), "LAUNCH_TRAINING": launcher,
                     "SFT_ARGS": step_args, "DPO_ARGS": step_args, **variables}
        result = {"name": name, "tier": make_vars["GPU"], "launcher": launcher}
        result["make"] = make(["sft", "dpo"], make_vars, work / f"{name}.log")
        result.update(outputs(run_dir, work / f"{name}.log"))
        # A second make must find both adapters finished (make -q: exit 0 when everything is up to date).
        result["rerun_is_noop"] = make(["sft", "dpo"], make_vars, work / f"{name}-rerun.log", dry=True)["rc"] == 0
        report["runs"].append(result)
        out_file.write_text(json.dumps(report, indent=1))
        print(f"[{name}] rc {result['make']['rc']} in {result['make']['elapsed_s']}s; rerun no-op: "
              f"{result['rerun_is_noop']}; sft {result['sft'] and result['sft']['losses']}; "
              f"dpo margins {result['dpo'] and result['dpo']['margins']}", flush=True)
        if result["make"]["rc"]:
            print(result["log_tail"], flush=True)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
