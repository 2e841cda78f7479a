"""The merge engine: one live model, cached task vectors, `apply(recipe)` in place.

The base is loaded once as the live model (on the GPU when there is one), and a pristine copy
of its weights is kept beside it. Each donor is loaded once, aligned with the base by the layout
(LLM → VLM donors included), and reduced to its task vector (donor − base, in the math dtype),
then dropped. `apply` writes the merged weights into the live model's parameters: no second
model is allocated, and only tensors whose value must change are written (a component the
recipe leaves out keeps, or gets back, the base's weights).

Sparsification masks are cached by bytes (`mask_cache_bytes`), with what they need of a task
vector whatever the density (a magnitude histogram, DELLA's ranks), so that a searched density
costs one pass. DARE and DELLA draw from a counter stream keyed by (recipe seed, tensor, donor):
the same masks on any device. Each apply returns the exact weights digest and per-component
fingerprints (float64 sum and norm), which agree across devices within a tolerance.

Example:
    >>> from vlmexp.zoo.tiny import build
    >>> base, donor = build("llava", seed=0), build("llava", seed=1)
    >>> engine = MergeEngine(base, {"ft": donor}, progress=False)
    >>> recipe = Recipe.from_dict({"method": "task_arithmetic", "base": {"path": "b"},
    ...     "donors": [{"name": "ft", "path": "d"}],
    ...     "components": {"projector": {"ft": {"weight": 1.0}}}})
    >>> result = engine.apply(recipe)
    >>> torch.allclose(base.model.multi_modal_projector.linear_1.weight,
    ...                donor.model.multi_modal_projector.linear_1.weight, rtol=0, atol=1e-6)
    True
    >>> sorted(result.fingerprints)  # per component: float64 sum, norm, count
    ['embed', 'head', 'language', 'projector', 'vision']
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from vlmexp.errors import MergeError, RecipeError
from vlmexp.layout import COMPONENTS, Alignment, Layout, ParamInfo, align, discover, inert
from vlmexp.merge import kernels, methods, sparsify
from vlmexp.merge.fingerprint import Fingerprint, fingerprints
from vlmexp.merge.plan import SLAB_ELEMENTS
from vlmexp.merge.recipe import ModelRef, Recipe
from vlmexp.streamed import TRIM_EVERY, StreamedModel, open_streamed, release_freed_memory

if TYPE_CHECKING:
    from vlmexp.checkpoint import ResolvedModel

# masks held for queued merges before the queue is run early (those the cache cannot hold)
_QUEUED_MASK_BYTES = 256 << 20
# float32 elements a task vector is computed in at a time (64 MiB of temporaries each)
_SLAB_ELEMENTS = SLAB_ELEMENTS
_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "float16": torch.float16}
DIGEST_SCHEME = "isum2"


def math_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a recipe's `dtype` (float32, float64, bfloat16, float16)."""
    return _DTYPES[name]


@dataclass
class ApplyResult:
    """What one `apply` did: the weights digest and per-component fingerprints of the result,
    seconds (of the merge, of the digest, of the fingerprints), and how many tensors it wrote."""

    weights_digest: str
    seconds: float
    digest_seconds: float
    written: int
    merged: int
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    fingerprint_seconds: float = 0.0


