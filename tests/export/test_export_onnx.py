"""ONNX export (nxtp-export) and the JAX-free runner (convert/onnx_infer.py) against JAX.

The reference is always the JAX path (`nxtp-tag`, `Tagger`, `sampling.one_shot`), which
shares no code with the runner's sampling loop or with the exported graphs' wiring.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from export_helpers import ROOT, assert_same_predictions, export, in_process, infer_json, run, tag, tiny_checkpoint, write_images
from nxtp_jax import checkpoint, prompts
from nxtp_jax.cli.export import export_command
from nxtp_jax.inference import sampling
from nxtp_jax.export import onnx_export
from nxtp_jax.export.ort_tagger import OrtTagger
from nxtp_jax.models.config import DecoderConfig
from nxtp_jax.models.recognizer import Recognizer, init_params
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import tiny_config

RUNNER = ROOT / "convert" / "onnx_infer.py"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 3, 40)


@pytest.fixture(scope="module")
def ended(tmp_path_factory, sp_model_path):
    """A tiny checkpoint whose branches end early (delimiter boosted) and its export."""
    root = tmp_path_factory.mktemp("ended")
    ckpt = tiny_checkpoint(root / "ckpt", sp_model_path, delimiter_boost=3.0)
    res = export(ckpt, root / "onnx")
    return ckpt, root / "onnx", res.stdout


@pytest.fixture(scope="module")
def capped(tmp_path_factory, sp_model_path):
    """A tiny checkpoint in which some branches end and others hit the cap of 19 sampled tokens."""
    root = tmp_path_factory.mktemp("capped")
    ckpt = tiny_checkpoint(root / "ckpt", sp_model_path, seed=1, delimiter_boost=0.35)
    export(ckpt, root / "onnx")
    return ckpt, root / "onnx"


def test_export_writes_the_files_and_checks_every_graph(ended):
    ckpt, onnx_dir, stdout = ended
    names = {p.name for p in onnx_dir.iterdir()}
    assert {"encoder.onnx", "decoder.onnx", "embeddings.npy", "tokenizer.model", "config.json"} <= names
    assert (onnx_dir / "tokenizer.model").read_bytes() == checkpoint.tokenizer_path(ckpt).read_bytes()
    config = json.loads((onnx_dir / "config.json").read_text())
    tok = Tokenizer(onnx_dir / "tokenizer.model")
    assert config["special_tokens"] == {"bos": 1, "eos": 2, "image": tok.image_id, "empty": tok.empty_id, "delimiter": tok.delimiter_id}
    assert (config["num_image_tokens"], config["layers"], config["kv_heads"], config["head_dim"]) == (16, 2, 2, 16)
    assert config["max_updates"] == sampling.MAX_UPDATES
    diffs = config["max_abs_diff"]
    assert set(diffs) == {"encoder"} | {f"decoder {c} {o}" for c in ("prefill", "step") for o in ("logits", "cache")}
    assert max(diffs.values()) < 1e-4
    for name in diffs:
        assert f"onnxruntime vs JAX, {name}: max abs diff" in stdout
    emb = np.load(onnx_dir / "embeddings.npy")
    want = Tagger.load(ckpt).embeddings()
    np.testing.assert_array_equal(emb, want)


def test_graphs_have_symbolic_batch_and_lengths(ended):
    _, onnx_dir, _ = ended
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    encoder = onnx.load(onnx_dir / "encoder.onnx", load_external_data=False)
    assert dims(encoder.graph.input[0]) == ["B", 32, 32, 3]
    decoder = onnx.load(onnx_dir / "decoder.onnx", load_external_data=False)
    inputs = {i.name: dims(i) for i in decoder.graph.input}
    assert inputs["embeddings"] == ["B", "T", 64] and inputs["mask"] == [1, 1, "T", "C"]
    assert inputs["cache_k_1"] == ["B", "C", 2, 16] and inputs["logit_index"] == ["Q"]
    assert [o.name for o in decoder.graph.output] == ["logits"] + [f"present_{kv}_{i}" for i in range(2) for kv in "kv"]


@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_decoder_is_one_graph_with_external_data(tmp_path, sp_model_path, weights):
    """Weights over 1 MB go to decoder.onnx.data; the graph stays one .onnx file (float16 halves the data)."""
    tok = Tokenizer(sp_model_path)
    config = tiny_config(tok, layers=1)
    config = dataclasses.replace(config, decoder=DecoderConfig(dim=768, layers=1, n_heads=4, vocab_size=tok.vocab_size, multiple_of=64))
    model = Recognizer(config)
    ckpt = checkpoint.save(tmp_path / "ckpt", init_params(model, jax.random.key(0)), config, sp_model_path)
    export(ckpt, tmp_path / "onnx", "--dtype", weights)
    decoder = onnx.load(tmp_path / "onnx" / "decoder.onnx", load_external_data=False)
    external = [t for t in decoder.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"}
    wq = 768 * 768 * (4 if weights == "float32" else 2)
    assert len(external) >= 7 and (tmp_path / "onnx" / "decoder.onnx.data").stat().st_size > 7 * wq
    onnx.checker.check_model(str(tmp_path / "onnx" / "decoder.onnx"))
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert (config["dtype"], config["weight_dtype"]) == ("float32", weights)
    assert max(config["max_abs_diff"].values()) < 1e-3


@pytest.mark.parametrize("k", [3, 8])
def test_cached_sampling_equals_jax_one_shot(capped, ended, images, k):
    """Tokens identical and probabilities within 1e-5, for branches that end and branches that hit the cap."""
    for ckpt, onnx_dir in (capped, ended[:2]):
        ort_tagger, tagger = OrtTagger(onnx_dir), Tagger.load(ckpt)
        pixels = ort_tagger.preprocess(images)
        tokens, probs = ort_tagger.sample(pixels, k)
        want_tokens, want_probs = sampling.one_shot(
            tagger.model, tagger.checkpoint_params(), jnp.asarray(tagger.preprocess(images)), tagger.prompt, k=k,
            delimiter_id=tagger.tokenizer.delimiter_id,
        )
        want_tokens, want_probs = np.asarray(want_tokens), np.asarray(want_probs)
        ran = want_tokens[0, 0] >= 0  # updates the JAX loop ran (it stops when every branch is done)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_allclose(probs[..., ran], want_probs[..., ran], rtol=0, atol=1e-5)


def test_capped_checkpoint_really_hits_the_cap(capped, images):
    ckpt, onnx_dir = capped
    tokens, _ = OrtTagger(onnx_dir).sample(OrtTagger(onnx_dir).preprocess(images), 8)
    delimiter = Tokenizer(onnx_dir / "tokenizer.model").delimiter_id
    ended = (tokens == delimiter).any(axis=-1)
    assert ended.any() and not ended.all()


@pytest.mark.parametrize("ranking", ["prob", "ppl", "sim", "none"])
def test_predictions_equal_tagger(capped, images, ranking):
    ckpt, onnx_dir = capped
    got = OrtTagger(onnx_dir, batch_size=2).predict(images, 6, ranking_method=ranking)
    want = Tagger.load(ckpt).predict(images, 6, ranking_method=ranking)
    assert [[label for label, _ in r] for r in got] == [[label for label, _ in r] for r in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-4, atol=1e-6)


def test_recompute_equals_cached(capped, images):
    _, onnx_dir = capped
    tagger = OrtTagger(onnx_dir)
    pixels = tagger.preprocess(images[:2])
    tokens, probs = tagger.sample(pixels, 5)
    tokens_r, probs_r = tagger.sample(pixels, 5, cache=False)
    np.testing.assert_array_equal(tokens_r, tokens)
    np.testing.assert_allclose(probs_r, probs, rtol=0, atol=1e-5)


def test_runner_without_jax_prints_what_nxtp_infer_prints(ended, images, ort_python):
    ckpt, onnx_dir, _ = ended
    got = infer_json(ort_python, [RUNNER, "--onnx_dir", onnx_dir, "--num_labels", 5, "--json", *images])
    want = json.loads(tag(ckpt, "--num_labels=5", "--json", *images).stdout)
    assert_same_predictions(got, want)
    assert any(len(g["labels"]) >= 2 for g in got)

    text = run([RUNNER, "--onnx_dir", onnx_dir, "--num_labels", 5, *images[:2]], python=ort_python)
    want_text = tag(ckpt, "--num_labels=5", *images[:2])
    assert text.returncode == 0, text.stderr
    got_lines, want_lines = text.stdout.splitlines(), want_text.stdout.splitlines()
    assert len(got_lines) == len(want_lines)
    for g, w in zip(got_lines, want_lines):
        if g.startswith("| prob: "):
            assert g.split(" - ", 1)[1] == w.split(" - ", 1)[1]
            assert abs(float(g.split()[2]) - float(w.split()[2])) <= 1.5e-5
        else:
            assert g == w


def test_runner_recompute_flag(ended, images, ort_python):
    _, onnx_dir, _ = ended
    args = [RUNNER, "--onnx_dir", onnx_dir, "--num_labels", 4, "--json", images[0]]
    assert_same_predictions(infer_json(ort_python, args + ["--no_cache"]), infer_json(ort_python, args), atol=1e-6)


VOCAB = ["red", "red circle", "blue circle", "cat", "car", "cloud", "sky", "green tree", "zebra", "zebu"]


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "recompute"])
def test_constrained_predictions_equal_tagger(capped, images, cache):
    """With a closed vocabulary the runner's numpy trie steps give the JAX loop's labels and scores."""
    ckpt, onnx_dir = capped
    got = OrtTagger(onnx_dir, batch_size=2).predict(images, 4, vocab=VOCAB, cache=cache)
    want = Tagger.load(ckpt).predict(images, 4, vocab=VOCAB)
    assert [[label for label, _ in r] for r in got] == [[label for label, _ in r] for r in want]
    assert all(len(r) == 4 and all(label in VOCAB for label, _ in r) for r in got)
    for g, w in zip(got, want):
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-4, atol=1e-6)


def test_runner_vocab_and_min_prob_flags_print_what_nxtp_infer_prints(ended, images, ort_python, tmp_path):
    ckpt, onnx_dir, _ = ended
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    flags = ["--num_labels", 5, "--min_prob", 0.05, "--vocab", vocab, "--json"]
    got = infer_json(ort_python, [RUNNER, "--onnx_dir", onnx_dir, *flags, *images])
    want = json.loads(tag(ckpt, "--num_labels=5", "--min_prob=0.05", f"--vocab={vocab}", "--json", *images).stdout)
    assert_same_predictions(got, want)
    labels = [entry for g in got for entry in g["labels"]]
    assert labels and all(entry["label"] in VOCAB and entry["prob"] >= 0.05 for entry in labels)
    bad = run([RUNNER, "--onnx_dir", onnx_dir, "--min_prob", 2, images[0]], python=ort_python)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == ["error: expected min_prob in [0, 1], found 2.0"]


def test_float16_weights_match_jax_with_float16_weights(tmp_path, ended, images):
    ckpt, _, _ = ended
    export(ckpt, tmp_path / "onnx", "--dtype", "float16")
    assert np.load(tmp_path / "onnx" / "embeddings.npy").dtype == np.float16
    got = OrtTagger(tmp_path / "onnx").predict(images, 5)
    want = Tagger.load(ckpt, param_dtype=jnp.float16).predict(images, 5)
    assert [[label for label, _ in r] for r in got] == [[label for label, _ in r] for r in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-4, atol=1e-6)


def test_errors_name_the_problem(tmp_path, ended, images, ort_python):
    ckpt, onnx_dir, _ = ended
    res = subprocess.run([str(pathlib.Path(sys.executable).with_name("nxtp-export")), f"--ckpt={tmp_path / 'nothing'}", f"--out={tmp_path / 'o'}"], capture_output=True, text=True)
    assert res.returncode == 1 and "a checkpoint directory, found" in res.stderr and "nothing" in res.stderr
    assert "Traceback" not in res.stderr
    res = in_process(export_command, f"--ckpt={ckpt}", f"--out={onnx_dir}")
    assert res.returncode == 1 and "already exists" in res.stderr
    res = in_process(export_command, f"--ckpt={ckpt}", f"--out={tmp_path / 'o'}", "--quantize=int2")
    assert res.returncode == 2 and "--quantize" in res.stderr and not (tmp_path / "o").exists()
    res = run([RUNNER, "--onnx_dir", tmp_path, images[0]], python=ort_python)
    assert res.returncode == 1 and "convert/to_onnx.py" in res.stderr and "Traceback" not in res.stderr
    res = run([RUNNER, "--onnx_dir", onnx_dir, tmp_path / "missing.png"], python=ort_python)
    assert res.returncode == 1 and "missing.png" in res.stderr


def test_prompt_and_ids_come_from_the_tokenizer(ended, tmp_path):
    onnx_dir = shutil.copytree(ended[1], tmp_path / "onnx")
    tok = Tokenizer(onnx_dir / "tokenizer.model")
    np.testing.assert_array_equal(OrtTagger(onnx_dir).prompt, prompts.inference_prompt(tok))
    config = json.loads((onnx_dir / "config.json").read_text())
    config["special_tokens"]["delimiter"] += 1
    (onnx_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="export again"):
        OrtTagger(onnx_dir)


def test_int8_export_runs_without_jax_and_keeps_the_fp32_labels(ended, images, ort_python, tmp_path):
    ckpt, onnx_dir, _ = ended
    export(ckpt, tmp_path / "int8", "--quantize", "int8")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert (config["quantize"], config["accuracy_level"]) == ("int8", 4)  # int8 arithmetic: the fast kernels
    graph = onnx.load(str(tmp_path / "int8" / "decoder.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + 1  # wq wk wv wo w1 w2 w3 per block, and the output layer
    assert "Gemm" not in ops
    args = ["--num_labels", 5, "--json", *images]
    got = infer_json(ort_python, [RUNNER, "--onnx_dir", tmp_path / "int8", *args])
    want = infer_json(ort_python, [RUNNER, "--onnx_dir", onnx_dir, *args])
    # int8 moves each weight by at most half a step (max |block| / 254); on this tiny random model
    # label scores moved by less than 0.1 (tests/inference/test_quantize.py, the same bound). The
    # same top label, and every label fp32 scores >= 0.01 is there; below that this model's labels are
    # near ties (~1e-3 apart) that trade places at the k-th rank.
    for g, w in zip(got, want):
        got_probs = {x["label"]: x["prob"] for x in g["labels"]}
        assert g["labels"][0]["label"] == w["labels"][0]["label"], g["image"]
        for x in w["labels"]:
            if x["prob"] >= 0.01:
                assert abs(got_probs[x["label"]] - x["prob"]) <= 0.1, (g["image"], x)
    assert sum(x["prob"] >= 0.01 for w in want for x in w["labels"]) >= len(want)


@pytest.mark.parametrize("level", [1, 2, 3, "4"])
def test_quantize_refuses_an_accuracy_level_it_does_not_offer(tmp_path, level):
    with pytest.raises(ValueError, match="expected accuracy_level in"):
        onnx_export.quantize_decoder(tmp_path / "decoder.onnx", "int8", level)
