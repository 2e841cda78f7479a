"""Fused CPU kernels for the merges eager torch cannot make memory-bound.

A weighted sum (task arithmetic, linear, slerp) is one pass per donor in eager torch, plus a
pass that reads the result back for the finite check; the fused kernel reads each input once,
streams the result out once and counts its NaN and inf values in the same pass. `Queue` runs
the merges of all the tensors of an engine apply in one parallel launch.

A sign-consensus merge (TIES and relatives) is a dozen elementwise operations per entry; in
eager torch each is a pass of its own, so the merge is compute-bound at a few percent of the
memory bandwidth. One numba loop does the whole formula per entry, reading each input once and
writing the result once (counting its NaN and inf values too). Same math, entry for entry, as `methods.task_arithmetic`'s chunked
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

    @numba.njit(cache=True, nogil=True)
    def _chunk_table(units, per_chunk):  # pragma: no cover - compiled
        """first[k]: the first chunk of job k (of units[k] units, per_chunk units a chunk);
        first[-1]: how many chunks in all."""
        first = np.zeros(units.size + 1, np.int64)
        first[1:] = np.cumsum((units + per_chunk - 1) // per_chunk)
        return first

    @numba.njit(cache=True, nogil=True)
    def _per_job(first, chunk_counts):  # pragma: no cover - compiled
        """The chunks' counts summed per job."""
        out = np.zeros(first.size - 1, np.int64)
        for k in range(out.size):
            out[k] = chunk_counts[first[k]:first[k + 1]].sum()
        return out

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _weighted_sums(addrs, coefs, sizes, heads, token, workers):  # pragma: no cover
        # Job k: sizes[k] entries; entries before heads[k] (where out is 64-byte aligned) and
        # after its last whole line are done one by one, its lines in chunks of _CHUNK lines.
        # The threads claim chunks of all the jobs from one counter, so that a thread that
        # starts late, or loses its core to another process, delays the rest by one chunk at
        # most. Returns, per job, how many written values are NaN or inf.
        jobs = sizes.size
        lines = (sizes - heads) // _LINE
        first = _chunk_table(lines, _CHUNK)
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
        bad = _per_job(first, chunk_bad)
        for k in range(jobs):
            for j in range(heads[k]):
                bad[k] += _entry_at(addrs, coefs, k, j, token)
            for j in range(heads[k] + lines[k] * _LINE, sizes[k]):
                bad[k] += _entry_at(addrs, coefs, k, j, token)
        return bad

    def _pointer_intrinsic(item):
        @intrinsic
        def pointer(typingctx, addr):  # pragma: no cover - compiled
            def codegen(context, builder, sig, args):
                return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

            return types.CPointer(item)(types.int64), codegen

        return pointer

    # a typed pointer from an integer address: p[j] reads entry j, p[j] = v writes it (its
    # address an affine function of j, which the loop vectoriser needs)
    _f32p = _pointer_intrinsic(types.float32)
    _u8p = _pointer_intrinsic(types.uint8)

    _BLOCK = 256  # entries a sign merge works on at a time (its inputs stay in the L1 cache)

    @numba.njit(cache=True, nogil=True)
    def _sign_chunk(addrs, masks, coefs, weights, lams, flags, k, lo, hi,
                    token):  # pragma: no cover - compiled
        # Entries lo … hi-1 of job k; how many results are NaN or inf. flags[k] = 2·mode +
        # normalize, mode 0: no consensus (a weighted sum, normalised by Σ w_i); 1: elect the
        # sign of Σ c_i δ_i m_i (c_i = w_i·s_i); 2: elect by counting signs. +1 is elected at
        # 0; entries agreeing with it are summed and, when normalize, divided by their weights
        # (0 counts as 1). float32 arithmetic, as the torch path. Block by block, one donor
        # at a time: each inner loop reads one stream with its address and coefficient in
        # registers, so that it vectorises.
        n = len(token)
        zero, one = np.float32(0), np.float32(1)
        mode = flags[k] // 2
        normalize = flags[k] % 2 == 1
        lam = np.float32(lams[k])
        out, base = addrs[k, 0], addrs[k, 1]
        weight_sum = 0.0
        for i in range(n):
            weight_sum += weights[k, i]
        if mode == 0 and normalize and abs(weight_sum) >= 1e-8:
            lam = np.float32(lams[k] / weight_sum)
        total = np.empty(_BLOCK, np.float32)
        mixed = np.empty(_BLOCK, np.float32)
        divisor = np.empty(_BLOCK, np.float32)
        bad = 0
        for start in range(lo, hi, _BLOCK):
            m = min(_BLOCK, hi - start)
            for j in range(m):
                total[j] = zero
            for i in range(n):  # total = Σ c_i δ_i m_i, or Σ sign(c_i δ_i m_i)
                p, mp, c = _f32p(addrs[k, 2 + i] + 4 * start), masks[k, i], np.float32(coefs[k, i])
                mk = _u8p(mp + start)
                # (loads not behind a condition: a conditional load does not vectorise)
                if mode == 2:
                    if mp != 0:
                        for j in range(m):
                            v = p[j] * c
                            v = v if mk[j] != 0 else zero
                            total[j] += np.float32(v > zero) - np.float32(v < zero)
                    else:
                        for j in range(m):
                            v = p[j] * c
                            total[j] += np.float32(v > zero) - np.float32(v < zero)
                elif mp != 0:
                    for j in range(m):
                        v = p[j] * c
                        total[j] += v if mk[j] != 0 else zero
                else:
                    for j in range(m):
                        total[j] += p[j] * c
            b, o = _f32p(base + 4 * start), _f32p(out + 4 * start)
            if mode == 0:
                for j in range(m):
                    r = b[j] + lam * total[j]
                    o[j] = r
                    bad += (r - r) != zero
                continue
            for j in range(m):
                mixed[j] = zero
                divisor[j] = zero
            for i in range(n):  # the entries agreeing with the elected sign, and their weights
                p, mp, c = _f32p(addrs[k, 2 + i] + 4 * start), masks[k, i], np.float32(coefs[k, i])
                w = np.float32(weights[k, i])
                mk = _u8p(mp + start)
                if mp != 0:
                    for j in range(m):
                        v = p[j] * c
                        v = v if mk[j] != 0 else zero
                        agree = v > zero if total[j] >= zero else v < zero
                        mixed[j] += v if agree else zero
                        divisor[j] += w if agree else zero
                else:
                    for j in range(m):
                        v = p[j] * c
                        agree = v > zero if total[j] >= zero else v < zero
                        mixed[j] += v if agree else zero
                        divisor[j] += w if agree else zero
            for j in range(m):
                x = mixed[j]
                if normalize:
                    x = x / (divisor[j] if divisor[j] != zero else one)
                r = b[j] + lam * x
                o[j] = r
                bad += (r - r) != zero
        return bad

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _sign_merges(addrs, masks, coefs, weights, lams, flags, sizes, token,
                     workers):  # pragma: no cover - compiled
        # Job k: out = addrs[k, 0], base = addrs[k, 1], δ_i = addrs[k, 2 + i], mask_i =
        # masks[k, i] (0: none), all of sizes[k] entries. The threads claim chunks of
        # _CHUNK·_LINE entries of all the jobs from one counter, as in _weighted_sums.
        # Returns, per job, how many written values are NaN or inf.
        jobs = sizes.size
        step = _CHUNK * _LINE
        first = _chunk_table(sizes, step)
        chunk_bad = np.zeros(first[jobs], np.int64)
        counter = np.zeros(1, np.int64)
        for _ in numba.prange(workers):
            c = _claim(counter)
            while c < first[jobs]:
                k = np.searchsorted(first, c, side="right") - 1
                lo = (c - first[k]) * step
                chunk_bad[c] = _sign_chunk(addrs, masks, coefs, weights, lams, flags, k, lo,
                                           min(lo + step, sizes[k]), token)
                c = _claim(counter)
        return _per_job(first, chunk_bad)


