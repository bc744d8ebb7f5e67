"""The jitted train step: token-mean loss, frozen params, gradient accumulation, sharding, caption branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nxtp_jax import params as ptree, sharding
from nxtp_jax.models import mask
from nxtp_jax.training import optim, inputs as train_inputs, step as train_state
from nxtp_jax.data import preprocess
from nxtp_jax.models.recognizer import Recognizer, init_params
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import tiny_config

LABELS = ["dog,cat", "red", "tree,car,house", "blue,green", "sky", "bird,water", "grass,road,table", "circle"]
TEXT_LEN = 40


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


def host_batch(tok, n=8, seed=0, step=0, captions=False):
    rng = np.random.default_rng(seed)
    raw = {
        "image": rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
        "labels": np.array([LABELS[i % len(LABELS)] for i in range(n)]),
        "caption": np.array([f"a {w} next to the sky" for w in ("dog", "cat", "tree", "car", "bird", "road", "table", "logo")][:n]),
        "skipped": np.zeros(n, np.int32),
    }
    return train_inputs.model_inputs(tok, raw, step=step, seed=1, augment=True, text_len=TEXT_LEN, captions=captions)


def build(tok, mesh, *, trainable=(".*",), rows=None, accum=1, w_cap=0.0, lr=1e-3):
    config = tiny_config(tok)
    model = Recognizer(config)
    params = init_params(model, jax.random.key(0), mesh)
    schedule = optim.lr_schedule(lr=lr, lr_min=0.0, total_steps=10, warmup=2, kind="warmup_cosine")

    def make_tx(t):
        return optim.adamw(schedule, optim.decay_mask(t, (r"language_decoder/tok_embeddings/.*",), ()), b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip=0.0)

    state, frozen, tx = train_state.create(params, trainable, make_tx, mesh)
    opts = train_state.StepOptions(
        num_image_tokens=config.vision.num_patches, delimiter_id=tok.delimiter_id, grad_accum_steps=accum, weight_loss_cap=w_cap
    )
    row_mask = None if rows is None else jnp.asarray(optim.embedding_row_mask(tok.vocab_size, rows))
    fn = train_state.make_train_step(model, tx, schedule, opts, row_mask)
    spec = sharding.batch_sharding(mesh, sharding.LOGICAL_AXIS_RULES)
    step = train_state.jit_train_step(fn, state, frozen, spec, mesh)
    return model, params, state, frozen, step, spec, schedule


def one_device():
    return sharding.one_device_mesh()


def reference_loss(model, params, batch, tok, *, tokens="tokens", targets="targets", caption=False):
    """Token-mean CE with a numpy log-softmax over the whole batch."""
    n = model.config.vision.num_patches
    images = preprocess.normalize(batch["image"])
    if caption:
        m = mask.prefix_mask(n, n + batch[tokens].shape[1])
    else:
        m = mask.label_mask(batch[tokens], batch["answer_pos"], delimiter_id=tok.delimiter_id, num_image_tokens=n)
    # Jitted: eagerly, each of the forward's ops would compile on its own.
    logits = np.asarray(jax.jit(model.apply)({"params": params}, images, batch[tokens], m), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    t = np.asarray(batch[targets])
    valid = t >= 0
    picked = np.take_along_axis(logp, np.where(valid, t, 0)[..., None], -1)[..., 0]
    return float(-(picked * valid).sum() / valid.sum())


def test_step_loss_is_the_token_mean_and_frozen_params_stay_out(tok):
    mesh = one_device()
    trainable = (r"vision_encoder/proj/.*", r"language_decoder/.*")
    model, params, state, frozen, step, spec, schedule = build(tok, mesh, trainable=trainable, rows=[tok.image_id])
    batch = host_batch(tok)
    expected = reference_loss(model, params, batch, tok)
    assert "vision_encoder" in frozen and "proj" not in frozen["vision_encoder"]
    assert ptree.paths(state.params) == sorted(
        ["vision_encoder/proj/kernel"] + [p for p in ptree.paths(params) if p.startswith("language_decoder/")]
    )
    before = jax.tree.map(np.asarray, state.params)
    new_state, metrics = step(state, frozen, train_inputs.global_batch(batch, spec))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert int(new_state.step) == 1
    np.testing.assert_allclose(float(metrics["lr"]), float(schedule(0)), rtol=1e-6)
    assert float(metrics["target_tokens"]) == float((batch["targets"] >= 0).sum())
    after = jax.tree.map(np.asarray, new_state.params)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert all(jax.tree.leaves(changed))
    # Only the <|image|> row of the embedding table moves (gradient mask, no decay).
    emb = "language_decoder", "tok_embeddings", "embedding"
    rows = np.flatnonzero(np.any(before[emb[0]][emb[1]][emb[2]] != after[emb[0]][emb[1]][emb[2]], axis=1))
    assert rows.tolist() == [tok.image_id]
    # The optimizer state covers the trainable params only.
    mu = jax.tree.leaves(jax.tree.map(np.shape, new_state.opt_state[0].mu))
    assert mu == jax.tree.leaves(jax.tree.map(np.shape, before))


_RUNS = {}


def run_steps(tok, mesh_shape, n, **kw):
    """Losses and final params of n steps (cached: several tests compare against the same run)."""
    key = (tuple(sorted(mesh_shape.items())), n, tuple(sorted(kw.items())))
    if key not in _RUNS:
        mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(list(mesh_shape.values())))])
        model, params, state, frozen, step, spec, _ = build(tok, mesh, **kw)
        losses = []
        for i in range(n):
            state, metrics = step(state, frozen, train_inputs.global_batch(host_batch(tok, seed=i, step=i), spec))
            losses.append(float(metrics["loss"]))
        _RUNS[key] = losses, jax.tree.map(np.asarray, state.params)
    return _RUNS[key]


ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def test_gradient_accumulation_keeps_the_batch_token_mean(tok):
    full_losses, full = run_steps(tok, ONE, 2)
    acc_losses, acc = run_steps(tok, ONE, 2, accum=4)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc, full)


def test_sharded_step_matches_one_device(tok):
    assert jax.device_count() >= 8
    single_losses, single = run_steps(tok, ONE, 2)
    sharded_losses, sharded = run_steps(tok, {"data": 2, "fsdp": 4, "tensor": 1}, 2)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded, single)


def test_fsdp_state_is_sharded(tok):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    _, _, state, _, _, _, _ = build(tok, mesh)
    wq = state.params["language_decoder"]["layers_0"]["attention"]["wq"]["kernel"]
    mu = state.opt_state[0].mu["language_decoder"]["layers_0"]["attention"]["wq"]["kernel"]
    for x in (wq, mu):
        assert x.sharding.spec[0] == "fsdp"
        assert x.addressable_shards[0].data.shape == (wq.shape[0] // 8, wq.shape[1])


def test_caption_branch_adds_its_weighted_loss_and_costs_nothing_at_weight_zero(tok):
    mesh = one_device()
    model, params, state, frozen, step, spec, _ = build(tok, mesh, w_cap=0.5)
    batch = host_batch(tok, captions=True)
    expected = reference_loss(model, params, batch, tok) + 0.5 * reference_loss(
        model, params, batch, tok, tokens="cap_tokens", targets="cap_targets", caption=True
    )
    gb = train_inputs.global_batch(batch, spec)
    compiled = step.lower(state, frozen, gb).compile()
    with_caps_flops = compiled.cost_analysis()["flops"]
    _, metrics = compiled(state, frozen, gb)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)

    _, _, state0, frozen0, step0, spec0, _ = build(tok, mesh, w_cap=0.0)
    plain = train_inputs.global_batch(host_batch(tok), spec0)
    without_flops = step0.lower(state0, frozen0, plain).compile().cost_analysis()["flops"]
    assert with_caps_flops > 1.5 * without_flops
