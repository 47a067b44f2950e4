# Steering settings per model, for `make steer MODEL=...` and the eval targets. Each model names its
# last layer, the layers its specs steer and its learned methods' layers and scales.

# SmolLM2-135M-Instruct (30 layers): layers and scales from the sweeps of issues 5 and 6 (README, Results).
LAST_LAYER_smollm2-135m-instruct            := 29
REFUSAL_SPEC_LAYER_smollm2-135m-instruct    := 12
REFUSAL_SPEC_SCALE_smollm2-135m-instruct    := 1.0
SENTIMENT_SPEC_LAYERS_smollm2-135m-instruct := 10, 11, 12, 13, 14
L2S_LAYERS_smollm2-135m-instruct            := --read-layer 10 --steer-layer 12
W2S_LAYERS_smollm2-135m-instruct            := --read-layer 6 --layers 8,10,12,14,16
SVF_LAYERS_smollm2-135m-instruct            := 10,12,14
SVF_SCALE_sentiment_smollm2-135m-instruct   := 4
SVF_SCALE_verbosity_smollm2-135m-instruct   := 8
SVF_SWEEP_smollm2-135m-instruct             := -8,-4,4,8

# Qwen2.5-Coder-0.5B-Instruct (24 layers): the default's layers at the same relative depth (layer L of
# 30 → round(L·24/30)), and SVF's step lengths (absolute, unlike the vectors' and nets' scales, which are
# in units of the model's own state differences) scaled by the ratio of the two models' residual-stream
# norms at the field's layers: the median per-token norm (first token excluded) over 40 chat-wrapped
# sentiment prompts is 151 at SmolLM2's 10, 12, 14 and 19.8 at Qwen's 8, 10, 11 (0.13x; `bench/residual_norms.py
# onnx/smollm2-135m-instruct:10,12,14 onnx/qwen2.5-0.5b-instruct:8,10,11`), so 4 → 0.5 and 8 → 1, and the
# eval's sweep likewise. Its layers are not yet swept on this model.
LAST_LAYER_qwen2.5-0.5b-instruct            := 23
REFUSAL_SPEC_LAYER_qwen2.5-0.5b-instruct    := 10
# The refusal vector's scale from `make tune-scale-refusal` (validation splits only): every swept scale
# refuses more validation prompts than unsteered and over-refuses more still; 0.125 loses least (refusal
# 0.967 against 0.850 unsteered, over-refusal 0.617 against 0.383; scale 1: 0.967 and 1.000).
REFUSAL_SPEC_SCALE_qwen2.5-0.5b-instruct    := 0.125
# L2S's and W2S's from `make tune-scale-l2s` and `make tune-scale-w2s` the same way: both lose least at
# 0.125 (L2S: refusal 0.950, over-refusal 0.567; W2S: 0.950 and 0.650; unsteered 0.850 and 0.383).
L2S_SCALE_qwen2.5-0.5b-instruct             := 0.125
W2S_SCALE_qwen2.5-0.5b-instruct             := 0.125
SENTIMENT_SPEC_LAYERS_qwen2.5-0.5b-instruct := 8, 9, 10, 11
L2S_LAYERS_qwen2.5-0.5b-instruct            := --read-layer 8 --steer-layer 10
W2S_LAYERS_qwen2.5-0.5b-instruct            := --read-layer 5 --layers 6,8,10,11,13
SVF_LAYERS_qwen2.5-0.5b-instruct            := 8,10,11
SVF_SCALE_sentiment_qwen2.5-0.5b-instruct   := 0.5
SVF_SCALE_verbosity_qwen2.5-0.5b-instruct   := 1
SVF_SWEEP_qwen2.5-0.5b-instruct             := -1,-0.5,0.5,1

# Qwen2.5-Coder-1.5B-Instruct: no steering settings yet. Its fp32 copies (HF's, llama.cpp's F32 and F16,
# onnx-steer's) do not fit in this machine's 24 GB together, so `make peers` loads one at a time.
PEERS_FLAGS_qwen2.5-1.5b-instruct           := --low-memory

LAST_LAYER            := $(LAST_LAYER_$(MODEL))
REFUSAL_SPEC_LAYER    := $(REFUSAL_SPEC_LAYER_$(MODEL))
REFUSAL_SPEC_SCALE    := $(REFUSAL_SPEC_SCALE_$(MODEL))
SENTIMENT_SPEC_LAYERS := $(SENTIMENT_SPEC_LAYERS_$(MODEL))
L2S_LAYERS            := $(L2S_LAYERS_$(MODEL))
L2S_SCALE             ?= $(or $(L2S_SCALE_$(MODEL)),1)
W2S_LAYERS            := $(W2S_LAYERS_$(MODEL))
W2S_SCALE             ?= $(or $(W2S_SCALE_$(MODEL)),1)
SVF_LAYERS            := $(SVF_LAYERS_$(MODEL))
SVF_SCALE_sentiment   ?= $(SVF_SCALE_sentiment_$(MODEL))
SVF_SCALE_verbosity   ?= $(SVF_SCALE_verbosity_$(MODEL))
SVF_SWEEP             ?= $(SVF_SWEEP_$(MODEL))

# The targets that train or apply steering stop before any work for a model with no settings above.
ifneq ($(filter steer eval eval-% tune-% bench mixed-batch criterion serve load fleet-load demo,$(MAKECMDGOALS)),)
ifeq ($(LAST_LAYER),)
$(error no steering settings for MODEL=$(MODEL) in models.mk (the models with settings: $(patsubst LAST_LAYER_%,%,$(filter LAST_LAYER_%,$(.VARIABLES)))))
endif
endif
