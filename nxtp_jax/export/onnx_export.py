"""Export a checkpoint to ONNX with jax2onnx, and check every graph against JAX in ONNX Runtime.

    ONNX_DIR/encoder.onnx (+ .data)   uint8 pixels -> image tokens
    ONNX_DIR/decoder.onnx + .data     prefill and KV-cached steps in one graph (`graphs`)
    ONNX_DIR/embeddings.npy           the token embedding table [V, D]
    ONNX_DIR/tokenizer.model          the checkpoint's sentencepiece model
    ONNX_DIR/config.json              ids, dimensions, file names, the check's max differences

jax2onnx moves every initializer over 1 MB into `<graph>.onnx.data`, so the decoder stays one
graph however large it is (protobuf's 2 GB limit applies to the .onnx file only).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax2onnx import to_onnx
from onnx import numpy_helper

from nxtp_jax import checkpoint
from nxtp_jax.choices import ACCURACY_LEVELS, DEFAULT_ACCURACY_LEVEL, DEFAULT_OPSET, QUANTIZE
from nxtp_jax.inference import sampling
from nxtp_jax.export import graphs
from nxtp_jax.export.ort_tagger import CONFIG_FILE, FORMAT, make_session
from nxtp_jax.models.recognizer import Recognizer
from nxtp_jax.tokenizer import Tokenizer

QUANT_BLOCK = 128  # MatMulNBits' block along K: its block size is a power of two, so no per-channel 11008
# MatMulNBits' arithmetic (choices.ACCURACY_LEVELS): 0 float32 (activations stay float), 4 int8
# (activations quantized per block at each product). ORT 1.32 has no fast 8-bit kernel with
# float32 arithmetic on AVX2: 9 against fp32's 108 GFLOP/s for a [20, 4096] x [4096, 11008]
# product, 96 with level 4 (python -m benchmarks.cpu --matmuls).
EXTERNAL_BYTES = 1024 * 1024  # initializers this large go to <graph>.onnx.data (jax2onnx's threshold)
FILES = {
    "encoder": "encoder.onnx",
    "decoder": "decoder.onnx",
    "embeddings": "embeddings.npy",
    "tokenizer": checkpoint.TOKENIZER_FILE,  # the checkpoint's sentencepiece model, copied under its name
}


@contextlib.contextmanager
def _quiet_onnx_ir():
    # onnx_ir warns once per shape constant whose value type it does not record; harmless, and
    # thousands of lines for a full-size decoder.
    logger = logging.getLogger("onnx_ir.serde")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_model(
    model: Recognizer,
    params: Any,
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    source: str | None = None,
    log=print,
) -> dict:
    """Writes the export into `out_dir` (which must not hold one yet) and returns its config.

    `check_export(out_dir, jax_reference(model, params))` then compares it with JAX.
    """
    out_dir = pathlib.Path(out_dir)
    if (out_dir / CONFIG_FILE).exists():
        raise FileExistsError(f"{out_dir / CONFIG_FILE} already exists; choose a new --out directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    dtype, weight_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    tok = Tokenizer(tokenizer_path)
    if (tok.image_id, tok.empty_id) != (cfg.special_tokens.image, cfg.special_tokens.empty):
        raise ValueError(
            f"the model config says <|image|>={cfg.special_tokens.image}, <|empty|>={cfg.special_tokens.empty}, "
            f"but {tokenizer_path} gives {tok.image_id}, {tok.empty_id}; pass the checkpoint's own tokenizer"
        )
    checkpoint.copy_file(tokenizer_path, out_dir / FILES["tokenizer"])  # the checkpoint may be on gs://
    table = params["language_decoder"]["tok_embeddings"]["embedding"]
    np.save(out_dir / FILES["embeddings"], np.asarray(table, weight_dtype))

    with _quiet_onnx_ir():
        log(f"exporting {FILES['encoder']} ...")
        to_onnx(
            functools.partial(graphs.encoder_fn(model), params),
            graphs.encoder_specs(cfg),
            model_name="nxtp_encoder",
            opset=opset,
            return_mode="file",
            output_path=os.fspath(out_dir / FILES["encoder"]),
            input_names=list(graphs.ENCODER_INPUTS),
            output_names=list(graphs.ENCODER_OUTPUTS),
        )
        log(f"exporting {FILES['decoder']} ...")
        inputs, outputs = graphs.decoder_io_names(cfg.decoder.layers)
        to_onnx(
            functools.partial(graphs.decoder_fn(model), params),
            graphs.decoder_specs(cfg, dtype),
            model_name="nxtp_decoder",
            opset=opset,
            return_mode="file",
            output_path=os.fspath(out_dir / FILES["decoder"]),
            input_names=inputs,
            output_names=outputs,
        )

    for graph in (FILES["encoder"], FILES["decoder"]):
        if weight_dtype == jnp.float16:
            store_weights_as_float16(out_dir / graph)
        data = out_dir / f"{graph}.data"
        if data.exists():  # jax2onnx writes it owner-only; readable like the .onnx next to it
            data.chmod((out_dir / graph).stat().st_mode & 0o777)

    config = {
        "format": FORMAT,
        "dtype": dtype.name,
        "weight_dtype": weight_dtype.name,
        "opset": opset,
        "files": FILES,
        "image_size": cfg.vision.image_size,
        "num_image_tokens": cfg.vision.num_patches,
        "dim": cfg.decoder.dim,
        "layers": cfg.decoder.layers,
        "kv_heads": cfg.decoder.kv_heads,
        "head_dim": cfg.decoder.head_dim,
        "vocab_size": cfg.decoder.vocab_size,
        "max_updates": sampling.MAX_UPDATES,
        "special_tokens": {
            "bos": tok.bos_id,
            "eos": tok.eos_id,
            "image": tok.image_id,
            "empty": tok.empty_id,
            "delimiter": tok.delimiter_id,
        },
        "decoder_inputs": inputs,
        "decoder_outputs": outputs,
        "model": cfg.to_dict(),
        "source": source,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def store_weights_as_float16(path: pathlib.Path) -> int:
    """Stores the float32 weights of `path` that are exact float16 values as float16 + a Cast node.

    jax2onnx folds the graph's float16 -> float32 casts of constant weights, so a float16
    export first comes out with float32 weights; this puts the casts back (ONNX Runtime folds
    them again when it loads the graph). Returns the number of weights converted.
    """
    model = onnx.load(os.fspath(path))
    casts = []
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or math.prod(tensor.dims) * 4 < EXTERNAL_BYTES:
            continue
        value = numpy_helper.to_array(tensor)
        half = value.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), value):
            continue
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(half, f"{name}__float16"))
        casts.append(onnx.helper.make_node("Cast", [tensor.name], [name], to=onnx.TensorProto.FLOAT))
    nodes = casts + list(model.graph.node)  # the casts first, to keep the nodes topologically sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=EXTERNAL_BYTES)
    return len(casts)


def quantize_decoder(path: pathlib.Path, mode: str, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> int:
    """Stores the decoder's weight matrices in 8 or 4 bits; the graph's activations stay float32.

    ONNX Runtime's `MatMulNBitsQuantizer`: symmetric, one scale per block of QUANT_BLOCK input rows
    and output column, a `MatMulNBits` node with `accuracy_level` (ACCURACY_LEVELS). It quantizes
    MatMul nodes only, so jax2onnx's plain Gemms (A @ B, B a weight) become MatMuls first. Returns
    the number of quantized matrices.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if mode not in QUANTIZE:
        raise ValueError(f"expected quantize in {QUANTIZE}, found {mode!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"expected accuracy_level in {ACCURACY_LEVELS}, found {accuracy_level!r}")
    if mode == "none":
        return 0
    model = onnx.load(os.fspath(path))
    weights = {t.name: t for t in model.graph.initializer}
    converted = 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transA", 0) and not attrs.get("transB", 0)
        if node.op_type == "Gemm" and len(node.input) == 2 and plain and node.input[1] in weights:
            node.op_type = "MatMul"
            del node.attribute[:]
            converted += 1
    quantizer = MatMulNBitsQuantizer(model, bits=8 if mode == "int8" else 4, block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=accuracy_level)
    quantizer.process()
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    quantizer.model.save_model_to_file(os.fspath(path), use_external_data_format=True)
    quantized = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
    if quantized != converted:
        raise ValueError(f"{path}: {converted} weight matrices, but {quantized} were quantized; report this with the model's config")
    return quantized


def export_checkpoint(
    ckpt_dir, out_dir, *, dtype: str = "float32", quantize: str = "none", accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    opset: int = DEFAULT_OPSET, check: bool = True, log=print,
) -> dict:
    """Loads, exports, quantizes the decoder's weights (`quantize_decoder`) and (with `check`) compares
    every graph with JAX; returns the export's config."""
    if quantize not in QUANTIZE:
        raise ValueError(f"expected quantize in {QUANTIZE}, found {quantize!r}")
    model, params = graphs.load(ckpt_dir, dtype)
    source = os.fspath(checkpoint.as_path(ckpt_dir))
    config = export_model(model, params, checkpoint.tokenizer_path(ckpt_dir), out_dir, opset=opset, source=source, log=log)
    if quantize != "none":
        log(f"quantizing {FILES['decoder']} to {quantize} ...")
        quantize_decoder(pathlib.Path(out_dir) / FILES["decoder"], quantize, accuracy_level)
        config["accuracy_level"] = accuracy_level
    config["quantize"] = quantize
    (pathlib.Path(out_dir) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if check:
        reference = jax_reference(model, params)
        del params  # so that JAX's copy of the weights and onnxruntime's never coexist
        config["max_abs_diff"] = diffs = check_export(out_dir, reference)
        for name, diff in diffs.items():
            log(f"onnxruntime vs JAX, {name}: max abs diff {diff:.3g}")
    return config


Reference = dict[str, tuple[dict[str, np.ndarray], list[np.ndarray]]]


def jax_reference(model: Recognizer, params: Any, seed: int = 0) -> Reference:
    """JAX's outputs on `graphs.check_inputs`, per graph call: (feeds by input name, outputs)."""
    cfg = model.config
    pixels, calls, kv = graphs.check_inputs(cfg, np.dtype(jnp.dtype(model.dtype)), seed)
    reference = {"encoder": ({"images": pixels}, [np.asarray(jax.jit(graphs.encoder_fn(model))(params, pixels))])}
    names, _ = graphs.decoder_io_names(cfg.decoder.layers)
    decode = jax.jit(graphs.decoder_fn(model))
    for name, args in calls.items():
        outputs = [np.asarray(x) for x in decode(params, *args, *kv)]
        reference[f"decoder {name}"] = (dict(zip(names, args + kv)), outputs)
        kv = outputs[1:]
    return reference


def check_export(out_dir: str | os.PathLike, reference: Reference) -> dict[str, float]:
    """Max abs differences between ONNX Runtime and JAX's `reference`, per call; recorded in config.json."""
    out_dir = pathlib.Path(out_dir)
    diffs = {}
    sessions = {"encoder": make_session(out_dir / FILES["encoder"])}
    got = sessions["encoder"].run(None, reference["encoder"][0])[0]
    diffs["encoder"] = graphs.max_abs_diff(got, reference["encoder"][1][0])
    del sessions  # one graph's weights in memory at a time
    decoder = make_session(out_dir / FILES["decoder"])
    for name, (feeds, want) in reference.items():
        if name == "encoder":
            continue
        got = decoder.run(None, feeds)
        diffs[f"{name} logits"] = graphs.max_abs_diff(got[0], want[0])
        diffs[f"{name} cache"] = max(graphs.max_abs_diff(g, w) for g, w in zip(got[1:], want[1:]))
    path = out_dir / CONFIG_FILE
    config = json.loads(path.read_text())
    config["max_abs_diff"] = diffs
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return diffs


def file_sizes(out_dir: str | os.PathLike) -> dict[str, int]:
    """Bytes of every file of the export, by name."""
    return {p.name: p.stat().st_size for p in sorted(pathlib.Path(out_dir).iterdir()) if p.is_file()}
