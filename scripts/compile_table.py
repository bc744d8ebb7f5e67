"""The markdown table of docs/benchmarks.md ("TPU compile check") from compile reports.

    python scripts/compile_table.py "configs/g3m.py=runs/check_v4/compile_report.json" ...

Each argument is LABEL=PATH of a compile_report.json written by mode "compile" (nxtp_jax/aot);
every row of every report becomes a table row. Times are the check's estimates.
"""

from __future__ import annotations

import json
import sys

GiB = 2**30
HEADER = (
    "| config | topology | program | mesh (data, fsdp, tensor) | change from the config | batch per chip (global) "
    "| peak per chip, GiB (of) | fits | step, s (estimate) | samples/s bound | MFU bound |"
)


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def rows(label: str, report: list[dict]) -> list[str]:
    out = []
    for r in report:
        mesh = ", ".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        of = r.get("available_bytes_per_chip") or r["hbm_bytes_per_chip"]
        out.append(
            f"| {label} | {r['topology']} | {r['program']} ({r['param_dtype']}) | {mesh} | {r.get('change', '') or '—'} "
            f"| {r['batch_per_chip']:g} ({r['global_batch']}) | {r['peak_bytes_per_chip'] / GiB:.2f} ({of / GiB:.2f}) "
            f"| {'yes' if r['fits'] else 'no'} | {_fmt(r.get('estimated_step_s'), '.3f')} "
            f"| {_fmt(r.get('samples_per_s_bound'), '.0f')} | {_fmt(r.get('mfu_bound'), '.2f')} |"
        )
    return out


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    lines = [HEADER, "|" + "---|" * HEADER.count(" |")]
    for arg in argv:
        label, path = arg.rsplit("=", 1)  # labels may hold flags (a=b); paths do not
        with open(path) as f:
            lines += rows(label, json.load(f))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
