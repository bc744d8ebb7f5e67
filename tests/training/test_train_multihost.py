"""Multi-host training is real: 2 processes x 2 CPU devices give what 1 process x 4 devices gives.

Both runs start `python -m nxtp_jax.main` (the 2-process one with --coordinator_address,
--num_processes, --process_id). The training set is two shards of 4 samples and the global
batch is 8, so the first batch holds the same 8 samples either way (one process reads
both shards, or each process one); the token-mean loss and the summed gradient do not
depend on their order.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import jax

from nxtp_jax import checkpoint
from nxtp_jax.data.shapes import make_shapes
from nxtp_jax.training.log import read_metrics

REPO = pathlib.Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(workdir, data_root, *extra):
    return [
        sys.executable, "-m", "nxtp_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
        f"--config.data.root={data_root}", "--config.mode=train", "--config.stop_at_step=1",
        "--config.mesh.data=2", "--config.mesh.fsdp=2", *extra,
    ]


def env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def trained_params(workdir):
    """The step-1 params on this (one-device) test process, whatever mesh saved them."""
    path = pathlib.Path(workdir).absolute() / checkpoint.STEPS_DIR / "1" / checkpoint.TRAINABLE_ITEM
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        return jax.tree.map(np.asarray, ckptr.restore(path, target))


def test_two_processes_match_one_process(tmp_path):
    data_root = tmp_path / "data"
    shards = make_shapes(data_root / "shapes", num_train=8, num_val=4, image_size=32, samples_per_shard=4, progress=False)
    assert len(shards["train"]) == 2

    one = tmp_path / "one"
    single = subprocess.run(command(one, data_root), cwd=REPO, env=env(4), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr

    two = tmp_path / "two"
    port = free_port()
    procs = [
        subprocess.Popen(
            command(two, data_root, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
            cwd=REPO, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "2 process(es)" in outs[0] and "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in outs[0]

    loss_one, loss_two = read_metrics(one)[0], read_metrics(two)[0]
    assert loss_one["step"] == loss_two["step"] == 1
    np.testing.assert_allclose(loss_two["loss"], loss_one["loss"], rtol=1e-6)
    assert loss_two["target_tokens"] == loss_one["target_tokens"]
    a, b = trained_params(one), trained_params(two)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7), a, b)
