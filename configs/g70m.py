"""The paper's 1.78B model on G70M (LAION-115M subset + CC3M + SBU + COCO, 3 epochs).

    python -m nxtp_jax.main --config=configs/g70m.py --workdir=runs/g70m \
        --config.model.checkpoint=ckpts/init_1.78b --config.data.root=/data
"""

from ml_collections import config_dict

from nxtp_jax.configs import base


def get_config() -> config_dict.ConfigDict:
    config = base.get_config()
    config.data.train = ("laion115m", "cc3m", "sbu", "coco")
    config.eval.dataset = "coco_valid"
    # FSDP over all devices: replicated fp32 weights and AdamW moments do not fit next to the activations
    # (the compile check: 84 GiB per chip data-parallel on v4-8 at batch 512, docs/benchmarks.md).
    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
