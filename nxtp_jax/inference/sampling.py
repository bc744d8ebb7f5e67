"""One-shot sampling (docs/method.md §4): the top-k next tokens after the prompt each start a branch.

The prefix (image tokens + prompt) runs once per image and fills a KV cache that all k
branches of the image share. Each later step feeds one token per branch. Branch j's
keys are written at slots T0 + s*k + j, so a step writes k contiguous slots and a mask
keeps every branch on the prefix plus its own tokens. The loop is a `lax.while_loop`
with static shapes that stops as soon as every branch has emitted the delimiter, or at
the cap.

With a `Trie` (a closed vocabulary, `vocabulary.Vocabulary`), decoding is constrained: the
top-k step and every later step choose only among the tokens that continue some entry from
the branch's trie node (the delimiter only where an entry ends), with the model's softmax
renormalised over those tokens. Each branch carries its node; the node's edges are gathered
on the device, so the loop stays one compiled `while_loop` with no host round trip.

`one_shot_recompute` is the original's strategy (the whole sequence again at every step,
k copies of the prefix, no cache); it is the reference the tests and benchmarks compare
against.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nxtp_jax.inference.vocabulary import END, ROOT, Vocabulary
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


def _next_token_logits(model: Recognizer, params, hidden: jax.Array) -> jax.Array:
    return model.apply({"params": params}, hidden, method=Recognizer.logits).astype(jnp.float32)


def _next_token_probs(model: Recognizer, params, hidden: jax.Array) -> jax.Array:
    return jax.nn.softmax(_next_token_logits(model, params, hidden), axis=-1)


@flax.struct.dataclass
class Trie:
    """A `Vocabulary`'s trie as device arrays (its docstring has the layout)."""

    offset: jax.Array  # int32 [nodes]: first edge of each node
    count: jax.Array  # int32 [nodes]: edges of each node
    token: jax.Array  # int32 [edges]: the token of each edge
    next: jax.Array  # int32 [edges]: the node each edge leads to
    window: int = flax.struct.field(pytree_node=False)  # the most edges of any node

    @classmethod
    def from_vocabulary(cls, vocab: Vocabulary) -> "Trie":
        """Arrays padded to power-of-two sizes (unreachable nodes, unused edges), so that
        vocabularies of similar sizes share one compiled sampler."""
        nodes, edges = _bucket(len(vocab.count), 64), _bucket(len(vocab.token), 64)
        pad = lambda a, n, value: jnp.asarray(np.pad(a, (0, n - len(a)), constant_values=value))  # noqa: E731
        return cls(
            offset=pad(vocab.offset, nodes, 0),
            count=pad(vocab.count, nodes, 0),
            token=pad(vocab.token, edges, 0),
            next=pad(vocab.next, edges, END),
            window=_bucket(vocab.window, 8),
        )

    def edges(self, nodes: jax.Array, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The first `width` edges of each of `nodes` [...]: token ids, next nodes, validity, each [..., width]."""
        j = jnp.arange(width)
        idx = jnp.minimum(self.offset[nodes][..., None] + j, self.token.shape[0] - 1)
        return self.token[idx], self.next[idx], j < self.count[nodes][..., None]


def _bucket(n: int, smallest: int) -> int:
    return max(smallest, 1 << (n - 1).bit_length())


def _restricted_probs(logits: jax.Array, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """The softmax over the `valid` edge tokens only, [..., width] (0 elsewhere; a node without edges, all 0)."""
    z = jnp.where(valid, jnp.take_along_axis(logits, tokens, axis=-1), -jnp.inf)
    z = jnp.where(valid[..., :1], z, 0.0)  # a row with no edge would be all -inf: NaN
    return jnp.where(valid, jax.nn.softmax(z, axis=-1), 0.0)


def _constrained_first(trie: Trie, logits: jax.Array, k: int):
    """The top-k step over the root's tokens: logits [B, V] -> tokens, probs, nodes [B, k].

    Fewer than k root tokens leave branches that do not exist: token -1, probability 0, node END.
    """
    tokens, nxt, valid = trie.edges(jnp.full(logits.shape[:-1], ROOT), max(trie.window, k))
    p, pos = jax.lax.top_k(_restricted_probs(logits, tokens, valid), k)  # ties to the lower token id
    exists = pos < trie.count[ROOT]
    take = lambda a: jnp.take_along_axis(a, pos, axis=-1)  # noqa: E731
    return jnp.where(exists, take(tokens), -1), jnp.where(exists, p, 0.0), jnp.where(exists, take(nxt), END)


def _constrained_step(trie: Trie, logits: jax.Array, nodes: jax.Array, delimiter_id: int):
    """A greedy step over each node's edges: logits [..., V] -> token, prob, next node [...].

    A branch at END (its delimiter is sampled) gets the delimiter again, with probability 1.
    """
    tokens, nxt, valid = trie.edges(nodes, trie.window)
    p = _restricted_probs(logits, tokens, valid)
    j = jnp.argmax(p, axis=-1)[..., None]
    alive = trie.count[nodes] > 0
    pick = lambda a: jnp.take_along_axis(a, j, axis=-1)[..., 0]  # noqa: E731
    return jnp.where(alive, pick(tokens), delimiter_id), jnp.where(alive, pick(p), 1.0), jnp.where(alive, pick(nxt), END)


def decode_steps(max_updates: int = MAX_UPDATES) -> int:
    """The most iterations of `one_shot`'s decode loop: each feeds back one sampled token, and of the
    max_updates - 1 sampled tokens the last is never fed back."""
    return max_updates - 2


def decode_step(model: Recognizer, params, state: tuple, *, t0: int, delimiter_id: int, trie: Trie | None = None) -> tuple:
    """One iteration of `one_shot`'s decode loop (its body): feeds each branch's last token, samples the next.

    state: (s, tokens, probs, done, nodes, cache), s tokens sampled so far (the step feeds token s - 1);
    tokens, probs [B, k, sampled]; done, nodes [B, k]; the cache holds the t0 prefix slots, then k per step.
    """
    s, tokens, probs, done, nodes, cache = state
    b, k, _ = tokens.shape
    slot = jnp.arange(cache[0][0].shape[1] - t0)
    slot_step, slot_branch = slot // k, slot % k
    x = model.apply({"params": params}, tokens[:, :, s - 1], method=Recognizer.embed).astype(model.dtype)
    own = (slot_branch[None, :] == jnp.arange(k)[:, None]) & (slot_step[None, :] < s)  # [k, C - T0]
    step_mask = jnp.concatenate([jnp.ones((k, t0), bool), own], axis=1)[None, None]
    positions = jnp.full((b, k), t0 + s - 1)
    hidden, cache = model.apply(
        {"params": params}, x, positions, step_mask, cache, t0 + (s - 1) * k, method=Recognizer.decode
    )
    if trie is None:
        p = _next_token_probs(model, params, hidden)  # [B, k, V]
        nxt, prob = jnp.argmax(p, axis=-1).astype(jnp.int32), jnp.max(p, axis=-1)
    else:
        nxt, prob, nodes = _constrained_step(trie, _next_token_logits(model, params, hidden), nodes, delimiter_id)
    tokens = tokens.at[:, :, s].set(nxt)
    probs = probs.at[:, :, s].set(prob)
    return s + 1, tokens, probs, done | (nxt == delimiter_id), nodes, cache


def first_state(
    model: Recognizer, params, images, prompt, *, k: int, delimiter_id: int, max_updates: int = MAX_UPDATES, trie: Trie | None = None
) -> tuple:
    """The prefix pass and the top-k step of `one_shot`: the state its decode loop (`decode_step`) starts from."""
    cfg = model.config
    n = cfg.vision.num_patches
    h = prefix_embeddings(model, params, images, prompt)
    b, t0, _ = h.shape
    sampled = max_updates - 1  # tokens per branch, the top-k one included
    fed = decode_steps(max_updates)
    capacity = t0 + k * fed

    cache = init_cache(cfg.decoder, b, capacity, model.dtype)
    prefix = jnp.pad(masks.prefix_mask(n, t0), ((0, 0), (0, 0), (0, 0), (0, capacity - t0)))
    hidden, cache = model.apply(
        {"params": params}, h, jnp.arange(t0)[None], prefix, cache, 0, method=Recognizer.decode
    )
    if trie is None:
        first_probs, first = jax.lax.top_k(_next_token_probs(model, params, hidden[:, -1]), k)  # [B, k]
        nodes = jnp.zeros((b, k), jnp.int32)  # unused
    else:
        first, first_probs, nodes = _constrained_first(trie, _next_token_logits(model, params, hidden[:, -1]), k)

    tokens = jnp.full((b, k, sampled), -1, jnp.int32).at[:, :, 0].set(first)
    probs = jnp.ones((b, k, sampled), jnp.float32).at[:, :, 0].set(first_probs)
    done = (first == delimiter_id) | (first < 0)
    return jnp.int32(1), tokens, probs, done, nodes, cache


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
    trie: Trie | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Samples k branches per image.

    Args:
      images: normalised [B, R, R, 3].
      prompt: int [P] text ids of the prompt (`prompts.inference_prompt`), ending at "are".
      trie: a closed vocabulary to constrain the branches to, or None (open vocabulary).

    Returns:
      tokens, probs: [B, k, max_updates - 1]. Entry u is the token of update u + 1 and its
      probability. Entries after a branch's first delimiter are not meaningful. With a trie,
      a branch whose first token is -1 does not exist (the vocabulary has fewer than k
      first tokens).
    """
    state = first_state(model, params, images, prompt, k=k, delimiter_id=delimiter_id, max_updates=max_updates, trie=trie)
    sampled = max_updates - 1
    t0 = state[-1][0][0].shape[1] - k * decode_steps(max_updates)  # the prefix's slots of the cache

    def cond(state):
        s, _, _, done, _, _ = state
        return (s < sampled) & ~jnp.all(done)

    body = functools.partial(decode_step, model, params, t0=t0, delimiter_id=delimiter_id, trie=trie)
    _, tokens, probs, _, _, _ = jax.lax.while_loop(cond, body, state)
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
