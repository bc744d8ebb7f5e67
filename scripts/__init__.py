"""Tools run from a checkout: dataset packers, the shapes generator, the data fuzzer, the log plotter.

    python -m scripts.make_shapes --out data/shapes      # or: python scripts/make_shapes.py ...

A package so that tests import them (`from scripts import make_shapes`); never installed.
Launchers (run, run_slurm.sbatch, run_tpu_pod.sh) sit beside them; benchmarks live in benchmarks/.
"""
