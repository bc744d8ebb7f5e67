"""Weight-only quantization of the decoder for serving: int8 per output channel, or int4 in groups.

Each step of the one-shot sampler reads every decoder weight and the output layer (about
1.34B weights at full size), so on a CPU its time is bytes over memory bandwidth: fewer bytes
per weight is the way down. Activations stay float.

- `quantize_params(params, "int8" | "int4")` replaces the kernels of the decoder's Dense layers
  (attention, feed-forward, output) by `QuantizedKernel`s; the token embeddings and the image
  encoder stay as they are.
- `dequantizing()` is the context inside which a model runs with such params: it intercepts
  `nn.Dense` calls whose kernel is quantized and multiplies tile by tile.

Why tiles: XLA hoists a loop-invariant `convert(int8 -> f32)` of a whole weight out of the
sampler's `while_loop`, so a plain `x @ q.astype(f32)` would make one fp32 copy of every weight
per call and read fp32 at every step, and XLA's CPU dot does not fuse the convert. A `lax.scan`
over column tiles of the stored `[tiles, K, tn]` weight converts one small tile per iteration
(it stays in cache) and reads only the int8 (int4: packed uint8) bytes from memory.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "int8", "int4")
INT4_GROUP = 128  # int4 scales: one per group of 128 input rows and output column (all rows where K % 128)
TILE_BYTES = 2 * 2**20  # the float32 tile converted per scan iteration (fits a core's L2)
QUANTIZED_PARENTS = ("attention", "feed_forward")  # plus the decoder's `output` layer


@flax.struct.dataclass
class QuantizedKernel:
    """A Dense kernel [K, N] as column tiles: q [tiles, K, tn] int8 (int4: [tiles, K/2, tn] uint8,
    two rows per byte), scale [tiles, 1, tn] float32 (int4: [tiles, K/group, tn])."""

    q: jax.Array
    scale: jax.Array
    features: int = flax.struct.field(pytree_node=False)  # N (the tiles pad it)
    bits: int = flax.struct.field(pytree_node=False)

    def dequantize(self) -> jax.Array:
        """The float32 kernel [K, N] (for checks; the fast path never builds it)."""
        tiles = jax.vmap(lambda q, s: _tile(q, s, self.bits))(self.q, self.scale)  # [tiles, K, tn]
        return jnp.moveaxis(tiles, 0, 1).reshape(tiles.shape[1], -1)[:, : self.features]


def _tile(q: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """One tile's float32 values [K, tn]."""
    if bits == 8:
        return q.astype(jnp.float32) * scale
    lo = (q & 0xF).astype(jnp.int32) - 8
    hi = (q >> 4).astype(jnp.int32) - 8
    rows = jnp.stack([lo, hi], axis=1).reshape(2 * q.shape[0], q.shape[1]).astype(jnp.float32)  # [K, tn]
    groups = scale.shape[0]
    return (rows.reshape(groups, -1, rows.shape[-1]) * scale[:, None, :]).reshape(rows.shape)


def quantize_kernel(w: Any, bits: int) -> QuantizedKernel:
    """Symmetric round-to-nearest: int8 with one scale per output column (max |w| -> 127), int4 with
    one per column and group of INT4_GROUP rows (max |w| -> 7)."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    group = INT4_GROUP if k % INT4_GROUP == 0 else k
    if bits == 4 and k % 2:
        raise ValueError(f"int4 packs two input rows per byte: expected an even input dimension, found a kernel {w.shape}")
    tn = max(8, min(n, TILE_BYTES // (4 * k)))
    tiles = -(-n // tn)
    w = np.pad(w, ((0, 0), (0, tiles * tn - n)))
    if bits == 8:
        scale = np.abs(w).max(axis=0, keepdims=True) / 127  # [1, N']
        q = np.round(w / np.where(scale == 0, 1, scale)).astype(np.int8)
    else:
        g = w.reshape(k // group, group, -1)
        scale = np.abs(g).max(axis=1) / 7  # [K/group, N']
        q4 = np.clip(np.round(g / np.where(scale == 0, 1, scale)[:, None]), -8, 7).astype(np.int16).reshape(k, -1) + 8
        q = (q4[0::2] | (q4[1::2] << 4)).astype(np.uint8)  # rows 2i (low nibble) and 2i+1 (high)
    split = lambda a: np.ascontiguousarray(a.reshape(a.shape[0], tiles, tn).transpose(1, 0, 2))  # noqa: E731
    return QuantizedKernel(jnp.asarray(split(q)), jnp.asarray(split(scale.astype(np.float32))), n, bits)


def quantize_params(params: Any, mode: str) -> Any:
    """The params with the decoder's Dense kernels quantized ("none": unchanged)."""
    if mode not in MODES:
        raise ValueError(f"expected quantize in {MODES}, found {mode!r}")
    if mode == "none":
        return params
    bits = 8 if mode == "int8" else 4

    def walk(tree: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(tree, dict):
            return tree
        out = {}
        for key, value in tree.items():
            here = path + (key,)
            in_decoder = here[0] == "language_decoder"
            dense = len(here) >= 2 and (here[-2] == "output" or (len(here) >= 3 and here[-3] in QUANTIZED_PARENTS))
            out[key] = quantize_kernel(value, bits) if key == "kernel" and in_decoder and dense else walk(value, here)
        return out

    return walk(jax.tree.map(lambda x: x, params), ())


def is_quantized(params: Any) -> bool:
    return any(isinstance(x, QuantizedKernel) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedKernel)))


def matmul(x: jax.Array, kernel: QuantizedKernel) -> jax.Array:
    """x [..., K] @ the kernel -> float32 [..., N], one converted tile per scan iteration."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)

    def body(_, tile):
        q, scale = tile
        return None, x2 @ _tile(q, scale, kernel.bits)

    _, y = jax.lax.scan(body, None, (kernel.q, kernel.scale))  # [tiles, M, tn]
    y = jnp.moveaxis(y, 0, 1).reshape(x2.shape[0], -1)[:, : kernel.features]
    return y.reshape(*lead, kernel.features)


def _intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense) and module.has_variable("params", "kernel"):
        kernel = module.get_variable("params", "kernel")
        if isinstance(kernel, QuantizedKernel):
            (x,) = args
            y = matmul(x, kernel)
            if module.use_bias:
                y = y + module.get_variable("params", "bias").astype(jnp.float32)
            return y.astype(module.dtype or x.dtype)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def dequantizing():
    """Within it, Dense layers with a `QuantizedKernel` multiply tile by tile; other layers as usual.
    Traced functions (jit) must be traced inside it."""
    with nn.intercept_methods(_intercept):
        yield
