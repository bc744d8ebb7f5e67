"""The original's other decoders: greedy / top-k / top-p sampling and beam search.

Both generate one stream of labels per image, which `ranking.groups_from_stream` cuts at
the delimiters. Both recompute the whole sequence at every step, as the original does:
greedy decoding uses `mask.generation_mask`, under which earlier positions change when a
new delimiter appears, so their cached keys would go stale.

Defaults follow the original's g3m config: 64 generated tokens, greedy `top_k` with k=1,
temperature 1, repetition penalty 1.2 (logits of already generated ids divided by it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nxtp_jax.models import mask as masks
from nxtp_jax.models.recognizer import Recognizer
from nxtp_jax.inference.sampling import prefix_embeddings

MAX_GEN_LEN = 64


def _last_logits(model: Recognizer, params, h, text, answer_pos, cur, delimiter_id, generation):
    """fp32 logits at sequence position `cur` [R] of buffers h [R, T, D] / text ids [R, T - N]."""
    n = model.config.vision.num_patches
    t = h.shape[1]
    if generation:
        m = masks.generation_mask(text, answer_pos, delimiter_id=delimiter_id, num_image_tokens=n)
    else:
        m = masks.prefix_mask(n, t)
    hidden, _ = model.apply({"params": params}, h, jnp.arange(t)[None], m, method=Recognizer.decode)
    last = jnp.take_along_axis(hidden, cur[:, None, None], axis=1)[:, 0]
    return model.apply({"params": params}, last, method=Recognizer.logits).astype(jnp.float32)


@functools.partial(
    jax.jit, static_argnames=("model", "delimiter_id", "max_gen_len", "func", "top_k", "top_p", "temperature", "penalty")
)
def greedy(
    model: Recognizer,
    params,
    images: jax.Array,
    prompt: jax.Array,
    rng: jax.Array,
    *,
    delimiter_id: int,
    max_gen_len: int = MAX_GEN_LEN,
    func: str = "top_k",
    top_k: int = 1,
    top_p: float = 0.9,
    temperature: float = 1.0,
    penalty: float = 1.2,
) -> tuple[jax.Array, jax.Array]:
    """Generates `max_gen_len` tokens per image. Returns tokens, probs [B, max_gen_len].

    `func="top_k"` with k=1 is greedy argmax; k > 1 samples among the k best; `"top_p"` is
    nucleus sampling at `temperature` (top_k ignores the temperature, as the original).
    """
    h = prefix_embeddings(model, params, images, prompt)
    b, t0, d = h.shape
    p = prompt.shape[0]
    total = t0 + max_gen_len - 1  # the last generated token is never fed back
    h = jnp.pad(h, ((0, 0), (0, total - t0), (0, 0)))
    text = jnp.pad(jnp.broadcast_to(prompt, (b, p)), ((0, 0), (0, max_gen_len - 1)), constant_values=-1)
    answer_pos = jnp.full((b,), p - 1)
    vocab = model.config.decoder.vocab_size

    def step(i, state):
        h, text, seen, tokens, probs, key = state
        logits = _last_logits(model, params, h, text, answer_pos, jnp.full((b,), t0 - 1 + i), delimiter_id, True)
        if penalty > 0.0:
            logits = jnp.where(seen, logits / penalty, logits)
        key, sub = jax.random.split(key)
        nxt, prob = _sample(logits, sub, func, top_k, top_p, temperature)
        if penalty > 0.0:
            seen = seen.at[jnp.arange(b), nxt].set(True)
        emb = model.apply({"params": params}, nxt[:, None], method=Recognizer.embed).astype(h.dtype)
        h = jax.lax.dynamic_update_slice_in_dim(h, emb, jnp.minimum(t0 + i, total - 1), axis=1)
        text = jax.lax.dynamic_update_slice_in_dim(text, nxt[:, None], jnp.minimum(p + i, text.shape[1] - 1), axis=1)
        return h, text, seen, tokens.at[:, i].set(nxt), probs.at[:, i].set(prob), key

    init = (
        h,
        text,
        jnp.zeros((b, vocab), bool),
        jnp.zeros((b, max_gen_len), jnp.int32),
        jnp.zeros((b, max_gen_len), jnp.float32),
        rng,
    )
    _, _, _, tokens, probs, _ = jax.lax.fori_loop(0, max_gen_len, step, init)
    return tokens, probs


def _sample(logits, key, func, top_k, top_p, temperature):
    """(token, its probability) per row, as the original's decoder_top_k / decoder_top_p."""
    if func == "top_k":
        if top_k == 1:
            probs = jax.nn.softmax(logits, axis=-1)
            return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        probs = jax.nn.softmax(jnp.where(logits < kth, -1e10, logits), axis=-1)
    elif func == "top_p":
        probs = jax.nn.softmax(logits / temperature, axis=-1)
        order = jnp.argsort(-probs, axis=-1)
        sorted_p = jnp.take_along_axis(probs, order, axis=-1)
        keep_sorted = jnp.cumsum(sorted_p, axis=-1) - sorted_p <= top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(probs.shape[0])[:, None], order].set(keep_sorted)
        probs = jnp.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdims=True)
    else:
        raise ValueError(f"unknown sampling function {func!r}; expected 'top_k' or 'top_p'")
    tok = jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
    return tok, jnp.take_along_axis(probs, tok[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("model",))
def _beam_logits(model: Recognizer, params, h, cur):
    return _last_logits(model, params, h, None, None, cur, 0, False)


def beam_search(
    model: Recognizer,
    params,
    images: jax.Array,
    prompt: jax.Array,
    *,
    eos_id: int,
    beam_size: int = 3,
    patience: float = 1.0,
    length_penalty: float | None = None,
    penalty: float = 1.2,
    max_gen_len: int = MAX_GEN_LEN,
) -> list[list[int]]:
    """The original's beam search (after Whisper's). Returns per image the generated ids of the chosen beam.

    Kept as the original ran it: the mask is causal plus the image block; the rows of the
    input are not reordered when beams are reselected (each slot keeps its own history and
    gets the new beam's last token appended); the penalty divides the logits of every id a
    slot has held, prompt included; the best sequence maximises summed log-probability over
    its full length (prompt included) or the GNMT length penalty.
    """
    h0 = np.asarray(prefix_embeddings(model, params, images, prompt))
    b, t0, d = h0.shape
    rows = b * beam_size
    buf = np.zeros((rows, t0 + max_gen_len, d), h0.dtype)
    buf[:, :t0] = np.repeat(h0, beam_size, axis=0)
    table = np.asarray(params["language_decoder"]["tok_embeddings"]["embedding"]).astype(h0.dtype)

    prompt_ids = tuple(int(t) for t in np.asarray(prompt))
    seqs = [prompt_ids] * rows
    sums = np.zeros(rows, np.float32)
    held: list[set[int]] = [set() for _ in range(rows)]  # ids each slot has held, for the penalty
    finished: list[dict[tuple[int, ...], float]] = [{} for _ in range(b)]
    max_candidates = round(beam_size * patience)
    for step in range(max_gen_len):
        logits = np.array(_beam_logits(model, params, jnp.asarray(buf), jnp.full((rows,), t0 - 1 + step)))
        if penalty > 0.0:
            for r in range(rows):
                ids = list(held[r])
                logits[r, ids] /= penalty
        logprobs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
        new_seqs, new_sums = [], []
        for i in range(b):
            scores: dict[tuple[int, ...], float] = {}
            for r in range(i * beam_size, (i + 1) * beam_size):
                top = np.argsort(-logprobs[r], kind="stable")[: beam_size + 1]
                for tok in top:
                    scores[seqs[r] + (int(tok),)] = float(sums[r] + logprobs[r, tok])
            newly: dict[tuple[int, ...], float] = {}
            saved = 0
            for seq in sorted(scores, key=scores.get, reverse=True):
                if seq[-1] == eos_id:
                    newly[seq] = scores[seq]
                    continue
                new_seqs.append(seq)
                new_sums.append(scores[seq])
                saved += 1
                if saved == beam_size:
                    break
            for seq in sorted(newly, key=newly.get, reverse=True):
                if len(finished[i]) >= max_candidates:
                    break
                finished[i][seq] = newly[seq]
        for r, seq in enumerate(new_seqs):
            buf[r, t0 + step] = table[seq[-1]]
            held[r] |= set(seq)
        seqs, sums = new_seqs, np.asarray(new_sums, np.float32)
        if all(len(f) >= max_candidates for f in finished):
            break

    best = []
    for i in range(b):
        pool = finished[i]
        if len(pool) < beam_size:
            group = sums[i * beam_size : (i + 1) * beam_size]
            for j in np.argsort(group, kind="stable")[::-1]:
                pool[seqs[i * beam_size + j] + (eos_id,)] = float(group[j])
                if len(pool) >= beam_size:
                    break
        def score(seq):
            norm = len(seq) if length_penalty is None else ((5 + len(seq)) / 6) ** length_penalty
            return pool[seq] / norm
        best.append(list(max(pool, key=score)[len(prompt_ids) :]))
    return best
