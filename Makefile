# Two commands do all the set-up on a fresh machine:
#   make train   runs the main job (IPPO/GSPO) on the embedded default: tiny model, CPU, offline
#   make test    checks the import contracts and lints (pyproject.toml), then runs the test suite
#                (what CI runs through .ci/run)
#   make eval    evaluates the base against the newest IPPO run of `make train` on held-out synthetic tasks
#                (WARM=runs/<sft run> adds an IDAR warm start)
# Both create the virtual environment in $(VENV) when it is missing or out of date.
PYTHON ?= python3
VENV ?= .venv
# cpu: onnxruntime; gpu: onnxruntime-gpu (never both).
FLAVOUR ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(FLAVOUR)

.PHONY: train test eval bench venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(FLAVOUR),dev]"
	# Installed without their declared requirements: insightface requires onnxruntime and
	# opencv-python (clashing with onnxruntime-gpu and opencv-python-headless); facenet-pytorch
	# pins torch<2.3. What they really need at run time is in pyproject.toml.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt insightface facenet-pytorch
	rm -f $(VENV)/.installed-*
	touch $@

train: $(STAMP)
	$(PY) scripts/train_gspo.py $(ARGS)

# The newest run folder of `make train` (or RUN=runs/<name>) against the base it started from; with
# WARM=runs/<sft run> (configs/sft/quickstart_idar.yaml) also the warm start, between them.
RUN ?= $(shell ls -td runs/gspo-* 2>/dev/null | head -1)
WARM ?=
eval: $(STAMP)
	@test -n "$(RUN)" || { echo "make eval: no runs/gspo-* folder; run make train first (or give RUN=runs/<name>)"; exit 2; }
	$(PY) scripts/evaluate.py --config configs/eval/quickstart.yaml --compare base=configs/policy/tiny_base.yaml $(if $(WARM),warm=$(WARM)) ippo=$(RUN) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/sampler_overhead.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
