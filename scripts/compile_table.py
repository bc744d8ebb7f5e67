"""The markdown tables of docs/benchmarks.md ("TPU compile check") from compile reports.

    python scripts/compile_table.py "configs/g3m.py=runs/check_v4/compile_report.json" ...
    python scripts/compile_table.py --summary "g3m, v4-8=runs/mesh_v4/compile_report.json,runs/batch_v4/compile_report.json" ...

Each argument is LABEL=PATH of a compile_report.json written by mode "compile" (nxtp_jax/aot);
every row of every report becomes a table row. With --summary, each argument is LABEL=PATHS
(comma-separated: a compile.search=mesh report and a compile.search=batch report) and becomes one
row: the best mesh, and the largest batch per chip with its figures. Times are the check's estimates.
"""

from __future__ import annotations

import json
import sys

GiB = 2**30
HEADER = (
    "| config | topology | program | mesh (data, fsdp, tensor) | change from the config | batch per chip (global) "
    "| peak per chip, GiB (of) | fits | step, s (estimate) | samples/s bound | MFU bound |"
)
SUMMARY_HEADER = (
    "| config, topology | best mesh (data, fsdp, tensor): step at the config's batch, s (estimate) "
    "| largest batch per chip (global), mesh | peak per chip, GiB (of) | step, s (estimate) | samples/s bound | MFU bound |"
)


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _mesh(r: dict) -> str:
    return ", ".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))


def _of(r: dict) -> float:
    return (r.get("available_bytes_per_chip") or r["hbm_bytes_per_chip"]) / GiB


def rows(label: str, report: list[dict]) -> list[str]:
    out = []
    for r in report:
        out.append(
            f"| {label} | {r['topology']} | {r['program']} ({r['param_dtype']}) | {_mesh(r)} | {r.get('change', '') or '—'} "
            f"| {r['batch_per_chip']:g} ({r['global_batch']}) | {r['peak_bytes_per_chip'] / GiB:.2f} ({_of(r):.2f}) "
            f"| {'yes' if r['fits'] else 'no'} | {_fmt(r.get('estimated_step_s'), '.3f')} "
            f"| {_fmt(r.get('samples_per_s_bound'), '.0f')} | {_fmt(r.get('mfu_bound'), '.2f')} |"
        )
    return out


def summary(label: str, report: list[dict]) -> str:
    """One row from a mesh search and a batch search of the same config and topology."""
    tried = [r for r in report if r.get("search") == "mesh"]
    best = [r for r in tried if r.get("rank") == 1]
    largest = [r for r in report if r.get("search") == "batch" and r.get("best")]
    if len(best) != 1 or len(largest) != 1:
        raise ValueError(f"{label}: needs one compile.search=mesh report with a mesh that fits and one compile.search=batch report with a batch that fits")
    (b,), (r,) = best, largest
    fit = sum(t["fits"] for t in tried)
    return (
        f"| {label} | {_mesh(b)}: {b['estimated_step_s']:.3f} at {b['global_batch']} ({fit} of {len(tried)} compiled fit) "
        f"| {r['batch_per_chip']:g} ({r['global_batch']}), {_mesh(r)} | {r['peak_bytes_per_chip'] / GiB:.2f} ({_of(r):.2f}) "
        f"| {r['estimated_step_s']:.3f} | {r['samples_per_s_bound']:.0f} | {r['mfu_bound']:.2f} |"
    )


def main(argv: list[str]) -> int:
    brief = argv[:1] == ["--summary"]
    argv = argv[1:] if brief else argv
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    header = SUMMARY_HEADER if brief else HEADER
    lines = [header, "|" + "---|" * header.count(" |")]
    for arg in argv:
        label, paths = arg.rsplit("=", 1)  # labels may hold flags (a=b); paths do not
        reports = []
        for path in paths.split(",") if brief else [paths]:
            with open(path) as f:
                reports += json.load(f)
        try:
            lines += [summary(label, reports)] if brief else rows(label, reports)
        except ValueError as e:
            print(f"compile_table: {e}", file=sys.stderr)
            return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
