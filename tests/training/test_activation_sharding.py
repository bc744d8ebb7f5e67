"""Activation constraints, scan over blocks, and what the sharded train step compiles to on 8 CPU devices."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nxtp_jax import sharding
from nxtp_jax.data import preprocess
from nxtp_jax.models import mask
from nxtp_jax.models.config import DecoderConfig, ModelConfig, SpecialTokens, VisionConfig
from nxtp_jax.models.layers import Activations
from nxtp_jax.models.recognizer import Recognizer, init_params
from nxtp_jax.training import inputs, optim
from nxtp_jax.training.step import StepOptions, create, jit_train_step, make_train_step

# ViT width 128 (2 heads) and decoder width 128 (4 heads, 2 KV heads): every head axis splits over tensor=2.
CONFIG = ModelConfig(
    vision=VisionConfig(width=128, layers=2, patch_size=8, image_size=32),
    decoder=DecoderConfig(dim=128, layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=16),
    special_tokens=SpecialTokens(image=398, empty=399),
)
DELIMITER = 5
BATCH, TEXT = 8, 24
# The first ViT block stays frozen, as the paper freezes CLIP's early blocks.
TRAINABLE = (r"vision_encoder/transformer/resblocks_1/.*", r"vision_encoder/ln_post/.*", r"vision_encoder/proj/.*", r"language_decoder/.*")


def synthetic_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(6, 397, (BATCH, TEXT)).astype(np.int32)
    tokens[:, 6::3] = DELIMITER
    return {
        "image": rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8),
        "tokens": tokens,
        "targets": np.concatenate([tokens[:, 1:], np.full((BATCH, 1), -1, np.int32)], axis=1),
        "answer_pos": np.full((BATCH,), 4, np.int32),
        "skipped": np.zeros((BATCH,), np.int32),
    }


def forward_inputs():
    b = synthetic_batch()
    n = CONFIG.vision.num_patches
    m = mask.label_mask(jnp.asarray(b["tokens"]), jnp.asarray(b["answer_pos"]), delimiter_id=DELIMITER, num_image_tokens=n)
    return preprocess.normalize(jnp.asarray(b["image"])), jnp.asarray(b["tokens"]), m


def test_scan_over_blocks_gives_the_loops_logits_and_gradients_in_fp32():
    params = init_params(Recognizer(CONFIG), jax.random.key(0))
    images, tokens, m = forward_inputs()

    def run(model):
        def loss(p):
            logits = model.apply({"params": p}, images, tokens, m)
            return jnp.mean(jnp.square(logits)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits), jax.tree.map(np.asarray, grads)

    loop_logits, loop_grads = run(Recognizer(CONFIG))
    scan_logits, scan_grads = run(Recognizer(CONFIG, scan_layers=True, remat=True))
    assert np.abs(scan_logits - loop_logits).max() <= 1e-6
    # The gradients reach the per-layer params through the stack: same tree, same values.
    assert jax.tree.structure(scan_grads) == jax.tree.structure(loop_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), scan_grads, loop_grads)


def test_scan_keeps_the_kv_cache_path_on_the_loop():
    """With a cache (inference) the decoder runs its blocks one by one, scan or not: same cache, same hidden states."""
    params = init_params(Recognizer(CONFIG), jax.random.key(1))
    d = CONFIG.decoder
    h = jax.random.normal(jax.random.key(2), (2, 5, d.dim))
    positions = jnp.arange(5)[None]
    causal = jnp.tril(jnp.ones((5, 8), bool))[None, None]
    cache = tuple((jnp.zeros((2, 8, d.kv_heads, d.head_dim)),) * 2 for _ in range(d.layers))
    outs = [
        jax.jit(lambda p, model=model: model.apply({"params": p}, h, positions, causal, cache, 0, method=Recognizer.decode))(params)
        for model in (Recognizer(CONFIG), Recognizer(CONFIG, scan_layers=True))
    ]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), outs[0], outs[1])


def test_activation_constraints_are_absent_without_a_mesh_and_present_with_one():
    images, tokens, m = forward_inputs()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    params = init_params(Recognizer(CONFIG), jax.random.key(0), mesh)

    def hlo(model):
        return jax.jit(lambda p: model.apply({"params": p}, images, tokens, m)).lower(params).as_text()

    assert "sharding_constraint" not in hlo(Recognizer(CONFIG))
    constrained = hlo(Recognizer(CONFIG, activations=Activations(mesh, sharding.LOGICAL_AXIS_RULES)))
    # Per block: the residual twice and q, k, v, the attention output, the MLP hidden once each (encoder and decoder).
    blocks = CONFIG.vision.layers + CONFIG.decoder.layers
    assert constrained.count("sdy.sharding_constraint") >= 7 * blocks


def test_an_activation_axis_without_a_rule_is_an_error():
    images, tokens, m = forward_inputs()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    params = init_params(Recognizer(CONFIG), jax.random.key(0), mesh)
    rules = tuple(r for r in sharding.LOGICAL_AXIS_RULES if r[0] != "length")
    model = Recognizer(CONFIG, activations=Activations(mesh, rules))
    with pytest.raises(ValueError, match=r"no sharding rule for logical axes \['length'\]"):
        jax.jit(lambda p: model.apply({"params": p}, images, tokens, m)).lower(params)


def test_a_tensor_axis_that_does_not_divide_the_vocabulary_is_named_before_anything_compiles():
    """The released models' 32002-entry vocabulary splits over tensor = 2 but not 4; here 402 does the same."""
    odd = dataclasses.replace(CONFIG, decoder=dataclasses.replace(CONFIG.decoder, vocab_size=402))
    init_params(Recognizer(odd), jax.random.key(0), sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4]))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    message = r"params/language_decoder/output/kernel has 402 along 'vocab', which mesh axes \('tensor',\) \(4 devices\) do not divide"
    with pytest.raises(ValueError, match=message):
        init_params(Recognizer(odd), jax.random.key(0), mesh)


