"""Mode "compile" needs only the config's sizes: no checkpoint, tokenizer or dataset on disk."""

import pytest

from nxtp_jax import experiment
from nxtp_jax.configs import g3m
from nxtp_jax.experiment import ConfigError


def test_g3m_validates_for_compiling_without_checkpoint_or_data():
    config = g3m.get_config()
    config.mode = "compile"
    experiment.validate(config, process_count=1, device_count=4)
    config.mode = "train"
    with pytest.raises(ConfigError, match="model.checkpoint") as e:
        experiment.validate(config, process_count=1, device_count=4)
    assert "expected shards under" in str(e.value)


def test_compile_fields_are_checked():
    config = g3m.get_config()
    config.mode = "compile"
    config.compile.programs = "train,sample"
    config.compile.search = "batches"
    config.compile.num_slices = 0
    with pytest.raises(ConfigError) as e:
        experiment.validate(config, process_count=1, device_count=4)
    message = str(e.value)
    assert "compile.programs: expected a comma-separated subset of ('train', 'eval', 'tag'), found 'train,sample'" in message
    assert "compile.search: expected one of ('', 'batch', 'mesh'), found 'batches'" in message
    assert "compile.num_slices: expected >= 1, found 0" in message


def test_sized_vocabulary_is_llama_for_a_checkpoint_and_the_tokenizer_size_from_scratch():
    config = g3m.get_config()
    vocab = experiment.sized_vocabulary(config)
    assert (vocab.vocab_size, vocab.image_id, vocab.empty_id) == (32002, 32000, 32001)
    config.model.init = "scratch"
    config.tokenizer.vocab_size = 700
    assert experiment.sized_vocabulary(config).vocab_size == 702


def test_g3m_default_mesh_is_fsdp_over_all_devices_in_training_and_over_the_host_in_eval():
    import jax

    from nxtp_jax import sharding

    config = g3m.get_config()
    assert dict(experiment.make_mesh(config).shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    # The eval job's per-host mesh from the same fields (evaluation/job.py).
    eval_mesh = sharding.local_mesh(int(config.mesh.fsdp), int(config.mesh.tensor))
    assert dict(eval_mesh.shape) == {"data": 1, "fsdp": jax.local_device_count(), "tensor": 1}
