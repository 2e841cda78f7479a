"""Architecture-agnostic layout: every parameter → (component, block, depth); LLM → VLM alignment.

Discovery reads the live module tree and the config's sub-configs, never a per-architecture table:

- `vision`: the shallowest submodule whose `.config` is `config.vision_config`.
- `language`: the shallowest (non-root) submodule whose `.config` is the text config
  (`config.get_text_config()`; for a text-only LLM that is the config itself).
- `embed` / `head`: the parameters of `get_input_embeddings()` / `get_output_embeddings()`.
- `projector`: what maps vision features into the language model's width. Inside the vision
  module, a direct child (not the blocks) whose output width is the text hidden size while the
  vision blocks' width is not (Qwen-VL's `visual.merger`). Outside both, a submodule with a
  matrix that has both a vision width (or a multiple of it, e.g. after pixel shuffle) and the text
  width among its dims (LLaVA's `multi_modal_projector`, Idefics3's `connector`, Gemma 3's
  `multi_modal_projector` with its bare `mm_input_projection_weight` [vision, text] and
  `mm_soft_emb_norm`), or a bare 1-D parameter of text width (LLaVA-NeXT's `image_newline`:
  a learned vector in text space placed among the image features, so it is projector).
- `other`: whatever no rule places; listed in `Layout.other`, never dropped.

Blocks are the largest `nn.ModuleList` inside a component's module (a `Sequential`'s indices,
like `merger.mlp.0`, are never blocks). Block i of L has depth i/(L-1) (0 when L == 1);
non-block parameters registered before the first block have depth 0, after it 1; a component
without blocks has depth 0 throughout. Known names (`_PROJECTOR_NAMES`) only break the tie when
the vision and text widths are equal.

Tied tensors (identity of `nn.Parameter` objects, e.g. PaliGemma's and Gemma 3's embed/head)
appear once, under their first `named_parameters()` name, with the other names in `ties`; a tied
embed/head belongs to `embed` and the `head` component is then empty. Persistent buffers are not
parameters: they are never placed or merged, but `Layout.buffers` lists them so that nothing in
the state dict goes unreported.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmexp.errors import AlignmentError, LayoutError

COMPONENTS: tuple[str, ...] = ("vision", "projector", "language", "embed", "head", "other")
# Vocabulary-size policies of `align` (and of recipes, `merge.vocab`, `inspect --vocab`):
# "error" refuses donors whose vocabulary differs; "common_rows" merges the common leading rows.
VOCAB_POLICIES: tuple[str, ...] = ("error", "common_rows")

# Tie-breakers only: used when the vision width equals the text width, so width can't decide.
_PROJECTOR_NAMES = ("merger", "projector", "connector", "projection", "aligner", "adapter")

# Config values that change what the language model computes (compared, reported, not fatal).
_FUNCTION_KEYS = (
    "hidden_act", "hidden_activation", "rms_norm_eps", "layer_norm_eps", "rope_parameters",
    "rope_theta", "partial_rotary_factor", "head_dim", "num_attention_heads",
    "num_key_value_heads", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
    "layer_types", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
    "use_bidirectional_attention",
)
# Multimodal-rope sections are a no-op for text-only positions: not a function change for a donor.
_ROPE_IGNORED = ("mrope_section", "mrope_interleaved")


@dataclass(frozen=True)
class ParamInfo:
    """Where one parameter sits: component, block index within it, and relative depth."""

    name: str
    component: str
    block: int | None
    depth: float
    shape: tuple[int, ...]
    dtype: torch.dtype
    ties: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Layout:
    """The placement of every parameter of one model (see `discover`).

    `modules` maps a component to the module path it was found at ("" is the root) and
    `block_lists` to the path of its blocks' ModuleList; `projector` lists the module paths (or
    bare parameter names) found to be the projector; `buffers` lists persistent buffers.
    """

    architecture: str
    params: dict[str, ParamInfo]
    num_blocks: dict[str, int]
    other: list[str]
    modules: dict[str, str] = field(default_factory=dict)
    block_lists: dict[str, str] = field(default_factory=dict)
    buffers: list[str] = field(default_factory=list)
    projector: list[str] = field(default_factory=list)

    def by_component(self, component: str) -> list[ParamInfo]:
        """The parameters of `component`, in `named_parameters()` order."""
        if component not in COMPONENTS:
            raise LayoutError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
        return [p for p in self.params.values() if p.component == component]

    def resolve(self, name: str) -> ParamInfo:
        """The ParamInfo of `name`, also when `name` is a tied alias of a canonical name."""
        if name in self.params:
            return self.params[name]
        for info in self.params.values():
            if name in info.ties:
                return info
        raise LayoutError(f"{self.architecture} has no parameter {name!r}")

    @property
    def ties(self) -> dict[str, tuple[str, ...]]:
        """Canonical name → its other names, for tied tensors only."""
        return {n: p.ties for n, p in self.params.items() if p.ties}

    def summary(self) -> dict:
        """Per component: blocks, tensors, parameters (elements), dtypes and bytes.

        Example:
            >>> from vlmexp.zoo.tiny import build
            >>> discover(build("llava")).summary()["language"]["blocks"]
            2
        """
        out: dict[str, dict[str, Any]] = {}
        for comp in COMPONENTS:
            infos = self.by_component(comp)
            out[comp] = {
                "blocks": self.num_blocks.get(comp, 0),
                "tensors": len(infos),
                "parameters": sum(p.numel for p in infos),
                "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in infos}),
                "bytes": sum(p.nbytes for p in infos),
            }
        return out


def _is_under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _rel(name: str, prefix: str) -> str:
    return name if prefix == "" else name[len(prefix) + 1:]


def _config_module(model: nn.Module, config: Any, *, skip_root: bool) -> str | None:
    """Path of the shallowest submodule whose `.config` is `config` (identity, then equality)."""
    for same in (lambda c: c is config, lambda c: c == config):
        found = [n for n, m in model.named_modules()
                 if getattr(m, "config", None) is not None and same(m.config)]
        if skip_root and len(found) > 1:
            found = [n for n in found if n != ""]
        if found:
            return min(found, key=lambda n: (0 if n == "" else n.count(".") + 1))
    return None


def _block_list(module: nn.Module) -> tuple[str, int] | None:
    """(relative path, length) of the ModuleList holding most parameters inside `module`."""
    best: tuple[int, str, int] | None = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > 0:
            size = sum(p.numel() for p in sub.parameters())
            if size > 0 and (best is None or size > best[0]):
                best = (size, name, len(sub))
    return None if best is None else (best[1], best[2])


def _module_of(model: nn.Module, getter: str) -> nn.Module | None:
    try:
        module = getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None
    return module if isinstance(module, nn.Module) else None


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _last_matrix_out(params: list[torch.Tensor]) -> int | None:
    mats = [p for p in params if p.dim() >= 2]
    return int(mats[-1].shape[0]) if mats else None


def _block_width(model: nn.Module, path: str, blocks: str | None) -> int | None:
    """The most common dimension among the first block's parameters (its residual width)."""
    if blocks is None:
        return None
    first = model.get_submodule(f"{path}.{blocks}.0" if path else f"{blocks}.0")
    dims = Counter(d for p in first.parameters() for d in p.shape)
    return dims.most_common(1)[0][0] if dims else None


