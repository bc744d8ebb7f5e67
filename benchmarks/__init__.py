"""Benchmarks, one entry point per question; each prints its ratios measured in one run on this machine.

    python -m benchmarks.cpu --workdir DIR       # CPU tagging at full size against this machine's floor
    python -m benchmarks.accelerator --out F     # the accelerator goals: latency, eval throughput, training
    python -m benchmarks.train --config=configs/g3m.py   # training throughput and MFU (or --memory)
    python -m benchmarks.data                    # data loading against the decode ceiling
    python -m benchmarks.serve                   # the HTTP service: dynamic batching against none
    python -m benchmarks.evaluation              # the eval loop; --embedders: the metric's embedder

`common` holds what they share (timing, the machine's name, tables, child processes), `floor`
the CPU's measured limits. Run from a checkout; never installed. Figures: docs/benchmarks.md.
"""
