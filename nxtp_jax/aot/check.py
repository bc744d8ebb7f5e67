"""Mode "compile": does this config fit that TPU topology, with which mesh and batch, and how fast at best.

    python -m nxtp_jax.main --config=configs/g3m.py --config.mode=compile \
        --config.compile.topology=v5p-8 --workdir=DIR

Compiles the real train step and one-shot samplers for the topology's chips with libtpu on any
host (no TPU, no checkpoint, tokenizer or dataset), prints one row per program and writes
DIR/compile_report.json. `run` returns 1 when a program does not fit; the message says what to
change, and that change was compiled and fits. docs/training.md explains every figure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any, Callable, Sequence

from etils import epath
from ml_collections import config_dict

from nxtp_jax import experiment
from nxtp_jax.aot import analysis, programs, topologies
from nxtp_jax.choices import DEFAULT_NUM_LABELS
from nxtp_jax.errors import NxtpError

REPORT_FILE = "compile_report.json"
LIBTPU_HINT = 'compiling for a TPU needs libtpu, which is not installed: pip install -e ".[tpu]"'
# FSDP's windowed-einsum loops are costed once per loop by the cost model, under-counting FLOPs (by 26%
# for g3m on v5e:4x4 when first measured); without them the estimate counts every FLOP. The real run may use them.
COMPILER_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}
GiB = 2**30


class LibtpuMissing(NxtpError, ImportError):
    """libtpu is not installed."""


def tpu_devices(topology: topologies.Topology, num_slices: int) -> list[Any]:
    """The topology's devices, from libtpu's description of it (no TPU needed)."""
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissing(LIBTPU_HINT)
    from jax.experimental import topologies as jax_topologies

    # Compiling claims no TPU, so checks (and tests) may run side by side despite libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    desc = jax_topologies.get_topology_desc(platform="tpu", num_slices=num_slices, **topology.libtpu_kwargs())
    return list(desc.devices)


def compile_row(program: programs.Program, topology: topologies.Topology) -> dict[str, Any]:
    """One report row: the compiler's memory and cost figures, or its out-of-memory answer."""
    import jax
    from jax._src import config as jax_config  # the cache switch has no public context manager

    chip = topology.chip
    row: dict[str, Any] = {
        "program": program.name,
        "topology": topology.name,
        "libtpu_topology": topology.libtpu_name,
        "mesh": program.mesh,
        "batch_per_chip": program.global_batch / program.num_chips,
        "global_batch": program.global_batch,
        "param_dtype": program.param_dtype,
        "hbm_bytes_per_chip": chip.hbm_bytes,
        "hbm_source": chip.source,
    }
    t0 = time.perf_counter()
    # An executable for chips this host lacks cannot be loaded back from the persistent cache.
    with jax_config.enable_compilation_cache(False):
        try:
            compiled = program.lower().compile(COMPILER_OPTIONS)
        except jax.errors.JaxRuntimeError as e:
            oom = analysis.out_of_memory(str(e))
            if oom is None:
                raise
            row.update(fits=False, peak_bytes_per_chip=oom[0], available_bytes_per_chip=oom[1], flops=None, estimated_step_s=None)
        else:
            step = program.loop_step and program.loop_step.lower().compile(COMPILER_OPTIONS)
            cost = analysis.cost(compiled, chip, program.global_batch, step, program.loop_steps)
            row.update(fits=True, **analysis.memory(compiled), **cost)
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    return row


def with_settings(config: config_dict.ConfigDict, settings: dict[str, Any]) -> config_dict.ConfigDict:
    """A copy of `config` with dotted fields set, e.g. {"mesh.fsdp": 4}."""
    out = config_dict.ConfigDict(config.to_dict())
    out.update_from_flattened_dict(settings)
    return out


def flags(settings: dict[str, Any]) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in settings.items())


