"""Every field of an nxtp_jax experiment, with its default (the paper's G3M recipe, docs/method.md §3).

Experiment files (g3m.py, g70m.py, demo.py) start from `get_config()` here and change
fields; any field can also be set on the command line, e.g. `--config.optim.lr=2e-5`.
Pure data: nothing here reads files or computes from other fields.
"""

from ml_collections import config_dict

# Name -> {"root": directory under data.root, "length": samples}; lengths as in the original.
REGISTRY = {
    "cc3m_valid": {"root": "cc3m/cc3m_valid", "length": 12478},
    "coco_valid": {"root": "coco/coco_valid", "length": 5000},
    "openimages_v7_valid": {"root": "openimages_v7/openimages_v7_valid", "length": 41686},
    "coco": {"root": "coco/coco_train", "length": 118287},
    "cc3m": {"root": "cc3m/cc3m", "length": 2698118},
    "sbu": {"root": "sbu/sbu", "length": 828816},
    "laion115m": {"root": "laion115m/laion115m", "length": 67034168},
}

# The paper's trainable set: CLIP's last 6 blocks, ln_post and the new proj; every kept
# decoder block, norm and output; the token embeddings (only rows in `embedding_rows`).
PAPER_TRAINABLE = (
    r"vision_encoder/transformer/resblocks_(1[89]|2[0-3])/.*",
    r"vision_encoder/ln_post/.*",
    r"vision_encoder/proj/.*",
    r"language_decoder/layers_\d+/.*",
    r"language_decoder/norm/.*",
    r"language_decoder/output/.*",
    r"language_decoder/tok_embeddings/.*",
)

