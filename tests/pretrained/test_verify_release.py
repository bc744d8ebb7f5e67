"""scripts/verify_release.py: its comparison rule, and its --offline mode against the tiny served model."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from nxtp_jax.inference.tagger import Tagger
from scripts import verify_release
from tiny_models import random_images

G3M = verify_release.PUBLISHED["g3m"]


def with_prob(label: str, delta: float) -> list[tuple[str, float]]:
    return [(name, p + delta if name == label else p) for name, p in G3M]


def test_compare_accepts_the_published_list_and_probabilities_within_2e_3():
    assert verify_release.compare(G3M, G3M) == []
    assert verify_release.compare(with_prob("bar", 0.0019), G3M) == []
    assert verify_release.compare(with_prob("bar", -0.0021), G3M) == [
        "bar: ours 0.01198, published 0.01408 (differs by more than 0.002)"
    ]


def test_compare_allows_a_swap_only_between_labels_published_within_2e_3():
    near = list(G3M)
    near[7], near[8] = near[8], near[7]  # building 0.01640, food 0.01616
    assert verify_release.compare(near, G3M) == []
    far = list(G3M)
    far[0], far[2] = far[2], far[0]  # coffee 0.05742, shop 0.04402
    assert verify_release.compare(far, G3M) == [  # ours: shop, restaurant, coffee
        "order: ours ranks shop above restaurant, published restaurant (0.05525) above shop (0.04402)",
        "order: ours ranks shop above coffee, published coffee (0.05742) above shop (0.04402)",
        "order: ours ranks restaurant above coffee, published coffee (0.05742) above restaurant (0.05525)",
    ]


def test_compare_names_missing_and_extra_labels():
    found = G3M[:-1] + [("latte", 0.0066)]
    assert verify_release.compare(found, G3M) == [
        "published labels missing from ours: ['counter']",
        "our labels not in the published list: ['latte']",
    ]


def test_offline_mode_passes_on_the_tiny_served_model_and_fails_on_a_moved_probability(hub, card, tmp_path, capsys):
    image = tmp_path / "starbux.png"
    Image.fromarray(random_images(1, 16, seed=7)[0]).save(image)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    top = Tagger.from_pretrained(card).predict([str(image)], num_labels=20)[0]
    assert len(top) >= 2
    expected = tmp_path / "top.json"
    expected.write_text(json.dumps(top))
    args = ["--offline", f"--model={card}", f"--image={image}", f"--image_sha256={sha}", f"--expected={expected}"]
    assert verify_release.main(args) == 0
    assert capsys.readouterr().out.endswith("OK: matches the published outputs\n")

    label, prob = top[-1]
    expected.write_text(json.dumps(top[:-1] + [(label, prob + 0.003)]))
    assert verify_release.main(args) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH: {label}: ours {prob:.5f}, published {prob + 0.003:.5f} (differs by more than 0.002)" in out


def test_offline_mode_refuses_a_picture_with_another_sha256(hub, card, tmp_path):
    image = tmp_path / "starbux.png"
    Image.fromarray(random_images(1, 16)[0]).save(image)
    (tmp_path / "top.json").write_text("[]")
    with pytest.raises(ValueError, match="sha256 .*, expected 3baf1e2a.*not the picture the published list is for"):
        verify_release.main(["--offline", f"--model={card}", f"--image={image}", f"--expected={tmp_path / 'top.json'}"])
    assert image.is_file()
