"""The embedded demo: a small recognizer trained from scratch on synthetic shapes, on a laptop CPU.

    python -m nxtp_jax.main --config=configs/demo.py

Writes the shapes shards to ./data/shapes if absent, trains a tokenizer and the model in
./workdir/demo, then evaluates on the held-out split and prints R/P/F1.

`--config=configs/demo.py:tiny` is a seconds-long variant (tiny model and data) for tests.
"""

from ml_collections import config_dict

from nxtp_jax.configs import base

NUM_TRAIN = 20000
NUM_VAL = 1000


def get_config(variant: str = "") -> config_dict.ConfigDict:
    c = base.get_config()
    c.workdir = "./workdir/demo"
    c.seed = 0

    c.model.init = "scratch"
    c.model.vision.width = 256  # 4 heads; wider and shallower learns the shapes faster per CPU second
    c.model.vision.layers = 2
    c.model.vision.patch_size = 8
    c.model.vision.image_size = 64
    c.model.decoder.dim = 128
    c.model.decoder.layers = 2
    c.model.decoder.n_heads = 4
    c.model.decoder.multiple_of = 32
    c.model.dtype = "float32"  # CPUs gain nothing from bf16
    c.tokenizer.vocab_size = 700  # whole words for the labels and the templates

    c.data.root = "./data"
    c.data.train = ("shapes_train",)
    c.data.registry = {
        "shapes_train": {"root": "shapes/train", "length": NUM_TRAIN},
        "shapes_val": {"root": "shapes/val", "length": NUM_VAL},
    }
    c.data.synthesize = "shapes"
    c.data.synthetic_train = NUM_TRAIN
    c.data.synthetic_val = NUM_VAL
    c.data.worker_count = 0
    c.data.window_size = 256

    c.max_seq_len = 64 + 24  # 64 image tokens + 24 text tokens (prompt, 3 labels, EOS)
    c.prompt_augmentation = False  # one template: a model this small learns the images much faster
    c.batch_size = 32
    c.total_steps = 1500
    c.optim.lr = 2e-3
    c.optim.lr_min = 1e-5
    c.optim.warmup_ratio = 0.0
    c.optim.warmup_steps = 30
    c.optim.schedule = "warmup_cosine"  # no full-rate first update (the original's quirk) from scratch

    c.trainable = (".*",)  # from scratch, everything trains
    c.embedding_rows = ("*",)

    c.checkpoint.save_interval_steps = 250
    c.log_every_steps = 25

    c.eval.dataset = "shapes_val"
    # Every image has exactly 3 labels (colour, shape, count), so k = 3 lets a perfect model
    # score F1 1. MiniLM rates any two colour words (or counts, or shape names) as close, so
    # the label prior alone would score well under it: exact matching is the metric that
    # tells learning from guessing, and needs no optional dependency.
    c.eval.embedder = "exact"
    c.eval.k = 3
    c.eval.batch_size = 100
    c.eval.examples = 5
    c.eval.baseline = True
    if variant == "tiny":
        _tiny(c)
    elif variant:
        raise ValueError(f"expected the variant '' or 'tiny', found {variant!r}")
    return c


def _tiny(c: config_dict.ConfigDict) -> None:
    c.workdir = "./workdir/demo_tiny"
    c.model.vision.width = 64
    c.model.vision.layers = 1
    c.model.vision.image_size = 32
    c.model.decoder.dim = 64
    c.model.decoder.layers = 1
    c.tokenizer.vocab_size = 300
    c.data.root = "./data/tiny"
    c.data.registry.shapes_train.length = 64
    c.data.registry.shapes_val.length = 16
    c.data.synthetic_train = 64
    c.data.synthetic_val = 16
    c.data.window_size = 16
    c.max_seq_len = 16 + 48
    c.batch_size = 8
    c.total_steps = 40
    c.optim.warmup_steps = 4
    c.checkpoint.save_interval_steps = 10
    c.log_every_steps = 1
    c.eval.batch_size = 8
    c.eval.embedder = "exact"
    c.eval.examples = 2