def _maps_vision_to_text(params: list[torch.Tensor], vision: set[int], text: int) -> bool:
    """A matrix with the text width and a (multiple of a) vision width, or a text-width vector."""
    if len(params) == 1 and params[0].dim() == 1:
        return int(params[0].shape[0]) == text
    for p in params:
        if p.dim() < 2:
            continue
        dims = [int(d) for d in p.shape]
        for i, d in enumerate(dims):
            rest = dims[:i] + dims[i + 1:]
            if d == text and any(r % v == 0 for r in rest for v in vision if v > 0):
                return True
    return False


def discover(model: nn.Module) -> Layout:
    """Place every parameter of `model` into a component, block and depth.

    Example:
        >>> from vlmexp.zoo.tiny import build
        >>> layout = discover(build("qwen2_vl"))
        >>> layout.params["model.visual.merger.mlp.0.weight"].component
        'projector'
        >>> layout.num_blocks["language"], layout.params["model.language_model.norm.weight"].depth
        (2, 1.0)
    """
    arch = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise LayoutError(f"{arch} has no `.config`: cannot find its vision and text parts")
    get_text = getattr(config, "get_text_config", None)
    tcfg = get_text() if callable(get_text) else getattr(config, "text_config", config)
    vcfg = getattr(config, "vision_config", None)

    lm_path = _config_module(model, tcfg, skip_root=True)
    if lm_path is None:
        raise LayoutError(f"{arch}: no submodule carries the text config "
                          f"({type(tcfg).__name__}): cannot find the language model")
    vision_path = None
    if vcfg is not None:
        vision_path = _config_module(model, vcfg, skip_root=True)
        if vision_path is None or vision_path == "":
            raise LayoutError(f"{arch}: no submodule carries the vision config "
                              f"({type(vcfg).__name__}): cannot find the vision tower")
    text_width = getattr(tcfg, "hidden_size", None)
    if not isinstance(text_width, int):
        raise LayoutError(f"{arch}: the text config has no integer hidden_size")

    lm_blocks = _block_list(model.get_submodule(lm_path))
    if lm_blocks is None:
        raise LayoutError(f"{arch}: no ModuleList of blocks in the language model at {lm_path!r}")
    roots = {"language": lm_path}
    block_lists = {"language": lm_blocks[0]}
    num_blocks = dict.fromkeys(COMPONENTS, 0)
    num_blocks["language"] = lm_blocks[1]
    projector_prefixes: list[str] = []
    vision_widths: set[int] = set()
    if vision_path is not None:
        roots["vision"] = vision_path
        vblocks = _block_list(model.get_submodule(vision_path))
        if vblocks is not None:
            block_lists["vision"] = vblocks[0]
            num_blocks["vision"] = vblocks[1]
        # The width of the vision features, read off the blocks: Qwen2-VL's vision_config
        # .hidden_size is the merger's output width, not the blocks'.
        block_width = _block_width(model, vision_path, block_lists.get("vision"))
        if block_width is None:
            block_width = getattr(vcfg, "hidden_size", None)
        vision_widths = {block_width} if isinstance(block_width, int) else set()
        for child, sub in model.get_submodule(vision_path).named_children():
            if vblocks is not None and _is_under(vblocks[0], child):
                continue
            out = _last_matrix_out(list(sub.parameters()))
            if out != text_width:
                continue
            if block_width != text_width or any(k in child for k in _PROJECTOR_NAMES):
                projector_prefixes.append(f"{vision_path}.{child}")

    embed_path = _path_of(model, _module_of(model, "get_input_embeddings"))
    head_path = _path_of(model, _module_of(model, "get_output_embeddings"))
    if embed_path is not None:
        roots["embed"] = embed_path
    if head_path is not None:
        roots["head"] = head_path

    # Every name of every tensor, grouped by identity; the first name is canonical.
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        tensors[id(p)] = p

    placed = [p for p in (lm_path, vision_path) if p is not None]
    ancestors = {n for n, _ in model.named_modules() if any(_is_under(q, n) for q in placed)}

    def outside_group(name: str) -> str:
        # The shallowest module on `name`'s path that is not an ancestor of vision or language.
        parts = name.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix not in ancestors:
                return prefix
        return name  # a bare parameter on an ancestor: its own group

    outside: dict[str, list[str]] = {}

    def place(all_names: list[str]) -> str:
        if any(embed_path is not None and _is_under(n, embed_path) for n in all_names):
            return "embed"
        if any(head_path is not None and _is_under(n, head_path) for n in all_names):
            return "head"
        name = all_names[0]
        if any(_is_under(name, p) for p in projector_prefixes):
            return "projector"
        if vision_path is not None and _is_under(name, vision_path):
            return "vision"
        if _is_under(name, lm_path):
            return "language"
        outside.setdefault(outside_group(name), []).append(name)
        return "?"

    comp_of = {pid: place(ns) for pid, ns in names.items()}
    for group, members in outside.items():
        params = [model.get_parameter(n) for n in members]
        is_proj = vision_path is not None and (
            _maps_vision_to_text(params, vision_widths, text_width)
            or (vision_widths == {text_width} and any(k in group for k in _PROJECTOR_NAMES)))
        if is_proj:
            projector_prefixes.append(group)
        for pid, ns in names.items():
            if ns[0] in members:
                comp_of[pid] = "projector" if is_proj else "other"

    # Blocks and depth, per component, in registration order.
    params: dict[str, ParamInfo] = {}
    first_block: dict[str, int] = {}
    ordered = list(names.items())
    blocks_of: dict[int, int | None] = {}
    for pos, (pid, ns) in enumerate(ordered):
        comp = comp_of[pid]
        block = None
        if comp in block_lists:
            prefix = roots[comp] + "." + block_lists[comp] if roots[comp] else block_lists[comp]
            if _is_under(ns[0], prefix) and ns[0] != prefix:
                block = int(_rel(ns[0], prefix).split(".")[0])
                first_block.setdefault(comp, pos)
        blocks_of[pid] = block
    for pos, (pid, ns) in enumerate(ordered):
        comp, block = comp_of[pid], blocks_of[pid]
        count = num_blocks.get(comp, 0)
        if block is not None:
            depth = block / (count - 1) if count > 1 else 0.0
        elif comp in first_block and pos > first_block[comp]:
            depth = 1.0
        else:
            depth = 0.0
        t = tensors[pid]
        params[ns[0]] = ParamInfo(ns[0], comp, block, depth, tuple(t.shape), t.dtype, tuple(ns[1:]))

    param_names = {n for ns in names.values() for n in ns}
    buffers = [k for k in model.state_dict(keep_vars=True) if k not in param_names]
    return Layout(
        architecture=arch,
        params=params,
        num_blocks=num_blocks,
        other=[n for n, p in params.items() if p.component == "other"],
        modules=roots,
        block_lists=block_lists,
        buffers=buffers,
        projector=projector_prefixes,
    )


