"""Shared fixtures, and the markers every test gets from its path or from what it runs.

The environment lines run before any test module imports jax; subprocesses inherit them.
"""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# LLVM at -O0 for XLA:CPU: the tests' programs are small and compiled once each, so codegen time
# dominates; XLA's own passes (fusion, layout, buffer assignment) and float semantics are the same.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the tests and their subprocesses: a rerun loads each
# executable instead of compiling it (tests/test_compilation_cache.py checks a hit computes
# the same bits). Every executable is cached, however quick its compilation.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax_compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import inspect  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

from nxtp_jax import checkpoint  # noqa: E402
from nxtp_jax.prompts import CAPTION_TEMPLATES, OBJECT_TEMPLATES  # noqa: E402
from nxtp_jax.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from tiny_models import tiny_recognizer  # noqa: E402

# Markers by path (relative to tests/): whole folders or files, or single tests (FILE::NAME).
BY_PATH = {
    "serve": ("serve/",),
    "browser": ("serve/test_serve_page.py",),
    "export": ("export/",),
    # Over ~5 s each in a full run on 2 busy cores (--durations; about 2 s on quiet ones). The fast
    # loop still imports every module but the export extra's (tested in its own environment).
    "slow": (
        "test_install.py",
        "test_compilation_cache.py",
        "data/test_data_fuzz.py::test_fuzz_script_run_stays_under_a_memory_cap",
        "data/test_data_pipeline.py::test_eval_with_workers_keeps_order",
        "data/test_data_pipeline.py::test_orbax_restore_with_two_workers_and_two_processes",
        "evaluation/test_embedders.py::test_clip_text_equals_openai_encode_text_across_buckets",
        "evaluation/test_embedders.py::test_minilm_compiles_once_per_bucket",
        "evaluation/test_embedders.py::test_minilm_embeddings_equal_sentence_transformers_on_300_strings",
        "evaluation/test_embedders.py::test_semantic_fscore_minilm_with_torch_blocked_equals_sentence_transformers",
        "evaluation/test_evaluate.py::test_batch_predictor_equals_tagger_predict",
        "evaluation/test_evaluate.py::test_eval_vocab_constrains_every_prediction_as_tagger_predict_does",
        "evaluation/test_evaluate.py::test_two_processes_give_the_same_results_as_one",
        "evaluation/test_evaluate_clip.py::test_eval_predictor_with_clip_ranking",
        "evaluation/test_evaluate_clip.py::test_image_features_match_openai_encode_image",
        "evaluation/test_evaluate_in1k.py::test_eval_job_on_a_tfds_split",
        "evaluation/test_metrics.py::test_clip_text_tower_matches_openai_model",
        "evaluation/test_metrics.py::test_minilm_matches_sentence_transformers",
        "inference/test_decoding.py::test_greedy_matches_reference_loop",
        "inference/test_decoding.py::test_sampling_variants_run_and_are_seeded",
        "inference/test_e2e_original.py",
        "inference/test_infer.py::test_nxtp_tag_console_script_and_module_print_the_same_json",
        "inference/test_infer_bulk.py::test_killed_run_resumes_with_every_image_exactly_once",
        "inference/test_quantize.py::test_int8_labels_equal_fp32_at_top_k",
        "inference/test_quantize.py::test_sampler_keeps_the_weights_in_int8_inside_the_loop",
        "inference/test_quantize.py::test_served_tagger_equals_fp32_on_the_dequantized_weights",
        "inference/test_sampling.py::test_kv_cache_matches_recompute",
        "models/test_mask.py::test_eager_matches_reference",
        "models/test_mask.py::test_generation_mask_matches_slow_reference",
        "pretrained/test_pretrained.py::test_two_concurrent_first_uses_give_one_valid_cache",
        "training/test_activation_sharding.py::test_scan_over_blocks_gives_the_loops_logits_and_gradients_in_fp32",
        "training/test_train_loop.py::test_resume_is_bit_exact",
        "training/test_train_loop.py::test_sigterm_saves_and_exits_cleanly",
        "training/test_train_loop.py::test_workdir_loads_with_its_frozen_weights",
        "training/test_train_multihost.py",
        "training/test_train_step.py::test_caption_branch_adds_its_weighted_loss_and_costs_nothing_at_weight_zero",
        "training/test_train_step.py::test_fsdp_state_is_sharded",
        "training/test_train_step.py::test_gradient_accumulation_keeps_the_batch_token_mean",
        "training/test_train_step.py::test_sharded_step_matches_one_device",
        "training/test_train_storage.py",
        "weights/test_weights_convert.py::test_nxtp_convert_console_script_meta_llama_and_openai_clip",
        # Over ~5 s each on a first run (an empty compilation cache): the fast loop keeps one server
        # process (test_serve_guarded), the in-process serve tests and one test per training module.
        "serve/test_serve_api.py",
        "serve/test_serve_drain.py",
        "inference/test_tagger_dtype.py::test_load_keeps_bfloat16_weights_on_an_accelerator_with_the_float32_weights_choices",
        "inference/test_tagger_dtype.py::test_trained_demo_keeps_its_labels_with_bfloat16_weights_and_probabilities_within_0_01",
        "training/test_activation_sharding.py::test_scan_keeps_the_kv_cache_path_on_the_loop",
        "training/test_activation_sharding.py::test_activation_constraints_are_absent_without_a_mesh_and_present_with_one",
        "training/test_activation_sharding.py::test_fsdp_x_tensor_train_step_gathers_one_parameter_at_a_time_and_holds_an_eighth_of_the_state",
        "training/test_train_loop.py::test_non_finite_values_stop_the_run_without_saving_them",
        "aot/test_compile_check.py::test_demo_train_step_and_sampler_fit_v5e_2x2_and_the_printed_figures_are_the_compilers",
        "aot/test_compile_check.py::test_mesh_search_ranks_the_meshes_that_fit_by_estimated_step",
        "aot/test_compile_check.py::test_cost_model_correction_adds_back_one_second_per_concat_bitcast_call",
        "aot/test_compile_check.py::test_two_slices_put_data_across_them_and_each_zero_crop_call_is_added_back",
        "aot/test_run_tpu_pod.py",
    ),
}
# A test starts a process when its code, a helper of its module or one of its fixtures does so.
SPAWNS = re.compile(r"\bsubprocess\.|\bPopen\b|\bmultiprocessing\b|sys\.executable")


