"""Ground-truth labels from a caption: the paper's caption-to-nouns procedure (docs/method.md §6)."""

from __future__ import annotations

import functools
import re

# Removed as substrings, in this order, exactly as the original: "persons" is never
# matched whole ("person" goes first), and "top" also leaves "laptop" as "lap".
NOISE_SUBSTRINGS = (
    "person",
    "persons",
    "stock",
    "illustration",
    "foreground",
    "background",
    "photography",
    "image",
    "images",
    "front",
    "day",
    "ounce",
    "top",
)
NOUN_TAGS = ("NN", "NNS")

# NLTK resource path -> the downloader's package name.
NLTK_RESOURCES = {
    "tokenizers/punkt_tab/english/": "punkt_tab",
    "taggers/averaged_perceptron_tagger_eng/": "averaged_perceptron_tagger_eng",
    "corpora/wordnet": "wordnet",
}

_DISALLOWED = re.compile(r"[^a-zA-Z' 0-9.,&-]")
_WHITESPACE = re.compile(r"\s+")


class NltkDataMissingError(LookupError):
    """NLTK's tokenizer, tagger or WordNet data is not installed."""


def clean_caption(caption: str) -> str:
    """Steps 1-4: lowercase, drop noise substrings and odd characters, ',' and '&' to spaces."""
    text = caption.lower().replace("\r", " ").replace("\n", " ")
    for noise in NOISE_SUBSTRINGS:
        text = text.replace(noise, " ")
    text = _DISALLOWED.sub("", text)
    text = text.replace(",", " ").replace("&", " ")
    return _WHITESPACE.sub(" ", text).strip()


@functools.cache
def check_nltk_data() -> None:
    """Raise NltkDataMissingError with the download command if any resource is missing."""
    import nltk

    missing = []
    for path, package in NLTK_RESOURCES.items():
        try:
            nltk.data.find(path)
        except LookupError:
            missing.append(package)
    if missing:
        raise NltkDataMissingError(
            f"NLTK data needed to extract labels from captions is missing: {', '.join(missing)}. "
            f"Install it with:\n    python -m nltk.downloader {' '.join(missing)}\n"
            "(add `-d DIR` and set NLTK_DATA=DIR to keep it elsewhere). On a machine without "
            "internet, download it elsewhere and copy the nltk_data folder over, or "
            "pre-compute labels into the shards with scripts/extract_labels.py so training "
            "needs no NLTK."
        )


@functools.cache
def _lemmatizer():
    from nltk.stem import WordNetLemmatizer

    return WordNetLemmatizer()


def caption_to_nouns(caption: str) -> list[str]:
    """The nouns of a caption as training/evaluation labels, in caption order.

    Steps 5-9 of docs/method.md §6: NLTK word_tokenize + pos_tag, keep NN/NNS without digits,
    deduplicate, lemmatise as nouns with WordNet, keep words longer than 2 characters.
    As in the original, deduplication happens before lemmatisation, so "dog dogs" gives
    ["dog", "dog"]. The original also shuffled here; the order is left to the consumer.
    """
    import nltk

    check_nltk_data()
    tokens = nltk.word_tokenize(clean_caption(caption))
    nouns = [word for word, tag in nltk.pos_tag(tokens) if tag in NOUN_TAGS]
    nouns = [word for word in nouns if not any(c.isdigit() for c in word)]
    nouns = list(dict.fromkeys(nouns))
    lemmas = [_lemmatizer().lemmatize(word, pos="n") for word in nouns]
    return [word for word in lemmas if len(word) > 2]