@dataclass
class Alignment:
    """How a donor's parameters line up with a base's (see `align`)."""

    kind: str
    mapping: dict[str, str]
    missing: list[str]
    rows: dict[str, int]
    config_diffs: list[str]
    base: str = ""
    donor: str = ""

    def reach(self, layout: Layout) -> dict[str, int]:
        """Component → how many of the base's tensors (`layout`) the donor changes there."""
        counts = Counter(layout.params[n].component for n in self.mapping if n in layout.params)
        return {c: counts[c] for c in COMPONENTS if counts[c]}

    def describe(self, layout: Layout | None = None) -> str:
        """A few lines for people: what maps, what keeps the base's weights, what differs, and
        (given the base's layout) which components the donor can change."""
        what = "same architecture" if self.kind == "same" else "LLM → VLM"
        lines = [f"{what}: {self.donor or 'donor'} → {self.base or 'base'}: "
                 f"{len(self.mapping)} tensors mapped, {len(self.missing)} keep the base's weights"]
        if layout is not None:
            reach = self.reach(layout)
            lines.append("  reaches: " + ", ".join(f"{c} ({n} tensors)" for c, n in reach.items()))
            lines.append("  cannot change: " + (", ".join(
                c for c in COMPONENTS if c not in reach and layout.by_component(c)) or "nothing"))
        if self.missing:
            lines.append(f"  kept from the base: {_first(self.missing)}")
        for name, n in self.rows.items():
            lines.append(f"  {name}: only the first {n} rows come from the donor (vocabulary)")
        for diff in self.config_diffs:
            lines.append(f"  config differs: {diff}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "base": self.base, "donor": self.donor,
                "mapping": self.mapping, "missing": self.missing, "rows": self.rows,
                "config_diffs": self.config_diffs}