def _starts_processes(item: pytest.Item) -> bool:
    if not isinstance(item, pytest.Function):
        return False
    module = item.module
    todo = [item.function] + [d[-1].func for d in item._fixtureinfo.name2fixturedefs.values() if _in_tests(d[-1].func)]
    seen = set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen or not inspect.isfunction(fn):
            continue
        seen.add(fn)
        source = inspect.getsource(fn)
        if SPAWNS.search(source):
            return True
        names = set(re.findall(r"\b[A-Za-z_]\w*\b", source))
        for home in (inspect.getmodule(fn), module):  # test code only: helpers of the tests, never the library
            for obj in (getattr(home, n, None) for n in names):
                todo += [m for m in vars(obj).values() if _in_tests(m)] if inspect.isclass(obj) else [obj] if _in_tests(obj) else []
    return False


def _in_tests(fn) -> bool:
    source = inspect.getsourcefile(fn) if inspect.isfunction(fn) else None
    return source is not None and pathlib.Path(source).is_relative_to(ROOT / "tests")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = pathlib.Path(item.fspath).relative_to(ROOT / "tests").as_posix()
        test = f"{path}::{item.originalname}"
        for marker, prefixes in BY_PATH.items():
            if any(path.startswith(p) if p.endswith("/") else p in (path, test) for p in prefixes):
                item.add_marker(marker)
        if _starts_processes(item):
            item.add_marker("subprocess")


LABEL_WORDS = (
    "cloud", "sky", "logo", "dog", "cat", "red", "blue", "green", "circle", "square",
    "triangle", "tree", "car", "house", "bird", "water", "grass", "road", "person", "table",
)


def tiny_corpus() -> list[str]:
    """Templates, label lists and captions covering the words the tests use."""
    texts = list(OBJECT_TEMPLATES) + list(CAPTION_TEMPLATES)
    for i in range(len(LABEL_WORDS)):
        texts.append(", ".join(LABEL_WORDS[i:] + LABEL_WORDS[:i]))
    texts += [f"a {w} next to the {v}" for w, v in zip(LABEL_WORDS, reversed(LABEL_WORDS))]
    return texts


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny LLaMA-like sentencepiece model (vocab 400) trained on `tiny_corpus()`."""
    return train_sentencepiece(tiny_corpus(), tmp_path_factory.mktemp("spm") / "tiny.model", 400)


@pytest.fixture(scope="session")
def tiny_ckpt(sp_model_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A checkpoint directory of a tiny random recognizer whose delimiter is boosted, so branches end early."""
    model, params = tiny_recognizer(Tokenizer(sp_model_path), delimiter_boost=3.0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(out, params, model.config, sp_model_path)
    return out
