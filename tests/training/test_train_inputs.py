"""Host-side batches: stateless label shuffles and templates, static shapes, global arrays; the plot script."""

import json

import numpy as np
import pytest

from nxtp_jax import prompts, sharding
from nxtp_jax.training import inputs
from nxtp_jax.tokenizer import Tokenizer
from scripts import plot_logs


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


def element(key, epoch, labels="dog,cat,tree,car,house,bird"):
    return {"key": key, "epoch": np.int32(epoch), "labels": labels, "image": np.zeros((2, 2, 3), np.uint8)}


def test_label_shuffle_depends_on_seed_key_and_epoch_only():
    a = inputs.shuffle_labels(element("k1", 0), seed=3)["labels"]
    assert a == inputs.shuffle_labels(element("k1", 0), seed=3)["labels"]
    assert sorted(a.split(",")) == sorted("dog,cat,tree,car,house,bird".split(","))
    others = {inputs.shuffle_labels(element(k, e), seed=s)["labels"] for k, e, s in [("k2", 0, 3), ("k1", 1, 3), ("k1", 0, 4)]}
    assert len({a} | others) >= 3
    assert inputs.shuffle_labels(element("k", 0, labels=""), seed=0)["labels"] == ""


def batch(n=4):
    return {
        "labels": np.array(["dog,cat", "red", "tree,car,house", ""][:n]),
        "caption": np.array(["a dog", "a red logo", "a tree", "sky"][:n]),
        "image": np.zeros((n, 8, 8, 3), np.uint8),
        "skipped": np.array([0, 2, 0, 1][:n], np.int32),
    }


def test_one_template_per_batch_drawn_from_seed_and_step(tok):
    def template_of(step, seed=0, augment=True):
        out = inputs.model_inputs(tok, batch(), step=step, seed=seed, augment=augment, text_len=40, captions=False)
        prompt_len = int(out["answer_pos"][0]) + 1
        assert (out["answer_pos"] == out["answer_pos"][0]).all()
        return tuple(out["tokens"][0, :prompt_len])

    prompts_by_template = {tuple(prompts.inference_prompt(tok, t)) for t in prompts.OBJECT_TEMPLATES}
    drawn = [template_of(s) for s in range(40)]
    assert set(drawn) <= prompts_by_template
    assert len(set(drawn)) >= 5
    assert drawn == [template_of(s) for s in range(40)]
    assert {template_of(s, augment=False) for s in range(5)} == {tuple(prompts.inference_prompt(tok))}


def test_arrays_have_static_shapes_and_keep_label_order(tok):
    out = inputs.model_inputs(tok, batch(), step=0, seed=0, augment=False, text_len=40, captions=True)
    assert {k: v.shape for k, v in out.items()} == {
        "image": (4, 8, 8, 3),
        "skipped": (4,),
        "tokens": (4, 40),
        "targets": (4, 40),
        "answer_pos": (4,),
        "cap_tokens": (4, 40),
        "cap_targets": (4, 40),
    }
    expected = prompts.object_batch(tok, [["tree", "car", "house"]], max_text_len=40, template=prompts.OBJECT_TEMPLATES[0], rng=None, pad_to=40)
    np.testing.assert_array_equal(out["tokens"][2], expected.tokens[0])
    assert out["skipped"].tolist() == [0, 2, 0, 1]


def test_global_batch_is_sharded_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    spec = sharding.batch_sharding(mesh, sharding.LOGICAL_AXIS_RULES)
    local = {"tokens": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
    g = inputs.global_batch(local, spec)["tokens"]
    assert g.shape == (16, 3) and len(g.addressable_shards) == 8
    assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(g), local["tokens"])


def test_plot_logs_writes_png_and_svg(tmp_path):
    rows = [{"step": s, "loss": 5.0 / s, "lr": 1e-4 * min(1, s / 5)} for s in range(1, 21)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_logs.main([str(tmp_path), "--smooth", "0.5"])
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == sorted(f"{m}-{t}-mode.{e}" for m in ("loss", "lr") for t in ("light", "dark") for e in ("png", "svg"))
    assert (tmp_path / "plots" / "loss-light-mode.svg").read_text().lstrip().startswith("<?xml")
