"""Installation: the constraints file against the requirements, `make setup`'s prerequisite checks, the Colab stamp,
and a GPU tier that stops before loading a model when torch sees no CUDA device. Offline and fast."""

import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO, make, run_step

CONSTRAINTS = REPO / "env" / "constraints.txt"
REQUIREMENTS = [REPO / "requirements.txt", REPO / "env" / "requirements-gpu.txt"]
# What the project measured and Colab would otherwise mix : each must be pinned.
MEASURED = ["transformers", "trl", "peft", "accelerate", "datasets", "lm-eval", "bitsandbytes", "liger-kernel"]


def requirement_lines(text):
    """The requirement lines of a requirements/constraints file: comments (whole-line or trailing) and blanks out."""
    lines = (line.split(" #")[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def constraint_problems(constraints_text, requirements_texts):
    """Everything wrong with a constraints file against the requirements files, as messages (empty: agrees)."""
    required = {}
    for text in requirements_texts:
        for line in requirement_lines(text):
            requirement = Requirement(line)
            required[canonicalize_name(requirement.name)] = requirement
    problems = [f"requirements name torch ({r})" for name, r in required.items() if name == "torch"]
    pinned = {}
    for line in requirement_lines(constraints_text):
        constraint = Requirement(line)
        name, specs = canonicalize_name(constraint.name), list(constraint.specifier)
        if name == "torch":
            problems.append(f"constraints name torch ({line}): PY's own torch must be kept")
            continue
        if len(specs) != 1 or specs[0].operator != "==":
            problems.append(f"{line}: a constraint pins one exact version (name==version)")
            continue
        pinned[name] = Version(specs[0].version)
        if name not in required:
            problems.append(f"{line}: not required by any requirements file")
        elif not required[name].specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{line}: does not satisfy the requirement {required[name]}")
    problems += [f"{name} is not pinned" for name in map(canonicalize_name, MEASURED) if name not in pinned]
    return problems


def test_constraints_agree_with_the_requirements_and_never_name_torch():
    assert constraint_problems(CONSTRAINTS.read_text(), [p.read_text() for p in REQUIREMENTS]) == []


def test_the_constraint_check_finds_each_kind_of_disagreement():
    requirements = ["transformers>=5.17,<6\ntrl==1.16.0  # trailing comment\n", "torch>=2\n"]
    constraints = "\n".join(["transformers==6.0.0", "trl>=1.16", "torch==2.13.0", "pandas==2.0.0"])
    problems = constraint_problems(constraints, requirements)
    assert "requirements name torch (torch>=2)" in problems
    assert any(p.startswith("torch==2.13.0: ") or "constraints name torch" in p for p in problems)
    assert "transformers==6.0.0: does not satisfy the requirement transformers<6,>=5.17" in problems
    assert "trl>=1.16: a constraint pins one exact version (name==version)" in problems
    assert "pandas==2.0.0: not required by any requirements file" in problems
    assert "peft is not pinned" in problems and "liger-kernel is not pinned" in problems


def test_the_installed_packages_are_the_constrained_versions():
    """make setup installed with the constraints: what this Python has is what env/constraints.txt says (packages a
    CPU setup doesn't install, liger-kernel, is skipped)."""
    wrong = []
    for line in requirement_lines(CONSTRAINTS.read_text()):
        constraint = Requirement(line)
        try:
            installed = metadata.version(constraint.name)
        except metadata.PackageNotFoundError:
            continue
        if not constraint.specifier.contains(installed, prereleases=True):
            wrong.append(f"{constraint.name} {installed} (constraint {line})")
    assert wrong == [], f"reinstall with `pip install -c {CONSTRAINTS.relative_to(REPO)} -r requirements.txt`"


# ---- make setup: prerequisites ----------------------------------------------------------------------------------

def fake_python(path, version, venv_works=True):
    """A stand-in `python3` for the checks setup runs: -V, the >= 3.11 test, the version name, and -m venv."""
    major_minor = ".".join(version.split(".")[:2])
    too_old = tuple(map(int, version.split(".")[:2])) < (3, 11)
    venv = 'mkdir -p "$3/bin"; exit 0' if venv_works else 'mkdir -p "$3/bin"; echo "ensurepip is not available" >&2; exit 1'
    path.write_text(f"""#!/bin/bash
case "$*" in
  -V) echo "Python {version}" ;;
  *print*) echo "python{major_minor}" ;;
  *version_info*) exit {int(too_old)} ;;
  "-m venv "*) {venv} ;;
  *) echo "fake python: $*" >&2; exit 1 ;;
esac
""")
    path.chmod(0o755)
    return path


def make_n(*args, env=None):
    """`make -n` (print the commands, run none) with the test's Python as PY."""
    return subprocess.run(["make", "-C", str(REPO), "-n", *args, f"PY={sys.executable}"], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def make_setup(tmp_path, python):
    venv = tmp_path / "venv"
    return make("setup", tmp_path / "run", VENV=venv, PY=venv / "bin" / "python", PYTHON=python), venv


def test_setup_states_and_checks_the_python_version(tmp_path):
    result, venv = make_setup(tmp_path, fake_python(tmp_path / "python3", "3.10.12"))
    assert result.returncode != 0
    assert "needs Python >= 3.11 with venv, GNU make >= 4.3" in result.stdout  # stated before the checks
    assert "Python >= 3.11 is needed (trl 1.16)" in result.stderr and "is Python 3.10.12" in result.stderr
    assert "sudo apt-get install python3.11 python3.11-venv) and pass PYTHON=python3.11" in result.stderr
    assert not venv.exists() and "pip install" not in result.stdout


def test_setup_without_the_venv_module_says_which_package_to_install(tmp_path):
    result, venv = make_setup(tmp_path, fake_python(tmp_path / "python3", "3.12.3", venv_works=False))
    assert result.returncode != 0
    assert "could not make a virtual environment" in result.stderr
    assert "sudo apt-get install python3.12-venv" in result.stderr
    assert not venv.exists(), "a half-made venv (no pip) would pass `test -x` on the next run"
    assert "pip install" not in result.stdout


def test_make_older_than_4_3_is_refused_with_what_to_install(tmp_path):
    # make 4.3 added grouped targets (`&:`) and announced them in .FEATURES; an older make lacks the word.
    result = make("help", tmp_path / "run", **{".FEATURES": "target-specific order-only"})
    assert result.returncode != 0
    assert "GNU make >= 4.3 is needed" in result.stderr and "brew install make" in result.stderr


# ---- make setup: what it installs, and where the stamp lies --------------------------------------------------

def test_colab_setup_pins_its_torch_uses_the_constraints_and_stamps_site_packages(tmp_path):
    result = make_n("setup", "GPU=cpu", env={"COLAB_RELEASE_TAG": "release-colab-test"})
    assert result.returncode == 0, result.stderr
    commands = result.stdout
    purelib = sysconfig.get_paths()["purelib"]  # the test's Python is the PY make is given
    # A new runtime has fresh site-packages, so a stamp there can't outlive the packages (a clone on Drive can).
    assert f"touch {purelib}/synthetic-instruction-tuner-deps-1" in commands
    install = next(line for line in commands.splitlines() if " -r requirements.txt" in line)
    assert "-c env/constraints.txt" in install
    assert f"-c <({sys.executable} -W ignore -c 'import torch; print(\"torch==\" + torch.__version__)')" in install


def test_torch_index_url_picks_the_torch_build(tmp_path):
    venv = tmp_path / "venv"
    url = "https://download.pytorch.org/whl/cu126"
    result = make_n("setup", f"VENV={venv}", f"TORCH_INDEX_URL={url}")
    assert result.returncode == 0, result.stderr
    assert f'pip install -q --index-url {url} "torch==2.13.0"' in result.stdout
    help_text = make("help", tmp_path / "run").stdout
    assert "TORCH_INDEX_URL=" in help_text and "PYTHON=" in help_text and "VENV=" in help_text


# ---- a GPU tier without a usable CUDA device ------------------------------------------------------------------

def test_makefile_asks_gpu_tiers_for_cuda(tmp_path):
    def shown(*variables):
        show = 'show-cuda: ; @echo "[$$SIT_REQUIRE_CUDA]"'
        result = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", f"--eval={show}", "show-cuda",
                                 *variables], capture_output=True, text=True)
        return result.stdout.strip() or result.stderr

    assert shown("GPU=cpu") == "[]"
    assert shown("GPU=t4", "MODEL=llama") == "[t4]"


NVIDIA_SMI_HEADER = """
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: 12.2     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_nvidia_smi_header_gives_the_driver_and_its_cuda(monkeypatch):
    from common import models

    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, NVIDIA_SMI_HEADER))
    assert models.nvidia_driver() == ("535.104.05", "12.2")

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(models.subprocess, "run", missing)
    assert models.nvidia_driver() is None


@pytest.mark.parametrize("torch_cuda, driver, expected", [
    (None, ("535.104.05", "12.2"),
     ["it is a CPU-only build", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu122", "rm -rf .venv"]),
    ("13.0", ("535.104.05", "12.2"),
     ["built for CUDA 13.0", "driver 535.104.05 runs CUDA 12.2 at most", "whl/cu122", "or update the driver"]),
    ("12.8", None, ["nvidia-smi finds no NVIDIA GPU or driver", "Use GPU=cpu"]),
    ("12.1", ("550.54.15", "12.4"), ["should run its CUDA 12.1", "CUDA_VISIBLE_DEVICES"]),
])
def test_gpu_tier_without_cuda_stops_before_loading_and_names_the_cause(monkeypatch, torch_cuda, driver, expected):
    import transformers
    from common import SetupError, models

    loaded = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(models, "nvidia_driver", lambda: driver)
    monkeypatch.setenv("SIT_REQUIRE_CUDA", "t4")
    for load in (lambda: models.load_causal_lm("embedded:smollm2"), lambda: models.load_tokenizer("embedded:smollm2")):
        with pytest.raises(SetupError) as error:
            load()
        message = str(error.value)
        assert message.startswith(f"GPU=t4 needs a CUDA device and torch {torch.__version__} sees none: ")
        for part in expected:
            assert part in message
    assert loaded == []
    monkeypatch.setenv("SIT_REQUIRE_CUDA", "")  # the cpu tier: the CPU is the device
    assert models.device() == "cpu"


def test_a_gpu_tier_step_on_this_machine_stops_with_the_cause(tmp_path, smol):
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    out = tmp_path / "generated.jsonl"
    result = run_step("generate", "--model", smol, "--out", out, "--num-samples", "2", check=False,
                      env={"SIT_REQUIRE_CUDA": "t4"})
    assert result.returncode == 2, result.stderr
    assert "error: GPU=t4 needs a CUDA device" in result.stderr and "Traceback" not in result.stderr
    cause = "CPU-only build" if torch.version.cuda is None else "nvidia-smi"
    assert cause in result.stderr
    partial = out.with_name(out.name + ".partial")  # the resume file may be opened before the model loads
    assert not out.exists() and (not partial.exists() or partial.read_text() == "")


# ---- make help: from the Makefile's own ## comments ------------------------------------------------------------

def test_help_lists_every_target_and_every_variable_with_its_value_now(tmp_path):
    """Every phony target and every variable a tier, model or the Makefile sets is documented by a ## comment, and
    `make help` prints each with its description and, for variables, the value for this GPU and MODEL."""
    sources = [REPO / "Makefile", REPO / "env" / "setup.mk", *REPO.glob("env/*/tier.mk")]
    documented = "\n".join(line for f in (REPO / "Makefile", REPO / "env" / "setup.mk")
                           for line in f.read_text().splitlines() if line.startswith(("## ", "#   ")))
    variables = {m for f in sources for m in re.findall(r"^([A-Z][A-Z_0-9]*) \?=", f.read_text(), re.M)}
    undocumented = sorted(v for v in variables if not re.search(rf"\b{v}\b", documented) and "EVAL_COST" not in v)
    assert undocumented == []
    phony = re.search(r"^\.PHONY: ((?:.*\\\n)*.*)", (REPO / "Makefile").read_text(), re.M).group(1)
    help_text = make("help", tmp_path / "run", GPU="t4", MODEL="llama").stdout
    listed = set(re.findall(r"^  ([a-z-]+) {2,}\S", help_text, re.M))
    assert set(phony.replace("\\\n", " ").split()) <= listed
    assert re.search(r"^  GEN_ROWS=64 +rows decoded at once at most \(the paged KV cache", help_text, re.M)
    assert re.search(r"^  GENERATOR=meta-llama/Llama-3.1-8B-Instruct +the instruct model", help_text, re.M)
    assert re.search(r"^  LOAD_IN_4BIT=--load-in-4bit +--load-in-4bit where", help_text, re.M)
