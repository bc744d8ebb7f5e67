"""Inference: one-shot sampling, the original's other decoders, ranking, the `Tagger` API and output formatting.

This file imports nothing, so `formatting` and `ranking` load where JAX is not installed
(the ONNX runner imports them).
"""
