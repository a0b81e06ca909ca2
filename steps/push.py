"""Upload an adapter directory to the Hugging Face Hub. The token comes from HF_TOKEN and is never printed or
written; files other than the adapter, its tokenizer, its configs and its curves stay local.

    HF_TOKEN=... python steps/push.py --adapter data/runs/llama-t4/dpo --repo-id you/llama-3.2-3b-sit-dpo
"""

import argparse
import os
import sys

from common import SetupError, run_step

UPLOADED = ["adapter_config.json", "adapter_model.safetensors", "tokenizer*", "chat_template.jinja",
            "special_tokens_map.json", "training_config.json", "log_history.json", "curves.*", "README.md"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)
    if not os.environ.get("HF_TOKEN"):
        raise SetupError("HF_TOKEN is not set: create a write token at https://huggingface.co/settings/tokens")
    from huggingface_hub import HfApi

    api = HfApi()  # reads HF_TOKEN itself
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    api.upload_folder(folder_path=args.adapter, repo_id=args.repo_id, allow_patterns=UPLOADED)
    print(f"uploaded {args.adapter} to https://huggingface.co/{args.repo_id}", file=sys.stderr)


if __name__ == "__main__":
    run_step(main)