# One launch at a time: numba's workqueue layer, when a user picks it, aborts the process on
# concurrent launches (its default here, OpenMP, takes them, but this costs nothing).
_LAUNCH = threading.Lock()


def _use_torch_threads() -> None:
    """As many threads as torch uses.

    Numba's default layer here is OpenMP, which binds to torch's own libgomp (one thread pool,
    whose idle threads spin a while before they sleep). Its launches are cheap on an idle
    machine, but when another process holds a core each one may wait a scheduler tick for a
    spinning thread to be preempted: hence one launch per apply (`Queue`). The workqueue
    layer, whose threads sleep at once, is no cure: waking them cost 0.2-0.6 ms per launch on
    these VMs (TIES, then one launch per tensor, took 0.64-0.82 s instead of 0.34-0.43 s on an
    idle machine).
    """
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class Queue:
    """Fused CPU merges, queued, then run in one parallel launch per kind and donor count.

    An engine apply queues every merge the kernels take and runs them all at once: one launch
    per apply instead of one per tensor (a launch can cost a scheduler tick when another
    process holds a core, or 0.2-0.6 ms of thread wake-ups with sleeping threads, against
    0.3 ms of work for a 768x768 tensor). Tensors: contiguous float32 on the CPU (see
    `available`), kept referenced until `run`; `out` must not overlap the inputs unless it is
    one of them.

    - `weighted_sum` (task arithmetic, linear, slerp): out = base_coef·base + Σ_i coefs_i·δ_i
      with the bits of `torch.mul(base, base_coef)` (skipped when it is 1) followed by one
      `add_(δ_i, alpha=coefs_i)` per donor on the CPU: float32 coefficients, one fused
      multiply-add per donor, in donor order.
    - `sign_merge` (TIES and the other sparsified or sign-consensus merges): see there.
    """

    def __init__(self) -> None:
        self._sums: list[tuple[int, torch.Tensor, torch.Tensor, float,
                               tuple[torch.Tensor, ...], tuple[float, ...]]] = []
        self._signs: list[tuple] = []
        # bytes of masks held for queued sign merges (a caller may run the queue early to
        # bound them: masks drawn per apply, as DARE's, live only as long as their job)
        self.mask_bytes = 0

    def __len__(self) -> int:
        return len(self._sums) + len(self._signs)

    def weighted_sum(self, out: torch.Tensor, base: torch.Tensor, base_coef: float,
                     deltas: Sequence[torch.Tensor], coefs: Sequence[float]) -> int:
        """Queue out = base_coef·base + Σ_i coefs_i·δ_i; its index in `run`'s counts."""
        self._sums.append((len(self), out, base, float(base_coef), tuple(deltas),
                           tuple(float(c) for c in coefs)))
        return len(self) - 1

    def sign_merge(self, out: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor],
                   masks: Sequence[torch.Tensor | None], scales: Sequence[float],
                   weights: Sequence[float], *, lam: float, normalize: bool,
                   consensus: str | None) -> int:
        """Queue out = base + lam · Σ_i w_i·s_i·(δ_i·m_i) over the entries agreeing with the
        elected sign (all entries without a consensus), divided by the agreeing weights when
        `normalize`; its index in `run`'s counts. Same math, entry for entry, as
        `methods.task_arithmetic`'s chunked torch path, in float32 (within an ulp or two: the
        coefficient w_i·s_i is one rounding here, two there)."""
        mode = {None: 0, "sum": 1, "count": 2}[consensus]
        masks = tuple(m.reshape(-1).contiguous().to(torch.bool) if m is not None else None
                      for m in masks)
        self.mask_bytes += sum(m.numel() for m in masks if m is not None)
        self._signs.append((len(self), out, base, tuple(deltas), masks,
                            tuple(float(s) * float(w) for s, w in zip(scales, weights,
                                                                      strict=True)),
                            tuple(float(w) for w in weights), float(lam),
                            2 * mode + bool(normalize)))
        return len(self) - 1

    def run(self) -> list[int]:
        """Compute every queued merge; per merge, how many of its values are NaN or inf."""
        counts = [0] * len(self)
        for n, jobs in _by_donor_count(self._sums, 4).items():
            addrs = np.array([[o.data_ptr(), b.data_ptr(), *(d.data_ptr() for d in ds)]
                              for _, o, b, _, ds, _ in jobs], dtype=np.int64)
            coefs = np.array([[bc, *cs] for *_, bc, _, cs in jobs], dtype=np.float32)
            sizes = np.array([job[1].numel() for job in jobs], dtype=np.int64)
            # entries before a 64-byte boundary of out (float32 data is 4-byte aligned)
            heads = np.minimum(-addrs[:, 0] % 64 // 4, sizes)
            with _LAUNCH:
                _use_torch_threads()
                # the token's length is the donor count: one compiled specialisation per count
                bad = _weighted_sums(addrs, coefs, sizes, heads, (0,) * n,
                                     numba.get_num_threads())
            for job, b in zip(jobs, bad.tolist(), strict=True):
                counts[job[0]] = b
        for n, jobs in _by_donor_count(self._signs, 3).items():
            addrs = np.array([[o.data_ptr(), b.data_ptr(), *(d.data_ptr() for d in ds)]
                              for _, o, b, ds, *_ in jobs], dtype=np.int64)
            masks = np.array([[m.data_ptr() if m is not None else 0 for m in job[4]]
                              for job in jobs], dtype=np.int64)
            coefs = np.array([job[5] for job in jobs], dtype=np.float64)
            weights = np.array([job[6] for job in jobs], dtype=np.float64)
            lams = np.array([job[7] for job in jobs], dtype=np.float64)
            flags = np.array([job[8] for job in jobs], dtype=np.int64)
            sizes = np.array([job[1].numel() for job in jobs], dtype=np.int64)
            with _LAUNCH:
                _use_torch_threads()
                bad = _sign_merges(addrs, masks, coefs, weights, lams, flags, sizes, (0,) * n,
                                   numba.get_num_threads())
            for job, b in zip(jobs, bad.tolist(), strict=True):
                counts[job[0]] = b
        self._sums.clear()
        self._signs.clear()
        self.mask_bytes = 0
        return counts


def _by_donor_count(jobs: list[tuple], at: int) -> dict[int, list[tuple]]:
    """Jobs grouped by their donor count (len(job[at])): one compiled kernel per count."""
    groups: dict[int, list[tuple]] = {}
    for job in jobs:
        groups.setdefault(len(job[at]), []).append(job)
    return groups


def weighted_sum(out: torch.Tensor, base: torch.Tensor, base_coef: float,
                 deltas: Sequence[torch.Tensor], coefs: Sequence[float]) -> int:
    """out = base_coef·base + Σ_i coefs_i·δ_i now (see `Queue`); how many are NaN or inf."""
    queue = Queue()
    queue.weighted_sum(out, base, base_coef, deltas, coefs)
    return queue.run()[0]


def merge(out: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor],
          masks: Sequence[torch.Tensor | None], scales: Sequence[float],
          weights: Sequence[float], *, lam: float, normalize: bool,
          consensus: str | None) -> int:
    """`Queue.sign_merge` now; how many of the values written are NaN or inf."""
    queue = Queue()
    queue.sign_merge(out, base, deltas, masks, scales, weights, lam=lam, normalize=normalize,
                     consensus=consensus)
    return queue.run()[0]