class _MaskCache:
    """Sparsification masks and their density-independent rankings, LRU by bytes.

    Keys are tuples whose first entry is the kind ("mask" or "ranking"); `hits` and `misses`
    count every lookup, `counts[kind]` those of one kind as [hits, misses].
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.counts: dict[str, list[int]] = {}
        self._entries: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple) -> Any:
        entry = self._entries.get(key)
        count = self.counts.setdefault(key[0], [0, 0])
        if entry is None:
            self.misses += 1
            count[1] += 1
            return None
        self.hits += 1
        count[0] += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: Any) -> None:
        size = _nbytes(entry)
        if size > self.budget:
            return
        while self.used + size > self.budget and self._entries:
            _, old = self._entries.popitem(last=False)
            self.used -= _nbytes(old)
        self._entries[key] = entry
        self.used += size


def _nbytes(entry: Any) -> int:
    if isinstance(entry, torch.Tensor):
        return entry.numel() * entry.element_size()
    return int(entry.nbytes)


class MergeEngine:
    """Holds the live base model and the donors' task vectors; `apply(recipe)` merges in place.

    Args:
        base: the base model (an `nn.Module`, or a `LoadedModel` / folder, opened on `device`).
        donors: name → donor model (`nn.Module`, `LoadedModel` or folder). Donors are aligned with
            the base (same architecture, or a text-only LLM onto the base's language model),
            reduced to task vectors and released.
        device: where the live model and task vectors live; default cuda when available.
        vocab: vocabulary-size policy for donors ("error" or "common_rows", see `layout.align`).
        maps: donor name → expected alignment kind ("same" / "llm_to_vlm"); "auto" accepts any.
        math_dtype: the math dtype of the recipes this engine applies (a recipe says its own).
        vector_dtype: the dtype task vectors are stored in; None: each base tensor's own (a
            bf16 model's task vectors take half the bytes of float32 ones; the kernels do
            their math in float32 either way).
        mask_cache_bytes: memory budget for cached sparsification masks and their rankings.
        progress: show a progress bar while loading donors.
        components: the components a recipe may change (None: all). Pristine base copies and
            task vectors are kept only for their tensors, which is most of the engine's memory
            when a search leaves part of the model alone (e.g. the vision tower); a recipe
            that changes another component is a RecipeError.
        vectors_on, pristine_on: "device" or "host": where task vectors and base copies live
            (`merge.plan` chooses). On the host (pinned memory beside a GPU) each apply copies
            a tensor's inputs to the device as it merges.
        fused: how weighted sums are batched: "auto" (numba kernels on the CPU, multi-tensor
            torch ops elsewhere) or "foreach" (multi-tensor torch ops on any device: the GPU
            path, which the CPU tests run this way).
    """

    def __init__(
        self,
        base: Any,
        donors: Mapping[str, Any] | None = None,
        *,
        device: str | None = None,
        vocab: str = "error",
        maps: Mapping[str, str] | None = None,
        math_dtype: torch.dtype = torch.float32,
        mask_cache_bytes: int = 2 << 30,
        progress: bool = True,
        components: Collection[str] | None = None,
        vector_dtype: torch.dtype | None = None,
        vectors_on: str = "device",
        pristine_on: str = "device",
        fused: str = "auto",
    ) -> None:
        from vlmexp.checkpoint import resolve_device

        self.device = resolve_device(device)
        # see apply: a GPU's finite checks are read back once per apply, not once per tensor
        self._defer_checks = not self.device.startswith("cpu")
        if fused not in ("auto", "foreach"):
            raise MergeError(f"fused: {fused!r}; choose auto or foreach")
        self._foreach = fused == "foreach" or self._defer_checks
        self._fetched_bytes = 0  # host inputs copied to the device for queued merges
        self._pending: list[tuple[str, torch.Tensor]] | None = None
        self._queue: kernels.Queue | None = None  # an apply's queued fused merges
        self._queued: list[str] = []  # the tensors of self._queue's jobs, in order
        self.vocab = vocab
        self.math_dtype = math_dtype
        self.vector_dtype = vector_dtype
        # "base" or a donor's name → where it was opened from (folder, hub commit), when opened
        self.sources: dict[str, ResolvedModel] = {}
        loaded = _as_loaded(base, self.device)
        if getattr(loaded, "source", None) is not None:
            self.sources["base"] = loaded.source
        self.model: torch.nn.Module = loaded.model.to(self.device)
        self.model_device = next(self.model.parameters()).device
        self.processor = getattr(loaded, "processor", None)
        self.layout: Layout = discover(self.model)
        self._params: dict[str, torch.nn.Parameter] = dict(self.model.named_parameters())
        self.components = tuple(c for c in COMPONENTS if components is None or c in components)
        for key, where in (("vectors_on", vectors_on), ("pristine_on", pristine_on)):
            if where not in ("device", "host"):
                raise MergeError(f"{key}: {where!r}; choose device or host")
        self._vector_home = self.device if vectors_on == "device" else "cpu"
        self._fetches = "host" in (vectors_on, pristine_on)  # inputs copied in per tensor
        self._pinned = self.device.startswith("cuda")  # host tensors pinned for async copies
        # pristine copies of what a recipe may change; every other tensor stays the base's
        self._base: dict[str, torch.Tensor] = {
            name: self._keep(self._params[name].detach(), pristine_on)
            for name, info in self.layout.params.items() if info.component in self.components
        }
        self.task_vectors: dict[str, dict[str, torch.Tensor]] = {}
        self.reach: dict[str, dict[str, int]] = {}  # donor -> component -> tensors it changes
        self._input_digests: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._fixed_prints: dict[str, Fingerprint] | None = None  # see fingerprints()
        self.masks = _MaskCache(mask_cache_bytes)
        self._memo: dict[tuple[str, ...], dict[str, Any]] = {}  # per (tensor, donors) statistics
        for name, donor in (donors or {}).items():
            expected = (maps or {}).get(name, "auto")
            self.add_donor(name, donor, map=expected, progress=progress)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_recipe(cls, recipe: Recipe, *, device: str | None = None,
                    check_digests: bool = True, progress: bool = True,
                    trust_remote_code: bool = False, allow_pickle: bool = False) -> MergeEngine:
        """Open the recipe's base and donors (folders, or hub ids at their recorded revisions)
        and check their digests; `trust_remote_code` / `allow_pickle` go to `open_model`."""
        from vlmexp.checkpoint import open_model

        dev = device
        opts = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
        base = open_model(recipe.base.path, revision=recipe.base.revision, device=_cpu_or(dev),
                          **opts)
        engine = cls(base, device=dev, vocab=recipe.vocab, math_dtype=math_dtype_of(recipe.dtype),
                     progress=progress, components={*recipe.components, *recipe.take})
        for ref in recipe.donors:
            engine.add_donor(ref.name, ref.path, revision=ref.revision, map=ref.map,
                             progress=progress, **opts)
        if check_digests:
            engine.check_digests(recipe)
        return engine

    def add_donor(self, name: str, donor: Any, *, map: str = "auto", progress: bool = True,
                  revision: str | None = None, trust_remote_code: bool = False,
                  allow_pickle: bool = False) -> Alignment:
        """Align `donor` with the base and keep its task vector under `name`.

        `donor`: an `nn.Module`, a `LoadedModel`, a `StreamedModel`, or a folder / hub id /
        `ModelRef`, which is read tensor by tensor where it can be (`streamed.open_streamed`), so
        that the whole donor is never held (`revision`, `trust_remote_code`, `allow_pickle` go to
        the opening). Each task vector is donor − base in float32, stored in the base tensor's
        own dtype, or `vector_dtype` when the engine was given one.
        """
        if name == "base" or name in self.task_vectors:
            raise MergeError(f"donor name {name!r} is reserved or already loaded")
        opened = _open_donor(donor, revision=revision, trust_remote_code=trust_remote_code,
                             allow_pickle=allow_pickle)
        if isinstance(opened, StreamedModel):
            donor_model, read = opened.model, opened.read
            self.sources[name] = opened.source
        else:
            donor_model = opened.model
            if getattr(opened, "source", None) is not None:
                self.sources[name] = opened.source
            donor_params = dict(donor_model.named_parameters())

            def read(donor_name: str) -> torch.Tensor:
                return donor_params[donor_name].detach()

        alignment = align(self.model, donor_model, vocab=self.vocab)
        if map != "auto" and alignment.kind != map:
            raise MergeError(f"donor {name!r}: expected a {map} donor, but it aligns as "
                             f"{alignment.kind}")
        vectors: dict[str, torch.Tensor] = {}
        items = [(b, d) for b, d in alignment.mapping.items() if b in self._base]
        since_trim = 0
        for base_name, donor_name in tqdm(items, desc=f"task vector {name}", unit="tensor",
                                          disable=not progress, leave=False):
            vectors[base_name] = self._task_vector(base_name, read(donor_name),
                                                   alignment.rows.get(base_name))
            since_trim += vectors[base_name].nbytes
            if since_trim >= TRIM_EVERY:  # what was read and freed, back to the system
                release_freed_memory()
                since_trim = 0
        self.task_vectors[name] = vectors
        self.reach[name] = alignment.reach(self.layout)
        if isinstance(opened, StreamedModel):
            self._input_digests[name] = opened.weights_sha256()
        else:
            from vlmexp.checkpoint import weights_sha256

            self._input_digests[name] = weights_sha256(donor_model)
        del opened, donor_model, read
        release_freed_memory()
        return alignment

    def _task_vector(self, name: str, donor: torch.Tensor, rows: int | None) -> torch.Tensor:
        """donor − base of tensor `name` (the first `rows` rows only, the rest 0), in float32,
        stored in the base tensor's dtype or the engine's `vector_dtype`, where task vectors
        live. Computed a slab of rows at a time, so that the float32 temporaries stay small
        beside a large tensor (an embedding of 150k rows)."""
        base = self._base[name]
        dtype = self.vector_dtype or base.dtype
        wide = torch.promote_types(base.dtype, torch.float32)
        tv = torch.zeros(base.shape, dtype=dtype, device=self._vector_home,
                         pin_memory=self._pinned and self._vector_home == "cpu")
        rows = base.shape[0] if rows is None else rows
        if base.dim() == 0:
            tv.copy_(donor.to(wide) - base.to(wide))
            return tv
        per_row = max(base[0].numel(), 1)
        step = max(1, _SLAB_ELEMENTS // per_row)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            diff = donor[start:stop].to(self.device, wide, copy=True)  # one temporary per slab
            diff.sub_(base[start:stop].to(self.device))
            tv[start:stop].copy_(diff)
        return tv

    def _keep(self, t: torch.Tensor, where: str) -> torch.Tensor:
        """A copy of `t` on the device or the host (pinned beside a GPU)."""
        if where == "device":
            return t.clone()
        return t.to("cpu", copy=True).pin_memory() if self._pinned else t.to("cpu", copy=True)

    def _fetch(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the merge device (a host tensor's copy, queued without waiting)."""
        if t.device == self.model_device:
            return t
        return t.to(self.model_device, non_blocking=self._pinned)

    # ------------------------------------------------------------------ digests of the inputs
    def input_digest(self, name: str) -> str:
        """sha256 of the weights of the base (`"base"`) or a donor, as `checkpoint.weights_sha256`."""
        if name == "base" and "base" not in self._input_digests:
            from vlmexp.checkpoint import weights_sha256

            # the whole base: pristine copies where kept, else the live tensor (never changed)
            self._input_digests["base"] = weights_sha256(
                {name: self._base.get(name, self._params[name].detach())
                 for name in self.layout.params})
        if name not in self._input_digests:
            raise MergeError(f"no model named {name!r} is loaded")
        return self._input_digests[name]

    def check_digests(self, recipe: Recipe) -> None:
        """Refuse a recipe whose pinned digests do not match the loaded weights."""
        for ref in [recipe.base, *recipe.donors]:
            if not ref.weights_sha256:
                continue
            key = "base" if ref is recipe.base else ref.name
            actual = self.input_digest(key)
            if actual != ref.weights_sha256:
                raise RecipeError(f"{key} ({ref.path}): weights_sha256 {ref.weights_sha256[:12]}… "
                                  f"does not match the loaded weights ({actual[:12]}…)")

    def pin(self, recipe: Recipe) -> Recipe:
        """The recipe with every model's weights_sha256 filled from the loaded weights, and each
        hub id's revision from the commit it was opened at."""
        data = recipe.to_dict()
        data["base"]["weights_sha256"] = self.input_digest("base")
        for d in data["donors"]:
            d["weights_sha256"] = self.input_digest(d["name"])
        pinned = Recipe.from_dict(data)
        return pinned.with_revisions({k: s.revision for k, s in self.sources.items()})

    # ------------------------------------------------------------------ merging
    def apply(self, recipe: Recipe) -> ApplyResult:
        """Write `recipe`'s merge into the live model, in place; return its weights digest.

        Raises MergeError naming the tensor when a merged tensor has a NaN or an inf (the
        model is then reset to the base, so the next apply starts clean).
        """
        self._check_recipe(recipe)
        start = time.perf_counter()
        math_dtype = _DTYPES[recipe.dtype]
        spec = methods.get_spec(recipe.method)
        params = methods.resolve_params(recipe.method, recipe.parameters)
        written = merged = 0
        # On a GPU the finite check of each tensor is a sum left on the device and read once at
        # the end (reading each one back would wait for the device per tensor); on the CPU it
        # runs per tensor, while the tensor is still in cache. On the CPU the fused merges
        # (weighted sums: task arithmetic, linear, slerp; sign merges: TIES and relatives) are
        # queued and run in one parallel launch at the end (or once _QUEUED_MASK_BYTES of
        # masks are held), which counts their NaN and inf values as it writes them.
        self._pending = [] if self._defer_checks else None
        self._queue = kernels.ForeachQueue() if self._foreach else kernels.Queue()
        self._fetched_bytes = 0
        self._queued = []
        try:
            for name, info in self.layout.params.items():
                comp = info.component
                if comp in recipe.take:
                    tv = self.task_vectors[recipe.take[comp]].get(name)
                    if tv is None:
                        raise MergeError(f"take.{comp}: donor {recipe.take[comp]!r} has no "
                                         f"tensor {name}")
                    self._dirty.add(name)
                    param = self._params[name].data
                    taken = self._fetch(self._base[name]).to(math_dtype) + self._fetch(tv)
                    param.copy_(taken)
                    self._check_finite(name, param, source=taken)
                    written += 1
                    continue
                donors = [d for d in recipe.participants(comp) if name in self.task_vectors[d]]
                if not donors:
                    if name in self._dirty:
                        self._params[name].data.copy_(self._base[name])
                        self._dirty.discard(name)
                        written += 1
                    continue
                self._dirty.add(name)
                self._merge_one(recipe, spec, params, info, donors, math_dtype)
                written += 1
                merged += 1
            self._run_queued()
            self._check_pending()
        except MergeError:
            self.reset()
            raise
        finally:
            self._queue, self._queued = None, []  # nor keep a failed apply's tensors alive
        _synchronize(self.device)
        seconds = time.perf_counter() - start
        t0 = time.perf_counter()
        digest = self.weights_digest()
        t1 = time.perf_counter()
        prints = self.fingerprints()
        return ApplyResult(weights_digest=digest, seconds=seconds, digest_seconds=t1 - t0,
                           written=written, merged=merged, fingerprints=prints,
                           fingerprint_seconds=time.perf_counter() - t1)

    def _merge_one(self, recipe: Recipe, spec: methods.MethodSpec, params: dict[str, Any],
                   info: ParamInfo, donors: list[str], math_dtype: torch.dtype) -> None:
        name = info.name
        base = self._fetch(self._base[name])
        deltas = [self._fetch(self.task_vectors[d][name]) for d in donors]
        donor_params = [recipe.resolve(info.component, d, info.depth) for d in donors]
        masks = None
        if spec.sparsification is not None:
            try:
                masks = [self._mask(recipe, spec, name, d, delta, p)
                         for d, delta, p in zip(donors, deltas, donor_params, strict=True)]
            except MergeError as err:
                raise MergeError(f"merged tensor {name}: {err}") from None
        if spec.inputs == "deltas":
            inputs = deltas
        else:
            base_m = base.to(math_dtype)
            inputs = [base_m + delta for delta in deltas]
        memo = self._memo.setdefault((name, *donors), {})
        # on the CPU merge_tensor checks the result itself (the fused kernels count NaN and inf
        # in the pass that writes it, so no second read) or queues it in self._queue; on a GPU
        # the check is deferred
        check_now = self._pending is None
        queued = len(self._queue) if self._queue is not None else 0
        try:
            methods.merge_tensor(recipe.method, base, inputs, donor_params, params,
                                 masks=masks, dtype=math_dtype,
                                 out=self._params[name].data, memo=memo, check_finite=check_now,
                                 batch=self._queue)
        except MergeError as err:
            raise MergeError(f"merged tensor {name}: {err}") from None
        if self._queue is not None and len(self._queue) > queued:
            self._queued.append(name)
            # host inputs copied for the queue stay on the device until it runs: bound them
            if self._fetches:
                self._fetched_bytes += sum(
                    t.nbytes for t in (self._base[name],
                                       *(self.task_vectors[d][name] for d in donors))
                    if t.device != self.model_device)
            if (self._queue.mask_bytes >= _QUEUED_MASK_BYTES
                    or self._fetched_bytes >= _QUEUED_MASK_BYTES):
                self._run_queued()
                self._fetched_bytes = 0
        elif not check_now:
            self._check_finite(name, self._params[name].data)

    def _mask(self, recipe: Recipe, spec: methods.MethodSpec, name: str, donor: str,
              delta: torch.Tensor, donor_params: Mapping[str, Any]) -> torch.Tensor | None:
        """Donor's keep-mask of tensor `name`, from the cache when it holds it.

        A mask is a function of the task vector, the donor's sparsification parameters and, for
        DARE and DELLA, the counter stream keyed by (recipe seed, tensor, donor): cached under
        all of them. The density-independent ranking (magnitude histogram, DELLA's ranks) is
        cached per (tensor, donor), so a density not seen before costs one pass, not a top-k.
        """
        p = methods.resolve_donor_params(recipe.method, donor_params)
        if float(p["density"]) >= 1:
            return None
        seed = recipe.seed if spec.random else None
        key = ("mask", name, donor, spec.sparsification, float(p["density"]), p.get("gamma"),
               p.get("epsilon"), seed)
        mask = self.masks.get(key)
        if mask is not None:
            return mask
        ranking = None
        if spec.sparsification != sparsify.RANDOM:
            kind = "ranks" if spec.sparsification == sparsify.RANK_MAGNITUDE_SAMPLING else "hist"
            ranking_key = ("ranking", kind, name, donor)
            ranking = self.masks.get(ranking_key)
            if ranking is None:
                ranking = methods.mask_ranking(recipe.method, delta)
                if ranking is not None:
                    self.masks.put(ranking_key, ranking)
        stream = sparsify.CounterStream.of(recipe.seed, name, donor) if spec.random else None
        mask = methods.sparsify_mask(recipe.method, delta, p, stream=stream, ranking=ranking)
        if mask is not None:
            self.masks.put(key, mask)
        return mask

    def _run_queued(self) -> None:
        """Run the queued merges; MergeError naming the first with a NaN or an inf."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        for index, (name, count) in enumerate(zip(queued, self._queue.run(), strict=True)):
            if count:
                source = self._queue.unrounded.get(index)
                if source is not None:  # written in bf16/fp16: an overflow of it, or a NaN?
                    self._check_finite(name, self._params[name].data, source=source)
                raise MergeError(f"merged tensor {name}: {count} merged values are NaN or inf")

    def _check_finite(self, name: str, t: torch.Tensor,
                      source: torch.Tensor | None = None) -> None:
        """Raise MergeError naming `name` when `t` has a NaN or an inf (on a GPU: at the end);
        `source`: the math-dtype values `t` was cast from, to tell an overflow of `t`'s dtype."""
        if self._pending is not None and t.is_floating_point():
            self._pending.append((name, t.sum(dtype=torch.float32)))
            return
        try:
            methods.assert_finite(t, source=source)
        except MergeError as err:
            raise MergeError(f"merged tensor {name}: {err}") from None

    def _check_pending(self) -> None:
        pending, self._pending = self._pending, None
        if not pending:
            return
        sums = torch.stack([s.float() for _, s in pending]).cpu().tolist()
        for (name, _), total in zip(pending, sums, strict=True):
            if not math.isfinite(total):
                try:
                    methods.assert_finite(self._params[name].data)
                except MergeError as err:
                    raise MergeError(f"merged tensor {name}: {err}") from None

    def reset(self) -> None:
        """Give every parameter the base's weights back."""
        for name in list(self._dirty):
            self._params[name].data.copy_(self._base[name])
        self._dirty.clear()

    def weights_digest(self) -> str:
        """A cheap digest of the live weights, computed on the device.

        Per tensor, the sum of its raw bits read as 64-bit integers (wrapping, so exact and
        independent of summation order and thread count) and the same over every 7th word; then
        sha256 over names, shapes, dtypes and those sums. Identical weights give identical
        digests; changing any value changes its tensor's sum.
        """
        sums = []
        for name in self.layout.params:
            words = _words(self._params[name].detach())
            sums.append(torch.stack([words.sum(), words[::7].sum()]))
        values = torch.stack(sums).cpu().tolist() if sums else []  # .cpu() waits for the device
        h = hashlib.sha256()
        for (name, info), pair in zip(self.layout.params.items(), values, strict=True):
            h.update(f"{name}|{info.shape}|{info.dtype}|{pair[0]}|{pair[1]};".encode())
        return f"{DIGEST_SCHEME}:{h.hexdigest()}"

    def fingerprints(self) -> dict[str, Fingerprint]:
        """Per component, the float64 sum and L2 norm of the live weights, computed on the device.

        Unlike the digest, these agree across devices and dtypes within
        `fingerprint.TOLERANCE`: `reproduce` compares them where the digest differs.
        """
        if self._fixed_prints is None:  # components no recipe may change: read once
            self._fixed_prints = fingerprints(
                (info.component, self._params[name].detach())
                for name, info in self.layout.params.items()
                if info.component not in self.components)
        changed = fingerprints((info.component, self._params[name].detach())
                               for name, info in self.layout.params.items()
                               if info.component in self.components)
        return {c: ({**self._fixed_prints, **changed})[c] for c in COMPONENTS
                if c in self._fixed_prints or c in changed}

    def _check_recipe(self, recipe: Recipe) -> None:
        missing = [d for d in recipe.donor_names if d not in self.task_vectors]
        if missing:
            raise RecipeError(f"donor {missing[0]!r} is not loaded in this engine "
                              f"(loaded: {', '.join(self.task_vectors) or 'none'})")
        if recipe.vocab != self.vocab:
            raise RecipeError(f"vocab: the recipe asks for {recipe.vocab!r} but the engine aligned "
                              f"its donors with {self.vocab!r}")
        outside = sorted(c for c in {*recipe.components, *recipe.take} if c not in self.components)
        if outside:
            raise RecipeError(f"components.{outside[0]}: this engine keeps base copies and task "
                              f"vectors only for {', '.join(self.components) or 'no component'}")
        for comp, per_donor in recipe.components.items():
            for donor in per_donor:
                why = inert(comp, self.layout, self.reach[donor], donor)
                if why:
                    raise RecipeError(f"components.{comp}.{donor}: {why}")
        for comp, donor in recipe.take.items():
            why = inert(comp, self.layout, self.reach[donor], donor)
            if why:
                raise RecipeError(f"take.{comp}: {why}")

    def state_dict_view(self) -> dict[str, torch.Tensor]:
        """The live parameters by canonical name (no copies)."""
        return {name: self._params[name].detach() for name in self.layout.params}


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as int64 words (a vectorised sum), or wider ints when they don't fit."""
    flat = t.contiguous().reshape(-1)
    if (flat.numel() * flat.element_size()) % 8 == 0:
        return flat.view(torch.int64)
    kind = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.int8}[flat.element_size()]
    return flat.view(kind).to(torch.int64)


