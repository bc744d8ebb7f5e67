"""Flax modules: the CLIP ViT encoder, the LLaMA decoder and the recognizer that joins them."""
