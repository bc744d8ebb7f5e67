"""Caption-to-nouns (docs/method.md §6) on hand-checked examples, with NLTK stubbed.

No NLTK data can be downloaded here, so `word_tokenize`, `pos_tag` and the WordNet lemmatiser
are stubbed: these tests check our cleaning, filtering, dedup and order around NLTK, not NLTK's
own tagging.
"""

import io
import json

import nltk
import numpy as np
import pytest
from PIL import Image

from nxtp_jax.data import labels
from nxtp_jax.data.samples import RawSample, Skip, decode_sample

# Tags a real tagger gives these words in context; the stub fails on any other token, so
# the tests also pin the exact tokens that reach the tagger.
TAGS = {
    "a": "DT", "dog": "NN", "and": "CC", "two": "CD", "cats": "NNS", "playing": "VBG", "in": "IN",
    "the": "DT", "dogs": "NNS", "3d": "NN", "printer": "NN", "lap": "NN", "on": "IN", "of": "IN",
    "desk": "NN", "s": "NN", "sign": "NN", "al": "NN", "items": "NNS", "cat": "NN", "red": "JJ",
    "buses": "NNS", "bus": "NN", "near": "IN", "geese": "NNS", "ox": "NN", "an": "DT",
}
LEMMAS = {"cats": "cat", "dogs": "dog", "items": "item", "buses": "bus", "geese": "goose"}


@pytest.fixture
def stub_nltk(monkeypatch):
    calls = []

    def pos_tag(tokens):
        calls.append(list(tokens))
        return [(t, TAGS[t]) for t in tokens]

    class Lemmatizer:
        def lemmatize(self, word, pos):
            assert pos == "n"
            return LEMMAS.get(word, word)

    monkeypatch.setattr(nltk, "word_tokenize", lambda text: text.split())
    monkeypatch.setattr(nltk, "pos_tag", pos_tag)
    monkeypatch.setattr(labels, "check_nltk_data", lambda: None)
    monkeypatch.setattr(labels, "_lemmatizer", Lemmatizer)
    return calls


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("A Dog and two Cats playing in the Background!", "a dog and two cats playing in the"),
        # "top" is a substring noise word: "laptop" -> "lap", "stop" -> "s"
        ("Dogs, dog & 3D printer; laptop on top of desk\nstop sign", "dogs dog 3d printer lap on of desk s sign"),
        # "person" goes before "persons", so "persons" leaves an "s"
        ("persons and personal items", "s and al items"),
        ("Stock photo: an Illustration of today's image", "photo an of to 's"),  # "day" -> " "
        ("Café – 100% déjà-vu", "caf 100 dj-vu"),
    ],
)
def test_clean_caption(caption, expected):
    assert labels.clean_caption(caption) == expected


@pytest.mark.parametrize(
    "caption,nouns",
    [
        ("A Dog and two Cats playing in the Background!", ["dog", "cat"]),
        # digits drop "3d"; dedup runs before lemmatising, so "dogs" and "dog" both give "dog"
        ("Dogs, dog & 3D printer; laptop on top of desk\nstop sign", ["dog", "dog", "printer", "lap", "desk", "sign"]),
        ("persons and personal items", ["item"]),  # "s" and "al" are too short
        ("a cat and a cat", ["cat"]),
        ("red buses near a bus", ["bus", "bus"]),
        ("geese and an ox", ["goose"]),  # "ox" is too short
    ],
)
def test_caption_to_nouns_hand_checked_with_nltk_stubbed(stub_nltk, caption, nouns):
    """Stubbed NLTK (tokenizer, tagger, lemmatiser): the tags are what a real tagger gives."""
    assert labels.caption_to_nouns(caption) == nouns
    assert stub_nltk == [labels.clean_caption(caption).split()]


def test_missing_nltk_data_error_gives_the_download_command(monkeypatch):
    labels.check_nltk_data.cache_clear()
    present = {"corpora/wordnet"}

    def find(path):
        if path not in present:
            raise LookupError(path)
        return path

    monkeypatch.setattr(nltk.data, "find", find)
    with pytest.raises(labels.NltkDataMissingError) as info:
        labels.caption_to_nouns("a dog")
    assert "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng\n" in str(info.value)
    labels.check_nltk_data.cache_clear()


def test_resource_names_are_nltks_own():
    # Each NLTK call either works (its data is installed and found under our path) or
    # fails naming the package our error message tells users to download.
    calls = {
        "punkt_tab": lambda: nltk.word_tokenize("a dog"),
        "averaged_perceptron_tagger_eng": lambda: nltk.pos_tag(["a", "dog"]),
        "wordnet": lambda: nltk.stem.WordNetLemmatizer().lemmatize("dogs", pos="n"),
    }
    assert sorted(calls) == sorted(labels.NLTK_RESOURCES.values())
    for path, package in labels.NLTK_RESOURCES.items():
        try:
            calls[package]()
        except LookupError as e:
            assert f"Resource '{package}' not found" in str(e)
        else:
            nltk.data.find(path)


def jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_json_labels_win_and_need_no_nltk(monkeypatch):
    def fail(caption):
        raise AssertionError("NLTK must not run when json carries labels")

    monkeypatch.setattr(labels, "caption_to_nouns", fail)
    raw = RawSample("k", "s.tar", {"jpg": jpeg(), "txt": b"a dog", "json": json.dumps({"labels": ["cat", "sofa"]}).encode()})
    assert decode_sample(raw, 4)["labels"] == "cat,sofa"
    raw = RawSample("k", "s.tar", {"jpg": jpeg(), "txt": b"a dog", "json": json.dumps({"labels": []}).encode()})
    assert decode_sample(raw, 4)["labels"] == ""
    assert decode_sample(raw, 4, label_source="none")["labels"] == ""
    bad = RawSample("k", "s.tar", {"jpg": jpeg(), "txt": b"a dog", "json": b'{"labels": ["a,b"]}'})
    assert isinstance(decode_sample(bad, 4), Skip) and decode_sample(bad, 4).kind == "bad_json"


def test_caption_labels_when_json_has_none_with_nltk_stubbed(stub_nltk):
    raw = RawSample("k", "s.tar", {"jpg": jpeg(), "txt": b"A Dog and two Cats", "json": b'{"url": "x"}'})
    assert decode_sample(raw, 4)["labels"] == "dog,cat"
    with_labels = RawSample("k", "s.tar", {"jpg": jpeg(), "txt": b"a dog", "json": b'{"labels": ["ox"]}'})
    assert decode_sample(with_labels, 4, label_source="caption")["labels"] == "dog"


def test_missing_nltk_is_an_error_not_a_skip(monkeypatch):
    labels.check_nltk_data.cache_clear()
    monkeypatch.setattr(nltk.data, "find", lambda path: (_ for _ in ()).throw(LookupError(path)))
    raw = RawSample("k", "s.tar", {"jpg": jpeg(), "txt": b"a dog"})
    with pytest.raises(labels.NltkDataMissingError, match="nltk.downloader"):
        decode_sample(raw, 4)
    labels.check_nltk_data.cache_clear()
