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

Every operand (the output, the base, the task vectors) is float32, bfloat16 or float16 as it is
stored: the kernels widen what they read to float32 (exact), compute in float32 in registers
and round what they write to the output's dtype as torch rounds (to nearest, ties to even), so
a bf16 or fp16 model is merged in place with no float32 copy of anything, to the bits of the
same merge on float32 copies, cast to its dtype (float16 through F16C's conversions on x86).
The NaN and inf values counted are those written: a finite float32 result that overflows
float16 (±65504) counts.
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


def available(tensors: Sequence[torch.Tensor], dtype: torch.dtype,
              queue: Queue | ForeachQueue | None = None) -> bool:
    """Whether the fused kernels can merge `tensors` (out, base, then the task vectors) with
    math in `dtype`: numba present, `dtype` float32 (the kernels' math), contiguous CPU tensors
    of float32, bfloat16 or float16 (the task vectors all of one), out of MIN_ELEMENTS or more.
    With a `ForeachQueue`: `dtype` float32 and tensors of those dtypes on its one device."""
    if isinstance(queue, ForeachQueue):
        return queue.takes(tensors, dtype)
    return (numba is not None and dtype == torch.float32
            and all(t.device.type == "cpu" and t.dtype in _STORAGE and t.is_contiguous()
                    for t in tensors)
            and len({t.dtype for t in tensors[2:]}) <= 1 and tensors[0].numel() >= MIN_ELEMENTS)


_STORAGE = (torch.float32, torch.bfloat16, torch.float16)


if numba is not None:

    _LINE = 16  # float32 entries per 64-byte cache line
    _CHUNK = 1024  # lines a thread claims at a time (64 KiB of output)
    _X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

    # An operand's storage reaches the compiler as the type of a marker value, so that each
    # combination of storages compiles to its own loads and stores: float32 as itself, the bits
    # of bfloat16 as uint16, those of float16 as int16.
    _MARKERS = {torch.float32: np.float32(0), torch.bfloat16: np.uint16(0),
                torch.float16: np.int16(0)}
    _SIZES = {"f32": 4, "bf16": 2, "f16": 2}

    def _kind(marker) -> str:
        """'f32', 'bf16' or 'f16': the storage a marker's numba type stands for."""
        return {types.float32: "f32", types.uint16: "bf16", types.int16: "f16"}[marker]

    def _vec(item, width):
        return item if width == 1 else ir.VectorType(item, width)

    def _splat(ty, value):
        return ir.Constant(ty, [value] * ty.count if isinstance(ty, ir.VectorType) else value)

    def _stored_type(kind, width):
        return _vec(ir.FloatType() if kind == "f32" else ir.IntType(16), width)

    def _widen_ir(builder, x, kind, width):  # pragma: no cover - compiled
        """Stored values (float32, or the bits of bfloat16 / float16) as float32, exactly."""
        f32 = _vec(ir.FloatType(), width)
        if kind == "f32":
            return x
        if kind == "bf16":  # bfloat16 is the top half of a float32
            i32 = _vec(ir.IntType(32), width)
            return builder.bitcast(builder.shl(builder.zext(x, i32), _splat(i32, 16)), f32)
        return builder.fpext(builder.bitcast(x, _vec(ir.HalfType(), width)), f32)

    def _narrow_ir(builder, v, kind, width):  # pragma: no cover - compiled
        """float32 values rounded to the stored dtype as torch rounds them: to nearest, ties to
        even; an overflow gives inf. bfloat16: a NaN gives 0xFFFF, as torch's CPU cast."""
        if kind == "f32":
            return v
        i16 = _vec(ir.IntType(16), width)
        if kind == "f16":  # (vcvtps2ph with F16C, as torch's cast)
            return builder.bitcast(builder.fptrunc(v, _vec(ir.HalfType(), width)), i16)
        i32 = _vec(ir.IntType(32), width)
        bits = builder.bitcast(v, i32)
        odd = builder.and_(builder.lshr(bits, _splat(i32, 16)), _splat(i32, 1))
        rounded = builder.lshr(builder.add(builder.add(bits, _splat(i32, 0x7FFF)), odd),
                               _splat(i32, 16))
        return builder.select(builder.fcmp_unordered("uno", v, v), _splat(i16, -1),
                              builder.trunc(rounded, i16))

    def _non_finite_ir(builder, s, kind):  # pragma: no cover - compiled
        """Whether stored values are NaN or inf (i1, or a vector of them)."""
        if kind == "f32":  # v - v is 0 for a finite v and NaN otherwise
            return builder.fcmp_unordered("!=", builder.fsub(s, s), ir.Constant(s.type, None))
        exponent = _splat(s.type, 0x7F80 if kind == "bf16" else 0x7C00)  # all ones: inf, NaN
        return builder.icmp_unsigned("==", builder.and_(s, exponent), exponent)

    def _weighted_sum_ir(context, builder, sig, args, line):  # pragma: no cover - compiled
        """IR for job k's entries j … j+width-1 (a whole 64-byte line of out when `line`,
        else entry j alone): out = c_0·base + Σ_i fma(δ_i, c_1+i, ·).

        addrs[k] = (out, base, δ_1 … δ_n) as addresses, coefs[k] = (base_coef, c_1 … c_n) in
        float32: the same float32 operations, in the same order, as torch.mul and one add_
        per donor, so the same bits; the storage markers say how each operand is stored (read
        widened to float32, written rounded). Returns how many written values are NaN or inf.
        A whole line is stored with a non-temporal hint: written without first reading the old
        cache line (write-allocate), so no read of out; its address must be 64-byte aligned.
        """
        addrs_t, coefs_t, _, _, token_t, storage_t = sig.args
        addrs_v, coefs_v, k, j, _, _ = args
        out_kind, base_kind, delta_kind = (_kind(t) for t in storage_t.types)
        width = 64 // _SIZES[out_kind] if line else 1
        i64 = ir.IntType(64)
        addrs_a = context.make_array(addrs_t)(context, builder, value=addrs_v)
        coefs_a = context.make_array(coefs_t)(context, builder, value=coefs_v)
        ty = _vec(ir.FloatType(), width)

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

        def at(col, kind):
            addr = builder.load(cgutils.get_item_pointer(context, builder, addrs_t, addrs_a,
                                                         [k, ir.Constant(i64, col)]))
            addr = builder.add(addr, builder.mul(j, ir.Constant(i64, _SIZES[kind])))
            return builder.inttoptr(addr, _stored_type(kind, width).as_pointer())

        def read(col, kind):
            x = builder.load(at(col, kind), align=_SIZES[kind])
            return _widen_ir(builder, x, kind, width)

        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ty, [ty] * 3),
            "llvm.fma.f32" if width == 1 else f"llvm.fma.v{width}f32")
        v = builder.fmul(read(1, base_kind), coef(0))
        for i in range(len(token_t)):
            v = builder.call(fma, [read(2 + i, delta_kind), coef(1 + i), v])
        s = _narrow_ir(builder, v, out_kind, width)
        store = builder.store(s, at(0, out_kind), align=64 if line else _SIZES[out_kind])
        bad = _non_finite_ir(builder, s, out_kind)
        if width == 1:
            return builder.zext(bad, i64)
        store.set_metadata("nontemporal", builder.module.add_metadata(
            [ir.Constant(ir.IntType(32), 1)]))
        return builder.zext(builder.ctpop(builder.bitcast(bad, ir.IntType(width))), i64)

    @intrinsic
    def _line_at(typingctx, addrs, coefs, k, j, token, storage):  # pragma: no cover - compiled
        """Entries j … j+width-1 of job k (j a line start of out); how many are NaN or inf."""
        return types.int64(addrs, coefs, k, j, token, storage), (
            lambda context, builder, sig, args: _weighted_sum_ir(context, builder, sig, args,
                                                                 True))

    @intrinsic
    def _entry_at(typingctx, addrs, coefs, k, j, token, storage):  # pragma: no cover - compiled
        """Entry j of job k (before its first whole line or after its last); 1 if NaN/inf."""
        return types.int64(addrs, coefs, k, j, token, storage), (
            lambda context, builder, sig, args: _weighted_sum_ir(context, builder, sig, args,
                                                                 False))

    @intrinsic
    def _line_entries(typingctx, storage):  # pragma: no cover - compiled
        """Entries of out in a 64-byte line: 16 of float32, 32 of a 16-bit dtype."""
        entries = 64 // _SIZES[_kind(storage.types[0])]
        return types.int64(storage), (
            lambda context, builder, sig, args: ir.Constant(ir.IntType(64), entries))

    @intrinsic
    def _at(typingctx, addr, start, marker):  # pragma: no cover - compiled
        """A typed pointer to entry `start` of the array at `addr`, stored as `marker` says:
        p[j] reads or writes entry start + j (its address affine in j, which the loop
        vectoriser needs; a pointer made inside the loop would hide it)."""
        size = _SIZES[_kind(marker)]

        def codegen(context, builder, sig, args):
            addr = builder.add(args[0], builder.mul(args[1], ir.Constant(ir.IntType(64), size)))
            return builder.inttoptr(addr, context.get_value_type(sig.return_type))

        return types.CPointer(marker)(addr, start, marker), codegen

    @intrinsic
    def _widen(typingctx, x):  # pragma: no cover - compiled
        """A stored value as float32 (exact)."""
        return types.float32(x), (
            lambda context, builder, sig, args: _widen_ir(builder, args[0], _kind(x), 1))

    @intrinsic
    def _narrow(typingctx, v, marker):  # pragma: no cover - compiled
        """float32 `v` rounded to `marker`'s storage, as torch rounds."""
        return marker(types.float32, marker), (
            lambda context, builder, sig, args: _narrow_ir(builder, args[0], _kind(marker), 1))

    @intrinsic
    def _non_finite(typingctx, s):  # pragma: no cover - compiled
        """1 if the stored value `s` is NaN or inf, else 0."""
        return types.int64(s), (lambda context, builder, sig, args: builder.zext(
            _non_finite_ir(builder, args[0], _kind(s)), ir.IntType(64)))

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
    def _weighted_sums(addrs, coefs, sizes, heads, token, storage,
                       workers):  # pragma: no cover - compiled
        # Job k: sizes[k] entries; entries before heads[k] (where out is 64-byte aligned) and
        # after its last whole line are done one by one, its lines in chunks of _CHUNK lines.
        # The threads claim chunks of all the jobs from one counter, so that a thread that
        # starts late, or loses its core to another process, delays the rest by one chunk at
        # most. Returns, per job, how many written values are NaN or inf.
        jobs = sizes.size
        line = _line_entries(storage)
        lines = (sizes - heads) // line
        first = _chunk_table(lines, _CHUNK)
        chunk_bad = np.zeros(first[jobs], np.int64)
        counter = np.zeros(1, np.int64)
        for _ in numba.prange(workers):
            c = _claim(counter)
            while c < first[jobs]:
                k = np.searchsorted(first, c, side="right") - 1
                lo = (c - first[k]) * _CHUNK
                bad = 0
                for i in range(lo, min(lo + _CHUNK, lines[k])):
                    bad += _line_at(addrs, coefs, k, heads[k] + i * line, token, storage)
                chunk_bad[c] = bad
                c = _claim(counter)
            _fence()
        bad = _per_job(first, chunk_bad)
        for k in range(jobs):
            for j in range(heads[k]):
                bad[k] += _entry_at(addrs, coefs, k, j, token, storage)
            for j in range(heads[k] + lines[k] * line, sizes[k]):
                bad[k] += _entry_at(addrs, coefs, k, j, token, storage)
        return bad

    @intrinsic
    def _u8p(typingctx, addr):  # pragma: no cover - compiled
        """A mask's bytes from its address: p[j] reads entry j."""
        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

        return types.CPointer(types.uint8)(types.int64), codegen

    _BLOCK = 256  # entries a sign merge works on at a time (its inputs stay in the L1 cache)

    @numba.njit(cache=True, nogil=True)
    def _sign_chunk(addrs, masks, coefs, weights, lams, flags, k, lo, hi, token,
                    storage):  # pragma: no cover - compiled
        # Entries lo … hi-1 of job k; how many results are NaN or inf. flags[k] = 2·mode +
        # normalize, mode 0: no consensus (a weighted sum, normalised by Σ w_i); 1: elect the
        # sign of Σ c_i δ_i m_i (c_i = w_i·s_i); 2: elect by counting signs. +1 is elected at
        # 0; entries agreeing with it are summed and, when normalize, divided by their weights
        # (0 counts as 1). float32 arithmetic, as the torch path, on values widened from their
        # storage (storage: out's, base's, the deltas' markers), the result rounded to out's.
        # Block by block, one donor at a time: each inner loop reads one stream with its
        # address and coefficient in registers, so that it vectorises.
        n = len(token)
        out_marker, base_marker, delta_marker = storage
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
                p, mp = _at(addrs[k, 2 + i], start, delta_marker), masks[k, i]
                c = np.float32(coefs[k, i])
                mk = _u8p(mp + start)
                # (loads not behind a condition: a conditional load does not vectorise)
                if mode == 2:
                    if mp != 0:
                        for j in range(m):
                            v = _widen(p[j]) * c
                            v = v if mk[j] != 0 else zero
                            total[j] += np.float32(v > zero) - np.float32(v < zero)
                    else:
                        for j in range(m):
                            v = _widen(p[j]) * c
                            total[j] += np.float32(v > zero) - np.float32(v < zero)
                elif mp != 0:
                    for j in range(m):
                        v = _widen(p[j]) * c
                        total[j] += v if mk[j] != 0 else zero
                else:
                    for j in range(m):
                        total[j] += _widen(p[j]) * c
            b, o = _at(base, start, base_marker), _at(out, start, out_marker)
            if mode == 0:
                for j in range(m):
                    s = _narrow(_widen(b[j]) + lam * total[j], out_marker)
                    o[j] = s
                    bad += _non_finite(s)
                continue
            for j in range(m):
                mixed[j] = zero
                divisor[j] = zero
            for i in range(n):  # the entries agreeing with the elected sign, and their weights
                p, mp = _at(addrs[k, 2 + i], start, delta_marker), masks[k, i]
                c = np.float32(coefs[k, i])
                w = np.float32(weights[k, i])
                mk = _u8p(mp + start)
                if mp != 0:
                    for j in range(m):
                        v = _widen(p[j]) * c
                        v = v if mk[j] != 0 else zero
                        agree = v > zero if total[j] >= zero else v < zero
                        mixed[j] += v if agree else zero
                        divisor[j] += w if agree else zero
                else:
                    for j in range(m):
                        v = _widen(p[j]) * c
                        agree = v > zero if total[j] >= zero else v < zero
                        mixed[j] += v if agree else zero
                        divisor[j] += w if agree else zero
            for j in range(m):
                x = mixed[j]
                if normalize:
                    x = x / (divisor[j] if divisor[j] != zero else one)
                s = _narrow(_widen(b[j]) + lam * x, out_marker)
                o[j] = s
                bad += _non_finite(s)
        return bad

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _sign_merges(addrs, masks, coefs, weights, lams, flags, sizes, token, storage,
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
                                           min(lo + step, sizes[k]), token, storage)
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
    """Fused CPU merges, queued, then run in one parallel launch per kind, donor count and
    storage (the dtypes of out, base and the task vectors).

    An engine apply queues every merge the kernels take and runs them all at once: one launch
    per apply instead of one per tensor (a launch can cost a scheduler tick when another
    process holds a core, or 0.2-0.6 ms of thread wake-ups with sleeping threads, against
    0.3 ms of work for a 768x768 tensor). Tensors: contiguous CPU tensors of float32,
    bfloat16 or float16 (see `available`), kept referenced until `run`; `out` must not overlap
    the inputs unless it is one of them. The math is float32 whatever the storage; out gets
    the float32 result rounded to its dtype as `Tensor.to` rounds it.

    - `weighted_sum` (task arithmetic, linear, slerp): out = base_coef·base + Σ_i coefs_i·δ_i
      with the bits of `torch.mul(base, base_coef)` (skipped when it is 1) followed by one
      `add_(δ_i, alpha=coefs_i)` per donor on the CPU, in float32 (inputs widened exactly),
      then cast to out's dtype: float32 coefficients, one fused multiply-add per donor, in
      donor order.
    - `sign_merge` (TIES and the other sparsified or sign-consensus merges): see there.

    After `run`, `unrounded` maps the index of each merge written in bfloat16 or float16 with
    NaN or inf values to its float32 result before rounding (computed again, on this error
    path only), which tells an overflow of the narrow dtype from a NaN or inf of the math.
    """

    def __init__(self) -> None:
        self._sums: list[tuple[int, torch.Tensor, torch.Tensor, float,
                               tuple[torch.Tensor, ...], tuple[float, ...]]] = []
        self._signs: list[tuple] = []
        # bytes of masks held for queued sign merges (a caller may run the queue early to
        # bound them: masks drawn per apply, as DARE's, live only as long as their job)
        self.mask_bytes = 0
        self.unrounded: dict[int, torch.Tensor] = {}

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
        """Compute every queued merge; per merge, how many of its written values are NaN or
        inf (see `unrounded` for those written narrower than float32)."""
        counts = [0] * len(self)
        for (n, *storage), jobs in _by_kernel(self._sums, 4).items():
            addrs = np.array([[o.data_ptr(), b.data_ptr(), *(d.data_ptr() for d in ds)]
                              for _, o, b, _, ds, _ in jobs], dtype=np.int64)
            coefs = np.array([[bc, *cs] for *_, bc, _, cs in jobs], dtype=np.float32)
            sizes = np.array([job[1].numel() for job in jobs], dtype=np.int64)
            # entries before a 64-byte boundary of out (its data is aligned to its item size)
            heads = np.minimum(-addrs[:, 0] % 64 // storage[0].itemsize, sizes)
            with _LAUNCH:
                _use_torch_threads()
                # the token's length is the donor count, the markers' types the storage: one
                # compiled specialisation per count and storage
                bad = _weighted_sums(addrs, coefs, sizes, heads, (0,) * n, _markers(storage),
                                     numba.get_num_threads())
            for job, b in zip(jobs, bad.tolist(), strict=True):
                counts[job[0]] = b
        for (n, *storage), jobs in _by_kernel(self._signs, 3).items():
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
                                   _markers(storage), numba.get_num_threads())
            for job, b in zip(jobs, bad.tolist(), strict=True):
                counts[job[0]] = b
        self.unrounded = self._unrounded(counts)
        self._sums.clear()
        self._signs.clear()
        self.mask_bytes = 0
        return counts

    def _unrounded(self, counts: list[int]) -> dict[int, torch.Tensor]:
        """The float32 results of the merges written narrower with NaN or inf values (not of
        those written over one of their inputs, which are gone), from one more launch."""
        again, where = Queue(), {}
        for queued, at in ((self._sums, 4), (self._signs, 3)):
            for job in queued:
                index, out, base, *rest = job
                inputs = {base.data_ptr(), *(d.data_ptr() for d in job[at])}
                if counts[index] and out.dtype != torch.float32 and out.data_ptr() not in inputs:
                    where[index] = torch.empty(out.shape, dtype=torch.float32)
                    (again._sums if at == 4 else again._signs).append(
                        (len(again), where[index], base, *rest))
        if where:
            again.run()
        return where


