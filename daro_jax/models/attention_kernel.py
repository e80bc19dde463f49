"""Attention of packed rows without its score matrix in HBM: Pallas' TPU splash kernels.

The attention is `layers.attend`'s: softmax(q·kᵀ/√Dh masked)·v over the union of the
rows' own keys and an optional shared key set (a block's prompts, read by its J = R / Bp
consecutive rows), with the masks given by segment ids (`Segments`): query t may read key
s when seg_q[t] = seg_k[s] ≥ 0 (and s ≤ t when causal). Einsum attention writes the
[H, T, S] scores, their exponentials and, in the backward, their gradients to HBM; the
flash algorithm (online softmax over key blocks) keeps them in the TPU's VMEM, one
[block_q, block_kv] tile at a time.

Each key set is one splash attention call (`jax.experimental.pallas.ops.tpu.
splash_attention`: grouped-query heads, segment ids, a causal or full block mask): the
own keys per row [T, S], the shared keys per block with its J rows' queries laid end to
end [J·T, g·P] (the prompts' keys are read once per block, as in the einsum path). The two
partial results merge by their log-sum-exps ℓ₁, ℓ₂ (natural log of Σ_s exp(score)):

    L = log(e^ℓ₁ + e^ℓ₂),   o = e^(ℓ₁ − L)·o₁ + e^(ℓ₂ − L)·o₂.

Splash's own VJP does not differentiate ℓ, so `fused_attend` has its own: with the merged
L and D_t = Σ_d o_td·do_td, each key set's backward is splash's flash backward run with
(L, D) instead of its own (P_ts = exp(s_ts − L_t), dS = P ⊙ (do·vᵀ − D)), which gives that
set's share of dq and its dk, dv exactly; dq = dq₁ + dq₂. That backward is splash's
internal `_splash_attention_bwd` (jax pinned in requirements.txt).

Under a mesh (`sharding.use_mesh`) the kernels run per device in a `shard_map` over the
rows' batch shards and the key/value heads' tensor shards: a custom call is opaque to
XLA's partitioner, which would otherwise gather its operands whole.

Each kernel call runs under a named scope that carries its FLOPs and HBM bytes
(`_KeySet.cost`), which `plan.costs` adds to XLA's counts of the rest.

Entry points: `Segments`, `fused_attend`, `kernel_fits`, `cost_scope`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from daro_jax import sharding

LANES = 128  # splash's key blocks are multiples of the TPU's 128 lanes
KEY_AXES = ("batch", "kv_heads", "head_dim", "cache_length")  # keys: slots last
VALUE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")
QUERY_AXES = ("batch", "length", "kv_heads", None, "head_dim")  # [R, T, KV, G, Dh]
ROW_AXES = ("batch", None)  # segment ids [R or Bp, T or S]
COST_TAG = "kernel_cost"  # named scope of a kernel call's analytic cost (`cost_scope`)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("q", "kv"), meta_fields=("causal",)
)
@dataclasses.dataclass(frozen=True)
class Segments:
    """Which keys each query reads: q [R, T] and kv [R or Bp, S] segment ids; query t of
    row r reads key s of its row (or its group r // J) when q[r, t] = kv[·, s] ≥ 0, and,
    when `causal`, s ≤ t. A negative id marks padding (no key; a query with no key gets a
    meaningless output)."""

    q: jax.Array
    kv: jax.Array
    causal: bool = False

    def allowed(self) -> jax.Array:
        """The dense mask [R, T, S] (kv rows repeated for the J rows of each group)."""
        kv = jnp.repeat(self.kv, self.q.shape[0] // self.kv.shape[0], axis=0)
        out = (self.q[:, :, None] == kv[:, None, :]) & (kv[:, None, :] >= 0)
        if self.causal:
            t, s = out.shape[1:]
            out = out & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
        return out


def _block(n: int) -> int:
    """The largest of 512, 256, 128 that divides n."""
    return next(b for b in (512, 256, 128) if n % b == 0)


@dataclasses.dataclass(frozen=True)
class _KeySet:
    """One splash call's static shape: `heads` query heads, `queries` × `keys` slots."""

    heads: int
    queries: int
    keys: int
    causal: bool
    interpret: bool

    def kernel(self) -> splash.SplashAttentionKernel:
        shape = (self.queries, self.keys)
        one = masks.CausalMask(shape) if self.causal else masks.FullMask(shape)
        bq, bk = _block(self.queries), _block(self.keys)
        sizes = splash.BlockSizes(
            block_q=bq,
            block_kv=bk,
            block_q_dkv=bq,
            block_kv_dkv=bk,
            block_q_dq=bq,
            block_kv_dq=bk,
            k_layout=splash.QKVLayout.SEQ_MINOR,
        )
        return splash.make_splash_mha(
            masks.MultiHeadMask([one] * self.heads),
            block_sizes=sizes,
            save_residuals=True,
            head_shards=1,
            q_seq_shards=1,
            interpret=self.interpret,
        )

    def cost(self, phase: str, batch: int, head_dim: int, itemsize: int) -> str:
        """A named scope that carries this call's FLOPs and HBM bytes for `plan.costs`
        (XLA's cost analysis cannot see into a custom call), counted over the visited
        [bq, bk] blocks, a fraction ρ of all ((n + 1) / 2n of n × n causal blocks):

            fwd: 4·A·Dh FLOPs (q·kᵀ, e·v), A = H·Q·K·ρ score entries; bytes: q and o, ℓ,
                 and k, v re-read by each query head and query block: 2·H·K·Dh·(Q/bq)·ρ;
            bwd: 6·A·Dh (dq kernel: q·kᵀ, do·vᵀ, dS·k) + 8·A·Dh (dk/dv kernel: q·kᵀ,
                 do·vᵀ, eᵀ·do, dSᵀ·q); bytes: the dq kernel reads q, do, ℓ, D and writes
                 dq, re-reading k, v as the forward; the dk/dv kernel reads k, v and writes
                 dk, dv once per query head, re-reading q, do, ℓ, D per key block.
        """
        bq, bk = _block(self.queries), _block(self.keys)
        blocks = self.keys // bk
        rho = (blocks + 1) / (2 * blocks) if self.causal else 1.0
        h, q, k, d, e = self.heads, self.queries, self.keys, head_dim, itemsize
        pairs = h * q * k * rho
        kv_reads = 2 * h * k * d * e * (q / bq) * rho
        if phase == "fwd":
            flops, nbytes, calls = 4 * pairs * d, 2 * h * q * d * e + 4 * h * q + kv_reads, 1
        else:
            dq = 3 * h * q * d * e + 8 * h * q + kv_reads
            dkv = 4 * h * k * d * e + (2 * h * q * d * e + 8 * h * q) * (k / bk) * rho
            flops, nbytes, calls = 14 * pairs * d, dq + dkv, 2
        return cost_scope(batch * flops, batch * nbytes, calls)

    def forward(self, q, k, v, seg):
        """(o [N, H, Q, Dh], ℓ [N, H, Q]) of q [N, H, Q, Dh], k [N, KV, K, Dh], v alike,
        seg (q [N, Q], kv [N, K])."""
        kernel = self.kernel()
        one = lambda q, k, v, sq, sk: kernel(q, k, v, splash.SegmentIds(sq, sk))  # noqa: E731
        with _scope(self.cost("fwd", q.shape[0], q.shape[3], q.dtype.itemsize), q.dtype):
            o, (lse,) = jax.vmap(one)(q, k, v, *seg)
        return o, lse

    def backward(self, q, k, v, seg, o, lse, do):
        """(dq, dk, dv) of this key set given the merged output o and log-sum-exp ℓ."""
        kernel = self.kernel()
        kw = kernel.kwargs

        def one(q, k, v, sq, sk, o, lse, do):
            res = (q, k, v, splash.SegmentIds(sq, sk), None, o, lse)
            res += (kernel.dq_mask_info, kernel.dkv_mask_info)
            grads = splash._splash_attention_bwd(
                False,
                kw["mask_value"],
                kw["is_mqa"],
                kw["block_sizes"],
                None,
                kw["mask_function"],
                None,
                self.interpret,
                res,
                do,
            )
            return grads[3:6]

        with _scope(self.cost("bwd", q.shape[0], q.shape[3], q.dtype.itemsize), q.dtype):
            return jax.vmap(one)(q, k, v, *seg, o, lse, do)


@contextlib.contextmanager
def _scope(name: str, dtype):
    """The cost's named scope; for bfloat16 inputs the kernels' matmuls at the default
    precision (exact products either way; Mosaic refuses a "highest" bfloat16 matmul on
    v5e, which `jax_default_matmul_precision` would otherwise ask for)."""
    with jax.named_scope(name):
        if dtype == jnp.bfloat16:
            with jax.default_matmul_precision("default"):
                yield
        else:
            yield


def cost_scope(flops: float, nbytes: float, calls: int) -> str:
    """The named-scope text that `plan.costs` reads off a custom call's op_name: `calls`
    custom calls made under it share `flops` FLOPs and `nbytes` HBM bytes."""
    return f"{COST_TAG}[flops={flops:.0f},bytes={nbytes:.0f},calls={calls}]"


def _to_sets(sets, q, o=None, lse=None):
    """Rows layout [R, H, T, ·] → each key set's [N, H, Q, ·] (the shared set's J rows
    end to end), for q (and o, ℓ)."""
    out = []
    for _, groups in sets:

        def regroup(x, groups=groups):  # [R, H, T, ...] -> [Bp, H, J·T, ...]
            r, h, t = x.shape[:3]
            x = x.reshape(groups, r // groups, h, t, *x.shape[3:]).swapaxes(1, 2)
            return x.reshape(groups, h, r // groups * t, *x.shape[4:])

        fix = (lambda x: x) if groups is None else regroup
        out.append(tuple(fix(x) for x in (q, o, lse) if x is not None))
    return out


def _to_rows(x, rows: int, groups: int | None):
    """Inverse of `_to_sets`' regrouping: [Bp, H, J·T, ·] → [R, H, T, ·]."""
    if groups is None:
        return x
    _, h, jt = x.shape[:3]
    x = x.reshape(groups, h, rows // groups, jt * groups // rows, *x.shape[3:]).swapaxes(1, 2)
    return x.reshape(rows, h, jt * groups // rows, *x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _merged(sets, q, kvs, segs):
    return _merged_fwd(sets, q, kvs, segs)[0]


def _merged_fwd(sets, q, kvs, segs):
    rows = q.shape[0]
    os, lses = [], []
    for (key_set, groups), (qs,), (k, v), seg in zip(
        sets, _to_sets(sets, q), kvs, segs, strict=True
    ):
        o, lse = key_set.forward(qs, k, v, seg)
        os.append(_to_rows(o, rows, groups).astype(jnp.float32))
        lses.append(_to_rows(lse, rows, groups))
    total = functools.reduce(jnp.logaddexp, lses)
    out = sum(o * jnp.exp(lse - total)[..., None] for o, lse in zip(os, lses, strict=True))
    out = out.astype(q.dtype)
    return out, (q, kvs, segs, out, total)


def _merged_bwd(sets, res, do):
    q, kvs, segs, out, total = res
    rows, dq, dkvs = q.shape[0], jnp.zeros(q.shape, jnp.float32), []
    parts = _to_sets(sets, q, out, total)
    do_parts = _to_sets(sets, do)
    for (key_set, groups), (qs, o, lse), (dos,), (k, v), seg in zip(
        sets, parts, do_parts, kvs, segs, strict=True
    ):
        dq_set, dk, dv = key_set.backward(qs, k, v, seg, o, lse, dos)
        dq = dq + _to_rows(dq_set, rows, groups).astype(jnp.float32)
        dkvs.append((dk, dv))
    return dq.astype(q.dtype), dkvs, jax.tree.map(lambda _: None, segs)


_merged.defvjp(_merged_fwd, _merged_bwd)


def _segment_ids(seg: Segments):
    """Splash's ids: padding keys −1, padding queries −2, so that none of them match."""
    return jnp.where(seg.q >= 0, seg.q, -2), jnp.where(seg.kv >= 0, seg.kv, -1)


def _attend_local(q, k, v, own: Segments, shared, shared_seg, interpret: bool):
    r, t, kv, g, dh = q.shape
    qh = (q * (1.0 / math.sqrt(dh))).astype(q.dtype).reshape(r, t, kv * g, dh)
    qh = qh.transpose(0, 2, 1, 3)  # [R, H, T, Dh]
    sets = [(_KeySet(kv * g, t, k.shape[3], own.causal, interpret), None)]
    kvs = [(k.swapaxes(2, 3), v)]
    segs = [_segment_ids(own)]
    if shared is not None:
        bp, p = shared[0].shape[0], shared[0].shape[3]
        sets.append((_KeySet(kv * g, r // bp * t, p, shared_seg.causal, interpret), bp))
        kvs.append((shared[0].swapaxes(2, 3), shared[1]))
        sq, sk = _segment_ids(shared_seg)
        segs.append((sq.reshape(bp, r // bp * t), sk))
    out = _merged(tuple(sets), qh, kvs, segs)
    return out.transpose(0, 2, 1, 3).reshape(r, t, kv, g, dh)


def fused_attend(q, k, v, own: Segments, shared=None, shared_seg=None, interpret=False):
    """`layers.attend` on the splash kernels (module docstring): q [R, T, KV, G, Dh], own
    keys k [R, KV, Dh, S] and values v [R, KV, S, Dh] under `own`; shared None or (k [Bp,
    KV, Dh, P], v [Bp, KV, P, Dh]) under `shared_seg`. `interpret` runs the same kernels
    in Pallas' interpreter (any backend). Returns [R, T, KV, G, Dh]."""
    local = functools.partial(_attend_local, interpret=interpret)
    mesh = sharding.active_mesh()
    if mesh is None:
        return local(q, k, v, own, shared, shared_seg)
    spec = lambda names, x: sharding.logical_spec(names, x.shape, mesh)  # noqa: E731
    rows = lambda s: Segments(spec(ROW_AXES, s.q), spec(ROW_AXES, s.kv), s.causal)  # noqa: E731
    in_specs = (spec(QUERY_AXES, q), spec(KEY_AXES, k), spec(VALUE_AXES, v), rows(own))
    if shared is None:
        body = lambda q, k, v, own: local(q, k, v, own, None, None)  # noqa: E731
        args = (q, k, v, own)
    else:
        body, args = local, (q, k, v, own, shared, shared_seg)
        in_specs += ((spec(KEY_AXES, shared[0]), spec(VALUE_AXES, shared[1])), rows(shared_seg))
    out_spec = spec(QUERY_AXES, q)
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(
        *args
    )


def kernel_fits(q_shape, own_slots: int, shared_shape, causal: bool) -> bool:
    """Whether the kernel takes these shapes (q [R, T, KV, G, Dh], S own slots, shared
    keys [Bp, KV, Dh, P] or None): query and key lengths of whole 128-slot blocks (the
    shared set's J·T queries too), a causal own set square (S = T); and under a mesh, its
    batch shards dividing the rows and the shared groups, its tensor axis the key/value
    heads, so that each device holds whole groups."""
    r, t, kv = q_shape[:3]
    lengths = [t, own_slots] + ([] if shared_shape is None else [shared_shape[3]])
    fits = all(n % LANES == 0 for n in lengths) and (own_slots == t or not causal)
    mesh = sharding.active_mesh()
    if mesh is None or not fits:
        return fits
    batch = sharding.batch_shards(mesh)
    groups = r if shared_shape is None else shared_shape[0]
    return r % batch == 0 and groups % batch == 0 and kv % mesh.shape["tensor"] == 0
