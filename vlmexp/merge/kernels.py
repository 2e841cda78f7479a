"""Fused CPU kernels for the merges eager torch cannot make memory-bound.

A weighted sum (task arithmetic, linear, slerp) is one pass per donor in eager torch, plus a
pass that reads the result back for the finite check; `WeightedSums` reads each input once,
streams the result out once and counts its NaN and inf values in the same pass, for all the
tensors of an engine apply in one parallel launch.

A sign-consensus merge (TIES and relatives) is a dozen elementwise operations per entry; in
eager torch each is a pass of its own, so the merge is compute-bound at a few percent of the
memory bandwidth. One numba loop does the whole formula per entry, reading each input once and
writing the result once. Same math, entry for entry, as `methods.task_arithmetic`'s chunked
torch path (which serves GPUs, and CPUs when numba is missing); float64 accumulation.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Sequence

import torch

try:
    import numba
    import numpy as np
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; the torch path stays correct
    numba = None

MIN_ELEMENTS = 1 << 16  # below this the torch path is as fast and needs no compilation


def available(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the fused kernel can take these (contiguous float32 CPU tensors, numba present)."""
    return numba is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
        for t in tensors) and tensors[0].numel() >= MIN_ELEMENTS


if numba is not None:

    _LINE = 16  # float32 entries per 64-byte cache line
    _CHUNK = 1024  # lines a thread claims at a time (64 KiB of output)
    _X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

    def _weighted_sum_ir(context, builder, sig, args, width):  # pragma: no cover - compiled
        """IR for entries j … j+width-1 of job k: out = c_0·base + Σ_i fma(δ_i, c_1+i, ·).

        addrs[k] = (out, base, δ_1 … δ_n) as addresses, coefs[k] = (base_coef, c_1 … c_n) in
        float32: the same float32 operations, in the same order, as torch.mul and one add_
        per donor, so the same bits. Returns how many results are NaN or inf (v - v is 0 for
        a finite v and NaN otherwise). A whole line (width 16) is stored with a non-temporal
        hint: written without first reading the old cache line (write-allocate), so 16 bytes
        of traffic per entry, not 20; its address must be 64-byte aligned.
        """
        addrs_t, coefs_t, _, _, token_t = sig.args
        addrs_v, coefs_v, k, j, _ = args
        i64 = ir.IntType(64)
        addrs_a = context.make_array(addrs_t)(context, builder, value=addrs_v)
        coefs_a = context.make_array(coefs_t)(context, builder, value=coefs_v)
        ty = ir.FloatType() if width == 1 else ir.VectorType(ir.FloatType(), width)

        def coef(col):
            c = builder.load(cgutils.get_item_pointer(context, builder, coefs_t, coefs_a,
                                                      [k, ir.Constant(i64, col)]))
            if width == 1:
                return c
            c = builder.insert_element(ir.Constant(ty, ir.Undefined), c,
                                       ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(c, ir.Constant(ty, ir.Undefined),
                                          ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                      [0] * width))

        def at(col):
            addr = builder.load(cgutils.get_item_pointer(context, builder, addrs_t, addrs_a,
                                                         [k, ir.Constant(i64, col)]))
            return builder.inttoptr(builder.add(addr, builder.mul(j, ir.Constant(i64, 4))),
                                    ty.as_pointer())

        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ty, [ty] * 3),
            "llvm.fma.f32" if width == 1 else f"llvm.fma.v{width}f32")
        v = builder.fmul(builder.load(at(1), align=4), coef(0))
        for i in range(len(token_t)):
            v = builder.call(fma, [builder.load(at(2 + i), align=4), coef(1 + i), v])
        store = builder.store(v, at(0), align=64 if width > 1 else 4)
        bad = builder.fcmp_unordered("!=", builder.fsub(v, v), ir.Constant(ty, None))
        if width == 1:
            return builder.zext(bad, i64)
        store.set_metadata("nontemporal", builder.module.add_metadata(
            [ir.Constant(ir.IntType(32), 1)]))
        return builder.zext(builder.ctpop(builder.bitcast(bad, ir.IntType(width))), i64)

    @intrinsic
    def _line_at(typingctx, addrs, coefs, k, j, token):  # pragma: no cover - compiled
        """Entries j … j+15 of job k (j a line start); how many are NaN or inf."""
        return types.int64(addrs, coefs, k, j, token), (
            lambda context, builder, sig, args: _weighted_sum_ir(context, builder, sig, args,
                                                                 _LINE))

    @intrinsic
    def _entry_at(typingctx, addrs, coefs, k, j, token):  # pragma: no cover - compiled
        """Entry j of job k (before its first whole line or after its last); 1 if NaN/inf."""
        return types.int64(addrs, coefs, k, j, token), (
            lambda context, builder, sig, args: _weighted_sum_ir(context, builder, sig, args, 1))

    @intrinsic
    def _claim(typingctx, counter):  # pragma: no cover - compiled
        """Atomically counter[0] += 1; the old value (the next chunk to do)."""
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, value=args[0])
            return builder.atomic_rmw("add", ary.data, ir.Constant(ir.IntType(64), 1),
                                      "monotonic")

        return types.int64(counter), codegen

    @intrinsic
    def _fence(typingctx):  # pragma: no cover - compiled
        """Orders the streamed stores before what follows: they are weakly ordered, so each
        thread fences them before it reports its part done. On x86 an sfence (a seq_cst
        fence compiles to a locked add there, which need not drain write-combining buffers)."""
        def codegen(context, builder, sig, args):
            if _X86:
                sfence = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
                builder.call(sfence, [])
            else:
                builder.fence("seq_cst")
            return context.get_dummy_value()

        return types.none(), codegen

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _weighted_sums(addrs, coefs, sizes, heads, token, workers):  # pragma: no cover
        # Job k: sizes[k] entries; entries before heads[k] (where out is 64-byte aligned) and
        # after its last whole line are done one by one, its lines in chunks of _CHUNK lines.
        # The threads claim chunks of all the jobs from one counter, so that a thread that
        # starts late, or loses its core to another process, delays the rest by one chunk at
        # most. Returns, per job, how many written values are NaN or inf.
        jobs = sizes.size
        lines = (sizes - heads) // _LINE
        first = np.zeros(jobs + 1, np.int64)  # first[k]: job k's first chunk
        first[1:] = np.cumsum((lines + _CHUNK - 1) // _CHUNK)
        chunk_bad = np.zeros(first[jobs], np.int64)
        counter = np.zeros(1, np.int64)
        for _ in numba.prange(workers):
            c = _claim(counter)
            while c < first[jobs]:
                k = np.searchsorted(first, c, side="right") - 1
                lo = (c - first[k]) * _CHUNK
                bad = 0
                for line in range(lo, min(lo + _CHUNK, lines[k])):
                    bad += _line_at(addrs, coefs, k, heads[k] + line * _LINE, token)
                chunk_bad[c] = bad
                c = _claim(counter)
            _fence()
        bad = np.zeros(jobs, np.int64)
        for k in range(jobs):
            bad[k] = chunk_bad[first[k]:first[k + 1]].sum()
            for j in range(heads[k]):
                bad[k] += _entry_at(addrs, coefs, k, j, token)
            for j in range(heads[k] + lines[k] * _LINE, sizes[k]):
                bad[k] += _entry_at(addrs, coefs, k, j, token)
        return bad

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _merge(out, base, deltas, masks, has_mask, scales, weights, lam, normalize,
               mode):  # pragma: no cover - compiled
        # mode 0: no consensus (a weighted sum, normalised by Σ w_i); 1: elect the sign of
        # Σ w_i s_i δ_i m_i; 2: elect by counting signs. +1 is elected at 0; entries agreeing
        # with it are summed and, when normalize, divided by their weights (0 counts as 1).
        n = len(deltas)
        weight_sum = 0.0
        for i in range(n):
            weight_sum += weights[i]
        for j in numba.prange(out.size):
            total = 0.0
            for i in range(n):
                v = deltas[i][j] * scales[i] * weights[i]
                if has_mask[i] and not masks[i][j]:
                    v = 0.0
                if mode == 2:
                    total += (v > 0) - (v < 0)
                else:
                    total += v
            if mode == 0:
                if normalize and abs(weight_sum) >= 1e-8:
                    total /= weight_sum
                out[j] = base[j] + lam * total
                continue
            elected = 1.0 if total >= 0 else -1.0
            mixed = 0.0
            divisor = 0.0
            for i in range(n):
                v = deltas[i][j] * scales[i] * weights[i]
                if has_mask[i] and not masks[i][j]:
                    v = 0.0
                sign = (v > 0) - (v < 0)
                if sign == elected:
                    mixed += v
                    divisor += weights[i]
            if normalize:
                if divisor == 0:
                    divisor = 1.0
                mixed /= divisor
            out[j] = base[j] + lam * mixed


# One launch at a time: numba's workqueue layer, when a user picks it, aborts the process on
# concurrent launches (its default here, OpenMP, takes them, but this costs nothing).
_LAUNCH = threading.Lock()


def _use_torch_threads() -> None:
    """As many threads as torch uses.

    Numba's default layer here is OpenMP, which binds to torch's own libgomp (one thread pool,
    whose idle threads spin a while before they sleep). Its launches are cheap on an idle
    machine, but when another process holds a core each one may wait a scheduler tick for a
    spinning thread to be preempted: hence one launch per apply for the weighted sums
    (`WeightedSums`). The workqueue layer, whose threads sleep at once, is no cure: waking
    them cost 0.2-0.6 ms per launch on these VMs, and TIES, one launch per tensor, took
    0.64-0.82 s instead of 0.34-0.43 s on an idle machine.
    """
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class WeightedSums:
    """Weighted sums out = base_coef·base + Σ_i coefs_i·δ_i, queued, then run in one launch.

    An engine apply queues every such merge (task arithmetic, linear, slerp) and runs them all
    at once: one parallel launch per apply instead of one per tensor (a launch can cost a
    scheduler tick when another process holds a core, or 0.2-0.6 ms of thread wake-ups with
    sleeping threads, against 0.3 ms of work for a 768x768 tensor). Tensors: contiguous
    float32 on the CPU (see `available`), kept referenced until `run`. Each result has the
    bits of `torch.mul(base, base_coef)` (skipped when it is 1) followed by one
    `add_(δ_i, alpha=coefs_i)` per donor on the CPU: float32 coefficients, one fused
    multiply-add per donor, in donor order.
    """

    def __init__(self) -> None:
        self._jobs: list[tuple[torch.Tensor, torch.Tensor, float, tuple[torch.Tensor, ...],
                               tuple[float, ...]]] = []

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, out: torch.Tensor, base: torch.Tensor, base_coef: float,
            deltas: Sequence[torch.Tensor], coefs: Sequence[float]) -> int:
        """Queue one weighted sum into `out`; its index in `run`'s counts."""
        self._jobs.append((out, base, float(base_coef), tuple(deltas),
                           tuple(float(c) for c in coefs)))
        return len(self._jobs) - 1

    def run(self) -> list[int]:
        """Compute every queued sum; per sum, how many of its values are NaN or inf."""
        counts = [0] * len(self._jobs)
        by_donors: dict[int, list[int]] = {}
        for i, job in enumerate(self._jobs):
            by_donors.setdefault(len(job[3]), []).append(i)
        for n, idx in by_donors.items():
            jobs = [self._jobs[i] for i in idx]
            addrs = np.array([[o.data_ptr(), b.data_ptr(), *(d.data_ptr() for d in ds)]
                              for o, b, _, ds, _ in jobs], dtype=np.int64)
            coefs = np.array([[bc, *cs] for _, _, bc, _, cs in jobs], dtype=np.float32)
            sizes = np.array([o.numel() for o, *_ in jobs], dtype=np.int64)
            # entries before a 64-byte boundary of out (float32 data is 4-byte aligned)
            heads = np.minimum(-addrs[:, 0] % 64 // 4, sizes)
            with _LAUNCH:
                _use_torch_threads()
                # the token's length is the donor count: one compiled specialisation per count
                bad = _weighted_sums(addrs, coefs, sizes, heads, (0,) * n,
                                     numba.get_num_threads())
            for i, b in zip(idx, bad.tolist(), strict=True):
                counts[i] = b
        self._jobs.clear()
        return counts


def weighted_sum(out: torch.Tensor, base: torch.Tensor, base_coef: float,
                 deltas: Sequence[torch.Tensor], coefs: Sequence[float]) -> int:
    """out = base_coef·base + Σ_i coefs_i·δ_i now (see `WeightedSums`); how many are NaN/inf."""
    sums = WeightedSums()
    sums.add(out, base, base_coef, deltas, coefs)
    return sums.run()[0]


def merge(out: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor],
          masks: Sequence[torch.Tensor | None], scales: Sequence[float],
          weights: Sequence[float], *, lam: float, normalize: bool,
          consensus: str | None) -> None:
    """out = base + lam · Σ_i w_i·s_i·(δ_i·m_i) over the entries agreeing with the elected sign
    (all entries without a consensus), divided by the agreeing weights when `normalize`."""
    empty = np.zeros(0, dtype=np.bool_)
    out_np = out.view(-1).numpy()
    # homogeneous tuples (one compiled specialisation per donor count, cached on disk)
    d_list = tuple(d.reshape(-1).numpy() for d in deltas)
    m_list = tuple(m.reshape(-1).numpy() if m is not None else empty for m in masks)
    has_mask = np.array([m is not None for m in masks], dtype=np.bool_)
    with _LAUNCH:
        _use_torch_threads()
        _merge(out_np, base.reshape(-1).numpy(), d_list, m_list, has_mask,
               np.asarray(scales, dtype=np.float64), np.asarray(weights, dtype=np.float64),
               float(lam), bool(normalize), {None: 0, "sum": 1, "count": 2}[consensus])
