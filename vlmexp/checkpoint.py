"""Open a model folder or hub id (safetensors only by default) and its processor; save one atomically.

A model is named by a folder or a hub id, `org/name` or `org/name@revision`; `resolve_model` is
the one place that turns a name into the folder to read (a hub id: its snapshot in the Hugging
Face cache, fetched first unless offline) and the commit it resolved to, which recipes record.
A model folder is the Hugging Face layout: `config.json`, one `model.safetensors` or sharded
safetensors with `model.safetensors.index.json`, and processor/tokenizer files. transformers 5
writes LLaVA-like and Qwen-VL checkpoints under legacy key names by default and renames them on
load; both layouts open to the same in-memory names and tensors. Every fault is a one-line
`CheckpointError` naming the file at fault; shards are checked here before transformers sees them.

Example:
    >>> from vlmexp.checkpoint import open_model, save_model, weights_sha256
    >>> loaded = open_model("models/base")                      # doctest: +SKIP
    >>> out = save_model(loaded.model, "models/copy", source_dir="models/base")  # doctest: +SKIP
    >>> weights_sha256(open_model(out).model) == weights_sha256(loaded.model)    # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmexp.errors import CheckpointError, one_line

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Files that hold or index weights: never copied from a source folder into a saved checkpoint.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_MODEL_FILES = ("config.json", "generation_config.json")
# Any of these makes a folder carry a processor or tokenizer.
_PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "chat_template.jinja",
    "chat_template.json",
)
# Size in bytes of each safetensors dtype, to check a header's offsets against its shapes.
_ST_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# `org/name` (or a bare legacy `name`), optionally `@revision`: a branch, tag or commit hash.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*(?:/[\w.\-]+)?)(?:@(?P<revision>[\w.\-/]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")
# How users turn the two opt-ins on, wherever an error asks for one: argument, flag, config key.
_TRUST_HOW = "trust_remote_code=True (--trust-remote-code, models.trust_remote_code=true)"
_PICKLE_HOW = "allow_pickle=True (--allow-pickle, models.allow_pickle=true)"


@dataclass(frozen=True)
class ResolvedModel:
    """Where the model a name stands for lies on this machine (see `resolve_model`)."""

    folder: Path  # the folder to read: the named folder, or the hub snapshot's folder
    spec: str  # the name as given: a folder, `org/name` or `org/name@revision`
    revision: str | None = None  # the commit a hub id resolved to; None for a folder

    @property
    def pinned(self) -> str:
        """The name that opens this very snapshot again: `org/name@<commit>`, or the folder."""
        if self.revision is None:
            return self.spec
        return f"{self.spec.split('@', 1)[0]}@{self.revision}"


@dataclass
class LoadedModel:
    """A model opened by `open_model`, with its processor and where it came from."""

    model: torch.nn.Module  # eval mode, on the requested device
    processor: Any | None  # AutoProcessor, else AutoTokenizer, else None (no processor files)
    path: str  # the name it was opened by: a folder or a hub id
    config: Any  # model.config
    source: ResolvedModel  # the folder read and, for a hub id, the commit


def resolve_device(device: str | None = None) -> str:
    """Return "cuda" when available and `device` is None or "auto", else "cpu"; others pass through.

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` is written as a hub id, else None.

    Example:
        >>> parse_hub_id("org/name@main")
        ('org/name', 'main')
        >>> parse_hub_id("/models/base") is None
        True
    """
    match = _HUB_ID.match(spec)
    return (match["repo"], match["revision"]) if match else None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (HF_HUB_CACHE, else HF_HOME/hub),
    not when huggingface_hub was imported, so that a test or a caller may point it elsewhere.

    Example:
        >>> hub_cache_dir().name                                 # doctest: +SKIP
        'hub'
    """
    from huggingface_hub import constants

    env = os.environ
    raw = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not raw and env.get("HF_HOME"):
        raw = os.path.join(env["HF_HOME"], "hub")
    return Path(os.path.expandvars(raw or constants.HF_HUB_CACHE)).expanduser()


def resolve_model(
    spec: str | os.PathLike, revision: str | None = None, *, allow_pickle: bool = False
) -> ResolvedModel:
    """The folder a model name stands for: the folder itself, or a hub id's cached snapshot.

    An existing folder is used as it is (revision None). Otherwise `spec` must be a hub id,
    `org/name` or `org/name@revision`: its snapshot is looked up in the Hugging Face cache
    (`hub_cache_dir()`), and fetched first when online (safetensors, configs, tokenizer and
    processor files, shipped code; pickles only with `allow_pickle`). With HF_HUB_OFFLINE=1 a
    cached snapshot resolves and any other is a one-line CheckpointError naming the cache.
    `revision` is a commit a recipe recorded: it wins over a branch or tag in `spec`, so that a
    recipe built from `org/name` opens the same snapshot after `main` has moved on.

    Example:
        >>> resolve_model("models/base").revision is None        # doctest: +SKIP
        True
        >>> resolve_model("org/name@main").pinned                # doctest: +SKIP
        'org/name@0123456789abcdef0123456789abcdef01234567'
    """
    name = os.fspath(spec)
    if revision is None:
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(f"{path}: not a model folder (a file, not a folder)")
            return ResolvedModel(folder=path, spec=name)
    parsed = parse_hub_id(name)
    if parsed is None:
        if revision is not None:
            raise CheckpointError(f"{name}: has revision {revision}, but is not a hub id "
                                  f"(org/name)")
        raise CheckpointError(f"{name}: no such model folder")
    repo_id, asked = parsed
    if revision is not None and asked is not None and _COMMIT.match(asked) and asked != revision:
        raise CheckpointError(f"{name}: names commit {asked} but revision {revision} is "
                              f"recorded for it")
    wanted = revision or asked
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    offline = _offline()
    patterns = ["*.json", "*.jinja", "*.txt", "*.model", "*.py", "*.safetensors", "*.md"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        folder = Path(snapshot_download(repo_id, revision=wanted, cache_dir=cache,
                                        local_files_only=offline, allow_patterns=patterns))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(_not_cached(name, repo_id, wanted, cache, offline)) from err
    except Exception as err:  # network, auth, unknown repo or revision: one line naming the id
        raise CheckpointError(f"{name}: cannot fetch from the hub: {one_line(err)}") from err
    commit = folder.name if _COMMIT.match(folder.name) else wanted
    return ResolvedModel(folder=folder, spec=name, revision=commit)


def _not_cached(name: str, repo_id: str, revision: str | None, cache: Path,
                offline: bool) -> str:
    """The one line saying that a hub id (at `revision`) is not in the cache, and where it is."""
    from huggingface_hub.file_download import repo_folder_name

    why = "offline (HF_HUB_OFFLINE=1), so it cannot be fetched" if offline else (
        "the hub could not be reached to fetch it")
    snapshots = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    cached = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
    if not cached:
        return (f"{name}: no such model folder, and {repo_id} is not in the Hugging Face cache "
                f"({cache}); {why}")
    shown = ", ".join(c[:12] for c in cached[:3]) + (" …" if len(cached) > 3 else "")
    return (f"{name}: revision {revision or 'main'} of {repo_id} is not in the Hugging Face "
            f"cache ({cache}; cached commits: {shown}); {why}")


def open_model(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    load_processor: bool = True,
) -> LoadedModel:
    """Open a model folder or hub id (see `resolve_model`; `revision`: a recorded commit) in eval
    mode.

    The Auto class follows the config: image-text-to-text, else vision2seq, else causal LM.
    `dtype=None` keeps the checkpoint's dtype. Every tensor must load: a missing, unexpected or
    mis-shaped key raises `CheckpointError` rather than being dropped or randomly initialized.

    Example:
        >>> loaded = open_model("models/base", device="auto")   # doctest: +SKIP
        >>> loaded.model.training                                 # doctest: +SKIP
        False
    """
    source = resolve_model(path_or_id, revision, allow_pickle=allow_pickle)
    folder = source.folder
    weights = check_weights(folder, allow_pickle=allow_pickle)
    config = _load_config(folder, trust_remote_code=trust_remote_code)
    auto_class = _auto_class(config, folder / "config.json", trust_remote_code=trust_remote_code)
    try:
        model, info = auto_class.from_pretrained(
            folder, config=config, dtype=dtype if dtype is not None else "auto",
            use_safetensors=weights.name.startswith(SAFE_WEIGHTS),
            trust_remote_code=trust_remote_code,
            output_loading_info=True, local_files_only=True,
            # Mis-shaped keys come back in the loading info, so the error can name them.
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}: cannot load weights: {one_line(err)}") from err
    _check_loading_info(weights, info)
    model = model.to(resolve_device(device)).eval()
    processor = (
        _load_processor(folder, trust_remote_code=trust_remote_code) if load_processor else None
    )
    return LoadedModel(model=model, processor=processor, path=source.spec, config=model.config,
                       source=source)


def current_umask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def model_skeleton(path_or_id: str | os.PathLike | ResolvedModel, revision: str | None = None,
                   *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree from its config alone, with every tensor on the meta device:
    its names, shapes, dtypes and ties, and no weight read (for checks before loading).

    Example:
        >>> model_skeleton("models/base").lm_head.weight.device  # doctest: +SKIP
        device(type='meta')
    """
    from transformers import AutoConfig

    source = path_or_id if isinstance(path_or_id, ResolvedModel) else resolve_model(
        path_or_id, revision)
    try:
        config = AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{source.spec}: cannot read config ({one_line(err)})") from err
    auto = auto_model_class(config, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    return model


def load_processor(
    path: str | os.PathLike, revision: str | None = None, *, trust_remote_code: bool = False
) -> Any | None:
    """The processor every command uses for a checkpoint; None when it has no processor files.

    The checkpoint's own class (AutoProcessor) wherever it constructs. Where it cannot be built
    here (Qwen2-VL / Qwen2.5-VL processors need torchvision for their video part), an image-only
    equivalent that makes the same inputs (`vlmexp.processors.QwenVLImageProcessor`); failing
    both, the bare tokenizer (text-only models). Without torchvision, transformers falls back
    to PIL image processors, whose resizing differs from the default torchvision ones; they are
    made to resize as torchvision does (`vlmexp.processors.torch_resizing`), so that a model
    gets the same pixel values with or without torchvision.

    Example:
        >>> load_processor("models/base")                       # doctest: +SKIP
        LlavaProcessor(...)
    """
    from transformers import AutoProcessor, AutoTokenizer

    folder = resolve_model(path, revision).folder
    if not any((folder / f).exists() for f in _PROCESSOR_FILES):
        return None
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as processor_err:  # any failure: try the tokenizer alone
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except Exception as err:
            raise CheckpointError(
                f"{path}: cannot load processor ({one_line(processor_err)}) "
                f"or tokenizer ({one_line(err)})"
            ) from err
        return _image_only_processor(folder, tokenizer) or tokenizer
    if not hasattr(processor, "image_processor"):  # a bare tokenizer: no processor class named
        return _image_only_processor(folder, processor) or processor
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():  # PIL image processors: resize as torchvision would
        from vlmexp.processors import torch_resizing

        torch_resizing(processor.image_processor)
    if not getattr(processor, "chat_template", None):
        processor.chat_template = _chat_template(folder) or getattr(
            processor.tokenizer, "chat_template", None)
    return processor


def _image_only_processor(folder: Path, tokenizer: Any) -> Any | None:
    """The image-only stand-in for a Qwen-VL processor class that cannot be built, else None.

    Reads the image processor's settings as either layout stores them: the hub's
    `preprocessor_config.json`, or transformers 5's `processor_config.json` (the image
    processor nested under `image_processor`); the processor's chat template from
    `chat_template.json` or `chat_template.jinja`, else the tokenizer's.
    """
    settings = _read_json(folder / "preprocessor_config.json")
    if settings is None:
        settings = (_read_json(folder / "processor_config.json") or {}).get("image_processor")
    if not isinstance(settings, dict):
        return None
    if not str(settings.get("image_processor_type", "")).startswith("Qwen2VLImageProcessor"):
        return _without_video_processor(folder, settings)
    from vlmexp.processors import QwenVLImageProcessor, qwen_vl_image_processor

    options = {k: v for k, v in settings.items()
               if k not in ("image_processor_type", "processor_class", "auto_map")}
    return QwenVLImageProcessor(qwen_vl_image_processor(**options), tokenizer,
                                chat_template=_chat_template(folder))


def _chat_template(folder: Path) -> str | None:
    """The processor's own chat template (`chat_template.json`, else `chat_template.jinja`)."""
    template = (_read_json(folder / "chat_template.json") or {}).get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    return template


def _without_video_processor(folder: Path, settings: dict[str, Any]) -> Any | None:
    """The checkpoint's own processor class built without its video processor (which needs
    torchvision), e.g. SmolVLM's; None when the class takes no video processor."""
    import inspect

    import transformers

    from vlmexp.processors import torch_resizing, without_video

    name = (_read_json(folder / "processor_config.json") or {}).get("processor_class") or \
        settings.get("processor_class")
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        return None
    try:
        processor = without_video(cls).from_pretrained(folder, video_processor=None)
    except Exception as err:  # noqa: BLE001 - any failure: say what could not be built
        raise CheckpointError(f"{folder}: cannot build {name} without its video processor "
                              f"({one_line(err)})") from err
    torch_resizing(processor.image_processor)
    if not getattr(processor, "chat_template", None):
        processor.chat_template = _chat_template(folder) or getattr(
            processor.tokenizer, "chat_template", None)
    return processor


def _read_json(path: Path) -> Any | None:
    """A JSON file's content, None when there is no such file; CheckpointError if malformed."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({one_line(err)})") from err


def save_model(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    processor: Any | None = None,
    source_dir: str | os.PathLike | ResolvedModel | None = None,
    force: bool = False,
    native_layout: bool = False,
    max_shard_size: str = "2GB",
) -> Path:
    """Write config, safetensors weights, generation config and processor files atomically.

    Everything goes into a temporary folder beside `out_dir` that is renamed into place once
    complete; a failure leaves nothing at `out_dir` (or the old folder untouched with `force`).
    Every file of `source_dir` (a folder, a hub id, or the `ResolvedModel` a model was opened
    from, so a hub snapshot's files come from the very snapshot) is copied as it is, except
    weights, indexes, `config.json` and `generation_config.json`: a merge keeps the base's
    processor, tokenizer and chat template files byte for byte. `processor.save_pretrained`
    writes them only where the source has none (or there is no source). Weights keep the model's dtype (its config's
    `dtype`); more than `max_shard_size` of them are written as shards with an index.
    `native_layout=True` writes in-memory key names; the default writes transformers' legacy names.

    Example:
        >>> save_model(model, "out/merged", source_dir="models/base")   # doctest: +SKIP
        PosixPath('out/merged')
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; pass force=True (--force) to replace it")
    source = source_dir if isinstance(source_dir, ResolvedModel) or source_dir is None else (
        resolve_model(source_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the result from colleagues
    try:
        model.save_pretrained(
            tmp, max_shard_size=max_shard_size, save_original_format=not native_layout,
        )
        if source is not None:  # the base's own files, verbatim (processor, templates, card)
            _copy_non_weight_files(source.folder, tmp)
        has_processor = any((tmp / f).exists() for f in _PROCESSOR_FILES)
        if processor is not None and not has_processor:
            processor.save_pretrained(tmp)
        _replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise CheckpointError(f"{out}: cannot write checkpoint: {one_line(err)}") from err
        raise
    return out


def weights_sha256(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor in sorted in-memory name order: name, dtype, shape, raw bytes.

    Tied tensors count once (the first name in sorted order), so the digest is the same for a
    model saved in legacy or native layout once reopened, and for a live model and its saved copy.

    Example:
        >>> weights_sha256({"w": torch.zeros(2)})[:12]
        '2d3c4d38442d'
    """
    state = (
        model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module)
        else model_or_state
    )
    digest = hashlib.sha256()
    seen: set[tuple] = set()
    for name in sorted(state):
        tensor = state[name].detach()
        identity = (
            str(tensor.device), tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tensor.stride(), tensor.dtype,
        )
        if tensor.numel() and identity in seen:  # empty tensors share a null pointer
            continue
        seen.add(identity)
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{name}\0{dtype}\0{tuple(tensor.shape)}\0".encode())
        data = tensor.to("cpu").contiguous().reshape(-1)
        # Reinterpreting as bytes works for every dtype, bf16 and fp8 included (numpy has neither).
        digest.update(data.view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def folder_weights_sha256(
    path: str | os.PathLike, revision: str | None = None, *, allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> str:
    """`weights_sha256` of the model `path` names (a folder or hub id, see `resolve_model`): this
    loads the whole model (on the CPU).

    Example:
        >>> folder_weights_sha256("models/base")                # doctest: +SKIP
        '3f1c…'
    """
    loaded = open_model(path, revision=revision, allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code, load_processor=False)
    return weights_sha256(loaded.model)


# --- opening: find the folder, check its files -------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.upper() in _OFFLINE_VALUES for f in flags)


def check_weights(folder: Path, *, allow_pickle: bool) -> Path:
    """Check the folder's weight files; return the one transformers will read (file or index)."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a model folder (no config.json)")
    index = folder / SAFE_INDEX
    if index.is_file():
        _check_index(folder, index)
        return index
    if (folder / SAFE_WEIGHTS).is_file():
        _check_shard(folder / SAFE_WEIGHTS)
        return folder / SAFE_WEIGHTS
    stray = sorted(p.name for p in folder.glob("*.safetensors"))
    if stray:
        others = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
        raise CheckpointError(
            f"{folder / SAFE_INDEX}: missing, so {stray[0]}{others} cannot be read"
        )
    pickles = [folder / f for f in PICKLE_WEIGHTS if (folder / f).is_file()]
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{pickles[0]}: pickle-only checkpoint; loading it can run arbitrary code, "
            f"opt in with {_PICKLE_HOW}"
        )
    if pickles:
        return pickles[-1]  # the index when there is one
    raise CheckpointError(f"{folder}: no weights ({SAFE_WEIGHTS} or {SAFE_INDEX})")


def stored_tensor_names(
    path: str | os.PathLike, revision: str | None = None, *, allow_pickle: bool = False
) -> set[str]:
    """The tensor names the checkpoint `path` names stores (a folder or hub id, see
    `resolve_model`): safetensors headers or an index only, no weights read; a single pickle
    file (only with `allow_pickle`) is memory-mapped, its tensors are not read either.

    transformers' default save writes LLaVA-like models under legacy names (e.g.
    `language_model.model.layers.0…`), which differ from the in-memory ones
    (`model.language_model.layers.0…`); tools that read the files, not transformers, see these.
    """
    folder = resolve_model(path, revision, allow_pickle=allow_pickle).folder
    weights = check_weights(folder, allow_pickle=allow_pickle)
    if weights.name.endswith(".index.json"):
        return set(json.loads(weights.read_text())["weight_map"])
    if weights.name.endswith(".safetensors"):
        return _check_shard(weights)
    try:
        return set(torch.load(weights, map_location="cpu", mmap=True, weights_only=True))
    except Exception as err:  # a pickle that is not a plain state dict
        raise CheckpointError(f"{weights}: cannot read its tensor names ({one_line(err)})") from err


def _check_index(folder: Path, index: Path) -> None:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("empty weight_map")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: malformed index ({one_line(err)})") from err
    shards: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, set()).add(key)
    for shard, keys in sorted(shards.items()):
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index}: names shard {shard}, which is missing")
        absent = sorted(keys - _check_shard(shard_path))
        if absent:
            raise CheckpointError(
                f"{index}: maps {absent[0]} to {shard}, which does not hold it"
                + (f" ({len(absent) - 1} more)" if len(absent) > 1 else "")
            )


def _check_shard(path: Path) -> set[str]:
    """Check a safetensors file's header against its size; return its tensor names."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes but the file has {size}")
            header = json.loads(f.read(header_len))
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, stop = entry["data_offsets"]
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
            if stop - begin != numel * _ST_DTYPE_BYTES.get(entry["dtype"], 0):
                raise ValueError(f"tensor {name}: offsets do not match dtype and shape")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors file ({one_line(err)})") from err
    if size != 8 + header_len + end:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, header says "
            f"{8 + header_len + end})"
        )
    return {name for name in header if name != "__metadata__"}


def _load_config(folder: Path, *, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_file = folder / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({one_line(err)})") from err
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    has_code = isinstance(raw, dict) and "auto_map" in raw
    if model_type not in CONFIG_MAPPING and not (has_code and trust_remote_code):
        hint = (
            f"it ships its own code: pass {_TRUST_HOW} to run it"
            if has_code else
            f"upgrade transformers, or pass {_TRUST_HOW} if the folder ships its own modeling "
            "code"
        )
        raise CheckpointError(
            f"{config_file}: architecture model_type={model_type!r} is unknown to "
            f"transformers; {hint}"
        )
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{config_file}: cannot read config ({one_line(err)})") from err


def _auto_classes() -> list[tuple[str, Any, Any]]:
    """(name, Auto class, its mapping) in order of preference: image-text, vision2seq, causal LM."""
    import transformers
    from transformers.models.auto import modeling_auto

    order = [
        ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING"),
        ("AutoModelForVision2Seq", "MODEL_FOR_VISION_2_SEQ_MAPPING"),  # gone in transformers 5
        ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING"),
    ]
    return [
        (auto, getattr(transformers, auto), getattr(modeling_auto, mapping))
        for auto, mapping in order
        if hasattr(transformers, auto) and hasattr(modeling_auto, mapping)
    ]


def _auto_class(config: Any, config_file: Path, *, trust_remote_code: bool) -> Any:
    """The Auto class for `config`: one the trusted remote code names, else one whose mapping
    gives a class named in `architectures`, else the first whose mapping knows the config type."""
    candidates = _auto_classes()
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code:
        for auto, cls, _ in candidates:
            if auto in auto_map:
                return cls
    known = [(cls, mapping[type(config)]) for _, cls, mapping in candidates
             if type(config) in mapping]
    architectures = set(getattr(config, "architectures", None) or ())
    for cls, model_cls in known:
        if getattr(model_cls, "__name__", None) in architectures:
            return cls
    if known:
        return known[0][0]
    named = ", ".join(sorted(architectures)) or "no architectures"
    hint = "" if trust_remote_code else (
        f"; if it ships its own code pass {_TRUST_HOW}"
    )
    raise CheckpointError(
        f"{config_file}: {type(config).__name__} ({named}) is neither an image-text-to-text "
        f"nor a causal LM model in transformers{hint}"
    )


def _describe_key(key: Any) -> str:
    # mismatched entries are (key, checkpoint shape, model shape)
    if isinstance(key, tuple) and len(key) == 3:
        return f"{key[0]} {tuple(key[1])} in checkpoint vs {tuple(key[2])} in model"
    return str(key[0] if isinstance(key, tuple) else key)


def auto_model_class(config: Any, *, trust_remote_code: bool = False) -> Any:
    """The Auto class `open_model` uses for `config` (image-text-to-text, vision2seq, causal LM).

    Example:
        >>> auto_model_class(transformers.LlamaConfig()).__name__   # doctest: +SKIP
        'AutoModelForCausalLM'
    """
    return _auto_class(config, Path("config.json"), trust_remote_code=trust_remote_code)


def _check_loading_info(weights: Path, info: Mapping[str, Any]) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(_describe_key(k) for k in info.get(kind) or ())
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:3])}{more}")
    problems += [one_line(msg) for msg in info.get("error_msgs") or ()]
    if problems:
        raise CheckpointError(f"{weights}: weights do not match the model; " + "; ".join(problems))


# --- saving -------------------------------------------------------------------------------------


def _copy_non_weight_files(source: Path, dest: Path) -> None:
    """Copy the processor/tokenizer (and other non-weight) files of `source` into `dest`."""
    if not source.is_dir():
        raise CheckpointError(f"{source}: source folder does not exist")
    for item in sorted(source.iterdir()):
        name = item.name
        if (
            not item.is_file() or name.startswith(".") or name in _MODEL_FILES
            or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")
            or (dest / name).exists()
        ):
            continue
        shutil.copy2(item, dest / name)


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` goes only once `tmp` is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


_load_processor = load_processor  # open_model's `load_processor` flag shadows the function
