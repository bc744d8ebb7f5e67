"""Trainable selection, decay groups, the original's lr schedule and AdamW, against torch references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from nxtp_jax import experiment, params as ptree
from nxtp_jax.configs import base
from nxtp_jax.experiment import full_size
from nxtp_jax.training import optim
from nxtp_jax.models.recognizer import Recognizer


PAPER_TRAINABLE = base.PAPER_TRAINABLE


@pytest.fixture(scope="module")
def full_abstract():
    """Shapes of the 1.78B model's params (nothing allocated)."""
    model = Recognizer(full_size(layers=6))
    r, n = 224, 256

    def init(key):
        return model.init(key, jnp.zeros((1, r, r, 3)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 1, n + 2, n + 2), bool))

    return jax.tree.map(lambda x: x, jax.eval_shape(init, jax.random.key(0))["params"])


def test_paper_trainable_set(full_abstract):
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, full_abstract, is_leaf=lambda x: hasattr(x, "value"))
    trainable, frozen = ptree.split(params, PAPER_TRAINABLE)
    tr = ptree.paths(trainable)
    fr = ptree.paths(frozen)
    assert not set(tr) & set(fr)
    assert len(tr) + len(fr) == len(ptree.paths(params))
    vision_blocks = {int(p.split("/")[2].split("_")[1]) for p in tr if p.startswith("vision_encoder/transformer/")}
    assert vision_blocks == set(range(18, 24))
    frozen_blocks = {int(p.split("/")[2].split("_")[1]) for p in fr if p.startswith("vision_encoder/transformer/")}
    assert frozen_blocks == set(range(18))
    assert {p for p in tr if p.startswith("vision_encoder/") and "transformer" not in p} == {
        "vision_encoder/ln_post/scale",
        "vision_encoder/ln_post/bias",
        "vision_encoder/proj/kernel",
    }
    assert {p for p in fr if p.startswith("vision_encoder/") and "transformer" not in p} == {
        "vision_encoder/conv1/kernel",
        "vision_encoder/class_embedding",
        "vision_encoder/positional_embedding",
        "vision_encoder/ln_pre/scale",
        "vision_encoder/ln_pre/bias",
    }
    assert not [p for p in fr if p.startswith("language_decoder/")]
    assert "language_decoder/tok_embeddings/embedding" in tr


def test_unmatched_pattern_is_an_error():
    params = {"a": {"kernel": np.zeros((2, 2))}, "b": np.zeros(2)}
    with pytest.raises(ValueError, match="matches no parameter"):
        ptree.split(params, ("a/.*", "c/.*"))


def test_split_merge_roundtrip():
    params = {"a": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}, "b": {"w": np.full(3, 2.0)}}
    trainable, frozen = ptree.split(params, (r"a/kernel",))
    assert ptree.paths(trainable) == ["a/kernel"]
    assert ptree.paths(frozen) == ["a/bias", "b/w"]
    merged = ptree.merge(trainable, frozen)
    assert jax.tree.map(lambda x, y: np.array_equal(x, y), merged, params) == jax.tree.map(lambda _: True, params)


def test_decay_groups_follow_the_original_filter():
    trainable = {
        "vision_encoder": {"proj": {"kernel": np.zeros((4, 8))}, "ln_post": {"scale": np.zeros(4), "bias": np.zeros(4)}},
        "language_decoder": {
            "tok_embeddings": {"embedding": np.zeros((10, 8))},
            "layers_0": {"attention_norm": {"weight": np.zeros(8)}, "attention": {"wq": {"kernel": np.zeros((8, 8))}}},
            "norm": {"weight": np.zeros(8)},
            "output": {"kernel": np.zeros((8, 10))},
        },
    }
    mask = optim.decay_mask(trainable, (r"language_decoder/tok_embeddings/.*",), (r"language_decoder/norm/.*",))
    flat = dict(zip(ptree.paths(mask), [mask_leaf for mask_leaf in jax.tree.leaves(mask)]))
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == [
        "language_decoder/layers_0/attention/wq/kernel",
        "language_decoder/norm/weight",
        "language_decoder/output/kernel",
        "vision_encoder/proj/kernel",
    ]


