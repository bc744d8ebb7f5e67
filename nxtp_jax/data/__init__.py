"""Data: WebDataset tar shards through grain, CLIP preprocessing, labels from captions.

Modules (import them directly; this package imports nothing):
- preprocess: image decoding, torchvision-exact resize/crop, CLIP normalisation;
- tar, stream, samples, skips: reading shards by offset, the resumable training stream,
  sample decoding and counting of skipped bad samples;
- pipeline: build_train_iterator, build_eval_loader;
- registry: dataset names -> shard lists; labels: caption -> nouns (NLTK);
- writer, shapes: writing shards, the synthetic shapes dataset; check: the shard checker
  CLI; tfds_source: TensorFlow Datasets sources (optional extra).
"""