# Logical axis -> mesh axis (or None: replicated); `nxtp_jax.sharding` applies them, and a
# logical axis with no rule is an error there. FSDP over the model width, tensor parallelism
# over heads / MLP / vocabulary.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vit_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("vit_qkv", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_pos", None),
    ("norm", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    # Activations at block boundaries ([batch, length, embed], [.., heads, head_dim], [.., mlp]) reuse
    # the names above. Rules apply in order: `batch` takes fsdp first, so activations are
    # split over the batch there and replicated over their width.
    ("length", None),
    ("head_dim", None),
)


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.mode = "train_and_eval"  # train | eval | train_and_eval | compile (TPU memory and speed check, nxtp_jax/aot)
    c.workdir = ""  # default for --workdir: checkpoints, logs, config.json, eval results
    c.seed = 42  # init, data order, prompt templates and label shuffles all derive from it

    c.model = config_dict.ConfigDict()
    c.model.name = "nxtp"  # the architecture (experiment.model_config dispatches on it): CLIP ViT + LLaMA blocks
    c.model.init = "checkpoint"  # "checkpoint" (from convert/from_torch.py) or "scratch" (random)
    c.model.checkpoint = ""  # directory written by convert/from_torch.py, when init == "checkpoint"
    c.model.vision = config_dict.ConfigDict()
    c.model.vision.width = 1024  # ViT-L/14
    c.model.vision.layers = 24  # CLIP blocks
    c.model.vision.patch_size = 14  # patch conv kernel and stride
    c.model.vision.image_size = 224  # input resolution; image tokens = (image_size / patch_size)^2
    c.model.decoder = config_dict.ConfigDict()
    c.model.decoder.dim = 4096  # LLaMA-2 7B width
    c.model.decoder.layers = 6  # kept decoder blocks (6: 1.78B model, 1: 0.77B model)
    c.model.decoder.n_heads = 32  # attention heads
    c.model.decoder.n_kv_heads = config_dict.placeholder(int)  # GQA key/value heads; None = n_heads
    c.model.decoder.multiple_of = 256  # SwiGLU hidden size rounding
    c.model.decoder.ffn_dim_multiplier = config_dict.placeholder(float)  # from params.json, if it has one
    c.model.decoder.norm_eps = 1e-5  # RMSNorm epsilon
    c.model.decoder.rope_theta = 10000.0  # RoPE base
    c.model.dtype = "bfloat16"  # activation / compute dtype
    c.model.param_dtype = "float32"  # master weights; the loss is always fp32
    c.model.attention_impl = ""  # "" (XLA) or "cudnn" (flash attention on NVIDIA GPUs)
    c.model.remat = False  # recompute decoder block activations in the backward pass
    # One lax.scan over each tower's blocks: compile time stops growing with depth. Params,
    # checkpoints and trainable patterns stay per layer (stacked inside the forward pass).
    c.model.scan_layers = False

    c.tokenizer = config_dict.ConfigDict()
    c.tokenizer.path = ""  # sentencepiece model; "" = the init checkpoint's, or <workdir>/tokenizer.model
    c.tokenizer.vocab_size = 1000  # pieces of a tokenizer trained from the training data (scratch only)
    c.tokenizer.max_texts = 50000  # training samples whose labels and captions train that tokenizer

    c.data = config_dict.ConfigDict()
    c.data.root = ""  # folder that the registry roots are relative to
    c.data.train = ("cc3m", "sbu", "coco")  # registry names mixed for training
    c.data.registry = REGISTRY  # dataset name -> {"root", "length"}
    c.data.synthesize = ""  # "shapes": write the synthetic shapes shards when they are absent
    c.data.synthetic_train = 20000  # samples of a synthesized training split
    c.data.synthetic_val = 1000  # samples of a synthesized validation split
    c.data.label_source = "auto"  # "auto": json labels, else caption nouns (NLTK); "caption"
    c.data.worker_count = 8  # grain worker processes per host (0 = in the main process)
    c.data.window_size = 1024  # shuffle window of the shard stream
    c.data.cycle_length = 4  # shards each reader interleaves

    c.max_seq_len = 512  # image tokens + text; text is cut/padded to max_seq_len - image tokens
    c.prompt_augmentation = True  # draw one of the ten templates per batch (else the first)
    c.shuffle_labels = True  # shuffle each sample's labels (seeded by seed, key and epoch)
    c.weight_loss_obj = 1.0  # weight of the object-label loss
    c.weight_loss_cap = 0.0  # weight of the caption loss; 0 skips the caption branch entirely

    c.batch_size = 512  # global batch (16 per device x 32 GPUs in the paper)
    c.grad_accum_steps = 1  # micro-batches per update; the loss stays a token mean over the batch
    c.epochs = 3  # passes over data.train, for total_steps
    c.total_steps = 0  # updates; 0 = epochs * (sum of registry lengths) // batch_size
    c.stop_at_step = 0  # stop (and save) at this step without changing the schedule; 0 = total_steps

    c.optim = config_dict.ConfigDict()
    c.optim.lr = 1e-5  # peak learning rate
    c.optim.lr_min = 0.0  # end of the cosine
    c.optim.b1 = 0.9  # AdamW beta1
    c.optim.b2 = 0.98  # AdamW beta2
    c.optim.eps = 1e-6  # AdamW epsilon
    c.optim.weight_decay = 0.1  # decoupled decay on the params `optim.no_decay`/`force_decay` select
    c.optim.no_decay = (r"language_decoder/tok_embeddings/.*",)  # >= 2-D params without decay
    # 1-D params with decay anyway. docs/method.md §3: none. The original's filter also decayed the final
    # RMSNorm (`(r"language_decoder/norm/.*",)` reproduces it).
    c.optim.force_decay = ()
    c.optim.warmup_ratio = 0.2  # warmup = max(warmup_ratio % of total_steps, warmup_steps)
    c.optim.warmup_steps = 2000  # minimum warmup length
    c.optim.schedule = "original"  # "original" (its exact off-by-one) or "warmup_cosine"
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 = none

    c.trainable = PAPER_TRAINABLE  # regexes over '/'-joined param paths; the rest is frozen
    c.embedding_rows = ("<|image|>",)  # token-embedding rows that get gradients; ("*",) = all rows

    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1  # data-parallel replicas (-1 = all remaining devices)
    c.mesh.fsdp = 1  # parameter/optimizer sharding (ZeRO-3 style); the batch is split over it too
    c.mesh.tensor = 1  # tensor parallelism over heads / MLP / vocabulary
    c.logical_axis_rules = LOGICAL_AXIS_RULES  # logical axis -> mesh axis; a missing rule is an error

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.save_interval_steps = 2000  # also saved at the first step, at the end and on SIGTERM
    c.checkpoint.keep = 3  # checkpoints kept in <workdir>/checkpoints
    c.checkpoint.dir = ""  # orbax's step checkpoints; "" = <workdir>/checkpoints (else absolute or a URI)
    c.checkpoint.async_save = True  # write in the background while training continues

    c.log_every_steps = 100  # console line, metrics.jsonl and TensorBoard
    c.tensorboard = True  # write TensorBoard scalars to <workdir>/tensorboard (needs tensorboardX)

    c.eval = config_dict.ConfigDict()
    c.eval.ckpt = ""  # checkpoint dir, training workdir or released model (g3m, g70m, a card .json); "" = the workdir
    c.eval.dataset = "coco_valid"  # registry name of the evaluation split
    c.eval.k = 10  # labels per image
    c.eval.strategy = "one_shot"  # one_shot | greedy | beam
    c.eval.ranking = "prob"  # prob | ppl | sim | none | clip
    c.eval.vocab = ""  # closed vocabulary: a file with one label per line (constrained one-shot); "" = open
    c.eval.batch_size = 64  # images per forward pass (per host)
    c.eval.quantize = "none"  # decoder weights: none | int8 (per output channel) | int4 (groups of 128)
    c.eval.embedder = "minilm"  # metric embedder: minilm | exact | clip
    c.eval.clip_archive = ""  # OpenAI's ViT-L-14.pt, for ranking "clip" and embedder "clip"
    c.eval.max_images = 0  # evaluate the first N images only; 0 = all
    c.eval.examples = 0  # predictions printed for this many images
    c.eval.baseline = False  # also score the frequency baseline (the k most common training labels)

    # mode "compile": ahead-of-time compiles for a TPU topology on any host (needs `pip install -e ".[tpu]"`).
    c.compile = config_dict.ConfigDict()
    c.compile.topology = "v5e-4"  # v4-32, v5e-16 / v5litepod-16, v5p-64, v6e-8, or JAX's form v5e:4x4
    c.compile.num_slices = 1  # slices joined over the data-center network (multi-slice)
    c.compile.programs = "train,eval,tag"  # which of train, eval, tag
    c.compile.search = ""  # "" | "batch" (largest per-chip batch that fits) | "mesh" (meshes ranked by step time)
    c.compile.tag_batches = (1, 8, 32)  # batches of the tagging program (one chip, bf16 params as Tagger.load)
    return c
