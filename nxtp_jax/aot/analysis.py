"""Figures of one compiled program: memory per chip, FLOPs, the step-time estimates, collectives.

Memory and FLOPs are the compiler's (`memory_analysis()`, `cost_analysis()`). Times are estimates:
`optimal_seconds` is the compiler's cost model, corrected below; the roofline bound is
max(FLOPs / peak, bytes accessed / HBM bandwidth) at the chip's published figures. A sampler's decode
loop, whose body cost_analysis counts once, is estimated from its body compiled on its own (`cost`).
"""

from __future__ import annotations

import collections
import re
from typing import Any

from nxtp_jax.aot.topologies import Chip

# libtpu 0.0.42's cost model counts each of these custom calls as -1 s: ConcatBitcast (v5e and v4 programs),
# ZeroCrop and SliceId (programs over several slices).
MINUS_ONE_SECOND_CALLS = ("ConcatBitcast", "ZeroCrop", "SliceId")
_MINUS_ONE_SECOND = re.compile(r'custom_call_target="(' + "|".join(MINUS_ONE_SECOND_CALLS) + ')"')
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# "... required for HLO temporaries (32.00G) exceeds available HBM (15.75G)" or "Used 27.1G of 15.75G hbm".
_OOM = (
    re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
    re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
)


def memory(compiled) -> dict[str, int]:
    """memory_analysis() per chip; the peak is the compiler's own (`peak_memory_in_bytes`, from its buffer
    live ranges), which the sum of the categories only approximates (buffers of different categories
    share memory, e.g. donated arguments)."""
    m = compiled.memory_analysis()
    return {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "code_bytes": m.generated_code_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "peak_bytes_per_chip": m.peak_memory_in_bytes,
    }


def minus_one_second_calls(hlo_text: str) -> dict[str, int]:
    """How many of each custom call that the cost model counts as -1 s the module has."""
    found = collections.Counter(_MINUS_ONE_SECOND.findall(hlo_text))
    return {name: found[name] for name in MINUS_ONE_SECOND_CALLS}


def corrected_optimal_seconds(raw: float, hlo_text: str) -> float:
    """The compiler's optimal_seconds with the -1 s of each such custom call taken back."""
    return raw + sum(minus_one_second_calls(hlo_text).values())


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """kind -> {"count", "bytes"}: each collective of the optimized module and the bytes of the largest
    array it produces (a loop body's collectives are counted once, as the module lists them)."""
    out: dict[str, dict[str, int]] = {}
    for result, kind in _COLLECTIVE.findall(hlo_text):
        sizes = [_BYTES[t] * _elements(dims) for t, dims in _ARRAY.findall(result)]
        entry = out.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += max(sizes, default=0)
    return out


def _elements(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def counts(compiled) -> dict[str, Any]:
    """cost_analysis() of one compiled program, per chip, with its optimal_seconds corrected."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    text = compiled.as_text()
    raw = float(c.get("optimal_seconds", 0.0))
    return {
        "flops": float(c.get("flops", 0.0)),
        "bytes_accessed": float(c.get("bytes accessed", 0.0)),
        "optimal_seconds_raw": raw,
        "minus_one_second_calls": minus_one_second_calls(text),
        "optimal_seconds_corrected": corrected_optimal_seconds(raw, text),
    }


def cost(compiled, chip: Chip, global_batch: int, loop_step=None, loop_steps: int = 0) -> dict[str, Any]:
    """FLOPs and bytes per chip (the compiler's count), and the estimates derived from them.

    With `loop_step`, the body of the program's decode loop compiled on its own, which the loop runs at most
    `loop_steps` times: cost_analysis counts the body once, so FLOPs, bytes and the compiler's time are
    estimated as the whole program + (loop_steps - 1) x the step; both counts are kept beside the estimate.
    """
    whole = counts(compiled)
    out: dict[str, Any] = dict(whole)
    if loop_step is not None:
        step = counts(loop_step)
        summed = ("flops", "bytes_accessed", "optimal_seconds_corrected")
        out = {key: whole[key] + (loop_steps - 1) * step[key] for key in summed}
        out.update(
            whole_program=whole, decode_step=step, decode_steps=loop_steps,
            estimate_of=f"{', '.join(summed)} = whole_program + (decode_steps - 1) x decode_step",
        )
    flops, accessed, corrected = out["flops"], out["bytes_accessed"], out["optimal_seconds_corrected"]
    compiler_s = corrected if corrected >= 0 else None  # below zero: a custom call the correction does not know
    roofline_s = max(flops / chip.peak_flops, accessed / chip.hbm_bandwidth)
    step_s = max(compiler_s or 0.0, roofline_s)  # both are lower bounds on the step time: the larger is the tighter
    return {
        **out,
        "compiler_estimate_s": compiler_s,
        "roofline_estimate_s": roofline_s,
        "estimated_step_s": step_s,
        "samples_per_s_bound": global_batch / step_s if step_s > 0 else None,
        "mfu_bound": flops / (step_s * chip.peak_flops) if step_s > 0 else None,
        "collectives": collectives(compiled.as_text()),
    }


def out_of_memory(message: str) -> tuple[int, int] | None:
    """(required, available) bytes from the compiler's RESOURCE_EXHAUSTED message, or None for another error."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    for pattern in _OOM:
        if m := pattern.search(message):
            need, need_unit, have, have_unit = m.groups()
            return int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit])
    return None
