"""Dataset registry: names -> shard lists under data_root, mixing, clear errors."""

import os

import pytest

from nxtp_jax.data.registry import find_shards, resolve_shards, total_length

REGISTRY = {
    "coco": {"root": "coco/coco_train", "length": 3},
    "cc3m": {"root": "cc3m/cc3m", "length": 5},
    "empty": {"root": "empty", "length": 0},
}


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def test_resolve_mixes_datasets_recursively_and_sorted(tmp_path):
    c1 = touch(tmp_path / "coco/coco_train/00001/b.tar")
    c0 = touch(tmp_path / "coco/coco_train/00000/a.tar")
    touch(tmp_path / "coco/coco_train/00000/a.txt")
    m0 = touch(tmp_path / "cc3m/cc3m/000000.tar")
    assert resolve_shards(["COCO", "cc3m"], tmp_path, REGISTRY) == [c0, c1, m0]
    assert resolve_shards("cc3m", str(tmp_path), REGISTRY) == [m0]
    assert total_length(["coco", "cc3m"], REGISTRY) == 8


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(KeyError, match="unknown dataset 'laion'.*cc3m"):
        resolve_shards(["laion"], tmp_path, REGISTRY)
    with pytest.raises(FileNotFoundError, match="coco/coco_train"):
        resolve_shards(["coco"], tmp_path, REGISTRY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="found none"):
        resolve_shards(["empty"], tmp_path, REGISTRY)
    with pytest.raises(ValueError, match='"root" and "length"'):
        resolve_shards(["x"], tmp_path, {"x": {"root": "x"}})


def test_find_shards_file_or_directory(tmp_path):
    shard = touch(tmp_path / "d/x.tar")
    assert find_shards(shard) == [shard]
    assert find_shards(tmp_path / "d") == [shard]
    with pytest.raises(FileNotFoundError, match="nothing at"):
        find_shards(tmp_path / "nope")


def test_symlinked_directories_are_followed_once_and_shards_listed_once(tmp_path):
    real = touch(tmp_path / "data/real/a.tar")
    touch(tmp_path / "data/real/sub/b.tar")
    os.symlink(tmp_path / "data/real", tmp_path / "data/alias")  # two paths to one folder
    os.symlink(tmp_path / "data", tmp_path / "data/real/sub/loop")  # a cycle back to the root
    shards = find_shards(tmp_path / "data")
    assert sorted(os.path.realpath(s) for s in shards) == [real, str(tmp_path / "data/real/sub/b.tar")]
    assert len(shards) == 2
