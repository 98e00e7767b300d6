# Two commands for a new user: `make demo` and `make test`.
# Both create .venv with Python >= 3.12 if it is absent and install the package into it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-f32 test-x64 lint bench clean

# Find a Python >= 3.12: on PATH first, then pyenv's versions, then uv's.
define find_python
for c in python3.13 python3.12 python3 python; do \
  p=$$(command -v $$c 2>/dev/null) || continue; \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; exit 0; }; \
done; \
for p in $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python3 $$HOME/.local/share/uv/python/cpython-3.1[2-9]*/bin/python3; do \
  [ -x $$p ] && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; exit 0; }; \
done; \
echo "error: Python >= 3.12 not found (install python3.12)" >&2; exit 1
endef

$(PY):
	@py=$$($(find_python)) || exit 1; echo "creating $(VENV) with $$py"; $$py -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	@# the compiled CPU E-step (conceptshift/_kernels), built once per machine; without a C++
	@# compiler the XLA formulation runs instead
	@$(PY) -c "from conceptshift import _kernels; print('CPU kernel:', _kernels.build())" \
	  || echo "CPU kernel not built: the XLA formulation will run"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/conceptshift demo

# The default suite runs twice: in float32 (JAX's default) and in float64.
test: test-f32 test-x64

test-f32: $(STAMP)
	JAX_ENABLE_X64=0 $(PY) -m pytest -q -n 2 --dist worksteal -p no:cacheprovider
	@# the EM tests again on the XLA formulation of the E-step (the compiled CPU kernel off)
	CONCEPTSHIFT_CPU_KERNEL=0 JAX_ENABLE_X64=0 $(PY) -m pytest -q -n 2 --dist worksteal \
	  -p no:cacheprovider tests/test_em.py

test-x64: $(STAMP)
	JAX_ENABLE_X64=1 $(PY) -m pytest -q -n 2 --dist worksteal -p no:cacheprovider

# heavy tests (marked slow; pytest's "no tests collected" exit code 5 counts as success)
# in both precisions, like the default suite: some slow checks run in the float32 pass only
test-slow: $(STAMP)
	JAX_ENABLE_X64=0 $(PY) -m pytest -q -m slow -p no:cacheprovider || [ $$? -eq 5 ]
	JAX_ENABLE_X64=1 $(PY) -m pytest -q -m slow -p no:cacheprovider || [ $$? -eq 5 ]

lint: $(STAMP)
	$(VENV)/bin/ruff check conceptshift tests benchmarks scripts

# every benchmark, full size (tens of minutes on 2 cores); each writes benchmarks/results/NAME.json
bench: $(STAMP)
	$(PY) benchmarks/replicates.py
	$(PY) benchmarks/hmm.py
	$(PY) benchmarks/svi.py
	$(PY) benchmarks/monotone.py
	$(PY) benchmarks/restarts.py
	$(PY) benchmarks/em_iteration.py  # last: it regenerates benchmarks/README.md from all results

clean:
	rm -rf $(VENV) .pytest_cache
