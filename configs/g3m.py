"""The paper's 1.78B model on G3M (CC3M + SBU + COCO, 3 epochs, 21k steps at batch 512).

    python -m nxtp_jax.main --config=configs/g3m.py --workdir=runs/g3m \
        --config.model.checkpoint=ckpts/init_1.78b --config.data.root=/data

`model.checkpoint` is the output of `convert/from_torch.py` (CLIP ViT-L/14 + the first 6
blocks of LLaMA-2 7B).
"""

from ml_collections import config_dict

from nxtp_jax.configs import base


def get_config() -> config_dict.ConfigDict:
    config = base.get_config()
    config.data.train = ("cc3m", "sbu", "coco")
    config.eval.dataset = "coco_valid"
    # FSDP over all devices: replicated fp32 weights and AdamW moments do not fit next to the activations
    # (the compile check: 84 GiB per chip data-parallel on v4-8 at batch 512, docs/benchmarks.md).
    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
