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
    return config
