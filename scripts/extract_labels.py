"""Pre-compute labels (the nouns of each caption, docs/method.md §6) into new shards, so training needs no NLTK.

    python scripts/extract_labels.py --input SHARDS_DIR --out NEW_DIR --workers 8

Every member of every sample is copied; the .json gets "labels" (a list of strings) and is
created if absent. Samples whose caption is missing or not UTF-8, or whose json does not
parse, are left out and counted, and so are captions and json above samples.MAX_TEXT_BYTES
and keys with '..' parts. Shards keep their relative paths. --out must be empty, or pass
--overwrite to replace the shards in it; it must not hold the input shards. Needs NLTK's data:
`python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet`.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
from typing import Iterator

from tqdm import tqdm

from nxtp_jax.data import labels
from nxtp_jax.data.registry import find_shards
from nxtp_jax.data.samples import read_sample
from nxtp_jax.data.tar import TarFormatError, walk
from nxtp_jax.data.writer import PackError, key_problem, output_path, packer_main, prepare_out, write_shard
from nxtp_jax.errors import USER_ERRORS


def labelled_samples(shard: str, counts: collections.Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The shard's samples with labels added to their json; problems are counted in `counts`."""
    with walk(shard, all_members=True) as (fd, groups):
        for group in groups:
            if isinstance(group, TarFormatError):
                counts[group.kind] += 1
                return
            raw = read_sample(fd, group.key, group.members)
            if raw.problem is not None or key_problem(group.key):
                counts[raw.problem[0] if raw.problem else "bad_key"] += 1
                continue
            members = raw.members
            if "txt" not in members:
                counts["missing_caption"] += 1
                continue
            try:
                caption = members["txt"].decode("utf-8")
                meta = json.loads(members["json"]) if "json" in members else {}
            except UnicodeDecodeError:
                counts["bad_caption"] += 1
                continue
            except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
                counts["bad_json"] += 1
                continue
            if not isinstance(meta, dict):
                counts["bad_json"] += 1
                continue
            meta["labels"] = labels.caption_to_nouns(caption)
            members["json"] = json.dumps(meta).encode("utf-8")
            counts["labelled"] += 1
            yield group.key, members


def process_shard(job: tuple[str, str]) -> collections.Counter:
    src, dst = job
    counts: collections.Counter = collections.Counter()
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    write_shard(dst, labelled_samples(src, counts))
    return counts


def plan(inputs: list[str], out: str) -> list[tuple[str, str]]:
    """(source shard, output shard) pairs, output paths relative to each input folder."""
    jobs = []
    for path in inputs:
        base = path if os.path.isdir(path) else os.path.dirname(path)
        jobs += [(s, output_path(out, os.path.relpath(s, base))) for s in find_shards(path)]
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help="shards or folders of shards")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--workers", type=int, default=1, help="processes (one shard each at a time)")
    return packer_main(parser, run, argv, (*USER_ERRORS, labels.NltkDataMissingError))


def run(args: argparse.Namespace) -> int:
    labels.check_nltk_data()
    jobs = plan(args.input, args.out)
    out = os.path.realpath(args.out)
    inputs_in_out = [src for src, _ in jobs if os.path.realpath(src).startswith(out.rstrip("/") + "/")]
    if inputs_in_out:
        raise PackError(f"--out {args.out!r} holds input shards (e.g. {inputs_in_out[0]!r}); choose another folder")
    prepare_out(args.out, args.overwrite)
    totals: collections.Counter = collections.Counter()
    with tqdm(total=len(jobs), unit="shard", disable=args.no_progress) as bar:
        if args.workers > 1:
            with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
                for counts in pool.imap_unordered(process_shard, jobs):
                    totals.update(counts)
                    bar.update(1)
                    bar.set_postfix(labelled=totals["labelled"])
        else:
            for job in jobs:
                totals.update(process_shard(job))
                bar.update(1)
                bar.set_postfix(labelled=totals["labelled"])
    skipped = {k: v for k, v in totals.items() if k != "labelled"}
    print(f"labelled={totals['labelled']} skipped={sum(skipped.values())} {dict(sorted(skipped.items()))} "
          f"shards={len(jobs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
