"""Build the demo zoo: a tiny LLaVA `base`, its `vqa-expert`, and a text-only Llama `text-expert`.

The zoo is trained here, on CPU, in about a minute, and cached under a folder keyed by its
settings and the torch / transformers versions; `ensure_zoo` builds it only when that folder is
missing (or when forced).

Example:
    >>> from vlmexp.zoo.build import ensure_zoo  # doctest: +SKIP
    >>> paths = ensure_zoo()  # doctest: +SKIP
    >>> paths.base.name, paths.text_expert.name  # doctest: +SKIP
    ('base', 'text-expert')
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from vlmexp.checkpoint import folder_weights_sha256
from vlmexp.errors import CheckpointError
from vlmexp.zoo import data
from vlmexp.zoo.train import encode_image_items, encode_text_items, train

# Bump when the code changes what a given ZooSettings builds: it is part of the cache key.
ZOO_FORMAT = 3  # 2: 256-item colour/shape splits; 3: saved under the in-memory tensor names
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
ENV_DIR = "VLMEXP_ZOO_DIR"
DEFAULT_DIR = Path(".vlmexp_cache") / "zoo"


@dataclass(frozen=True)
class ZooSettings:
    """Everything that decides the zoo's weights; its hash (plus versions) keys the cache folder."""

    seed: int = 0
    # architecture
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 128
    text_intermediate: int = 256
    text_layers: int = 2
    heads: int = 4
    patch_size: int = 8
    # data
    position_items: int = 2000
    recitation_items: int = 2000
    vqa_items: int = 2000
    # training (Adam, warm-up then cosine); threads are fixed so that weights do not depend on the host
    batch_size: int = 32
    pretrain_steps: int = 700  # batches cycle position, position, recitation
    pretrain_lr: float = 1e-3
    vqa_steps: int = 2000  # long enough that its language model drifts: see README, demo zoo
    vqa_lr: float = 1e-3
    vqa_batch_size: int = 16
    text_steps: int = 200
    text_lr: float = 1e-3
    threads: int = 1

    def key(self) -> str:
        """The cache folder name: a hash of these settings, the zoo format and library versions."""
        blob = json.dumps({"settings": dataclasses.asdict(self), "format": ZOO_FORMAT,
                           "torch": torch.__version__, "transformers": tf.__version__},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ZooPaths:
    """Where a built zoo lies: three model folders (each with the processor) and the eval tasks."""

    root: Path
    base: Path
    vqa_expert: Path
    text_expert: Path
    evals: Path

    @classmethod
    def under(cls, root: Path) -> ZooPaths:
        return cls(root, root / "base", root / "vqa-expert", root / "text-expert", root / "evals")


# ---- tokenizer, processor, models -----------------------------------------------------------


def build_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the zoo's fixed vocabulary: every word is one token."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *data.vocabulary()))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # spaces and newlines separate, never count
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", extra_special_tokens={"image_token": "<image>"},
    )


def check_tokenizer(tokenizer: Any) -> None:
    """Every answer word must be exactly one known token after the answer prefix (" ")."""
    words = [*data.COLOURS, *data.SHAPES, *(w for ws in data.LISTS.values() for w in ws)]
    for word in words:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise CheckpointError(f"zoo tokenizer: answer word {word!r} is not one token: {ids}")


