"""The TPU compile check (nxtp_jax/aot) on the tiny demo model for v5e:2x2, with libtpu on this CPU host."""

import json
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("libtpu", reason='compiling for a TPU needs libtpu: pip install -e ".[tpu]"')

from nxtp_jax import experiment, sharding  # noqa: E402
from nxtp_jax.aot import analysis, check, programs, topologies  # noqa: E402
from nxtp_jax.cli import main as main_cli  # noqa: E402
from nxtp_jax.configs import demo  # noqa: E402

TOPOLOGY = "v5e:2x2"


def demo_config(variant="tiny", **fields):
    config = demo.get_config(variant)
    config.mode = "compile"
    config.compile.topology = TOPOLOGY
    config.update_from_flattened_dict(fields)
    return config


def devices():
    return check.tpu_devices(topologies.parse(TOPOLOGY), 1)


def test_demo_train_step_and_sampler_fit_v5e_2x2_and_the_printed_figures_are_the_compilers(tmp_path):
    lines = []
    config = demo_config(**{"compile.programs": "train,eval"})
    assert check.run(config, tmp_path, out=lines.append) == 0
    printed = "\n".join(lines)
    report = json.loads((tmp_path / check.REPORT_FILE).read_text())
    assert [r["program"] for r in report] == ["train", "eval"]
    for row in report:
        assert row["fits"] is True
        assert row["topology"] == TOPOLOGY and row["hbm_bytes_per_chip"] == 16 * 2**30
        assert {"mesh", "batch_per_chip", "peak_bytes_per_chip", "flops", "estimated_step_s"} <= set(row)
    # The train step on its own: the demo's mesh (data over the 4 chips) and batch 8, 2 per chip.
    assert report[0]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and report[0]["batch_per_chip"] == 2
    compiled = programs.train(config, devices()).lower().compile(check.COMPILER_OPTIONS)
    m, cost = compiled.memory_analysis(), compiled.cost_analysis()
    peak = m.peak_memory_in_bytes
    assert (
        f"train b=8 memory_analysis (bytes per chip): peak {peak}; arguments {m.argument_size_in_bytes}, outputs "
        f"{m.output_size_in_bytes} (aliased to arguments {m.alias_size_in_bytes}), temporaries {m.temp_size_in_bytes}, "
        f"code {m.generated_code_size_in_bytes}"
    ) in printed
    assert f"train b=8 cost_analysis (per chip): flops {cost['flops']:.0f}, bytes accessed {cost['bytes accessed']:.0f}, " in printed
    assert report[0]["flops"] == cost["flops"] and report[0]["peak_bytes_per_chip"] == peak
    assert "estimate" in printed.splitlines()[1]  # the table's header names the times as estimates


def test_sampler_flops_and_times_are_the_whole_program_plus_17_more_decode_steps(tmp_path):
    """cost_analysis counts the decode loop's body once; a decode runs at most 18 steps (19 sampled tokens
    per branch, sampling.MAX_UPDATES - 1, of which all but the last are fed back), so 17 steps are added."""
    lines = []
    config = demo_config(**{"compile.programs": "eval"})
    assert check.run(config, tmp_path, out=lines.append) == 0
    [row] = json.loads((tmp_path / check.REPORT_FILE).read_text())
    program = programs.evaluate(config, devices())
    whole = program.lower().compile(check.COMPILER_OPTIONS).cost_analysis()
    step = program.loop_step.lower().compile(check.COMPILER_OPTIONS).cost_analysis()
    assert 0 < step["flops"] < whole["flops"]
    assert row["decode_steps"] == 18
    assert row["whole_program"]["flops"] == whole["flops"] and row["decode_step"]["flops"] == step["flops"]
    assert row["flops"] == whole["flops"] + 17 * step["flops"]
    assert row["bytes_accessed"] == whole["bytes accessed"] + 17 * step["bytes accessed"]
    assert row["compiler_estimate_s"] == pytest.approx(whole["optimal_seconds"] + 17 * step["optimal_seconds"], rel=1e-9)
    assert f"eval b=8 estimate for 18 decode steps = whole program + 17 x one step: flops {row['flops']:.0f}," in "\n".join(lines)


def test_cost_model_correction_adds_back_one_second_per_concat_bitcast_call():
    """libtpu counts each ConcatBitcast custom call as -1 s. The demo's float32 sampler has such calls (its
    256 x 1024 MLP weights are copied in four slices), the tiny bfloat16 tagging sampler none."""
    one_chip = check.tpu_devices(topologies.parse("v5e-1"), 1)
    config = demo_config("", **{"eval.batch_size": 1, "eval.k": 3})
    with_calls = programs.evaluate(config, one_chip).lower().compile(check.COMPILER_OPTIONS)
    without = programs.tag(demo_config(), one_chip, 1, 3).lower().compile(check.COMPILER_OPTIONS)
    raw, text = with_calls.cost_analysis()["optimal_seconds"], with_calls.as_text()
    calls = text.count('custom_call_target="ConcatBitcast"')
    assert calls > 0 and raw < 0
    assert analysis.corrected_optimal_seconds(raw, text) == raw + calls
    assert 0 < analysis.corrected_optimal_seconds(raw, text) < 1e-3
    raw, text = without.cost_analysis()["optimal_seconds"], without.as_text()
    assert 'custom_call_target="ConcatBitcast"' not in text and raw > 0
    assert analysis.corrected_optimal_seconds(raw, text) == raw


