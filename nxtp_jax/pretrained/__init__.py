"""Released models by name: `resolve("g3m")` downloads, checks and converts once, then returns the checkpoint.

A model card (`g3m.json`, `g70m.json` beside this file, or any JSON file of the same form)
names four inputs, each `{"hub": "owner/name", "file": ..., "revision": ...}` or `{"url": ...}`:

    checkpoint    the released nxtp .pth (its trained params)
    clip          OpenAI's CLIP archive
    tokenizer     LLaMA-2's tokenizer.model
    llama_config  LLaMA-2's config.json (Hugging Face layout; the checkpoint holds every decoder weight)

and, for each, `sha256`, `md5_prefix` (where only that is published), or neither with `revision`
pinned to a commit: then the Hub's ETag (an LFS file's sha256, a git file's blob sha1) is checked,
and the file's sha256 is recorded at first download and checked on every reuse. A file that does
not match is deleted. Hub files go through huggingface_hub (HF_ENDPOINT, HF_HOME, HF_TOKEN,
HF_HUB_OFFLINE, resumed downloads); URL files through the same HF_HOME, or openai-clip's own
folder (~/.cache/clip) where it already holds the file.

The converted checkpoint lives in `$NXTP_JAX_CACHE/<name>` (default `~/.cache/nxtp_jax/<name>`),
written whole and renamed into place under a file lock, so concurrent first uses convert once.
Its config.json records the card's inputs and the sha256 of every source.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pathlib
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import filelock
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from tqdm import tqdm

from nxtp_jax import checkpoint
from nxtp_jax.errors import CheckpointError, NxtpError, WeightImportError
from nxtp_jax.weights import convert

CARDS = pathlib.Path(__file__).resolve().parent
INPUTS = ("tokenizer", "llama_config", "clip", "checkpoint")  # fetch order: the gated, small files first
# The released params and OpenAI's CLIP are fp16: stored so, the cache is exact and half the size of fp32.
CONVERT_DTYPE = "float16"
CLIP_FOLDER = "~/.cache/clip"  # where openai-clip's clip.load downloads its archives
URL_RETRIES = 5
_HEX40, _HEX64 = re.compile(r"[0-9a-f]{40}"), re.compile(r"[0-9a-f]{64}")
_licensed: set[str] = set()  # models whose licence this process has printed


def names() -> list[str]:
    """The released models shipped with the package."""
    return sorted(p.stem for p in CARDS.glob("*.json"))


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("NXTP_JAX_CACHE") or pathlib.Path.home() / ".cache" / "nxtp_jax")


def _check_input(where: str, key: str, spec: Any) -> None:
    def bad(what: str) -> NxtpError:
        return NxtpError(f"{where}: input {key!r} {what}; see nxtp_jax/pretrained/g3m.json for the form")

    if not isinstance(spec, dict) or ("hub" in spec) == ("url" in spec):
        raise bad(f"must be an object with exactly one of 'hub' and 'url', found {spec!r}")
    if "hub" in spec and not isinstance(spec.get("file"), str):
        raise bad("names a 'hub' repo but no 'file'")
    if "sha256" in spec and not _HEX64.fullmatch(str(spec["sha256"])):
        raise bad(f"has sha256 {spec['sha256']!r}; expected 64 lowercase hex digits")
    if "md5_prefix" in spec and not re.fullmatch(r"[0-9a-f]{4,32}", str(spec["md5_prefix"])):
        raise bad(f"has md5_prefix {spec['md5_prefix']!r}; expected 4 to 32 lowercase hex digits")
    if "sha256" not in spec and "md5_prefix" not in spec and not ("hub" in spec and _HEX40.fullmatch(str(spec.get("revision")))):
        raise bad("has no sha256 or md5_prefix; a Hub file may go without only with 'revision' pinned to a 40-hex commit")


def load_card(model: str | os.PathLike) -> dict[str, Any]:
    """A released model's card by name, or a card file (`*.json`), checked for the fields `resolve` needs."""
    text = os.fspath(model)
    if text.endswith(".json"):
        path = pathlib.Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"expected a model card at {path}, found no such file")
    elif text in names():
        path = CARDS / f"{text}.json"
    else:
        raise NxtpError(
            f"expected a released model ({', '.join(names())}), a model card .json or a checkpoint directory, found {text!r}"
        )
    try:
        card = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NxtpError(f"{path}: expected a model card in JSON, found unreadable JSON ({e})") from e
    if not isinstance(card, dict):
        raise NxtpError(f"{path}: expected a JSON object, found {type(card).__name__}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(card.get("name", ""))):
        raise NxtpError(f"{path}: expected a 'name' of letters, digits, '.', '_', '-' (the cache folder), found {card.get('name')!r}")
    if not isinstance(card.get("license"), str) or isinstance(card.get("layers"), bool) or not isinstance(card.get("layers"), int):
        raise NxtpError(f"{path}: expected a 'license' text and the decoder's 'layers' (an int)")
    for key in INPUTS:
        _check_input(str(path), key, card.get(key))
    return card


def _identity(card: dict[str, Any]) -> dict[str, Any]:
    """What the converted checkpoint depends on: the inputs and the depth (not the prose)."""
    return {k: card[k] for k in (*INPUTS, "layers")}


def _print_licence(card: dict[str, Any]) -> None:
    if card["name"] not in _licensed:
        _licensed.add(card["name"])
        print(f"{card['name']}: licence: {card['license']}", file=sys.stderr, flush=True)


def _hashes(path: str | os.PathLike) -> dict[str, str]:
    """sha256, md5 and the git blob sha1 (a non-LFS Hub file's ETag) of a file, in one read."""
    sha256, md5, git = hashlib.sha256(), hashlib.md5(), hashlib.sha1()
    git.update(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            for h in (sha256, md5, git):
                h.update(chunk)
    return {"sha256": sha256.hexdigest(), "md5": md5.hexdigest(), "git_sha1": git.hexdigest()}


def _source_name(spec: dict[str, Any]) -> str:
    if "hub" in spec:
        return f"{spec['hub']}@{spec.get('revision', 'main')}/{spec['file']}"
    return spec["url"]


def _records_path() -> pathlib.Path:
    return pathlib.Path(constants.HF_HOME) / "nxtp_jax" / "sha256.json"


def _refuse(path: str, spec: dict[str, Any], key: str, found: str, expected: str) -> WeightImportError:
    """Deletes a file that failed its check (the Hub cache's blob and snapshot link too) and says so."""
    for p in {os.path.realpath(path), path}:
        if os.path.lexists(p):
            os.remove(p)
    return WeightImportError(
        f"{key}: {_source_name(spec)} has {found}, expected {expected}; deleted {path} (run again to download it anew, "
        "or check the mirror behind HF_ENDPOINT)"
    )


def _verify(path: str, spec: dict[str, Any], key: str) -> dict[str, str]:
    """Checks the file against the card (or the Hub's ETag and the recorded sha256); its hashes."""
    h = _hashes(path)
    if "sha256" in spec:
        if h["sha256"] != spec["sha256"]:
            raise _refuse(path, spec, key, f"sha256 {h['sha256']}", f"{spec['sha256']} (the card's)")
    elif "md5_prefix" in spec:
        if not h["md5"].startswith(spec["md5_prefix"]):
            raise _refuse(path, spec, key, f"md5 {h['md5']}", f"one starting {spec['md5_prefix']} (the card's)")
    else:
        etag = os.path.basename(os.path.realpath(path))  # the Hub cache names each blob by its ETag
        kind = "sha256" if _HEX64.fullmatch(etag) else "git_sha1" if _HEX40.fullmatch(etag) else None
        if kind and h[kind] != etag:
            raise _refuse(path, spec, key, f"{kind} {h[kind]}", f"{etag} (the Hub's ETag)")
        records_path = _records_path()
        records_path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(f"{records_path}.lock"):
            records = json.loads(records_path.read_text()) if records_path.is_file() else {}
            name = _source_name(spec)
            if records.setdefault(name, h["sha256"]) != h["sha256"]:
                raise _refuse(path, spec, key, f"sha256 {h['sha256']}", f"{records[name]} (recorded at its first download)")
            records_path.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    return {"sha256": h["sha256"], "md5": h["md5"]}


def _fetch_hub(spec: dict[str, Any], key: str) -> str:
    repo, file = spec["hub"], spec["file"]
    try:
        return hf_hub_download(repo, file, revision=spec.get("revision", "main"))
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status not in (401, 403):
            raise NxtpError(f"{key}: cannot download {file} from {repo} ({type(e).__name__}: {str(e).splitlines()[0]})") from e
        local = " or pass local copies with --llama_dir DIR and --tokenizer FILE" if key in ("tokenizer", "llama_config") else ""
        raise NxtpError(
            f"{key}: {repo} answered {status}: it is gated; accept its licence at https://huggingface.co/{repo} , "
            f"then run `huggingface-cli login` (or set HF_TOKEN){local}"
        ) from e
    except LocalEntryNotFoundError as e:
        why = "downloads are off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise NxtpError(f"{key}: {file} of {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}") from e


def _http_get(url: str, dest: pathlib.Path) -> None:
    """Downloads `url` to `dest` through `dest.incomplete`, resuming it (Range) after a cut connection."""
    part = dest.with_name(dest.name + ".incomplete")
    for attempt in range(URL_RETRIES):
        start = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                if r.status != 206:  # the whole file: start over
                    start = 0
                total = start + int(r.headers.get("Content-Length", 0))
                with open(part, "ab" if start else "wb") as f, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, desc=dest.name, disable=None
                ) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # URLError, a reset, IncompleteRead: a cut connection
            if isinstance(e, urllib.error.HTTPError) or attempt == URL_RETRIES - 1:
                kept = part.stat().st_size if part.exists() else 0
                raise NxtpError(f"cannot download {url} ({type(e).__name__}: {e}); {kept} bytes kept, run again to resume") from e
            continue
        if part.stat().st_size >= total:
            os.replace(part, dest)
            return
    raise NxtpError(f"cannot download {url}: the connection was cut {URL_RETRIES} times; run again to resume")


def _fetch_url(spec: dict[str, Any], key: str) -> str:
    url = spec["url"]
    name = pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name
    clip_copy = pathlib.Path(os.path.expanduser(CLIP_FOLDER)) / name
    if "sha256" in spec and clip_copy.is_file() and _hashes(clip_copy)["sha256"] == spec["sha256"]:
        return str(clip_copy)  # openai-clip already downloaded it
    dest = pathlib.Path(constants.HF_HOME) / "nxtp_jax" / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if dest.is_file():
        return str(dest)
    if constants.HF_HUB_OFFLINE:
        raise NxtpError(f"{key}: {url} is not in {dest.parent} (nor in {CLIP_FOLDER}) and downloads are off (HF_HUB_OFFLINE=1)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(f"{dest}.lock"):
        if not dest.is_file():
            _http_get(url, dest)
    return str(dest)


def fetch(key: str, spec: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """One input of a card: its local path, downloaded if needed and checked (see the module docstring)."""
    path = _fetch_hub(spec, key) if "hub" in spec else _fetch_url(spec, key)
    return path, {"source": _source_name(spec), **_verify(path, spec, key)}


def _ready(out: pathlib.Path, card: dict[str, Any]) -> bool:
    if not (out / checkpoint.CONFIG_FILE).is_file():
        return False
    made_from = checkpoint.read_meta(out).get("release", {}).get("card")
    if made_from != _identity(card):
        raise CheckpointError(
            f"{out} holds a model converted from other inputs than the card {card['name']!r} names; "
            "remove that folder, or set NXTP_JAX_CACHE to another one"
        )
    return True


def _local(key: str, path: pathlib.Path) -> tuple[str, dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{key}: expected a local file at {path}, found none")
    h = _hashes(path)
    return str(path), {"source": str(path.resolve()), "sha256": h["sha256"], "md5": h["md5"]}


def _convert(
    card: dict[str, Any], out: str | os.PathLike, llama_dir: pathlib.Path | None, tokenizer: pathlib.Path | None,
    dtype: str = CONVERT_DTYPE,
) -> None:
    files: dict[str, tuple[str, dict[str, str]]] = {}
    for key in INPUTS:
        if key == "tokenizer" and (tokenizer or (llama_dir and (llama_dir / "tokenizer.model").is_file())):
            files[key] = _local(key, tokenizer or llama_dir / "tokenizer.model")
        elif key == "llama_config" and llama_dir:
            meta = (llama_dir / "params.json").is_file()
            files[key] = _local(key, llama_dir / ("params.json" if meta else "config.json"))
        else:
            files[key] = fetch(key, card[key])
    with tempfile.TemporaryDirectory() as header:
        # The converter reads a folder; give it the config alone, so that LLaMA weights that happen
        # to lie beside it in the Hub cache are not opened (the checkpoint holds every decoder param).
        name = os.path.basename(files["llama_config"][0])
        os.symlink(os.path.abspath(files["llama_config"][0]), os.path.join(header, name))
        layout = "llama_dir" if name == "params.json" else "llama_hf_dir"
        conversion = convert(
            clip_path=files["clip"][0],
            tokenizer_path=files["tokenizer"][0],
            nxtp_ckpt=files["checkpoint"][0],
            layers=card["layers"],
            dtype=dtype,
            **{layout: header},
        )
    release = {"name": card["name"], "license": card["license"], "card": _identity(card),
               "sources": {k: v[1] for k, v in files.items()}}
    checkpoint.save(out, conversion.params, conversion.config, files["tokenizer"][0],
                    provenance=conversion.provenance(), release=release)


def resolve(
    model: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    llama_dir: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> str:
    """NAME | CARD.json | DIR -> the path of a converted checkpoint directory (a DIR, local or gs://, as it is).

    A card's model is downloaded, checked and converted into `cache_dir` (default
    `$NXTP_JAX_CACHE`, else ~/.cache/nxtp_jax) on first use; later uses read it directly.
    `llama_dir` (Meta's or Hugging Face's LLaMA-2 folder) and `tokenizer` stand in for the gated
    Hub files. The model's licence is printed once per process.
    """
    text = os.fspath(model)
    if "://" in text or os.path.isdir(text):
        return text
    card = load_card(text)
    _print_licence(card)
    out = pathlib.Path(cache_dir or cache_root()) / card["name"]
    if not _ready(out, card):
        out.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(f"{out}.lock"):
            if not _ready(out, card):  # another process may have converted it meanwhile
                _convert(card, out, _optional_path(llama_dir), _optional_path(tokenizer))
    return str(out)


def convert_into(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    llama_dir: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = CONVERT_DTYPE,
) -> None:
    """Downloads (or reuses the Hub cache), checks and converts a released model into `out` (new or empty; gs:// works)."""
    if os.path.isdir(model):
        raise NxtpError(f"expected a released model ({', '.join(names())}) or a model card .json, found the directory {os.fspath(model)!r}")
    card = load_card(model)
    checkpoint.check_new_dir(out)  # before any download
    _print_licence(card)
    _convert(card, out, _optional_path(llama_dir), _optional_path(tokenizer), dtype)


def _optional_path(path: str | os.PathLike | None) -> pathlib.Path | None:
    return pathlib.Path(path) if path else None
