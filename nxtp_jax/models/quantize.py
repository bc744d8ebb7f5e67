"""The decoder's Dense kernels as the Tagger serves them: weight-only int8 / int4, and a CPU layout.

- `quantize_params(params, "int8" | "int4")` replaces the kernels of the decoder's Dense layers
  (attention, feed-forward, output) by `QuantizedKernel`s: int8 with one scale per output
  channel, int4 with one per output channel and group of 128 inputs (or of half the inputs).
  The token embeddings and the image encoder stay as they are. Activations stay float.
- `transpose_params(params)` stores the same kernels unquantized, as [N, K] (`TransposedKernel`).
- `dequantizing()` is the context inside which a model runs with such params: it intercepts
  `nn.Dense` calls whose kernel is one of these.

Why transposed: the sampler multiplies k rows (20) by each weight. XLA's CPU dot runs that
[k, K] x [K, N] product at 28-52 GFLOP/s on a 2-core AVX2 machine, but the same product as
[N, K] x [K, k] at 70-94 (python -m benchmarks.cpu --matmuls). Both layouts sum the same products.

Why tiles: XLA hoists a loop-invariant `convert(int8 -> f32)` of a whole weight out of the
sampler's `while_loop`, so a plain `q.astype(f32) @ x` would make one fp32 copy of every weight
per call and read fp32 at every step, and XLA's CPU dot does not fuse the convert. A `lax.scan`
over tiles of TILE_ROWS output channels converts one small tile per iteration (it stays in
cache) and reads only the int8 (int4: packed uint8) bytes from memory.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from nxtp_jax.choices import QUANTIZE

INT4_GROUP = 128  # int4 scales: one per group of 128 input rows and output column (half the rows where K/2 % 128)
TILE_ROWS = 256  # output channels converted per scan iteration: the fastest of 128-1024 for [20, K] inputs
QUANTIZED_PARENTS = ("attention", "feed_forward")  # plus the decoder's `output` layer


@flax.struct.dataclass
class QuantizedKernel:
    """A Dense kernel [K, N] as tiles of output channels: q [tiles, tn, K] int8 (int4: [tiles, tn, K/2]
    uint8, inputs k and K/2 + k in one byte), scale [tiles, tn, 1] float32 (int4: [tiles, tn, K/group])."""

    q: jax.Array
    scale: jax.Array
    features: int = flax.struct.field(pytree_node=False)  # N (the tiles pad it)
    bits: int = flax.struct.field(pytree_node=False)

    def dequantize(self) -> jax.Array:
        """The float32 kernel [K, N] (for checks; the fast path never builds it)."""
        tiles = jax.vmap(lambda q, s: _tile(q, s, self.bits))(self.q, self.scale)  # [tiles, tn, K]
        return tiles.reshape(-1, tiles.shape[-1])[: self.features].T


@flax.struct.dataclass
class TransposedKernel:
    """A float Dense kernel [K, N] stored as kt [N, K]."""

    kt: jax.Array

    def dequantize(self) -> jax.Array:
        return self.kt.T


SERVING_KERNELS = (QuantizedKernel, TransposedKernel)


def _tile(q: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """One tile's float32 values [tn, K]."""
    if bits == 8:
        return q.astype(jnp.float32) * scale
    return jnp.concatenate(_int4_halves(q, scale), axis=-1)