def _first(names: list[str], n: int = 3) -> str:
    head = ", ".join(names[:n])
    return head if len(names) <= n else f"{head} and {len(names) - n} more ({len(names)} in all)"


def _align_keys(layout: Layout) -> dict[tuple, str]:
    """Structural key → canonical name, for every name (ties too) of language, embed and head.

    Keys: ("block", i, name inside the block), ("language", name inside the LM outside blocks),
    ("embed", name inside the embedding), ("head", name inside the output head).
    """
    keys: dict[tuple, str] = {}
    lm = layout.modules["language"]
    blocks = f"{lm}.{layout.block_lists['language']}" if lm else layout.block_lists["language"]
    for info in layout.params.values():
        for name in (info.name, *info.ties):
            if "embed" in layout.modules and _is_under(name, layout.modules["embed"]):
                key: tuple = ("embed", _rel(name, layout.modules["embed"]))
            elif "head" in layout.modules and _is_under(name, layout.modules["head"]):
                key = ("head", _rel(name, layout.modules["head"]))
            elif info.component == "language" and _is_under(name, blocks):
                idx, _, inner = _rel(name, blocks).partition(".")
                key = ("block", int(idx), inner)
            elif info.component == "language":
                key = ("language", _rel(name, lm))
            else:
                continue
            keys[key] = info.name
    return keys