def fitting_changes(config: config_dict.ConfigDict, failed: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """What to try when the train step does not fit, least intrusive first: FSDP over all chips, then
    remat, then gradient accumulation (the global batch stays); settings the failed run had are left out."""
    fsdp = {"mesh.data": 1, "mesh.fsdp": n, "mesh.tensor": 1}
    tries = [fsdp, {**fsdp, "model.remat": True}]
    tries += [{**fsdp, "model.remat": True, "grad_accum_steps": a} for a in (2, 4, 8) if config.batch_size % (a * n) == 0]
    had = {**{f"mesh.{k}": v for k, v in failed["mesh"].items()}, "model.remat": config.model.remat, "grad_accum_steps": config.grad_accum_steps}
    changes = [{k: v for k, v in t.items() if had[k] != v} for t in tries]
    return [c for i, c in enumerate(changes) if c and c not in changes[:i]]


def hopeless(change: dict[str, Any], last: dict[str, Any], config: config_dict.ConfigDict) -> bool:
    """Whether `change` only divides the micro-batch of the failed try `last` by some factor a while
    required / a stays above the available memory (memory falls at most in proportion to the batch)."""
    if "grad_accum_steps" not in change or last["fits"]:
        return False
    before = dict(last.get("settings", {}))
    factor = change["grad_accum_steps"] / before.pop("grad_accum_steps", config.grad_accum_steps)
    same = before == {k: v for k, v in change.items() if k != "grad_accum_steps"}
    return same and last["peak_bytes_per_chip"] / factor > last["available_bytes_per_chip"]


def _head(row: dict[str, Any]) -> str:
    need = f"needs {row['peak_bytes_per_chip'] / GiB:.2f} GiB per chip of {row['available_bytes_per_chip'] / GiB:.2f} GiB available"
    return f"{row['program']} does not fit {row['topology']} at batch {row['global_batch']}, mesh {row['mesh']}: {need}"


def not_fit_line(row: dict[str, Any], change: dict[str, Any] | None, fixed: dict[str, Any] | None, tried: int) -> str:
    head = _head(row)
    if change is None:
        return f"{head}; none of {tried} changes tried (fsdp over all chips, remat, grad_accum_steps) fits: use more chips or a smaller batch"
    return (
        f"{head}; fits with {flags(change)} (peak {fixed['peak_bytes_per_chip'] / GiB:.2f} GiB per chip, "
        f"estimated step {fixed['estimated_step_s']:.3f} s, an estimate)"
    )


def search_batch(config, devices, topology) -> list[dict[str, Any]]:
    """The largest global batch that fits, to within an eighth, a multiple of the batch shards x grad_accum_steps
    (every try is a row)."""
    probe = programs.train(config, devices)
    unit = config.grad_accum_steps * probe.mesh["data"] * probe.mesh["fsdp"]
    rows: list[dict[str, Any]] = []

    def fits(multiple: int) -> bool:
        rows.append(compile_row(programs.train(with_settings(config, {"batch_size": multiple * unit}), devices), topology))
        return rows[-1]["fits"]

    # From the config's batch: doubling while it fits, else halving until it does; then bisection.
    start = max(1, config.batch_size // unit)
    if fits(start):
        good, bad = start, start * 2
        while fits(bad):
            good, bad = bad, bad * 2
    else:
        good, bad = start // 2, start
        while good and not fits(good):
            good, bad = good // 2, good
    while bad - good > max(1, good // 8):  # to within an eighth: each try is a full compile
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    for row in rows:
        row["search"] = "batch"
        row["best"] = row["fits"] and row["global_batch"] == good * unit
    return rows


def meshes(n: int) -> list[dict[str, int]]:
    return [{"data": d, "fsdp": f, "tensor": n // (d * f)} for d in range(1, n + 1) if n % d == 0 for f in range(1, n // d + 1) if (n // d) % f == 0]


def search_mesh(config, devices, topology) -> tuple[list[dict[str, Any]], list[str]]:
    """Every (data, fsdp, tensor) over the chips that the batch splits over, ranked by estimated step time;
    and a note for each mesh that the model's shapes do not split over."""
    rows, notes = [], []
    for m in meshes(len(devices)):
        if config.batch_size % (config.grad_accum_steps * m["data"] * m["fsdp"]):
            continue
        try:
            rows.append(compile_row(programs.train(with_settings(config, {f"mesh.{k}": v for k, v in m.items()}), devices), topology))
        except ValueError as e:  # e.g. a vocabulary or head count that the tensor axis does not divide
            notes.append(f"mesh {m}: not compiled, {str(e).splitlines()[0]}")
    ranked = sorted((r for r in rows if r["fits"]), key=lambda r: r["estimated_step_s"])
    for r in rows:
        r["search"] = "mesh"
        r["rank"] = ranked.index(r) + 1 if r["fits"] else None
    return sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0)), notes


def check(
    config: config_dict.ConfigDict, devices: Sequence[Any], topology: topologies.Topology
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(report rows, notes on meshes not compiled, one line per program that does not fit)."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    problems: list[str] = []
    wanted = config.compile.programs.split(",")
    if "train" in wanted:
        if config.compile.search == "batch":
            rows += search_batch(config, devices, topology)
        elif config.compile.search == "mesh":
            found, notes = search_mesh(config, devices, topology)
            rows += found
        else:
            rows.append(compile_row(programs.train(config, devices), topology))
            if not rows[-1]["fits"]:
                problems.append(_fix_train(config, devices, topology, rows))
    if "eval" in wanted:
        rows.append(compile_row(programs.evaluate(config, devices), topology))
    if "tag" in wanted:
        rows += [compile_row(programs.tag(config, devices, b, DEFAULT_NUM_LABELS), topology) for b in config.compile.tag_batches]
    if config.compile.search and not any(r["fits"] for r in rows if r["program"] == "train"):
        problems.append(f"train: no {config.compile.search} tried fits {topology.name}")
    for r in rows:
        if not r["fits"] and r["program"] != "train":
            problems.append(f"{_head(r)}; lower {'eval.batch_size' if r['program'] == 'eval' else 'compile.tag_batches'}")
    return rows, notes, problems


def _fix_train(config, devices, topology, rows: list[dict[str, Any]]) -> str:
    """Compiles the changes of `fitting_changes` until one fits; the line that names it (rows get every try)."""
    failed = rows[-1]
    tries = fitting_changes(config, failed, len(devices))
    for change in tries:
        if hopeless(change, rows[-1], config):
            continue
        row = compile_row(programs.train(with_settings(config, change), devices), topology)
        row.update(change=flags(change), settings=change)
        rows.append(row)
        if row["fits"]:
            return not_fit_line(failed, change, row, len(tries))
    return not_fit_line(failed, None, None, len(tries))


def _gib(n: Any) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _costs(c: dict[str, Any]) -> str:
    calls = ", ".join(f"{n} {name}" for name, n in c["minus_one_second_calls"].items())
    return (
        f"flops {c['flops']:.0f}, bytes accessed {c['bytes_accessed']:.0f}, optimal_seconds {c['optimal_seconds_raw']!r} "
        f"(raw; +1 s for each of {calls} calls = {c['optimal_seconds_corrected']:.6g} s, an estimate)"
    )


def table(rows: list[dict[str, Any]]) -> str:
    """The printed report: one row per program, then each program's raw compiler figures."""
    head = (
        f"{'program':8s} {'mesh (d,f,t)':12s} {'batch/chip (global)':>19s} {'peak GiB/chip':>13s} {'HBM GiB':>7s} "
        f"{'fits':>4s} {'TFLOP/chip':>10s} {'step s (compiler estimate)':>26s} {'step s (roofline estimate)':>26s} "
        f"{'samples/s bound':>15s} {'MFU bound':>9s}"
    )
    lines = [head]
    for r in rows:
        mesh = ",".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        batch = f"{r['batch_per_chip']:g} ({r['global_batch']})"
        lines.append(
            f"{r['program']:8s} {mesh:12s} {batch:>19s} {_gib(r['peak_bytes_per_chip']):>13s} {_gib(r['hbm_bytes_per_chip']):>7s} "
            f"{'yes' if r['fits'] else 'NO':>4s} {_num(r['flops'] and r['flops'] / 1e12, '.3f'):>10s} "
            f"{_num(r.get('compiler_estimate_s'), '.4f'):>26s} {_num(r.get('roofline_estimate_s'), '.4f'):>26s} "
            f"{_num(r.get('samples_per_s_bound'), '.1f'):>15s} {_num(r.get('mfu_bound'), '.2f'):>9s}"
            + (f"  [{r['change']}]" if "change" in r else "")
        )
    for r in rows:
        if not r["fits"]:
            continue
        lines.append(
            f"{r['program']} b={r['global_batch']} memory_analysis (bytes per chip): peak {r['peak_bytes_per_chip']}; arguments "
            f"{r['argument_bytes']}, outputs {r['output_bytes']} (aliased to arguments {r['alias_bytes']}), temporaries "
            f"{r['temp_bytes']}, code {r['code_bytes']}"
        )
        at = f"{r['program']} b={r['global_batch']}"
        if "decode_step" in r:
            lines.append(f"{at} cost_analysis of the whole program (its decode loop's body counted once), {_costs(r['whole_program'])}")
            lines.append(f"{at} cost_analysis of one decode step compiled on its own, {_costs(r['decode_step'])}")
            lines.append(
                f"{at} estimate for {r['decode_steps']} decode steps = whole program + {r['decode_steps'] - 1} x one step: "
                f"flops {r['flops']:.0f}, bytes accessed {r['bytes_accessed']:.0f}, compiler estimate {r['optimal_seconds_corrected']:.6g} s"
            )
        else:
            lines.append(f"{at} cost_analysis (per chip): {_costs(r)}")
        if r["compiler_estimate_s"] is None:
            lines.append(f"{at} compiler estimate not used: below zero after the correction (a custom call it does not know); the roofline only")
        coll = ", ".join(f"{k} x{v['count']} {v['bytes'] / 2**20:.1f} MiB" for k, v in r["collectives"].items()) or "none"
        lines.append(f"{r['program']} b={r['global_batch']} collectives: {coll}")
    lines.append(
        "Times are estimates (a lower bound on the step), not measurements: the compiler's cost model and a roofline "
        "at the chip's published peak. The samplers' FLOPs, bytes and times are estimates too: their decode loop "
        "at its most steps, the whole program + (steps - 1) x one step, since cost_analysis counts a loop body once; "
        "a step compiled alone also copies weights that the loop may copy once, so their bytes and times may overstate."
    )
    return "\n".join(lines)


def run(config: config_dict.ConfigDict, workdir: str | os.PathLike, *, out: Callable[[str], None] = print) -> int:
    """The compile check of `config.compile`: prints the table, writes <workdir>/compile_report.json;
    0 when every program fits (with a search: when one fits), 1 otherwise."""
    topology = topologies.parse(config.compile.topology)
    slices = config.compile.num_slices
    devices = tpu_devices(topology, slices)
    hosts = len({(getattr(d, "slice_index", 0), d.process_index) for d in devices})
    experiment.validate(config, process_count=hosts, device_count=len(devices))
    out(
        f"compiling for {topology.name} = {topology.libtpu_name} x {slices} slice(s): {len(devices)} chips of "
        f"{topology.chip.hbm_bytes / GiB:.0f} GiB ({topology.chip.source}), {hosts} host(s)"
    )
    rows, notes, problems = check(config, devices, topology)
    for r in rows:
        r["num_slices"] = slices
    out(table(rows))
    path = epath.Path(workdir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    out(f"report: {path}")
    for line in notes + problems:
        out(line)
    return 1 if problems else 0
