"""Data: WebDataset tar shards through grain, CLIP preprocessing, labels from captions."""