def _pair_leftovers(base: dict[tuple, str], donor: dict[tuple, str], section: str,
                    bl: Layout, dl: Layout) -> None:
    """Pair unmatched keys of one section in order when names differ but shapes line up
    (e.g. a final norm called `norm` in one model and `final_layernorm` in the other)."""
    b = [k for k in base if k[0] == section and k not in donor]
    d = [k for k in donor if k[0] == section and k not in base]
    if b and len(b) == len(d) and all(
            bl.params[base[x]].shape == dl.params[donor[y]].shape for x, y in zip(b, d, strict=True)):
        for x, y in zip(b, d, strict=True):
            donor[x] = donor.pop(y)


def _config_value(cfg: Any, key: str) -> Any:
    value = getattr(cfg, key, None)
    if key == "head_dim" and value is None and getattr(cfg, "num_attention_heads", None):
        value = cfg.hidden_size // cfg.num_attention_heads
    if key == "rope_parameters" and isinstance(value, dict):
        value = {k: ({i: j for i, j in v.items() if i not in _ROPE_IGNORED}
                     if isinstance(v, dict) else v)
                 for k, v in value.items() if k not in _ROPE_IGNORED}
    return value


def _config_diffs(base: nn.Module, donor: nn.Module, bl: Layout, dl: Layout,
                  same: bool) -> list[str]:
    diffs = []
    pairs = [("", base.config.get_text_config(), donor.config.get_text_config())]
    if same and getattr(base.config, "vision_config", None) is not None:
        pairs.append(("vision_config.", base.config.vision_config, donor.config.vision_config))
    for prefix, bc, dc in pairs:
        for key in _FUNCTION_KEYS:
            a, b = _config_value(bc, key), _config_value(dc, key)
            if a != b:
                diffs.append(f"{prefix}{key}: {a} vs {b}")
    tied = [any(_is_under(t, lay.modules.get("head", "\0")) for p in lay.params.values()
                for t in p.ties) for lay in (bl, dl)]
    if tied[0] != tied[1]:
        diffs.append(f"tie_word_embeddings: {tied[0]} vs {tied[1]}")
    return diffs


