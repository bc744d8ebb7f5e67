"""The closed sets of names that configs, command lines and the API accept: each written once, here.

JAX-free, so the ONNX runner can import it.
"""

# Decoders (docs/method.md §4, §5).
STRATEGIES = ("one_shot", "greedy", "beam")
# Label rankings of Appendix A; "clip" re-ranks with OpenAI's CLIP and exists only in evaluation.
RANKINGS = ("prob", "ppl", "sim", "none")
EVAL_RANKINGS = RANKINGS + ("clip",)
# Beam search records no probabilities: the rankings that need none.
BEAM_RANKINGS = ("sim", "none", "clip")
# Embedders of the semantic F-score (docs/method.md §6).
EMBEDDERS = ("minilm", "exact", "clip")
# Where training and evaluation targets come from: json labels else caption nouns, caption nouns, none.
LABEL_SOURCES = ("auto", "caption", "none")
# Parameter and compute dtypes, by name (`jax.numpy.dtype(name)` gives the type).
DTYPES = ("float32", "bfloat16", "float16")
# Learning-rate schedules: the original's exact off-by-one, and the clean warmup + cosine.
SCHEDULES = ("original", "warmup_cosine")
# Experiment modes, model initialisations and synthetic datasets of configs/base.py.
MODES = ("train", "eval", "train_and_eval", "compile")
INITS = ("checkpoint", "scratch")
SYNTHETIC = ("", "shapes")
# Programs that mode "compile" builds for a TPU topology, and what it searches over (nxtp_jax/aot).
COMPILE_PROGRAMS = ("train", "eval", "tag")
COMPILE_SEARCHES = ("", "batch", "mesh")
# Decoder weight quantization for serving: none, int8 per output channel, int4 in groups.
QUANTIZE = ("none", "int8", "int4")
# Labels per image (k of the one-shot sampling) when a caller does not say.
DEFAULT_NUM_LABELS = 10
# ONNX and SavedModel export: the weights' dtype (float16 halves the files; activations stay float32).
EXPORT_DTYPES = ("float32", "float16")
# MatMulNBits' arithmetic with a quantized ONNX decoder: 4 int8 (the default: ORT's fast kernels), 0 float32.
ACCURACY_LEVELS = (0, 4)
DEFAULT_ACCURACY_LEVEL = 4
DEFAULT_OPSET = 23
