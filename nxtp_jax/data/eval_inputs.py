"""Evaluation splits by registry name: tar shards, or a TFDS dataset (ImageNet-1k) read by random access.

A registry entry is `{"root", "length"}` for shards under `data.root/root`. An entry with
a `"tfds"` name reads that TFDS dataset instead, from the data_dir `data.root/root`:

    "in1k_valid": {"root": "tensorflow_datasets", "length": 50000,
                   "tfds": "imagenet2012", "split": "validation", "classes": "in1k"}

`"classes": "in1k"` makes the targets the class's synonyms (imagenet.py), as the original
evaluated ImageNet. Either way the loader is a `pipeline.EvalLoader`: sample i goes to
process i % count and every process gets the same number of (padded) batches.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

import grain
from ml_collections import config_dict

from nxtp_jax.data import pipeline, registry
from nxtp_jax.data.samples import Skip

TFDS_CLASSES = ("in1k",)


class _Slots:
    """This process's records of a random-access source, then padding (-1 reads as None)."""

    def __init__(self, source: Any, entries: list[int]):
        self.source = source
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Any:
        j = self.entries[i]
        return pipeline.PADDING if j < 0 else self.source[j]

    def __repr__(self) -> str:
        return f"_Slots({len(self.entries)} slots of {self.source!r})"


def _eval_element(to_element: Callable[[Any], dict[str, Any] | Skip], image_size: int, record: Any) -> dict[str, Any]:
    element = None if isinstance(record, str) else to_element(record)
    return pipeline.eval_element(element, image_size, element.where if isinstance(element, Skip) else "")


def build_random_access_eval_loader(
    source: Any,
    to_element: Callable[[Any], dict[str, Any] | Skip],
    *,
    image_size: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    worker_count: int = 0,
) -> pipeline.EvalLoader:
    """`build_eval_loader` for a random-access source (`__len__`, `__getitem__`, e.g. a TFDS data source).

    `to_element(record)` returns an element dict ("image" uint8 [S, S, 3], "key", "caption",
    "labels") or a `samples.Skip`, which becomes a `valid=False` element. With workers it
    must be picklable.
    """
    if batch_size <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"expected batch_size > 0 and 0 <= process_index < process_count, found {batch_size}, "
            f"{process_index}, {process_count}"
        )
    n = len(source)
    if n == 0:
        raise ValueError(f"expected a non-empty eval source, found {source!r} with no records")
    ds = grain.MapDataset.source(_Slots(source, pipeline.process_slots(n, process_index, process_count, batch_size)))
    ds = ds.map(functools.partial(_eval_element, to_element, image_size))
    return pipeline.EvalLoader(ds.batch(batch_size), n, worker_count)


def _entry(registry_map: Mapping[str, Any], dataset: str) -> Mapping[str, Any]:
    key = dataset.lower()
    if key not in registry_map:
        raise KeyError(f"unknown eval dataset {dataset!r}; expected one of {sorted(registry_map)} (add it to data.registry)")
    return registry_map[key]


def build_loader(
    config: config_dict.ConfigDict,
    dataset: str,
    *,
    image_size: int,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> pipeline.EvalLoader:
    """The eval loader of registry entry `dataset` for this process (jax.process_index() by default)."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    entry = _entry(config.data.registry, dataset)
    if "tfds" not in entry:
        shards = registry.resolve_shards([dataset], config.data.root, config.data.registry)
        return pipeline.build_eval_loader(
            shards,
            image_size=image_size,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            worker_count=config.data.worker_count,
            label_source=config.data.label_source,
        )
    classes = entry.get("classes")
    if classes not in TFDS_CLASSES:
        raise ValueError(
            f"registry entry {dataset!r}: a TFDS eval split needs \"classes\" in {TFDS_CLASSES} (how its labels "
            f"become targets), found {classes!r}"
        )
    from nxtp_jax.data import imagenet
    from nxtp_jax.data.tfds_source import tfds_data_source

    source = tfds_data_source(entry["tfds"], entry.get("split", "validation"), os.path.join(config.data.root, entry["root"]))
    return build_random_access_eval_loader(
        source,
        imagenet.In1kRecord(image_size),
        image_size=image_size,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        worker_count=config.data.worker_count,
    )