def align(base: nn.Module, donor: nn.Module, *, vocab: str = "error") -> Alignment:
    """Map every base parameter the donor provides to the donor's name for it.

    Same architecture: identity mapping, shapes checked. Text-only LLM donor for a VLM base:
    language blocks by index and name inside the block, the LM's other parameters (final norm)
    by name, embed to embed, head to head (a tied donor head is its embedding); the base's
    vision and projector keep their weights (`missing`). Anything that does not line up raises
    `AlignmentError`. Vocabulary sizes that differ raise unless `vocab="common_rows"`, which
    maps the common leading rows (recorded in `rows`).

    Example:
        >>> from vlmexp.zoo.tiny import build
        >>> a = align(build("llava"), build("llama"))
        >>> a.kind, a.mapping["model.language_model.norm.weight"]
        ('llm_to_vlm', 'model.norm.weight')
    """
    if vocab not in VOCAB_POLICIES:
        raise AlignmentError(f"vocab must be one of {', '.join(VOCAB_POLICIES)}, not {vocab!r}")
    bl, dl = discover(base), discover(donor)
    same = bl.architecture == dl.architecture
    names = f"base {bl.architecture} and donor {dl.architecture}"
    if not same and (dl.by_component("vision") or not bl.by_component("vision")):
        raise AlignmentError(f"{names} differ and are not a text-only LLM donor for a VLM "
                             "base: only same-architecture or LLM → VLM donors line up")
    for comp in ("language", "vision") if same else ("language",):
        if bl.num_blocks[comp] != dl.num_blocks[comp]:
            raise AlignmentError(f"{names}: {comp} blocks differ: "
                                 f"{bl.num_blocks[comp]} vs {dl.num_blocks[comp]}")

    pairs: dict[str, str] = {}
    if same:
        extra = [n for n in dl.params if n not in bl.params]
        lacking = [n for n in bl.params if n not in dl.params]
        if extra:
            raise AlignmentError(f"{names}: donor tensors that map nowhere: {_first(extra)}")
        if lacking:
            raise AlignmentError(f"{names}: base tensors the donor lacks: {_first(lacking)}")
        pairs = {n: n for n in bl.params}
    else:
        bkeys, dkeys = _align_keys(bl), _align_keys(dl)
        for section in ("language", "embed", "head"):
            _pair_leftovers(bkeys, dkeys, section, bl, dl)
        nowhere = sorted({d for k, d in dkeys.items() if k not in bkeys}
                         - {d for k, d in dkeys.items() if k in bkeys})
        if nowhere:
            raise AlignmentError(f"{names}: donor tensors that map nowhere: {_first(nowhere)}")
        conflicts = []
        for key, b in bkeys.items():
            if key not in dkeys:
                continue
            d = dkeys[key]
            if pairs.setdefault(b, d) != d:
                conflicts.append(f"{b} ← {pairs[b]} and {d}")
        if conflicts:
            raise AlignmentError(f"{names}: base tensors tied where the donor's are separate: "
                                 f"{_first(conflicts)}")
        lacking = [n for n, p in bl.params.items()
                   if p.component in ("language", "embed", "head") and n not in pairs]
        if lacking:
            raise AlignmentError(f"{names}: base tensors the donor lacks: {_first(lacking)}")

    rows: dict[str, int] = {}
    bad, vocab_bad = [], []
    for b, d in pairs.items():
        bs, ds = bl.params[b].shape, dl.params[d].shape
        if bs == ds:
            continue
        if (bl.params[b].component in ("embed", "head") and len(bs) == len(ds)
                and bs[1:] == ds[1:]):
            vocab_bad.append((b, d, bs[0], ds[0]))
        else:
            bad.append(f"{b} {list(bs)} vs {d} {list(ds)}")
    if bad:
        raise AlignmentError(f"{names}: shapes differ: {_first(bad)}")
    if vocab_bad:
        b, d, nb, nd = vocab_bad[0]
        if vocab == "error":
            raise AlignmentError(f"{names}: vocabulary sizes differ: base {nb} vs donor {nd} "
                                 f"({b} vs {d}); vocab common_rows (merge.vocab=common_rows, "
                                 f"a recipe's vocab: common_rows) merges the first "
                                 f"{min(nb, nd)} rows")
        rows = {b: min(nb, nd) for b, _, nb, nd in vocab_bad}

    return Alignment(
        kind="same" if same else "llm_to_vlm",
        mapping={n: pairs[n] for n in bl.params if n in pairs},
        missing=[n for n in bl.params if n not in pairs],
        rows=rows,
        config_diffs=_config_diffs(base, donor, bl, dl, same),
        base=bl.architecture,
        donor=dl.architecture,
    )


def inert(component: str, layout: Layout, reach: Mapping[str, int] | None = None,
          donor: str | None = None) -> str | None:
    """Why a merge setting on `component` (for `donor`, whose task vector reaches `reach`)
    cannot change the model, or None when it can.

    Example:
        >>> from vlmexp.zoo.tiny import qwen2_vl
        >>> inert("head", discover(qwen2_vl(tie_word_embeddings=True)))[:48]
        'Qwen2VLForConditionalGeneration has no head tens'
    """
    if component not in COMPONENTS:
        return f"unknown component {component!r} (known: {', '.join(COMPONENTS)})"
    if not layout.by_component(component):
        why = f"{layout.architecture} has no {component} tensors of its own"
        tied_to = sorted({layout.params[n].component for n in layout.ties})
        if component == "head" and "embed" in tied_to:
            why += " (its head is tied to the token embeddings: set the weight on embed)"
        return why + ", so a setting there changes nothing"
    if donor is not None and reach is not None and not reach.get(component):
        reached = ", ".join(c for c in COMPONENTS if reach.get(c)) or "nothing"
        return (f"donor {donor!r} has no tensors aligned with the base's {component} (it "
                f"reaches: {reached}), so a setting there changes nothing")
    return None