def torch_lrs(lr, lr_min, total, warmup):
    """The learning rate each update of the original's loop (src/train.py) runs at, with torch's own scheduler."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=lr_min)
    used = []
    for global_step in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        if global_step > warmup:
            sched.step()
        else:
            for g in opt.param_groups:
                g["lr"] = lr * global_step / warmup
    return used


@pytest.mark.parametrize("total,warmup", [(40, 10), (25, 1), (12, 11)])
def test_original_schedule_matches_the_torch_loop(total, warmup):
    ours = optim.lr_schedule(lr=1e-3, lr_min=1e-5, total_steps=total, warmup=warmup, kind="original")
    got = [float(ours(k)) for k in range(total)]
    np.testing.assert_allclose(got, torch_lrs(1e-3, 1e-5, total, warmup), rtol=1e-5, atol=1e-12)


def test_warmup_cosine_schedule():
    f = optim.lr_schedule(lr=1.0, lr_min=0.0, total_steps=10, warmup=4, kind="warmup_cosine")
    got = [float(f(k)) for k in range(10)]
    expected = [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * e / 6)) for e in range(6)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_warmup_length_is_ratio_percent_or_minimum():
    config = base.get_config()
    config.total_steps = 21360
    assert experiment.warmup_steps(config) == 2000
    config.total_steps = 10_000_000
    assert experiment.warmup_steps(config) == 20000


def test_adamw_with_row_mask_matches_torch():
    """Three updates of AdamW (betas 0.9/0.98, eps 1e-6, wd 0.1 on the decay group) with the embedding grad hook."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)  # decays
    b0 = rng.normal(size=(3,)).astype(np.float32)  # no decay (1-D)
    e0 = rng.normal(size=(6, 3)).astype(np.float32)  # embeddings: no decay, only row 4 trains
    grads = [[rng.normal(size=x.shape).astype(np.float32) for x in (w0, b0, e0)] for _ in range(3)]
    lrs = [1e-2, 5e-3, 2e-3]

    tw, tb, te = (torch.nn.Parameter(torch.tensor(x)) for x in (w0, b0, e0))
    opt = torch.optim.AdamW(
        [{"params": [tw], "weight_decay": 0.1}, {"params": [tb, te], "weight_decay": 0.0}], lr=lrs[0], betas=(0.9, 0.98), eps=1e-6
    )
    hook_mask = torch.zeros(6, 3)
    hook_mask[4] = 1.0
    for (gw, gb, ge), lr in zip(grads, lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        tw.grad, tb.grad, te.grad = torch.tensor(gw), torch.tensor(gb), torch.tensor(ge) * hook_mask
        opt.step()

    params = {"w": {"kernel": jnp.asarray(w0)}, "b": jnp.asarray(b0), "language_decoder": {"tok_embeddings": {"embedding": jnp.asarray(e0)}}}
    decay = optim.decay_mask(params, (r"language_decoder/tok_embeddings/.*",), ())
    tx = optim.adamw(lambda k: jnp.asarray(lrs)[k], decay, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip=0.0)
    state = tx.init(params)
    row_mask = jnp.asarray(optim.embedding_row_mask(6, [4]))
    for gw, gb, ge in grads:
        g = {"w": {"kernel": jnp.asarray(gw)}, "b": jnp.asarray(gb), "language_decoder": {"tok_embeddings": {"embedding": jnp.asarray(ge)}}}
        g = optim.mask_embedding_grads(g, row_mask)
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)

    np.testing.assert_allclose(params["w"]["kernel"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["b"], tb.detach().numpy(), rtol=1e-5, atol=1e-6)
    emb = params["language_decoder"]["tok_embeddings"]["embedding"]
    np.testing.assert_allclose(emb, te.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.delete(np.asarray(emb), 4, axis=0), np.delete(e0, 4, axis=0))
    assert not np.allclose(emb[4], e0[4])


def test_grad_clip_bounds_the_global_norm():
    params = {"a": jnp.zeros(4)}
    tx = optim.adamw(lambda k: 1.0, {"a": False}, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.0, grad_clip=1.0)
    _, state = tx.update({"a": jnp.full(4, 100.0)}, tx.init(params), params)
    # The first moment after one update is (1 - b1) * the clipped gradient, whose norm is 1.
    mu = optax.tree_utils.tree_get(state, "mu")["a"]
    np.testing.assert_allclose(mu, np.full(4, 0.1 * 0.5), rtol=1e-6)
