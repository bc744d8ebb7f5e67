"""Checks a released model end to end against what the original published for it.

    python scripts/verify_release.py --model=g3m            # needs the internet (and the LLaMA licence on the Hub)
    python scripts/verify_release.py --model=g70m --eval --coco_root=/data   # also COCO-val top-10 recall
    python scripts/verify_release.py --offline --model=CARD.json --image=PIC --image_sha256=HEX --expected=TOP.json

What it checks:
1. the model (`nxtp_jax.pretrained`): its files downloaded and checked against the card's
   hashes (the checkpoint's md5 prefix, CLIP's sha256, the LLaMA files' pinned ETags), then
   converted;
2. the original's `assets/starbux.jpg`, downloaded from its GitHub repository at run time and
   checked against its sha256 (the picture is CC-BY-NC and is not copied into this repository);
3. the top-20 labels against the list the original's README publishes for that model: the
   same 20 labels, each probability within 2e-3 of the published one (the original ran in
   half precision on a GPU), and the order differing only between labels whose published
   probabilities are within 2e-3 of each other;
4. with `--eval`, COCO-val top-10 recall (`python -m nxtp_jax.main`, config g3m / g70m) against
   the card's published figure, within 0.005; precision and F1 are printed beside it.

`--offline` touches no network beyond HF_ENDPOINT (a mirror or the tests' local Hub): the
picture is `--image` (its sha256 `--image_sha256`) and the expected top list `--expected`
(JSON `[[label, prob], ...]`). Exit status 0 when everything matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import tempfile
import urllib.request

TOLERANCE = 2e-3  # the original's fp16 GPU run vs ours
RECALL_TOLERANCE = 0.005
NUM_LABELS = 20
STARBUX_URL = "https://raw.githubusercontent.com/kaiyuyue/nxtp/main/assets/starbux.jpg"
STARBUX_SHA256 = "3baf1e2a4e46fbd015a5147c33760549b64718711d1dfbd91607852d26f01788"
# The original README's top-20 for assets/starbux.jpg (`python src/infer.py --num-labels 20`).
PUBLISHED = {
    "g3m": [
        ("coffee", 0.05742), ("restaurant", 0.05525), ("shop", 0.04402), ("room", 0.02528), ("store", 0.02468),
        ("interior", 0.02381), ("area", 0.01732), ("building", 0.01640), ("food", 0.01616), ("bar", 0.01408),
        ("customer", 0.01247), ("view", 0.01134), ("floor", 0.01059), ("table", 0.01045), ("kitchen", 0.00933),
        ("home", 0.00926), ("look", 0.00872), ("people", 0.00841), ("cup", 0.00693), ("counter", 0.00665),
    ],
    "g70m": [
        ("coffee", 0.15203), ("shop", 0.09728), ("counter", 0.09182), ("interior", 0.03848), ("bar", 0.03389),
        ("restaurant", 0.03215), ("table", 0.02440), ("store", 0.02245), ("area", 0.01950), ("inside", 0.01905),
        ("starbucks", 0.01590), ("cafe", 0.01313), ("chair", 0.01220), ("floor", 0.01172), ("cup", 0.01020),
        ("drink", 0.00879), ("room", 0.00794), ("customer", 0.00746), ("wood", 0.00635), ("bakery", 0.00345),
    ],
}


def compare(found: list[tuple[str, float]], published: list[tuple[str, float]], tol: float = TOLERANCE) -> list[str]:
    """What differs between our top list and the published one (empty: they agree); see the module docstring."""
    ours, theirs = dict(found), dict(published)
    problems = []
    if missing := [label for label, _ in published if label not in ours]:
        problems.append(f"published labels missing from ours: {missing}")
    if extra := [label for label, _ in found if label not in theirs]:
        problems.append(f"our labels not in the published list: {extra}")
    for label, prob in published:
        if label in ours and abs(ours[label] - prob) > tol:
            problems.append(f"{label}: ours {ours[label]:.5f}, published {prob:.5f} (differs by more than {tol:g})")
    shared = [label for label, _ in found if label in theirs]
    for i, a in enumerate(shared):
        for b in shared[i + 1:]:
            if theirs[b] - theirs[a] > tol:
                problems.append(f"order: ours ranks {a} above {b}, published {b} ({theirs[b]:.5f}) above {a} ({theirs[a]:.5f})")
    return problems


def fetch_picture(url: str, sha256: str, cache: pathlib.Path) -> pathlib.Path:
    """The picture, downloaded once into `cache` and checked against `sha256` (a mismatch is deleted)."""
    path = cache / pathlib.PurePosixPath(url).name
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as r:
            path.write_bytes(r.read())
    try:
        check_sha256(path, sha256)
    except ValueError:
        path.unlink()  # a bad download: the next run fetches it anew
        raise
    return path


def check_sha256(path: pathlib.Path, sha256: str) -> None:
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    if found != sha256:
        raise ValueError(f"{path}: sha256 {found}, expected {sha256}; not the picture the published list is for")


def table(found: list[tuple[str, float]], published: list[tuple[str, float]]) -> str:
    theirs = dict(published)
    lines = [f"{'label':<14} {'ours':>8} {'published':>10} {'diff':>9}"]
    for label, prob in found:
        pub = theirs.get(label)
        lines.append(f"{label:<14} {prob:8.5f} " + (f"{pub:10.5f} {prob - pub:+9.5f}" if pub is not None else f"{'-':>10} {'-':>9}"))
    return "\n".join(lines)


def coco_eval(model: str, coco_root: str, name: str) -> dict:
    """COCO-val top-10 with the model's experiment config (`python -m nxtp_jax.main`, mode eval)."""
    from nxtp_jax.cli.main import main as main_command
    from nxtp_jax.evaluation.job import METRICS_FILE

    config = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    with tempfile.TemporaryDirectory() as workdir:
        status = main_command([
            f"--config={config}", "--config.mode=eval", f"--config.eval.ckpt={model}", "--config.eval.k=10",
            "--config.eval.dataset=coco_valid", f"--config.data.root={coco_root}", f"--workdir={workdir}",
        ])
        if status:
            raise RuntimeError(f"the COCO evaluation exited with status {status}")
        return json.loads((pathlib.Path(workdir) / METRICS_FILE).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="g3m", help="g3m, g70m or a model card .json (default g3m)")
    p.add_argument("--eval", action="store_true", help="also COCO-val top-10 recall against the card's published figure")
    p.add_argument("--coco_root", help="--eval: the data root holding COCO val (config.data.root)")
    p.add_argument("--offline", action="store_true", help="no download of the picture: --image, --image_sha256, --expected")
    p.add_argument("--image", help="--offline: the picture to tag")
    p.add_argument("--image_sha256", default=STARBUX_SHA256, help="--offline: the picture's sha256 (default: starbux.jpg's)")
    p.add_argument("--expected", help="--offline: JSON [[label, prob], ...], the top list to compare with")
    p.add_argument("--dtype", default="float32", help="compute dtype (the original ran float16 on a GPU)")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from nxtp_jax import pretrained
    from nxtp_jax.inference.tagger import Tagger

    card = pretrained.load_card(args.model)
    if args.offline:
        if not (args.image and args.expected):
            p.error("--offline needs --image and --expected")
        if args.eval:
            p.error("--eval needs COCO and the network; drop --offline")
        picture = pathlib.Path(args.image)
        check_sha256(picture, args.image_sha256)
        published = [(label, float(prob)) for label, prob in json.loads(pathlib.Path(args.expected).read_text())]
    else:
        if card["name"] not in PUBLISHED:
            p.error(f"no published top list for {card['name']!r}; pass --offline with --expected")
        picture = fetch_picture(STARBUX_URL, STARBUX_SHA256, pretrained.cache_root() / "verify_release")
        published = PUBLISHED[card["name"]]

    tagger = Tagger.from_pretrained(args.model, dtype=jnp.dtype(args.dtype))
    found = tagger.predict([str(picture)], num_labels=NUM_LABELS)[0]
    print(table(found, published))
    problems = compare(found, published)

    if args.eval:
        if not args.coco_root:
            p.error("--eval needs --coco_root")
        summary = coco_eval(args.model, args.coco_root, card["name"])
        recall = card["published"]["top10_recall"]["coco"]
        print(f"COCO val top-10: recall {summary['recall']:.3f} (published {recall:.3f}), "
              f"precision {summary['precision']:.3f}, F1 {summary['f1']:.3f}")
        if abs(summary["recall"] - recall) > RECALL_TOLERANCE:
            problems.append(f"COCO recall {summary['recall']:.3f}, published {recall:.3f} (differs by more than {RECALL_TOLERANCE})")

    for problem in problems:
        print(f"MISMATCH: {problem}")
    print("OK: matches the published outputs" if not problems else f"FAILED: {len(problems)} mismatch(es)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
