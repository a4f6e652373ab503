# Two commands do everything on a fresh machine:
#   make run    create/reuse .venv, install, run the main job (digit tasks and real text,
#               one pool of 2 processes; results/, results/text/, the README's blocks)
#   make test   create/reuse .venv, install, run the whole test suite
# and one checks the main job in about 2 minutes without touching the committed results:
#   make quick  the same job with --quick (writes only results/quick/ and results/text_quick/)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: run quick test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	cd code/stage-09 && ../../$(PY) main_job.py

quick: $(STAMP)
	cd code/stage-09 && ../../$(PY) main_job.py --quick

# One BLAS thread: the suite's matrices are small, and a second thread only adds
# contention (seen here: 30x slower matmuls when the machine is busy).
test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench.py && $(PY) bench/bench_peft.py

clean:
	rm -rf $(VENV)

# Optional: the Hugging Face checks (transformers + peft load our exports, we load their
# checkpoints and adapters, and both compute the same logits and gradients). Installs the `hf` extra (CPU torch 2.13.0, transformers, peft).
.PHONY: test-hf
test-hf: $(STAMP)
	$(PY) -m pip install --quiet -e ".[hf]"
	REQUIRE_HF=1 $(PY) -m pytest -q code/stage-09/tests/test_hf_export.py code/stage-09/tests/test_adapter_files.py \
		code/stage-09/tests/test_hf_import.py code/stage-09/tests/test_hf_import_files.py \
		code/stage-09/tests/test_hf_tokenizer.py
