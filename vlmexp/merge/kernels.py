"""Fused CPU kernels for the merges eager torch cannot make memory-bound.

A weighted sum (task arithmetic, linear, slerp) is one pass per donor in eager torch, plus a
pass that reads the result back for the finite check; `weighted_sum` reads each input once,
writes the result once and counts its NaN and inf values in the same pass.

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

    @intrinsic
    def _fma(typingctx, a, b, c):  # pragma: no cover - compiled
        """a·b + c rounded once (llvm.fma), as torch's vectorised `add(x, y, alpha=)` does it."""
        if isinstance(a, types.Float) and a == b == c:
            return a(a, b, c), lambda context, builder, sig, args: builder.fma(*args)
        return None

    _LINE = 16  # float32 entries per 64-byte cache line

    def _data(context, builder, aryty, value):  # pragma: no cover - compiled
        return context.make_array(aryty)(context, builder, value=value).data

    @intrinsic
    def _stream_line(typingctx, out, base, base_coef, deltas, coefs, j):  # pragma: no cover
        """out[j:j+16] = base_coef·base + Σ_i coefs_i·δ_i, as vectors; how many are NaN or inf.

        The same float32 operations as the scalar loop (fmul, then llvm.fma per donor), so the
        same bits. The line is stored with a non-temporal hint: written without first reading
        the output's old cache line (write-allocate), 16 bytes of traffic per entry instead
        of 20. out[j] must be 64-byte aligned.
        """
        def codegen(context, builder, sig, args):
            out_t, base_t, _, deltas_t, coefs_t, _ = sig.args
            out_v, base_v, coef_v, deltas_v, coefs_v, j_v = args
            vec = ir.VectorType(ir.FloatType(), _LINE)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{_LINE}f32")

            def splat(x):
                one = builder.insert_element(ir.Constant(vec, ir.Undefined), x,
                                             ir.Constant(ir.IntType(32), 0))
                return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined),
                                              ir.Constant(ir.VectorType(ir.IntType(32), _LINE),
                                                          [0] * _LINE))

            def line(aryty, ary):
                ptr = builder.gep(_data(context, builder, aryty, ary), [j_v])
                return builder.bitcast(ptr, vec.as_pointer())

            v = builder.fmul(builder.load(line(base_t, base_v), align=4), splat(coef_v))
            coef_ptr = _data(context, builder, coefs_t, coefs_v)
            for i, d in enumerate(cgutils.unpack_tuple(builder, deltas_v, len(deltas_t))):
                c = builder.load(builder.gep(coef_ptr, [ir.Constant(ir.IntType(64), i)]))
                v = builder.call(fma, [builder.load(line(deltas_t.dtype, d), align=4),
                                       splat(c), v])
            store = builder.store(v, line(out_t, out_v), align=64)
            store.set_metadata("nontemporal", builder.module.add_metadata(
                [ir.Constant(ir.IntType(32), 1)]))
            bad = builder.fcmp_unordered("!=", builder.fsub(v, v), ir.Constant(vec, None))
            return builder.zext(builder.ctpop(builder.bitcast(bad, ir.IntType(_LINE))),
                                ir.IntType(64))

        if isinstance(coefs, types.Array) and coefs.dtype == types.float32:
            return types.int64(out, base, base_coef, deltas, coefs, j), codegen
        return None

    _X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

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

    @numba.njit(cache=True, nogil=True)
    def _weighted_sum_entries(out, base, base_coef, deltas, coefs, lo, hi):  # pragma: no cover
        bad = 0
        for j in range(lo, hi):
            v = base[j] * base_coef
            for i in range(len(deltas)):
                v = _fma(deltas[i][j], coefs[i], v)
            out[j] = v
            bad += (v - v) != 0  # v - v is 0 for a finite v, NaN for NaN and inf
        return bad

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _weighted_sum(out, base, base_coef, deltas, coefs, head):  # pragma: no cover - compiled
        # float32 throughout, in torch's order: base·base_coef (exact when it is 1), then one
        # fma per donor. Entries before `head` (out[head] is 64-byte aligned) and after the
        # last whole line are done one by one, the lines in parallel chunks of 64 KiB.
        # Returns how many of the written values are NaN or inf.
        n = out.size
        lines = (n - head) // _LINE
        end = head + lines * _LINE
        bad = _weighted_sum_entries(out, base, base_coef, deltas, coefs, 0, head)
        bad += _weighted_sum_entries(out, base, base_coef, deltas, coefs, end, n)
        per_chunk = 1024
        for c in numba.prange((lines + per_chunk - 1) // per_chunk):
            k = 0
            for line in range(c * per_chunk, min(c * per_chunk + per_chunk, lines)):
                k += _stream_line(out, base, base_coef, deltas, coefs, head + line * _LINE)
            _fence()
            bad += k
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


_LAUNCH = threading.Lock()  # one kernel at a time: numba's workqueue layer is not thread-safe
_layer_chosen = False


def _use_torch_threads() -> None:
    """As many threads as torch uses, from a pool whose idle threads sleep rather than spin.

    Numba's default layer on Linux is OpenMP, which here resolves to torch's own libgomp, whose
    threads spin while they wait. When another process holds a core, a parallel loop then ends
    only once a spinning thread is preempted, a scheduler tick later: 8 ms per call instead of
    2.5 (4M entries, another process on one of 2 cores), and task arithmetic on the 307M model
    of benchmarks/merge_speed.py 0.43-1.3 s instead of 0.22-0.24 s. The workqueue layer's
    threads wait on condition variables (and it is fork-safe); it is chosen unless a layer was
    named (NUMBA_THREADING_LAYER or numba.config) before the first launch.
    """
    global _layer_chosen
    if not _layer_chosen:
        if str(numba.config.THREADING_LAYER).lower() == "default":
            numba.config.THREADING_LAYER = "workqueue"
        _layer_chosen = True
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def weighted_sum(out: torch.Tensor, base: torch.Tensor, base_coef: float,
                 deltas: Sequence[torch.Tensor], coefs: Sequence[float]) -> int:
    """out = base_coef·base + Σ_i coefs_i·δ_i in one pass; the number of NaN/inf values written.

    Bit for bit what `torch.mul(base, base_coef)` (skipped when it is 1) followed by one
    `add_(δ_i, alpha=coefs_i)` per donor gives on the CPU: float32 coefficients, one fused
    multiply-add per donor, in donor order.
    """
    # homogeneous tuples (one compiled specialisation per donor count, cached on disk)
    head = min((-out.data_ptr() % 64) // 4, out.numel())  # entries before a 64-byte boundary
    args = (out.view(-1).numpy(), base.reshape(-1).numpy(), np.float32(base_coef),
            tuple(d.reshape(-1).numpy() for d in deltas), np.asarray(coefs, dtype=np.float32),
            head)
    with _LAUNCH:
        _use_torch_threads()
        return int(_weighted_sum(*args))


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