def _markers(storage: Sequence[torch.dtype]) -> tuple:
    """The kernels' storage markers for these dtypes (see _MARKERS)."""
    return tuple(_MARKERS[dtype] for dtype in storage)


def _by_kernel(jobs: list[tuple], at: int) -> dict[tuple, list[tuple]]:
    """Jobs grouped by what their kernel is compiled for: the donor count (len(job[at])) and
    the dtypes of out (job[1]), base (job[2]) and the task vectors."""
    groups: dict[tuple, list[tuple]] = {}
    for job in jobs:
        deltas = job[at]
        key = (len(deltas), job[1].dtype, job[2].dtype,
               deltas[0].dtype if deltas else torch.float32)
        groups.setdefault(key, []).append(job)
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


_FOREACH_PART = 32 << 20  # output entries per part (its float32 copies: 256 MiB at most)


def _parts(jobs: list[tuple], elements: int) -> list[list[tuple]]:
    """`jobs` in runs of about `elements` output entries (a larger job alone)."""
    parts, part, size = [], [], 0
    for job in jobs:
        if part and size + job[1].numel() > elements:
            parts.append(part)
            part, size = [], 0
        part.append(job)
        size += job[1].numel()
    return parts + ([part] if part else [])


class ForeachQueue:
    """Weighted sums (task arithmetic, linear, slerp) queued, then run as multi-tensor torch ops
    (`torch._foreach_*`): the GPU engine's path, a few launches per apply instead of a few per
    tensor (on an H200 a 307M-parameter apply was bound by per-tensor launches, at a few per
    cent of the bandwidth).

    Jobs are grouped by their coefficients, dtypes and device; a group is out = base (scaled),
    then one `_foreach_add_(outs, deltas_i, alpha=c_i)` per donor: the float32 math of
    `Queue`. With bfloat16 or float16 storage the sums run on float32 copies of a part of the
    group (`_foreach_copy_` widens exactly) and are rounded into `out` once: summing in the
    narrow dtype would round after every donor's term (values near 1, as norm weights are,
    then drift by 2^-8 each), and torch's CPU ops round an `alpha` to the tensor's dtype.
    Sign merges (TIES and relatives) are not queued here: they take the chunked torch path.
    `run` returns, per job, how many written values are NaN or inf, from one read back.
    The CPU tests run this path too (`MergeEngine(fused="foreach")`).
    """

    def __init__(self) -> None:
        self._sums: list[tuple[int, torch.Tensor, torch.Tensor, float,
                               tuple[torch.Tensor, ...], tuple[float, ...]]] = []
        self.mask_bytes = 0  # no masks are held here (Queue's interface)
        self.unrounded: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._sums)

    @staticmethod
    def takes(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> bool:
        """Whether `tensors` (out, base, task vectors) can be merged here with math in `dtype`."""
        return (dtype == torch.float32 and len({t.device for t in tensors}) == 1
                and all(t.dtype in _STORAGE for t in tensors))

    def weighted_sum(self, out: torch.Tensor, base: torch.Tensor, base_coef: float,
                     deltas: Sequence[torch.Tensor], coefs: Sequence[float]) -> int:
        """Queue out = base_coef·base + Σ_i coefs_i·δ_i; its index in `run`'s counts."""
        self._sums.append((len(self), out, base, float(base_coef), tuple(deltas),
                           tuple(float(c) for c in coefs)))
        return len(self) - 1

    def run(self) -> list[int]:
        """Compute every queued sum; per job, how many written values are NaN or inf."""
        groups: dict[tuple, list[tuple]] = {}
        for job in self._sums:
            _, out, base, base_coef, deltas, coefs = job
            key = (out.device, out.dtype, base.dtype, tuple(d.dtype for d in deltas), base_coef,
                   coefs)
            groups.setdefault(key, []).append(job)
        for (_, out_dtype, base_dtype, delta_dtypes, base_coef, coefs), jobs in groups.items():
            wide = out_dtype == base_dtype == torch.float32 and all(
                d == torch.float32 for d in delta_dtypes)
            for part in _parts(jobs, _FOREACH_PART):
                outs = [job[1] for job in part]
                # narrower storage: float32 copies of a part, summed, rounded once into out
                acc = outs if wide else [torch.empty(o.shape, dtype=torch.float32,
                                                     device=o.device) for o in outs]
                torch._foreach_copy_(acc, [job[2] for job in part])
                if base_coef != 1.0:
                    torch._foreach_mul_(acc, base_coef)
                scratch = None
                for i, coef in enumerate(coefs):
                    deltas = [job[4][i] for job in part]
                    if delta_dtypes[i] != torch.float32:
                        if scratch is None:
                            scratch = [torch.empty_like(a) for a in acc]
                        torch._foreach_copy_(scratch, deltas)
                        deltas = scratch
                    torch._foreach_add_(acc, deltas, alpha=coef)
                if not wide:
                    torch._foreach_copy_(outs, acc)
        counts = [0] * len(self)
        if self._sums:
            outs = [job[1] for job in self._sums]
            # a NaN or inf anywhere makes the norm non-finite; one read back for every job
            norms = torch.stack(torch._foreach_norm(outs, 1, dtype=torch.float32))
            for job, finite in zip(self._sums, torch.isfinite(norms).tolist(), strict=True):
                if not finite:
                    counts[job[0]] = int((~torch.isfinite(job[1])).sum())
        self._sums.clear()
        return counts