def test_two_slices_put_data_across_them_and_each_zero_crop_call_is_added_back(tmp_path):
    """v5e:2x2 x 2 slices: the demo's data axis (8) spans the slices, 4 chips inside each; the program's
    ZeroCrop custom calls (multi-slice only) count -1 s each in libtpu's cost model."""
    config = demo_config(**{"compile.programs": "train", "compile.num_slices": 2})
    two = check.tpu_devices(topologies.parse(TOPOLOGY), 2)
    mesh = experiment.make_mesh(config, two)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert [d.slice_index for d in mesh.devices[:, 0, 0]] == [0, 0, 0, 0, 1, 1, 1, 1]
    compiled = programs.train(config, two).lower().compile(check.COMPILER_OPTIONS)
    raw, text = compiled.cost_analysis()["optimal_seconds"], compiled.as_text()
    calls = text.count('custom_call_target="ZeroCrop"')
    assert calls > 0 and raw < 0
    assert analysis.corrected_optimal_seconds(raw, text) == raw + calls
    assert 0 < analysis.corrected_optimal_seconds(raw, text) < 1e-3
    with pytest.raises(ValueError, match="over 2 slices: data or fsdp must be a multiple of 2"):
        sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8}, two)


def test_each_slice_id_call_is_added_back():
    """A program that reads its index along a mesh axis spanning two slices has one SliceId custom call,
    which libtpu's cost model counts as -1 s; the program itself costs next to nothing."""
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}, check.tpu_devices(topologies.parse(TOPOLOGY), 2))
    scale = jax.shard_map(lambda x: x * jax.lax.axis_index("data").astype(x.dtype), mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    x = jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    compiled = jax.jit(scale).lower(x).compile()
    raw, text = compiled.cost_analysis()["optimal_seconds"], compiled.as_text()
    assert text.count('custom_call_target="SliceId"') == 1 and raw < -0.99
    assert 0 <= analysis.corrected_optimal_seconds(raw, text) < 1e-3


class _Compiled:
    """cost_analysis() and as_text() of a compiled program, as given."""

    def __init__(self, optimal_seconds):
        self.costs = {"flops": 2e12, "bytes accessed": 1e9, "optimal_seconds": optimal_seconds}

    def cost_analysis(self):
        return self.costs

    def as_text(self):
        return ""


def test_a_compiler_estimate_below_zero_after_the_correction_is_not_used():
    chip = topologies.CHIPS["v5e"]
    roofline = max(2e12 / chip.peak_flops, 1e9 / chip.hbm_bandwidth)
    negative = analysis.cost(_Compiled(-0.5), chip, global_batch=4)
    assert negative["compiler_estimate_s"] is None and negative["estimated_step_s"] == roofline
    positive = analysis.cost(_Compiled(1.0), chip, global_batch=4)
    assert positive["compiler_estimate_s"] == 1.0 == positive["estimated_step_s"]


def test_too_large_batch_prints_one_line_naming_required_and_available_and_exits_1(tmp_path, capsys):
    """One chip, so the only changes to try are remat and accumulation; accumulating 8 micro-batches
    cannot fit either, so it is not compiled (two compiles in all)."""
    argv = ["--config=configs/demo.py:tiny", "--config.mode=compile", "--config.compile.topology=v5e-1",
            "--config.compile.programs=train", "--config.batch_size=1048576", f"--workdir={tmp_path}"]
    assert main_cli.main(argv) == 1
    out = capsys.readouterr().out.splitlines()
    verdicts = [line for line in out if "does not fit" in line]
    assert len(verdicts) == 1
    assert re.fullmatch(
        r"train does not fit v5e-1 at batch 1048576, mesh \{'data': 1, 'fsdp': 1, 'tensor': 1\}: needs [\d.]+ GiB per chip "
        r"of 15.75 GiB available; none of 4 changes tried \(fsdp over all chips, remat, grad_accum_steps\) fits: .*",
        verdicts[0],
    ), verdicts[0]
    report = json.loads((tmp_path / check.REPORT_FILE).read_text())
    assert [(r["fits"], r.get("change")) for r in report] == [(False, None), (False, "--config.model.remat=True")]
    assert report[0]["peak_bytes_per_chip"] > report[0]["available_bytes_per_chip"] == 15.75 * 2**30


def test_mesh_search_ranks_the_meshes_that_fit_by_estimated_step(tmp_path):
    """Batch 2 splits over at most 2 batch shards: (1,1,4), (1,2,2) and (2,1,2) of the 4 chips; the tiny
    vocabulary (302) does not split 4 ways, so (1,1,4) is a note, not a row."""
    fields = {"compile.programs": "train", "compile.search": "mesh", "batch_size": 2, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
    lines = []
    assert check.run(demo_config(**fields), tmp_path, out=lines.append) == 0
    report = json.loads((tmp_path / check.REPORT_FILE).read_text())
    meshes = sorted(tuple(r["mesh"][a] for a in ("data", "fsdp", "tensor")) for r in report)
    assert meshes == [(1, 2, 2), (2, 1, 2)]
    assert [r["rank"] for r in report] == [1, 2]
    assert report[0]["estimated_step_s"] <= report[1]["estimated_step_s"]
    assert any(line.startswith("mesh {'data': 1, 'fsdp': 1, 'tensor': 4}: not compiled, ") and "has 302 along 'vocab'" in line for line in lines)
