"""One-shot sampling (docs/method.md §4): the top-k next tokens after the prompt each start a branch.

The prefix (image tokens + prompt) runs once per image and fills a KV cache that all k
branches of the image share. Each later step feeds one token per branch. Branch j's
keys are written at slots T0 + s*k + j, so a step writes k contiguous slots and a mask
keeps every branch on the prefix plus its own tokens. The loop is a `lax.while_loop`
with static shapes that stops as soon as every branch has emitted the delimiter, or at
the cap.

`one_shot_recompute` is the original's strategy (the whole sequence again at every step,
k copies of the prefix, no cache); it is the reference the tests and benchmarks compare
against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nxtp_jax.models import mask as masks
from nxtp_jax.models.llama import init_cache
from nxtp_jax.models.recognizer import Recognizer

# Update 1 is the top-k step; a branch without a delimiter after update 19 gets a forced one.
MAX_UPDATES = 20


def prefix_embeddings(model: Recognizer, params, images: jax.Array, prompt: jax.Array) -> jax.Array:
    """Image tokens followed by the prompt's embeddings, [B, N + P, D]."""
    variables = {"params": params}
    img = model.apply(variables, images, method=Recognizer.encode_images)
    txt = model.apply(variables, prompt[None], method=Recognizer.embed).astype(img.dtype)
    return jnp.concatenate([img, jnp.broadcast_to(txt, (img.shape[0],) + txt.shape[1:])], axis=1)


def _next_token_probs(model: Recognizer, params, hidden: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, hidden, method=Recognizer.logits)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "k", "delimiter_id", "max_updates"))
def one_shot(
    model: Recognizer,
    params,
    images: jax.Array,
    prompt: jax.Array,
    *,
    k: int,
    delimiter_id: int,
    max_updates: int = MAX_UPDATES,
) -> tuple[jax.Array, jax.Array]:
    """Samples k branches per image.

    Args:
      images: normalised [B, R, R, 3].
      prompt: int [P] text ids of the prompt (`prompts.inference_prompt`), ending at "are".

    Returns:
      tokens, probs: [B, k, max_updates - 1]. Entry u is the token of update u + 1 and its
      probability. Entries after a branch's first delimiter are not meaningful.
    """
    cfg = model.config
    n = cfg.vision.num_patches
    h = prefix_embeddings(model, params, images, prompt)
    b, t0, _ = h.shape
    sampled = max_updates - 1  # tokens per branch, the top-k one included
    fed = sampled - 1  # the last sampled token is never fed back
    capacity = t0 + k * fed

    cache = init_cache(cfg.decoder, b, capacity, model.dtype)
    prefix = jnp.pad(masks.prefix_mask(n, t0), ((0, 0), (0, 0), (0, 0), (0, capacity - t0)))
    hidden, cache = model.apply(
        {"params": params}, h, jnp.arange(t0)[None], prefix, cache, 0, method=Recognizer.decode
    )
    first_probs, first = jax.lax.top_k(_next_token_probs(model, params, hidden[:, -1]), k)  # [B, k]

    tokens = jnp.full((b, k, sampled), -1, jnp.int32).at[:, :, 0].set(first)
    probs = jnp.ones((b, k, sampled), jnp.float32).at[:, :, 0].set(first_probs)
    done = first == delimiter_id

    slot = jnp.arange(capacity - t0)
    slot_step, slot_branch = slot // k, slot % k

    def cond(state):
        s, _, _, done, _ = state
        return (s < sampled) & ~jnp.all(done)

    def body(state):
        s, tokens, probs, done, cache = state  # s tokens sampled so far; feed token s-1
        x = model.apply({"params": params}, tokens[:, :, s - 1], method=Recognizer.embed).astype(h.dtype)
        own = (slot_branch[None, :] == jnp.arange(k)[:, None]) & (slot_step[None, :] < s)  # [k, C - T0]
        step_mask = jnp.concatenate([jnp.ones((k, t0), bool), own], axis=1)[None, None]
        positions = jnp.full((b, k), t0 + s - 1)
        hidden, cache = model.apply(
            {"params": params}, x, positions, step_mask, cache, t0 + (s - 1) * k, method=Recognizer.decode
        )
        p = _next_token_probs(model, params, hidden)  # [B, k, V]
        nxt = jnp.argmax(p, axis=-1).astype(jnp.int32)
        tokens = tokens.at[:, :, s].set(nxt)
        probs = probs.at[:, :, s].set(jnp.max(p, axis=-1))
        return s + 1, tokens, probs, done | (nxt == delimiter_id), cache

    _, tokens, probs, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, probs, done, cache))
    return tokens, probs


@functools.partial(jax.jit, static_argnames=("model",))
def _recompute_step(model: Recognizer, params, h: jax.Array) -> jax.Array:
    n = model.config.vision.num_patches
    t = h.shape[1]
    hidden, _ = model.apply(
        {"params": params}, h, jnp.arange(t)[None], masks.prefix_mask(n, t), method=Recognizer.decode
    )
    return _next_token_probs(model, params, hidden[:, -1])


def one_shot_recompute(
    model: Recognizer, params, images, prompt, *, k: int, delimiter_id: int, max_updates: int = MAX_UPDATES
):
    """The original's strategy, same outputs as `one_shot`: every step reruns the whole sequence.

    Each sequence length compiles once; callers that time it should warm it up first.
    """
    h = prefix_embeddings(model, params, jnp.asarray(images), jnp.asarray(prompt))
    b = h.shape[0]
    first_probs, first = jax.lax.top_k(_recompute_step(model, params, h), k)
    h = jnp.repeat(h, k, axis=0)  # k copies of the prefix, as the original
    tokens, probs = [first.reshape(b * k)], [first_probs.reshape(b * k)]
    done = tokens[0] == delimiter_id
    while len(tokens) < max_updates - 1 and not bool(jnp.all(done)):
        x = model.apply({"params": params}, tokens[-1][:, None], method=Recognizer.embed).astype(h.dtype)
        h = jnp.concatenate([h, x], axis=1)
        p = _recompute_step(model, params, h)
        tokens.append(jnp.argmax(p, axis=-1).astype(jnp.int32))
        probs.append(jnp.max(p, axis=-1))
        done = done | (tokens[-1] == delimiter_id)
    sampled = max_updates - 1
    pad = sampled - len(tokens)
    tokens = jnp.pad(jnp.stack(tokens, -1), ((0, 0), (0, pad)), constant_values=-1)
    probs = jnp.pad(jnp.stack(probs, -1), ((0, 0), (0, pad)), constant_values=1.0)
    return tokens.reshape(b, k, sampled), probs.reshape(b, k, sampled)
