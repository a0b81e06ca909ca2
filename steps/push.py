"""Upload an adapter (make push) or the run's dataset (make push-data) to the Hugging Face Hub, as one commit.

    HF_TOKEN=... python steps/push.py --adapter data/runs/llama-t4/dpo --repo-id you/llama-3.2-3b-sit-dpo
    HF_TOKEN=... python steps/push.py --dataset-dir data/runs/llama-t4/dataset --repo-id you/sit-data --private

The token comes from HF_TOKEN and is never printed or written. Only an allow-list of files goes up (the adapter,
its tokenizer, configs and curves; the dataset's JSONL splits and card); everything else stays local. An adapter's
model card (README.md, written when training ended) goes up with the eval table of base, SFT and DPO added where the
eval step has run (RUN/eval/*.json), and its base model recorded as a Hub id; the local files are left as they are.
"""

import fnmatch
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import DataError, OptionError, SetupError, run_step
from common.models import hub_id, portable_base
from common.options import step_parser
from common.reporting.cards import model_card, with_evaluation
from common.reporting.eval_tables import read_evals

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "tokenizer*", "chat_template.jinja",
                 "special_tokens_map.json", "training_config.json", "log_history.json", "curves.*", "README.md"]
DATASET_FILES = ["README.md", "sft/*.jsonl", "preference/*.jsonl"]
REWRITTEN = {"README.md", "adapter_config.json"}  # copied, not linked, into the upload: they are changed there


def parse_args(argv=None):
    p = step_parser(__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--adapter", type=Path, help="adapter directory (the SFT or DPO step's output)")
    what.add_argument("--dataset-dir", type=Path, help="dataset directory (the dataset step's output)")
    p.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    p.add_argument("--private", action="store_true",
                   help="create the repository private (one that exists already keeps its visibility)")
    p.add_argument("--evals", type=Path, default=None,
                   help="eval results for the adapter's card (default: eval/ beside the adapter directory)")
    p.add_argument("--dataset", default=None, help="the Hub dataset the adapter was trained on, for its card")
    args = p.parse_args(argv)
    if args.dataset_dir and (args.evals or args.dataset):
        raise OptionError("--evals and --dataset describe an adapter: pass them with --adapter, not --dataset-dir")
    return args


def allowed_files(folder, patterns):
    """The files under `folder` (paths relative to it, sorted) that match one of the patterns."""
    folder = Path(folder)
    found = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(f for f in found if any(fnmatch.fnmatch(f, pattern) for pattern in patterns))


def link_or_copy(src, dst):
    """A hard link where the filesystem allows one (no second copy of large weights or data), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish(folder, repo_id, repo_type, patterns, private=False, card=None, adapter=False):
    """Upload the files of `folder` that match `patterns` to the Hub repository `repo_id` ("model" or "dataset"),
    creating it where it does not exist. `card` (text) goes up as README.md in place of the folder's own. Returns
    the uploaded paths.

    The files are gathered in a staging directory first, so the commit holds exactly the allow-list and the local
    outputs are never modified (make would otherwise take a changed adapter for a new one and evaluate it again)."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise SetupError("HF_TOKEN is not set: create a write token at https://huggingface.co/settings/tokens and "
                         "export it (it is read from the environment only, never printed)")
    files = allowed_files(folder, patterns)
    if not files:
        raise DataError(f"{folder}: none of its files is one to upload ({', '.join(patterns)}); is it the right "
                        "directory?")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    with tempfile.TemporaryDirectory(prefix="push-") as staging:
        staging = Path(staging)
        for name in files:
            if name in REWRITTEN:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(folder) / name, staging / name)
            else:
                link_or_copy(Path(folder) / name, staging / name)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
        if adapter:
            portable_base(staging)  # adapters trained before bases were recorded by Hub id
        sent = allowed_files(staging, ["*"])
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            api.upload_folder(folder_path=staging, repo_id=repo_id, repo_type=repo_type,
                              commit_message=f"Upload {Path(folder).name} (Synthetic Instruction Tuner)")
        except OfflineModeIsEnabled:
            raise SetupError(f"HF_HUB_OFFLINE is set: pushing to {repo_id} needs the Hub; unset it for this command "
                             "(env -u HF_HUB_OFFLINE make push ...)") from None
        except HfHubHTTPError as e:  # its message holds the URL and the server's reason, never the token
            raise SetupError(f"the Hub refused the upload to {repo_id} ({str(e).splitlines()[0]}); check that "
                             "HF_TOKEN is a write token for that namespace") from None
    return sent


def adapter_card(adapter, evals_dir, dataset):
    """The adapter's model card with the eval table (and the dataset) added where known."""
    readme = adapter / "README.md"
    text = readme.read_text() if readme.exists() else ""
    if "Synthetic Instruction Tuner" not in text:  # PEFT's template: an adapter trained before model cards
        text = model_card(adapter)
    evals = read_evals(evals_dir or adapter.parent / "eval")
    return with_evaluation(text, evals, adapter.name, dataset)


def portable_base_of(adapter):
    """The base model the adapter will record on the Hub."""
    config = Path(adapter) / "adapter_config.json"
    if not config.exists():
        raise DataError(f"{config}: missing; is {adapter} an SFT or DPO step output (a PEFT adapter directory)?")
    return hub_id(json.loads(config.read_text()).get("base_model_name_or_path") or "")


def main(argv=None):
    args = parse_args(argv)
    if args.adapter:
        base = portable_base_of(args.adapter)
        if base and Path(base).is_absolute():
            print(f"warning: the adapter's base model is the local directory {base}: the pushed adapter loads only "
                  "where that directory exists", file=sys.stderr)
        sent = publish(args.adapter, args.repo_id, "model", ADAPTER_FILES, args.private,
                       card=adapter_card(args.adapter, args.evals, args.dataset), adapter=True)
        url = f"https://huggingface.co/{args.repo_id}"
    else:
        if not (args.dataset_dir / "README.md").exists():
            raise DataError(f"{args.dataset_dir / 'README.md'}: missing; is {args.dataset_dir} the dataset step's "
                            "output (make dataset)?")
        sent = publish(args.dataset_dir, args.repo_id, "dataset", DATASET_FILES, args.private)
        url = f"https://huggingface.co/datasets/{args.repo_id}"
    print(f"uploaded {len(sent)} files ({', '.join(sent)}) to {url}" + (" (private)" if args.private else ""),
          file=sys.stderr)


if __name__ == "__main__":
    run_step(main)