def _int4_halves(q: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An int4 tile's float32 values as its two halves of inputs, [tn, K/2] each."""
    tn, groups = scale.shape  # even: no group straddles the halves

    def half(nibbles, s):
        v = (nibbles.astype(jnp.int8) - 8).astype(jnp.float32)
        return (v.reshape(tn, groups // 2, -1) * s[:, :, None]).reshape(v.shape)

    return half(q & 0xF, scale[:, : groups // 2]), half(q >> 4, scale[:, groups // 2 :])


def quantize_kernel(w: Any, bits: int) -> QuantizedKernel:
    """Symmetric round-to-nearest: int8 with one scale per output column (max |w| -> 127), int4 with
    one per column and group of INT4_GROUP rows (max |w| -> 7)."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    group = INT4_GROUP if (k // 2) % INT4_GROUP == 0 else k // 2
    if bits == 4 and k % 2:
        raise ValueError(f"int4 packs two input rows per byte: expected an even input dimension, found a kernel {w.shape}")
    tn = min(n, TILE_ROWS)
    tiles = -(-n // tn)
    wt = np.pad(w.T, ((0, tiles * tn - n), (0, 0)))  # [N', K]
    if bits == 8:
        scale = np.abs(wt).max(axis=1, keepdims=True) / 127  # [N', 1]
        q = np.round(wt / np.where(scale == 0, 1, scale)).astype(np.int8)
    else:
        g = wt.reshape(len(wt), k // group, group)
        scale = np.abs(g).max(axis=2) / 7  # [N', K/group]
        q4 = np.clip(np.round(g / np.where(scale == 0, 1, scale)[:, :, None]), -8, 7).astype(np.int16).reshape(len(wt), k) + 8
        q = (q4[:, : k // 2] | (q4[:, k // 2 :] << 4)).astype(np.uint8)  # inputs k (low nibble) and K/2 + k (high)
    split = lambda a: np.ascontiguousarray(a.reshape(tiles, tn, a.shape[-1]))  # noqa: E731
    return QuantizedKernel(jnp.asarray(split(q)), jnp.asarray(split(scale.astype(np.float32))), n, bits)


def _decoder_dense_kernels(params: Any, replace, consume: bool) -> Any:
    """The params with replace(kernel) for each of the decoder's Dense kernels; with `consume`, each
    replaced kernel's buffer is deleted at once, so the peak stays one kernel above the params."""

    def swap(w):
        out = replace(w)
        if consume and isinstance(w, jax.Array):
            w.delete()
        return out

    def walk(tree: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(tree, dict):
            return tree
        out = {}
        for key, value in tree.items():
            here = path + (key,)
            in_decoder = here[0] == "language_decoder"
            dense = len(here) >= 2 and (here[-2] == "output" or (len(here) >= 3 and here[-3] in QUANTIZED_PARENTS))
            out[key] = swap(value) if key == "kernel" and in_decoder and dense else walk(value, here)
        return out

    return walk(params, ())


def quantize_params(params: Any, mode: str, *, consume: bool = False) -> Any:
    """The params with the decoder's Dense kernels quantized ("none": unchanged). With `consume` the
    originals are deleted as they are replaced: `params` must not be used afterwards."""
    if mode not in QUANTIZE:
        raise ValueError(f"expected quantize in {QUANTIZE}, found {mode!r}")
    if mode == "none":
        return params
    bits = 8 if mode == "int8" else 4
    return _decoder_dense_kernels(params, lambda w: quantize_kernel(w, bits), consume)


def transpose_params(params: Any, *, consume: bool = False) -> Any:
    """The params with the decoder's Dense kernels stored [N, K] (`TransposedKernel`), as they are;
    `consume` as in `quantize_params`."""
    return _decoder_dense_kernels(params, lambda w: TransposedKernel(jnp.asarray(w).T.copy()), consume)


def untransposed(params: Any) -> Any:
    """The params with each `TransposedKernel` back as a [K, N] array."""
    is_transposed = lambda x: isinstance(x, TransposedKernel)  # noqa: E731
    return jax.tree.map(lambda x: x.kt.T if is_transposed(x) else x, params, is_leaf=is_transposed)


def matmul(x: jax.Array, kernel: QuantizedKernel) -> jax.Array:
    """x [..., K] @ the kernel -> float32 [..., N], one converted tile per scan iteration."""
    lead = x.shape[:-1]
    xt = x.reshape(-1, x.shape[-1]).astype(jnp.float32).T  # [K, M]

    def body(_, tile):
        q, scale = tile
        if kernel.bits == 8:  # one scale per output channel: applied to the product, not the tile
            return None, (q.astype(jnp.float32) @ xt) * scale
        lo, hi = _int4_halves(q, scale)  # two products: no concatenated tile
        return None, lo @ xt[: lo.shape[1]] + hi @ xt[lo.shape[1] :]

    _, y = jax.lax.scan(body, None, (kernel.q, kernel.scale))  # [tiles, tn, M]
    y = y.reshape(-1, xt.shape[1])[: kernel.features].T
    return y.reshape(*lead, kernel.features)


def transposed_matmul(x: jax.Array, kt: jax.Array) -> jax.Array:
    """x [..., K] @ kt.T -> [..., N], as kt [N, K] times x's rows."""
    return jnp.moveaxis(jax.lax.dot_general(kt, x, (((1,), (x.ndim - 1,)), ((), ()))), 0, -1)


def _intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense) and module.has_variable("params", "kernel"):
        kernel = module.get_variable("params", "kernel")
        if isinstance(kernel, SERVING_KERNELS):
            (x,) = args
            if isinstance(kernel, QuantizedKernel):
                y = matmul(x, kernel)
            else:
                y = transposed_matmul(*promote_dtype(x, kernel.kt, dtype=module.dtype))
            if module.use_bias:
                y = y + module.get_variable("params", "bias").astype(y.dtype)
            return y.astype(module.dtype or x.dtype)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def dequantizing():
    """Within it, Dense layers with a `QuantizedKernel` or `TransposedKernel` multiply as described
    above; other layers as usual. Traced functions (jit) must be traced inside it."""
    with nn.intercept_methods(_intercept):
        yield