def build_processor(settings: ZooSettings) -> tf.LlavaProcessor:
    """LlavaProcessor(CLIP image processor, word-level tokenizer), no chat template."""
    size = data.IMAGE_SIZE
    images = tf.CLIPImageProcessorPil(size={"shortest_edge": size},
                                      crop_size={"height": size, "width": size})
    return tf.LlavaProcessor(
        image_processor=images, tokenizer=build_tokenizer(), patch_size=settings.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def build_base(settings: ZooSettings, tokenizer: Any) -> tf.LlavaForConditionalGeneration:
    """The untrained base: CLIP vision tower + 2-layer MLP projector + Llama language model."""
    s = settings
    vision = dict(model_type="clip_vision_model", hidden_size=s.vision_hidden,
                  intermediate_size=2 * s.vision_hidden, num_hidden_layers=s.vision_layers,
                  num_attention_heads=s.heads, image_size=data.IMAGE_SIZE,
                  patch_size=s.patch_size, projection_dim=s.vision_hidden)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=s.text_hidden,
                intermediate_size=s.text_intermediate, num_hidden_layers=s.text_layers,
                num_attention_heads=s.heads, num_key_value_heads=s.heads,
                max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    image_tokens = (data.IMAGE_SIZE // s.patch_size) ** 2
    config = tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
        image_seq_length=image_tokens, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    torch.manual_seed(s.seed)
    return tf.LlavaForConditionalGeneration(config)


def check_image_tokens(model: Any, processor: Any) -> None:
    """The processor's `<image>` expansion must equal the number of features the model makes."""
    image = data.render("circle", "red", 4, random.Random(0))
    inputs = processor(text=processor.image_token, images=image, return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    if n_tokens != len(features[0]) or n_tokens != model.config.image_seq_length:
        raise CheckpointError(f"zoo processor expands <image> to {n_tokens} tokens, the model "
                              f"makes {len(features[0])} features")


def text_model_from(vlm: Any) -> tf.LlamaForCausalLM:
    """A text-only Llama holding a copy of the VLM's language model and head."""
    llm = tf.LlamaForCausalLM(copy.deepcopy(vlm.config.text_config))
    prefix = "model.language_model."
    state = {"model." + k[len(prefix):]: v for k, v in vlm.state_dict().items() if k.startswith(prefix)}
    state["lm_head.weight"] = vlm.state_dict()["lm_head.weight"]
    missing, unexpected = llm.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return llm


# ---- build ----------------------------------------------------------------------------------


@contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_zoo(out: Path, settings: ZooSettings, *, progress: bool = True) -> dict[str, Any]:
    """Train the three models and write them, the processor and the eval tasks into `out`."""
    s = settings
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    losses: dict[str, float] = {}
    processor = build_processor(s)
    tok = processor.tokenizer
    check_tokenizer(tok)
    with _threads(s.threads):
        torch.manual_seed(s.seed)
        base = build_base(s, tok)
        check_image_tokens(base, processor)
        position = encode_image_items(processor, data.position_items(s.position_items, s.seed + 1))
        recite = encode_text_items(tok, [(r, None) for r in data.recitations(s.recitation_items, s.seed + 2)])
        vqa_data = encode_image_items(processor, [
            (it.image, it.question, it.answer) for it in data.color_shape_items(s.vqa_items, s.seed + 3)])
        next_data = encode_text_items(tok, [
            (data.next_item_text(it.question), it.choices[it.answer])
            for it in data.next_item_splits()["train"]])
        seconds["data"] = time.perf_counter() - start

        def phase(name: str, model: Any, sets: list, steps: int, lr: float, seed: int,
                  batch_size: int = s.batch_size) -> None:
            t0 = time.perf_counter()
            run = train(model, sets, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                        desc=f"zoo: {name}", progress=progress)
            seconds[name] = time.perf_counter() - t0
            losses[name] = sum(run[-20:]) / len(run[-20:])

        phase("base", base, [position, position, recite], s.pretrain_steps, s.pretrain_lr, s.seed + 11)
        vqa = copy.deepcopy(base)
        phase("vqa-expert", vqa, [vqa_data], s.vqa_steps, s.vqa_lr, s.seed + 12, s.vqa_batch_size)
        text = text_model_from(base)
        phase("text-expert", text, [next_data, recite], s.text_steps, s.text_lr, s.seed + 13)

    paths = ZooPaths.under(out)
    for model, folder in ((base, paths.base), (vqa, paths.vqa_expert), (text, paths.text_expert)):
        # in-memory names, not transformers' legacy ones: mergekit reads them (vlmexp export)
        model.save_pretrained(folder, save_original_format=False)
        processor.save_pretrained(folder)
    data.write_evals(paths.evals)
    manifest = {
        "settings": dataclasses.asdict(s), "key": s.key(), "format": ZOO_FORMAT,
        "torch": torch.__version__, "transformers": tf.__version__,
        # the digest a recipe pins the model by (its weights_sha256)
        "weights_sha256": {f.name: folder_weights_sha256(f) for f in (paths.base, paths.vqa_expert, paths.text_expert)},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "final_loss": {k: round(v, 4) for k, v in losses.items()},
    }
    manifest["seconds"]["total"] = round(time.perf_counter() - start, 2)
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def default_root() -> Path:
    """`$VLMEXP_ZOO_DIR`, else `.vlmexp_cache/zoo` in the working directory."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def ensure_zoo(
    root: str | Path | None = None,
    *,
    settings: ZooSettings | None = None,
    progress: bool = True,
    force: bool = False,
) -> ZooPaths:
    """The zoo for `settings` under `root` (see `default_root`), built first if it is not there.

    The zoo is built in a temporary folder beside its final place and renamed into it, so a
    folder that exists is complete. `force` rebuilds it even when it exists.

    Example:
        >>> paths = ensure_zoo("/tmp/zoo", progress=False)  # doctest: +SKIP
        >>> sorted(p.name for p in paths.evals.glob("*.yaml"))  # doctest: +SKIP
        ['color_shape_test.yaml', 'color_shape_val.yaml', 'next_item_test.yaml', 'next_item_val.yaml']
    """
    settings = settings or ZooSettings()
    root = Path(root) if root is not None else default_root()
    final = root / settings.key()
    if (final / "zoo.json").is_file() and not force:
        return ZooPaths.under(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{settings.key()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_zoo(tmp, settings, progress=progress)
        if final.exists():
            old = root / f".{settings.key()}.old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
    except OSError as err:
        if not (final / "zoo.json").is_file():  # another process may have won the race
            raise CheckpointError(f"{final}: cannot write the zoo: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ZooPaths.under(final)
