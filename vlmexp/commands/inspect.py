"""`python -m vlmexp inspect MODEL [DONOR ...] [--json]`: a model's layout, and how donors align.

For MODEL: its components (blocks, tensors, bytes; a component with no tensors of its own, such
as the head of a model that ties it to its embeddings, cannot be merged) and its tied tensors.
For each DONOR: how it aligns (same architecture, or a text-only LLM onto the language model),
which components of MODEL it reaches and which it cannot change.

MODEL and DONOR are model folders or hub ids (`org/name[@revision]`, through the Hugging Face
cache), opened with `vlmexp.checkpoint.open_model` (safetensors only unless --allow-pickle), or
`tiny:NAME`, a built-in tiny random model from `vlmexp.zoo.tiny` (nothing on disk needed).

Example:
    $ python -m vlmexp inspect tiny:llava tiny:llama
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from vlmexp.commands import add_model_flags
from vlmexp.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from vlmexp.layout import Alignment, Layout

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="show a model's components and blocks; with donors, what each can change",
        description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL", help="model folder, hub id or tiny:NAME")
    p.add_argument("others", metavar="DONOR", nargs="*",
                   help="donors: report how each aligns with MODEL and what it can change")
    p.add_argument("--vocab", default="error",
                   help="when vocabulary sizes differ: error (refuse, the default) or "
                        "common_rows (share the common rows); see vlmexp.layout.VOCAB_POLICIES")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plan", action="store_true",
                   help="print the merge engine's memory plan instead, from the models' configs "
                        "alone (no weight is read)")
    p.add_argument("--components", default=None, metavar="C1,C2",
                   help="with --plan: the components recipes may change (default: all)")
    p.add_argument("--device", default="auto", help="with --plan: the merge device (default auto)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="with --plan: the memory the engine may use, e.g. 80GB (default: what "
                        "is free on the device now); with it, --device cuda plans for a GPU "
                        "this machine does not have")
    p.add_argument("--placement", default=None, choices=("auto", "device", "host"),
                   help="with --plan on a GPU: where task vectors and base copies live (default "
                        "auto: the device while they fit, else the host)")
    p.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="with --plan on a GPU: the host memory free beside it (default: this "
                        "machine's)")
    add_model_flags(p)
    p.set_defaults(run=run)


def load(spec: str, *, trust_remote_code: bool = False, allow_pickle: bool = False
         ) -> torch.nn.Module:
    """The model named by `spec`: `tiny:NAME` builds a tiny random one, else a folder or hub id
    is opened."""
    from vlmexp.zoo import is_tiny, open_tiny

    if is_tiny(spec):
        return open_tiny(spec, with_processor=False)[0]
    from vlmexp.checkpoint import open_model

    return open_model(spec, load_processor=False, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle).model


def layout_dict(spec: str, layout: Layout) -> dict[str, Any]:
    return {
        "model": spec,
        "architecture": layout.architecture,
        "components": layout.summary(),
        "other": layout.other,
        "ties": {k: list(v) for k, v in layout.ties.items()},
        "buffers": layout.buffers,
        "modules": layout.modules,
        "projector": layout.projector,
        "params": {n: {"component": p.component, "block": p.block, "depth": p.depth,
                       "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                       "ties": list(p.ties)}
                   for n, p in layout.params.items()},
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_layout(spec: str, layout: Layout) -> str:
    from vlmexp.layout import COMPONENTS, inert

    lines = [f"{spec}: {layout.architecture}",
             f"  {'component':<10} {'blocks':>6} {'tensors':>8} {'parameters':>12}  "
             f"{'dtype':<10} {'bytes':>10}  module"]
    for comp, s in layout.summary().items():
        where = layout.modules.get(comp, "")
        if comp == "projector":
            where = ", ".join(layout.projector)
        lines.append(f"  {comp:<10} {s['blocks']:>6} {s['tensors']:>8} {s['parameters']:>12,}  "
                     f"{','.join(s['dtypes']) or '-':<10} {_size(s['bytes']):>10}  {where}")
    for name, ties in layout.ties.items():
        lines.append(f"  tied: {name} = {', '.join(ties)}")
    empty = [c for c in COMPONENTS if c != "other" and inert(c, layout)]
    if empty:
        lines.append(f"  cannot be merged: {', '.join(empty)} (no tensors of its own)")
    lines.append(f"  other: {', '.join(layout.other) if layout.other else 'none'}")
    if layout.buffers:
        lines.append(f"  persistent buffers (not merged): {', '.join(layout.buffers)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from vlmexp.config import check_device

    if args.device is not None and not (args.plan and args.memory_budget is not None):
        check_device(args.device, key="--device")
    from vlmexp.layout import VOCAB_POLICIES, align, discover

    if args.vocab not in VOCAB_POLICIES:
        raise ConfigError(f"--vocab: {args.vocab!r} is not one of {', '.join(VOCAB_POLICIES)}")
    if args.plan:
        return _plan(args)
    for flag in ("components", "memory_budget", "placement", "host_memory"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} goes with --plan")

    opts = {"trust_remote_code": args.trust_remote_code, "allow_pickle": args.allow_pickle}
    model = load(args.model, **opts)
    layout = discover(model)
    layouts = [(args.model, layout)]
    alignments: dict[str, Alignment] = {}
    for spec in args.others:
        other = load(spec, **opts)
        layouts.append((spec, discover(other)))
        alignments[spec] = align(model, other, vocab=args.vocab)
    if args.json:
        out: dict[str, Any] = {"models": [layout_dict(s, lay) for s, lay in layouts]}
        found = {spec: {**a.to_dict(), "reach": a.reach(layout)} for spec, a in alignments.items()}
        if found:
            out["alignments"] = found
        if len(found) == 1:
            out["alignment"] = next(iter(found.values()))
        print(json.dumps(out, indent=2))
    else:
        print("\n\n".join(format_layout(s, lay) for s, lay in layouts))
        for alignment in alignments.values():
            print()
            print(alignment.describe(layout))
    return 0


def _plan(args: argparse.Namespace) -> int:
    """The memory plan of merging the donors into MODEL, from configs alone; the library's
    errors speak of search's config keys, these of inspect's flags."""
    try:
        return _plan_of(args)
    except ConfigError as err:
        text = str(err)
        for key, flag in (("memory_budget:", "--memory-budget:"),
                          ("memory_placement:", "--placement:"),
                          ("search fewer components (space.pin)",
                           "plan fewer components (--components)")):
            text = text.replace(key, flag)
        raise ConfigError(text) from None


def _plan_of(args: argparse.Namespace) -> int:
    from vlmexp.checkpoint import model_skeleton, resolve_device
    from vlmexp.layout import COMPONENTS, align, discover
    from vlmexp.merge.plan import donor_reading_bytes, parse_bytes, plan_memory

    if not args.others:
        raise ConfigError("--plan needs at least one DONOR")
    components = COMPONENTS if args.components is None else [
        c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ConfigError(f"--components: {', '.join(unknown) or 'none given'}: components are "
                          f"{', '.join(COMPONENTS)}")
    opts = {"trust_remote_code": args.trust_remote_code}
    base = model_skeleton(args.model, **opts)
    layout = discover(base)
    reach, sizes = {}, {}
    for spec in args.others:
        donor = model_skeleton(spec, **opts)
        sizes[spec] = donor_reading_bytes(spec, allow_pickle=args.allow_pickle, **opts)
        reach[spec] = align(base, donor, vocab=args.vocab).reach(layout)
    if args.memory_budget is not None and args.device.startswith("cuda"):
        device = args.device  # a GPU elsewhere: its memory is the budget given
    else:
        device = resolve_device(args.device)
    budget = None if args.memory_budget is None else parse_bytes(args.memory_budget)
    host = None if args.host_memory is None else parse_bytes(args.host_memory)
    plan = plan_memory(layout, reach, components, device=device, donor_bytes=sizes,
                       free_bytes=budget, placement=args.placement or "auto",
                       host_free_bytes=host)
    if args.json:
        print(json.dumps({"device": plan.device, "model_bytes": plan.model_bytes,
                          "pristine_bytes": plan.pristine_bytes,
                          "task_vector_bytes": plan.task_vector_bytes,
                          "largest_donor_bytes": plan.largest_donor_bytes,
                          "held_bytes": plan.held_bytes, "peak_bytes": plan.peak_bytes,
                          "vectors_on": plan.vectors_on, "pristine_on": plan.pristine_on,
                          "device_bytes": plan.device_bytes, "host_bytes": plan.host_bytes,
                          "free_bytes": plan.free_bytes,
                          "host_free_bytes": plan.host_free_bytes}, indent=2))
    else:
        print(plan.describe())
    plan.check()
    return 0
