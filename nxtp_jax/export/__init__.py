"""Export: ONNX graphs and a TF SavedModel of the recognizer, and a JAX-free ONNX Runtime tagger.

`graphs` and `onnx_export` / `savedmodel` need JAX (plus jax2onnx, onnxruntime or
TensorFlow); `ort_tagger` needs only onnxruntime, numpy, pillow and sentencepiece.
This file imports nothing, so the runner works where JAX is not installed.
"""
