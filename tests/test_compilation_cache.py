"""The tests' persistent compilation cache (tests/conftest.py): a process that loads its executables
from the cache computes the same bits as the process that compiled them."""

import json
import os
import subprocess
import sys

# A tiny recognizer: random init and a forward pass, both jitted; prints a digest of every output
# bit and how many executables came from the cache.
PROBE = """
import hashlib, json, types
import jax, jax.numpy as jnp, numpy as np
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("/cache_hits") else None)
from nxtp_jax.models.recognizer import Recognizer, init_params
from tiny_models import tiny_config
config = tiny_config(types.SimpleNamespace(vocab_size=300, image_id=298, empty_id=299))
model = Recognizer(config)
params = init_params(model, jax.random.key(0))
rng = np.random.default_rng(0)
images = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
tokens = jnp.asarray(rng.integers(0, 298, (2, 12)))
n = config.vision.num_patches + 12
mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (2, 1, n, n))
logits = jax.jit(model.apply)({"params": params}, images, tokens, mask)
digest = hashlib.sha256(np.asarray(logits).tobytes())
for leaf in jax.tree_util.tree_leaves(params):
    digest.update(np.asarray(leaf).tobytes())
print(json.dumps({"digest": digest.hexdigest(), "hits": len(hits)}))
"""


def probe(cache_dir) -> dict:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_executables_loaded_from_the_cache_compute_the_same_bits(tmp_path):
    compiled = probe(tmp_path / "cache")
    assert compiled["hits"] == 0 and any((tmp_path / "cache").iterdir())
    loaded = probe(tmp_path / "cache")
    assert loaded["hits"] >= 2  # the init and the forward pass at least
    assert loaded["digest"] == compiled["digest"]