def _synchronize(device: str) -> None:
    """Wait for the device's queued work, so that timings count it (cuda runs asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _cpu_or(device: str | None) -> str:
    return device or "cpu"


def _open_donor(obj: Any, *, revision: str | None, trust_remote_code: bool,
                allow_pickle: bool) -> Any:
    """A donor as given (module, LoadedModel, StreamedModel), or opened from a folder, hub id or
    ModelRef: streamed where it can be, else by transformers' loader on the CPU."""
    if isinstance(obj, torch.nn.Module):
        return _Loaded(obj)
    if isinstance(obj, StreamedModel) or hasattr(obj, "model"):
        return obj
    if isinstance(obj, ModelRef):
        obj, revision = obj.path, obj.revision
    from vlmexp.checkpoint import open_model, resolve_model

    source = resolve_model(str(obj), revision, allow_pickle=allow_pickle)
    streamed, _ = open_streamed(source, trust_remote_code=trust_remote_code,
                                allow_pickle=allow_pickle)
    if streamed is not None:
        return streamed
    return open_model(str(obj), revision=revision, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle, load_processor=False)


class _Loaded:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.processor = None


def _as_loaded(obj: Any, device: str) -> Any:
    """An nn.Module, a LoadedModel, a ModelRef or a folder → something with .model/.processor."""
    if isinstance(obj, torch.nn.Module):
        return _Loaded(obj)
    if hasattr(obj, "model"):
        return obj
    from vlmexp.checkpoint import open_model

    if isinstance(obj, ModelRef):
        return open_model(obj.path, revision=obj.revision, device=device)
    return open_model(str(obj), device=device)