def param_counts(c: ModelConfig) -> tuple[int, int]:
    """(all params, trainable params) of CONFIG with TRAINABLE, from the architecture's formulas."""
    v, d = c.vision, c.decoder
    w, hd = v.width, d.head_dim
    vit_block = 2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
    vit_rest = v.patch_size**2 * 3 * w + w + (v.num_patches + 1) * w + 2 * w  # conv1, class, positions, ln_pre
    vit_head = 2 * w + w * d.dim  # ln_post, proj
    attn = d.dim * d.n_heads * hd * 2 + d.dim * d.kv_heads * hd * 2  # wq, wo, wk, wv
    dec_block = attn + 3 * d.dim * d.hidden_dim + 2 * d.dim
    decoder = 2 * d.vocab_size * d.dim + d.layers * dec_block + d.dim
    total = vit_rest + v.layers * vit_block + vit_head + decoder
    trainable = vit_block + vit_head + decoder  # resblocks_1, ln_post, proj, the whole decoder
    return total, trainable


def collectives(hlo_text: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """op -> [(dtype, output shape)] for every collective in compiled HLO (async starts counted once)."""
    found = {op: [] for op in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")}
    pattern = re.compile(r"= (.*?) (all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(?:-start)?\(")
    for line in hlo_text.splitlines():
        match = pattern.search(line)
        if match:
            outputs = re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
            shapes = [(dtype, tuple(int(x) for x in dims.split(",") if x)) for dtype, dims in outputs]
            # A combined (tuple) collective is one entry: several arrays moved at once.
            found[match.group(2)].append(shapes[0] if len(shapes) == 1 else ("tuple", tuple(shapes)))
    return found


def test_fsdp_x_tensor_train_step_gathers_one_parameter_at_a_time_and_holds_an_eighth_of_the_state():
    """The compiled train step on mesh data=1 x fsdp=4 x tensor=2 (8 CPU devices), activation constraints on.

    Expected, from how FSDP and tensor parallelism work with these rules (batch over fsdp,
    weights' `embed` over fsdp, heads / mlp / vocab over tensor):
    - all-gather: each FSDP-sharded weight is gathered over fsdp right where a block uses it
      (forward, and again in the backward for trainable weights), so every floating-point
      all-gather outputs exactly one parameter's tensor-parallel shard (its shape with the
      `tensor` dims halved): never the whole model, never several layers at once, never a
      weight's tensor split undone. Their count lies between the number of FSDP-sharded
      weights inside the blocks and twice the number of FSDP-sharded weights. Other
      all-gathers move only the batch's integer tokens / boolean masks.
    - all-reduce: the tensor-parallel partial sums and the gradients' sums over fsdp; XLA on
      CPU emits no reduce-scatter (it all-reduces, then slices).
    - all-to-all and collective-permute re-lay out activations (attention's q/k/v between
      the batch split and the head split) and the batch's integer arrays, never a weight.
    - memory: the step's arguments per device are the sharded state (fp32 params, the
      trainable ones' two Adam moments) plus the batch shard. The FSDP estimate of
      docs/benchmarks.md is the state bytes divided by the devices that shard it, here
      4 * (params + 2 * trainable) / (4 * 2); measured within 10% of it (replicated norms and
      biases, and weights whose two axes both map to fsdp, make up the difference).
    """
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 host devices"
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, devices=jax.devices()[:8])
    rules = sharding.LOGICAL_AXIS_RULES
    model = Recognizer(CONFIG, activations=Activations(mesh, rules))
    params = init_params(Recognizer(CONFIG), jax.random.key(0), mesh, rules)
    schedule = optim.lr_schedule(lr=1e-3, lr_min=0.0, total_steps=10, warmup=2, kind="warmup_cosine")

    def make_tx(t):
        return optim.adamw(schedule, optim.decay_mask(t, (), ()), b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip=0.0)

    state, frozen, tx = create(params, TRAINABLE, make_tx, mesh)
    opts = StepOptions(num_image_tokens=CONFIG.vision.num_patches, delimiter_id=DELIMITER)
    spec = sharding.batch_sharding(mesh, rules)
    step = jit_train_step(make_train_step(model, tx, schedule, opts, None), state, frozen, spec, mesh)
    batch = inputs.global_batch(synthetic_batch(), spec)
    compiled = step.lower(state, frozen, batch).compile()
    found = collectives(compiled.as_text())

    # Which shapes one parameter's tensor-parallel shard can have, and which params FSDP splits.
    shards, fsdp_sharded, in_blocks = set(), 0, 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        spec_ = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        axes = [a if isinstance(a, tuple) else (a,) for a in spec_]
        shards.add(tuple(n // 2 if "tensor" in a else n for n, a in zip(x.shape, axes)))
        if any("fsdp" in a for a in axes):
            fsdp_sharded += 1
            in_blocks += any(re.fullmatch(r"(resblocks|layers)_\d+", getattr(k, "key", "")) for k in path)

    floats = [shape for dtype, shape in found["all-gather"] if dtype.startswith(("f", "bf"))]
    assert floats and all(shape in shards for shape in floats), sorted(set(floats) - shards)
    assert in_blocks <= len(floats) <= 2 * fsdp_sharded, (in_blocks, len(floats), fsdp_sharded)
    others = [(d, s) for d, s in found["all-gather"] if not d.startswith(("f", "bf"))]
    assert all(d in ("s32", "pred") and s[0] <= BATCH for d, s in others), others
    assert found["reduce-scatter"] == []
    assert found["all-reduce"]
    for op in ("all-to-all", "collective-permute"):
        moved = [x for d, s in found[op] for x in (s if d == "tuple" else [(d, s)])]
        assert not [s for _, s in moved if s in shards], found[op]  # activations only, never a weight

    total, trainable = param_counts(CONFIG)
    assert total == sum(x.size for x in jax.tree.leaves(params))
    assert trainable == sum(x.size for x in jax.tree.leaves(state.params))
    estimate = 4 * (total + 2 * trainable) / 8
    batch_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(batch))
    state_bytes = compiled.memory_analysis().argument_size_in_bytes - batch_bytes
    assert abs(state_bytes - estimate) <= 0.1 * estimate, (state_bytes, estimate)
