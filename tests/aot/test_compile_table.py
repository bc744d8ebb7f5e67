"""scripts/compile_table.py: the tables of docs/benchmarks.md from compile reports (hand-written reports)."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
GiB = 2**30


def row(mesh, batch, fits, step=None, **extra):
    data, fsdp, tensor = mesh
    r = {
        "program": "train", "topology": "v4-8", "param_dtype": "float32", "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "batch_per_chip": batch / 4, "global_batch": batch, "fits": fits, "hbm_bytes_per_chip": 32 * GiB,
        "peak_bytes_per_chip": (20 if fits else 40) * GiB, "estimated_step_s": step,
        "samples_per_s_bound": batch / step if step else None, "mfu_bound": 0.5 if step else None,
    }
    if not fits:
        r["available_bytes_per_chip"] = 30.75 * GiB
    return {**r, **extra}


def table(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_table.py"), *args], capture_output=True, text=True, timeout=60)


def test_summary_row_names_the_top_ranked_mesh_and_the_largest_batch_that_fits(tmp_path):
    mesh = [row((1, 4, 1), 512, True, 2.0, search="mesh", rank=1), row((1, 2, 2), 512, True, 2.5, search="mesh", rank=2),
            row((4, 1, 1), 512, False, search="mesh", rank=None)]
    batch = [row((1, 4, 1), 512, True, 2.0, search="batch", best=False), row((1, 4, 1), 1024, False, search="batch", best=False),
             row((1, 4, 1), 640, True, 2.56, search="batch", best=True), row((1, 4, 1), 768, False, search="batch", best=False)]
    (tmp_path / "m.json").write_text(json.dumps(mesh))
    (tmp_path / "b.json").write_text(json.dumps(batch))
    proc = table(tmp_path, "--summary", f"g3m, v4-8={tmp_path / 'm.json'},{tmp_path / 'b.json'}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2] == (
        "| g3m, v4-8 | 1, 4, 1: 2.000 at 512 (2 of 3 compiled fit) | 160 (640), 1, 4, 1 | 20.00 (32.00) | 2.560 | 250 | 0.50 |"
    )


def test_summary_without_a_batch_search_is_refused_in_one_line(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([row((1, 4, 1), 512, True, 2.0, search="mesh", rank=1)]))
    proc = table(tmp_path, "--summary", f"g3m={tmp_path / 'm.json'}")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "compile.search=batch" in proc.stderr


def test_every_report_row_becomes_a_table_row_with_the_available_memory_where_it_did_not_fit(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([row((4, 1, 1), 512, False), row((1, 4, 1), 512, True, 2.0, change="--config.mesh.fsdp=4")]))
    proc = table(tmp_path, f"g3m --config.x=1={tmp_path / 'r.json'}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2:] == [
        "| g3m --config.x=1 | v4-8 | train (float32) | 4, 1, 1 | — | 128 (512) | 40.00 (30.75) | no | — | — | — |",
        "| g3m --config.x=1 | v4-8 | train (float32) | 1, 4, 1 | --config.mesh.fsdp=4 | 128 (512) | 20.00 (32.00) | yes | 2.000 | 256 | 0.50 |",
    ]
