"""Evaluation: the eval job (`job`), the semantic F-score (`metrics`) and its embedders, CLIP re-ranking, the frequency baseline."""
