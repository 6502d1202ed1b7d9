"""Pallas kernels for the routed grouped low-rank product (DESIGN.md section 4), forward and backward.

    out[t] = sum_j w[t, j] * scaling[e] * (x[t] @ lora_a[e]) @ lora_b[e],  e = expert_idx[t, j]

Four forward algorithms, all written for Pallas's Triton lowering (GPU) and run with
`interpret=True` on CPU:

* "sorted" (prefill, training). The T*k (token, slot) pairs are laid out in k blocks, block c holding
  every token's c-th smallest adapter; inside a block the tokens are sorted by adapter and every
  adapter's segment is padded to a multiple of the token tile `block_t`, so each tile belongs to one
  adapter (`routing_plan_pallas`: a counting sort in two Pallas launches, block histograms and then
  each element's place; no sort kernel).
  Then
    1. `shrink`: one program per tile, a grouped GEMM x[rows] @ lora_a[e] -> xa [tiles*bt, R]
       (float32, unscaled; R = rank padded to a power of two >= 16; lora_a itself is padded to R
       columns first, `rank_padded`, so that its tiles load R-element rows). With few tiles the
       depth is split over more programs and the parts summed (`shrink_splits`; two parts bound for a
       combo expand of at most 16 column blocks are added by that expand as it loads them);
    2. `expand`, once per block c: one program per (tile, block of d_out), (xa * w * scaling) @
       lora_b[e], scattered by row into out[T, d_out]. In a block every token occurs exactly once,
       so a launch writes each output row once and no atomics are needed; block c > 0 reads the
       rows back and adds (the buffer is aliased from launch to launch).
  Extra memory: O(T*k*R) for xa and the plan; no [T, k, d_in, r] gather, no [T*k, d_out] buffer.
* "decode" (few tokens): no sort. `shrink_decode` computes each pair's x[t] @ lora_a[e] as a
  split-K vector product (grid: pairs x splits), `expand_decode` sums the splits, applies the
  weight and multiplies by the pair's rows of lora_b, summing the k slots in registers.
* "combo" (large T): the sorted path's plan and shrinks, but one expand pass for all k slots
  (`combo_expand`): tokens ordered by the set of adapters they chose, smallest first
  (`combo_plan_pallas`, counting passes on top of the sorted plan, two launches at k = 2), so a
  tile of neighbouring tokens uses a few adapters and each program loops over them, gathering every
  slot's xa row from the pair layout.
  Each output row is written once, where the sorted expand reads, adds and writes it again for every
  slot after the first.
* "dense" (token order, no plan): `dense_shrink` computes x @ A_flat over all L*r flat adapter
  columns (x read once for every slot; split-K with float32 atomics when there are few tokens), and
  `dense_expand` combines all k slots of a token tile in one pass over the output: the routing
  coefficients are built in the kernel from expert_idx / expert_weight / scaling. L/k times the
  sorted path's flops. Chosen only explicitly (`path="dense"`): the "concat" grad path below does
  the same products faster.

Which path runs is chosen twice (`Config.path`, `Config.grad_path`): the primal path when the call is
not differentiated, and the path whose forward saves residuals for the backward when it is. Under
differentiation there is one more path, "concat" (`grouped_lora_xla.concat_forward` /
`concat_backward`): the dense products as four plain XLA GEMMs over every adapter's weights side
by side (A_cat [d_in, L*r], B_cat [L*r, d_out]), compute-dtype operands with float32 accumulation.
No Pallas kernel: the library GEMMs beat ours there. `auto_grad_path` picks decode for up to 16
tokens, then concat while T * L * r is small enough that its L/k-fold flops cost less than the sorted
path's plan and per-slot passes (from 4096 tokens only at r <= 8; from 256 tokens not at r >= 64),
then combo (from 4096 tokens, or at r <= 16; never above r = 64) or sorted.

Backward of the sorted path (custom VJP, through the sorted plan): with g = d out,
    gB   = g[rows] @ lora_b[e]^T                (`shrink` with the weight read transposed)
    dx   = sum_j (w s gB) @ lora_a[e]^T           (`expand` with the weight read transposed;
                                                   the combo path: `combo_expand`)
    dw   = s * <xa, gB>,  dscaling = sum w <xa, gB>   (<xa, gB>, times s in gate training, from the dx
                                                   expand's first column block, then at most one small
                                                   XLA op; without dx, XLA on [T*k, R])
    dA[e] = x[rows]^T (w s gB),  dB[e] = (w s xa)^T g[rows]   (`tgmm`, per adapter and block)
Backward of the decode path (`decode_backward`): the same gB and dx per (token, slot) pair, with
the decode kernels reading the weight transposed; the dx kernel also returns <xa, gB> per pair, so
d expert_weight costs no launch of its own; dA / dB as two small XLA GEMMs when asked for.
Backward of the dense path (`dense_backward`): gB = g @ B_flat^T (dense shrink, transposed weight),
dx = (coef gB) @ A_flat^T (dense expand), dw / dscaling from <xa, gB> per selected adapter (XLA, with
the forward's saved xa), dA / dB as two XLA GEMMs when asked for.
Each gradient is computed only when its input is perturbed: the VJP uses `symbolic_zeros=True`, so
the forward rule knows which of x / lora_a / lora_b / scaling / expert_weight are being
differentiated. In MeteoRA the LoRAs are frozen (not differentiated), so dA/dB are skipped; in
MixLoRA, differentiating w.r.t. lora_a/lora_b makes them appear. `jax.lax.stop_gradient` on an
input also switches its gradient off.

Out-of-range handling: every load and store inside the kernels is masked, with integer-array
indices (gather/scatter style) so that interpret mode drops out-of-range stores exactly like the
GPU does; padding rows carry the sentinel token index T.

This module holds the path choice, the custom VJP and the entry point; the kernels live with their
path: `grouped_lora_plan_pallas` (the sorted and combo plans; `grouped_lora_plan` holds their XLA
references), `grouped_lora_sorted` (shrink, expand, combo expand, tgmm), `grouped_lora_decode`,
`grouped_lora_dense_pallas`, and `pallas_common` (the helpers they share).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pallas_kernels.grouped_lora_decode import decode_backward, forward_decode
from pallas_kernels.grouped_lora_dense_pallas import dense_backward, dense_forward
from pallas_kernels.grouped_lora_plan import combo_plan, routing_plan, row_coef
from pallas_kernels.grouped_lora_plan_pallas import combo_plan_pallas, routing_plan_pallas
from pallas_kernels.grouped_lora_sorted import (
    combo_expand,
    combo_expand_adds_parts,
    expand,
    shrink,
    summed_parts,
    tgmm,
)
from pallas_kernels.grouped_lora_xla import (
    concat_backward,
    concat_forward,
    concat_weights,
    dense_routing_weights,
    routing_grads,
)
from pallas_kernels.pallas_common import pow2_at_least

# ------------------------------------------------------------------------------------------------
# The "concat" gradient path (plain XLA GEMMs)
# ------------------------------------------------------------------------------------------------


def _concat_fwd(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg, need):
    """Forward of the "concat" grad path: `grouped_lora_xla.concat_forward`, two XLA GEMMs over
    every adapter side by side."""
    weights = dense_routing_weights(expert_idx, expert_weight, scaling)
    a_cat, b_cat = concat_weights(lora_a, lora_b)
    out, h = concat_forward(x, a_cat, b_cat, weights, base if cfg.has_base else None)
    res = dict(a_cat=a_cat, b_cat=b_cat, weights=weights, h=h, s=scaling, idx=expert_idx,
               w=expert_weight, need=need)
    if "a" in need:
        res["x"] = x
    return out, res


def _concat_bwd(res, g, need):
    a_cat, b_cat, scaling = res["a_cat"], res["b_cat"], res["s"]
    num_adapters = scaling.shape[0]
    depth, rank, width = a_cat.shape[0], a_cat.shape[1] // num_adapters, b_cat.shape[1]
    want = (need & {"x", "a", "b"}) | ({"weights"} if need & {"s", "w"} else set())
    # Without d scaling, d expert_weight = scaling * <xa, gB> comes out of the reduction itself.
    scaled = "s" not in need
    dx, da, db, raw = concat_backward(g.astype(a_cat.dtype), res.get("x"), a_cat, b_cat, res["weights"],
                                      res["h"], want, expert_idx=res["idx"],
                                      adapter_scale=scaling if scaled else None)
    if da is not None:
        da = da.reshape(depth, num_adapters, rank).transpose(1, 0, 2)
    if db is not None:
        db = db.reshape(num_adapters, rank, width)
    ds = dw = None
    if raw is not None and scaled:  # [T, k]: scaling[e] <xa, gB>, d expert_weight itself
        dw = raw.astype(res["w"].dtype)
    elif raw is not None:  # [T, k]: <xa, gB> per (token, slot) pair
        ds, dw = routing_grads(raw, res["idx"], res["w"], scaling, need)
    return dx, da, db, ds, dw


# ------------------------------------------------------------------------------------------------
# Forward / backward with custom VJP
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel choices (hashable; a `nondiff_argnums` argument of the custom VJP)."""

    path: str  # forward path when not differentiated: "sorted", "combo", "dense" or "decode"
    grad_path: str  # forward + backward path under differentiation: "concat", "sorted", "combo", "dense", "decode"
    block_t: int
    block_k: int
    block_n: int
    block_n_tgmm: int
    block_k_decode: int  # the decode path's x @ lora_a shrink: depth chunk
    block_k_decode_grad: int  # its backward's g @ lora_b^T shrink: depth chunk
    block_n_decode: int  # its dx expand: column block
    block_n_decode_out: int  # its forward expand: column block
    block_t_dense: int
    block_c_dense: int
    block_k_dense: int
    block_t_combo: int
    block_n_combo: int
    dx_dots: bool  # the sorted / combo dx expand also returns the pairs' <xa, gB> (d expert_weight)
    plan: str  # "pallas" (`grouped_lora_plan_pallas`) or "xla" (its references in `grouped_lora_plan`)
    interpret: bool
    poison: bool
    has_base: bool


def _routing_plans(expert_idx, expert_weight, scaling, num_adapters, cfg, combo):
    """The sorted plan, its rows' coefficients and (with combo) the combo plan: from the Pallas plan
    kernels, or with cfg.plan == "xla" from their plain-XLA references (the same arrays)."""
    if cfg.plan == "xla":
        plan = routing_plan(expert_idx, num_adapters, cfg.block_t)
        coef = row_coef(plan, expert_idx, expert_weight, scaling)
        return plan, coef, combo_plan(plan, coef, expert_idx, num_adapters, cfg.block_t_combo) if combo else None
    plan, coef = routing_plan_pallas(expert_idx, expert_weight, scaling, num_adapters, cfg.block_t,
                                     interpret=cfg.interpret)
    cplan = (combo_plan_pallas(plan, coef, expert_idx, num_adapters, cfg.block_t_combo, interpret=cfg.interpret)
             if combo else None)
    return plan, coef, cplan


def rank_padded(lora_a):
    """lora_a [L, d_in, r] -> [L, d_in, R] (R = `pow2_at_least(r)`), zero columns past r.

    The sorted shrink and the dx expand read lora_a in [block, R] tiles. At r < R a row of lora_a is
    only r elements (16 bytes at r = 8), and those tiles load slowly: at r = 8, T = 16384 the shrink
    took 63 us against 51 at r = 16, the transposed expand 76 against 60 (session 18, H200). One
    small copy per call reads it with R-element rows instead.
    """
    rank = lora_a.shape[2]
    pad = pow2_at_least(rank) - rank
    return lora_a if pad == 0 else jnp.pad(lora_a, ((0, 0), (0, 0), (0, pad)))


def _sorted_forward(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg, combo):
    """The sorted (combo=False) or combo path's output [T, d_out] and the backward's residuals: the
    plan, the pair rows' coefficients, the unscaled xa [S*pair rows, R] (S = 2 where the combo expand adds
    the shrink's two depth parts itself, else 1), the combo plan (or None) and lora_a padded to rank R
    (`rank_padded`)."""
    num_tokens = x.shape[0]
    num_adapters, _, rank = lora_a.shape
    plan, coef, cplan = _routing_plans(expert_idx, expert_weight, scaling, num_adapters, cfg, combo)
    a_padded = rank_padded(lora_a)
    xa = shrink(plan, x, a_padded, rank=a_padded.shape[2], transpose_w=False, block_t=cfg.block_t,
                block_k=cfg.block_k, interpret=cfg.interpret,
                keep_parts=combo and combo_expand_adds_parts(lora_b.shape[2], cfg.block_n_combo))
    out = _expand_any(plan, cplan, coef, xa, lora_b, num_tokens=num_tokens, width=lora_b.shape[2], rank=rank,
                      transpose_w=False, out_dtype=x.dtype, cfg=cfg, base=base if cfg.has_base else None)
    return out, plan, coef, xa, cplan, a_padded


def _expand_any(plan, cplan, coef, xa, w, *, cfg, expert_idx=None, **kw):
    """The sorted expand (a pass per slot) or, with a combo plan, the combo expand (one pass).
    expert_idx: the sorted expand's, for dots (the combo plan has its own)."""
    if cplan is None:
        return expand(plan, coef, xa, w, block_t=cfg.block_t, block_n=cfg.block_n, interpret=cfg.interpret,
                      poison=cfg.poison, expert_idx=expert_idx, **kw)
    return combo_expand(cplan, xa, w, pair_rows=plan.rows.shape[0], block_t=cfg.block_t_combo,
                        block_n=cfg.block_n_combo, interpret=cfg.interpret, poison=cfg.poison, **kw)


def _primal(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg):
    kw = dict(interpret=cfg.interpret, base=base if cfg.has_base else None, poison=cfg.poison)
    if cfg.path == "decode":
        return forward_decode(x, lora_a, lora_b, scaling, expert_idx, expert_weight,
                              block_k=cfg.block_k_decode, block_n=cfg.block_n_decode_out, **kw)[0]
    if cfg.path == "dense":
        return dense_forward(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg)[0]
    return _sorted_forward(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg,
                           combo=cfg.path == "combo")[0]


_grouped_lora = jax.custom_vjp(_primal, nondiff_argnums=(7,))


def _fwd(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg):
    # symbolic_zeros=True: every argument arrives as CustomVJPPrimal(value, perturbed). Which
    # gradients are needed is kept in the residuals' tree structure (dict keys), not as data.
    perturbed = {"x": x.perturbed, "a": lora_a.perturbed, "b": lora_b.perturbed,
                 "s": scaling.perturbed, "w": expert_weight.perturbed,
                 "base": base.perturbed and cfg.has_base}
    xv, av, bv, sv, iv, wv, basev = (arg.value for arg in
                                     (x, lora_a, lora_b, scaling, expert_idx, expert_weight, base))
    need = {name: None for name, p in perturbed.items() if p}
    if cfg.grad_path == "concat":
        return _concat_fwd(xv, av, bv, sv, iv, wv, basev, cfg, need)
    if cfg.grad_path == "dense":
        out, xa = dense_forward(xv, av, bv, sv, iv, wv, basev, cfg)
        res = dict(xa=xa, a=av, b=bv, s=sv, idx=iv, w=wv, need=need)
    elif cfg.grad_path == "decode":
        out, part = forward_decode(xv, av, bv, sv, iv, wv, block_k=cfg.block_k_decode,
                                   block_n=cfg.block_n_decode_out, interpret=cfg.interpret,
                                   base=basev if cfg.has_base else None, poison=cfg.poison)
        res = dict(part=part, a=av, b=bv, s=sv, idx=iv, w=wv, need=need)
    else:  # sorted or combo
        out, plan, coef, xa, cplan, a_padded = _sorted_forward(xv, av, bv, sv, iv, wv, basev, cfg,
                                                               combo=cfg.grad_path == "combo")
        res = dict(plan=plan, coef=coef, xa=xa, cplan=cplan, a=av, b=bv, s=sv, idx=iv, w=wv, need=need)
        if perturbed["x"]:
            res["a_padded"] = a_padded
    if perturbed["a"]:
        res["x"] = xv
    return out, res


def _bwd(cfg, res, g):
    need = set(res["need"])
    if isinstance(g, SymbolicZero) or not need:
        return (None,) * 7
    if cfg.grad_path == "concat":
        dx, da, db, ds, dw = _concat_bwd(res, g, need)
        return dx, da, db, ds, None, dw, (g.astype(res["a_cat"].dtype) if "base" in need else None)
    dtype = res["a"].dtype  # == x.dtype (the wrapper casts the LoRAs to x's dtype)
    g = g.astype(dtype)
    if cfg.grad_path in ("dense", "decode"):
        backward = dense_backward if cfg.grad_path == "dense" else decode_backward
        dx, da, db, ds, dw = backward(cfg, res, g, need)
        return dx, da, db, ds, None, dw, (g if "base" in need else None)
    lora_a, lora_b, scaling, expert_idx, expert_weight = res["a"], res["b"], res["s"], res["idx"], res["w"]
    plan, coef, xa = res["plan"], res["coef"], res["xa"]
    num_adapters, depth, rank = lora_a.shape
    num_tokens, top_k = expert_idx.shape
    num_rows = plan.rows.shape[0]  # pair rows
    dx = da = db = ds = dw = None
    if need & {"x", "a", "s", "w"}:
        # [S*rows, R] f32: g[rows] @ B[e]^T; in two parts where a combo dx expand is all that reads it
        dx_reads_all = "x" in need and "a" not in need and (cfg.dx_dots or not need & {"s", "w"})
        keep_parts = dx_reads_all and res["cplan"] is not None and combo_expand_adds_parts(depth, cfg.block_n_combo)
        gb = shrink(plan, g, lora_b, rank=rank, transpose_w=True, block_t=cfg.block_t, block_k=cfg.block_k,
                    interpret=cfg.interpret, keep_parts=keep_parts)
        dots = None  # [T, k] from the dx expand: <xa, gB> per pair, times scaling[e] without d scaling
        if "x" in need:
            a_padded = res["a_padded"]
            kw = dict(num_tokens=num_tokens, width=depth, rank=a_padded.shape[2], transpose_w=True, out_dtype=dtype,
                      cfg=cfg)
            if cfg.dx_dots and need & {"s", "w"}:
                # The dx expand's first column block takes the dots from the rows it loads anyway.
                dx, dots = _expand_any(plan, res["cplan"], coef, gb, a_padded, dots_with=xa, expert_idx=expert_idx,
                                       scaling=None if "s" in need else scaling, **kw)
            else:
                dx = _expand_any(plan, res["cplan"], coef, gb, a_padded, **kw)
        if "a" in need:
            da = tgmm(plan, res["x"], summed_parts(gb, num_rows) * coef[:, None], num_adapters=num_adapters,
                      rank=rank, out_dtype=dtype, block_t=cfg.block_t, block_n=cfg.block_n_tgmm,
                      interpret=cfg.interpret, poison=cfg.poison)
        if need & {"s", "w"} and dots is not None and "s" not in need:
            dw = dots.astype(expert_weight.dtype)  # gate training: the scaled dots are d expert_weight
        elif need & {"s", "w"}:
            # Otherwise the raw dots, or (no dx, or dx_dots=False) <xa, gB> of each (token, slot) pair
            # gathered by its row (the scatter from the padded rows that this replaces took 5-9 us on an
            # H200 at T >= 4096).
            raw = dots if dots is not None else jnp.sum(
                summed_parts(xa, num_rows)[plan.pair_row] * summed_parts(gb, num_rows)[plan.pair_row], axis=-1).T
            ds, dw = routing_grads(raw, expert_idx, expert_weight, scaling, need)
    if "b" in need:
        dbt = tgmm(plan, g, summed_parts(xa, num_rows) * coef[:, None], num_adapters=num_adapters, rank=rank,
                   out_dtype=dtype, block_t=cfg.block_t, block_n=cfg.block_n_tgmm, interpret=cfg.interpret,
                   poison=cfg.poison)  # [L, d_out, r]
        db = jnp.swapaxes(dbt, 1, 2)
    dbase = g if "base" in need else None
    return dx, da, db, ds, None, dw, dbase


_grouped_lora.defvjp(_fwd, _bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------

# Path choice, measured on an H100 (docs/benchmarks.md, "## grouped_lora kernel": bf16, L = 28, k = 2,
# d 4096 -> 4096 and 4096 -> 14336; v1 run and the v2 run of the dense path).
# * Forward (layer with the base fused, not differentiated): decode for T <= 32, sorted above.
#   v2 run, T = 16: decode 0.0259 / 0.0312 / 0.0554 / 0.0686 ms vs dense 0.0306 / 0.0541 / 0.0602 /
#   0.0917 vs sorted 0.0483 / 0.0560 / 0.0796 / 0.0939 (d_out 4096 r 8, 4096 r 64, 14336 r 8,
#   14336 r 64). T = 256: sorted 0.0643 / 0.0765 / 0.1028 / 0.1317 vs dense 0.0660 / 0.1514 / 0.1044 /
#   0.2147 vs decode 0.0672 / 0.1074 / 0.1264 / 0.2257. T >= 4096: sorted, dense 1.2-4.2x slower.
# * Under differentiation (forward + backward of the delta, gradients for x and expert_weight), measured
#   on an H200 (docs/benchmarks.md, "H200 run (session 10)"): "concat" (four
#   XLA GEMMs over every adapter side by side, bf16 operands) while T * L * r <= 2^22, sorted above.
#   Its flops grow with L*r where the sorted path's grow with k*r, so the crossover falls with r:
#   concat won every row up to T * L * r = 16384 * 224 = 3.7M (r 8, T 16384: 0.266 / 0.515 ms vs
#   sorted 0.399 / 0.823 at d_out 4096 / 14336; r 16, T 4096: 0.123 / 0.233 vs 0.154 / 0.315; r 64,
#   T 256: 0.069 / 0.095 vs 0.083 / 0.184), sorted every row from 7.3M up (r 16, T 16384: 0.395 /
#   0.830 vs 0.427 / 0.860; r 64, T 4096: 0.209 / 0.402 vs 0.380 / 0.807). One exception below the
#   bound: T = 1, r = 64, d_out 4096 (sorted 0.042 vs 0.052; at d_out 14336 concat won, 0.062 vs 0.072).
#   Up to 16 tokens the decode path's own backward beats concat (session 11, H200, f+b in ms, d_out 4096
#   / 14336; docs/benchmarks.md, "H200 run (session 11)"): T = 1, r = 8: 0.0075 / 0.0081 vs 0.0138 /
#   0.0149; r = 64: 0.0101 / 0.0113 vs 0.0521 / 0.0623; T = 16, r = 8: 0.0096 / 0.0137 vs 0.0163 /
#   0.0189; r = 64: 0.0235 / 0.0416 vs 0.0389 / 0.0577 (decode with 128 shrink programs; 256, as
#   committed: 0.0192 / 0.0381). At T = 32 it won at d_out 4096 and lost at
#   14336 (0.0275 vs 0.0264 at r = 16, 0.0763 vs 0.0615 at r = 64); at T = 256 it lost by 1.4-2.4x:
#   each (token, slot) pair reads its adapter's weights again.
# * Decode tiles (`decode_block_k`): with 16 or more pairs, 512-wide depth chunks (fewer serial
#   chunks per program); T = 16, d_out 4096, r = 8: layer 0.0186 vs 0.0225 ms at 128, f+b 0.0096 vs
#   0.0138. At one token, chunks of at most 8192 elements: r = 64 at 128 (layer 0.0178 vs 0.0193 at 512).
# * Combo (session 12, H200, docs/benchmarks.md "H200 run (session 12)"; ms, d_out 4096 / 14336):
#   T = 16384, f+b: r 16: 0.304 / 0.597 vs sorted 0.394 / 0.826; r 64: 0.494 / 0.994 vs 0.532 / 1.127
#   (r 8: concat stays, 0.267 / 0.515 vs 0.331 / 0.608). Layer: r 8: 0.885 / 2.813 vs sorted 0.903 /
#   2.993; r 16: 0.873 / 2.807 vs 0.896 / 2.999; r 64: 0.961 / 3.019 vs 0.961 / 3.135. At T = 4096
#   the combo plan's XLA passes (~10 us) outweigh the saved slot pass: f+b r 64 0.225 vs sorted
#   0.208, layer r 8 / 16 / 64 0.286 / 0.287 / 0.311 vs 0.267 / 0.268 / 0.289 (d_out 4096; at d_out
#   14336, r 16 combo won the layer, 0.787 vs 0.807). The 8192 crossover lies between the measured
#   4096 and 16384. Blocks: 64 tokens x 256 columns (r 64 f+b: 0.494 vs 0.541 at 32 x 128).
# * Launch parameters (session 13, H200, docs/benchmarks.md "H200 run (session 13)"; ms, d_out 4096 /
#   14336). The sorted shrink's depth tile `block_k`: 128 below COMBO_MIN_TOKENS, 64 from there up.
#   At T = 4096 its grid holds 2 * (64 + 28) tiles, under two waves, and the longer tile keeps more
#   bytes in flight: r = 64 f+b 0.1945 / 0.368 vs 0.2127 / 0.4063; layer r = 8 0.2579 / 0.7914 vs
#   0.2684 / 0.8037, r = 64 0.2833 / 0.8455 vs 0.2912 / 0.8537; T = 256 layer r = 16 0.0524 vs 0.0598.
#   At T = 16384 (568 tiles) it lost: combo f+b r = 16 0.3262 vs 0.2981 (shrink 64 vs 51 us).
#   The combo expand pipelines 3 stages (2 before): f+b r = 16 0.2896 / 0.5569 vs 0.2997 / 0.5797,
#   layer 0.867 / 2.7935 vs 0.8754 / 2.816 at T = 16384.
# * Plans (session 15, H200, docs/benchmarks.md "H200 run (session 15)"): the sorted and combo plans
#   became Pallas launches (`grouped_lora_plan_pallas`): all plan and glue kernels of the combo f+b at
#   T = 16384 took 27 us in 7 launches where they took 50 in 26; the combo plan's own three launches
#   9.5 us. COMBO_MIN_TOKENS was not re-measured with them.
# * Gradient path, re-measured with the Pallas plans (session 16, H200, docs/benchmarks.md "H200 run
#   (session 16)"; f+b in ms, d_out 4096 / 14336). From 4096 tokens concat loses at r > 8: r 16,
#   T 4096: combo 0.1085 / 0.1962 vs concat 0.1236 / 0.2338 vs sorted 0.1223 / 0.2598; r 16, T 8192:
#   combo 0.1716 / 0.3267 vs concat 0.2254 / 0.4379; r 32, T 4096: sorted 0.1390 vs combo 0.1412 vs
#   concat 0.2012. Below 4096 concat still wins (r 16, T 2048: 0.0736 / 0.1309 vs sorted 0.0790 /
#   0.1757, combo 0.0827 / 0.1519; T 1024: 0.0520 vs 0.0628 / 0.0649), and so it does at r = 8 (T 4096:
#   0.0870 / 0.1579 vs combo 0.1182 / 0.2036; T 8192: 0.1527 vs combo 0.1897). Below COMBO_MIN_TOKENS
#   combo beats sorted only at small ranks: r 64, T 4096: sorted 0.1776 / 0.3460 vs combo 0.1964 /
#   0.3509. The forward's choice stays: at T 4096 combo won the layer at d_out 14336 (r 8 / 16:
#   0.7315 / 0.7294 vs sorted 0.7702 / 0.7740) but tied or lost at d_out 4096 (r 64: 0.2844 vs 0.2669),
#   and the rule has no d_out input.
# * Combo token tile (session 17, H200, docs/benchmarks.md "H200 run (session 17)"; combo f+b / LoRA
#   f+b, tile 64 -> 32, blocks of 256 columns, 4 warps, 3 stages). r 16: T 16384 1.481-1.493 -> 1.444-1.464
#   (d_out 4096 and 14336, two calls), T 8192 1.970 -> 1.913 (d_out 4096); the layer moved by -0.3% to +2%.
#   At other ranks 32 lost: r 8, T 16384 1.628 -> 1.736 (the dx expand, lora_a read transposed, 82 -> 105
#   us), r 32 1.542 -> 1.582, r 64 2.136 -> 2.285 (d_out 4096) and 2.241 -> 2.454 (14336). Tiles of 16
#   tokens, 2 or 8 warps, 4 stages, 128 or 512 columns, several column blocks per program and a
#   columns-fastest grid were no better at r 16.
# * Small ranks (session 18, H200, docs/benchmarks.md "H200 run (session 18)"). With lora_a padded to rank
#   R (`rank_padded`), 32-token combo tiles also win at r 8, and combo beats concat at T 16384: f+b / LoRA
#   f+b 1.443 (tile 64: 1.469; before the padding 1.629) vs concat 1.522 at d_out 4096, 1.360 vs 1.373 at
#   14336. At T 12288 they tie (207.0 vs 208.3 us), at T 8192 concat wins (1.652 vs combo 1.877). So
#   CONCAT_GRAD_MAX_WORK fell from 2^22 to 3 * 2^20 (at r 8, L 28: concat up to 14043 tokens). Checked at
#   the edges: r 4, T 16384 stays concat (232.4 vs combo 248.2 us, d_out 4096); r 64, T 2048 and r 32,
#   T 3584, which the old bound gave to concat, now take sorted (113.8 vs 207.2 us; 126.8 vs 201.3).
# * Set-ordered combo plan (session 19, H200, docs/benchmarks.md "H200 run (session 19)"; f+b / LoRA f+b,
#   or layer / LoRA layer, sorted vs combo). The tokens ordered by their adapter set made combo win
#   under differentiation from T 4096 up to rank 64: r 32, T 4096: 2.293 vs 2.075; r 64, T 4096: 2.307
#   vs 2.244 (d_out 4096), 2.663 vs 2.429 (14336). Below 4096 sorted still wins at r 64 (T 3072: 2.228
#   vs 2.377; T 2048: 2.160 vs 2.399 at d_out 4096, 2.824 vs 2.684 at 14336); r 32, T 3584 stays sorted
#   (2.271 vs 2.173: close, left). Forward at T 4096: combo won up to r 32 (r 8: 0.976 vs 0.946, r 16:
#   0.966 vs 0.935, 0.954 vs 0.868 at 14336; r 32: 0.988 vs 0.994, 0.969 vs 0.926 at 14336) and split at
#   r 64 (1.057 vs 1.084 at d_out 4096, 1.009 vs 0.977 at 14336). Above rank 64 the combo expand's
#   R = 128 tiles lose everywhere, which the old rule (combo from T 8192 at any rank) missed: r 128,
#   f+b T 16384 2.448 vs 3.742 (32-token tiles 3.221), T 8192 2.208 vs 3.698, T 4096 2.633 vs 4.211;
#   r 96, T 16384 2.539 vs 4.046; layer r 128, T 16384 1.157 vs 1.383.
#   With the sorted shrink split over the depth at small grids (`shrink_splits`), sorted beat concat at
#   r 64, T 256: 52.8 vs 69.3 us (d_out 4096), 94.2 vs 92.6 (14336); at r 8 / 16 concat still won (30.1
#   vs 38.8 at d_out 4096, r 8; 40.7 vs 52.8 at 14336, r 16). At r 64, T 2048 sorted already won (above),
#   so from T 256 up r >= 64 takes sorted (SORTED_GRAD_MIN_RANK / _TOKENS; below 256 not measured).
# * Dense at T 256 (session 27, H200, docs/benchmarks.md "H200 run (session 27)"): the dense path's four
#   launches with depth parts instead of atomics, tiles swept per kernel, d expert_weight in the dx
#   expand: 31.9-32.6 us f+b vs concat 28.1-28.7 (d_out 4096, r 8). Its floor (each kernel at its best,
#   the expands reading one part) is 24.5 / 34.0 / 37.6 / 55.8 us at d_out 4096 / 4096 / 14336 / 14336,
#   r 8 / 16 / 8 / 16, vs concat 28.1 / 35.7 / 34.1 / 41.2: concat stays below CONCAT_GRAD_MAX_WORK.
DECODE_MAX_TOKENS = 32
DECODE_GRAD_MAX_TOKENS = 16
CONCAT_GRAD_MAX_WORK = 3 << 20  # T * L * r
CONCAT_GRAD_LARGE_T = 4096  # from here on, concat only up to rank CONCAT_GRAD_MAX_RANK_LARGE_T
CONCAT_GRAD_MAX_RANK_LARGE_T = 8
SORTED_GRAD_MIN_RANK = 64  # from this rank and SORTED_GRAD_MIN_TOKENS up, sorted rather than concat
SORTED_GRAD_MIN_TOKENS = 256
MAX_RANK = 128  # the kernels' largest rank (issue #4: r from 1 to 128); `grouped_lora(impl="auto")` takes XLA above
COMBO_MAX_RANK = 64  # above it (R = 128) sorted, forward and backward
COMBO_MIN_TOKENS = 8192  # forward: combo from here up ...
COMBO_MIN_TOKENS_LOW_RANK = 4096  # ... and from here up to rank COMBO_LOW_RANK
COMBO_LOW_RANK = 32
COMBO_GRAD_MIN_TOKENS = 4096  # under differentiation, combo from here up
COMBO_GRAD_MAX_RANK = 16  # below COMBO_GRAD_MIN_TOKENS, combo rather than sorted up to this rank
COMBO_SMALL_TILE_MAX_RANK = 16  # up to this rank the combo expand takes 32-token tiles


def auto_path(num_tokens, rank, num_adapters=28):
    """Forward path when not differentiated."""
    del num_adapters  # no measured dependence on it
    if num_tokens <= DECODE_MAX_TOKENS:
        return "decode"
    combo = num_tokens >= COMBO_MIN_TOKENS or (num_tokens >= COMBO_MIN_TOKENS_LOW_RANK and rank <= COMBO_LOW_RANK)
    return "combo" if combo and rank <= COMBO_MAX_RANK else "sorted"


def auto_grad_path(num_tokens, rank, num_adapters=28):
    """Forward + backward path under differentiation."""
    if num_tokens <= DECODE_GRAD_MAX_TOKENS:
        return "decode"
    small_work = num_tokens * num_adapters * rank <= CONCAT_GRAD_MAX_WORK and (
        num_tokens < CONCAT_GRAD_LARGE_T or rank <= CONCAT_GRAD_MAX_RANK_LARGE_T)
    if small_work and not (rank >= SORTED_GRAD_MIN_RANK and num_tokens >= SORTED_GRAD_MIN_TOKENS):
        return "concat"
    combo = num_tokens >= COMBO_GRAD_MIN_TOKENS or rank <= COMBO_GRAD_MAX_RANK
    return "combo" if combo and rank <= COMBO_MAX_RANK else "sorted"


def decode_block_k(num_tokens, top_k, rank):
    """Depth chunk of the decode kernels' split-K vector products (see the measurements above)."""
    if num_tokens * top_k >= 16:
        return min(512, 32768 // pow2_at_least(rank))  # r = 128 (never timed): 256, as a register bound
    return min(512, max(128, 8192 // pow2_at_least(rank)))


def decode_block_n_out(num_tokens, top_k, rank, width):
    """Column block of the decode path's forward expand: 512 over wide outputs at small ranks from 16
    pairs up, else 256 (H200, T = 16, d_out 14336, session 21: r = 8 4.2 -> 3.5 us, r = 16 4.8 -> 4.4;
    r = 64 13.7 -> 15.6 and one token 2.3 -> 2.5 at r = 16 lost, as did d_out 4096)."""
    return 512 if width >= 8192 and rank <= 16 and num_tokens * top_k >= 16 else 256


def default_config(num_tokens, top_k, num_adapters, rank, *, path="auto", interpret=None, poison=False,
                   has_base=False, d_out=4096, **blocks):
    """The paths and launch parameters for T = num_tokens, k = top_k, L = num_adapters, r = rank and
    the output width d_out; blocks override the launch parameters (unknown names raise)."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if path == "auto":
        path, grad_path = auto_path(num_tokens, rank, num_adapters), auto_grad_path(num_tokens, rank, num_adapters)
    elif path not in ("sorted", "combo", "decode", "dense"):
        raise ValueError(f"path must be 'auto', 'sorted', 'combo', 'dense' or 'decode', got {path!r}")
    else:  # an explicit path is also the path differentiated through
        grad_path = path
    # Token tile: 64 when adapters average >= 64 pairs, else smaller to cut padding (>= 16 for dots).
    per_adapter = num_tokens * top_k / max(num_adapters, 1)
    block_t = 64 if per_adapter >= 64 else (32 if per_adapter >= 24 else 16)
    # Depth tile of the sorted shrink: 128 below the combo range, where its grid is small (see above).
    block_k = 64 if num_tokens >= COMBO_MIN_TOKENS or path == "dense" else 128
    # Token tile of the combo expand: 32 up to rank 16, 64 above (see above).
    block_t_combo = 32 if rank <= COMBO_SMALL_TILE_MAX_RANK else 64
    cfg = dict(path=path, grad_path=grad_path, block_t=block_t, block_k=block_k, block_n=128, block_n_tgmm=64,
               block_k_decode=decode_block_k(num_tokens, top_k, rank),
               # The backward's shrink over d_out: shorter chunks, for more programs (DECODE_GRAD_MIN_PROGRAMS).
               block_k_decode_grad=min(256, decode_block_k(num_tokens, top_k, rank)),
               block_n_decode=256, block_n_decode_out=decode_block_n_out(num_tokens, top_k, rank, d_out),
               block_t_dense=64, block_c_dense=256, block_k_dense=64,
               block_t_combo=block_t_combo, block_n_combo=256, dx_dots=True, plan="pallas",
               interpret=bool(interpret),
               poison=bool(poison), has_base=bool(has_base))
    unknown = set(blocks) - set(cfg)
    if unknown:
        raise ValueError(f"unknown kernel options {sorted(unknown)}")
    cfg.update(blocks)
    if cfg["plan"] not in ("pallas", "xla"):
        raise ValueError(f"plan must be 'pallas' or 'xla', got {cfg['plan']!r}")
    for name in ("block_t", "block_k", "block_n", "block_n_tgmm", "block_t_dense", "block_c_dense",
                 "block_k_dense", "block_t_combo", "block_n_combo"):
        if cfg[name] < 16 or cfg[name] & (cfg[name] - 1):
            raise ValueError(f"{name}={cfg[name]} must be a power of two >= 16 (Triton dot tiles)")
    return Config(**cfg)


def empty_product(x, lora_a, lora_b, expert_idx, base):
    """The result where there is nothing to compute (no tokens, adapters, slots, input or output
    features): zeros [T, d_out], or `base` when given; None otherwise."""
    if x.shape[0] and x.shape[1] and lora_a.shape[0] and lora_b.shape[2] and expert_idx.shape[1]:
        return None
    delta = jnp.zeros((x.shape[0], lora_b.shape[2]), x.dtype)
    return delta if base is None else (base + delta).astype(x.dtype)


def grouped_lora_pallas(
    x: jax.Array,  # [T, d_in]
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    expert_idx: jax.Array,  # [T, k] int32
    expert_weight: jax.Array,  # [T, k]
    *,
    path: str = "auto",
    base: jax.Array | None = None,  # [T, d_out]
    interpret: bool | None = None,
    poison: bool = False,
    **blocks,
) -> jax.Array:  # [T, d_out], x.dtype
    """Pallas routed grouped low-rank product; differentiable (custom VJP, see module docstring).

    base: optional [T, d_out] added in the kernel's epilogue (out = base + delta; the layer's
    x @ kernel), which saves a separate read-add-write pass over the output.
    path: "sorted", "combo", "dense", "decode" or "auto" (`auto_path` when not differentiated, `auto_grad_path`
    under differentiation); an explicit path is also the one differentiated through. interpret:
    defaults to True on CPU. poison (tests): outputs start as NaN so unwritten elements show.
    blocks: block_t, block_k, block_n, block_n_tgmm, block_k_decode, block_k_decode_grad, block_n_decode,
    block_n_decode_out, block_t_dense, block_c_dense, block_k_dense, block_t_combo, block_n_combo; and
    plan="xla", which builds the sorted and combo paths' routing plans with their plain-XLA references
    instead of the Pallas plan kernels (the same arrays; the CPU tests use it where the plan kernels are
    not what they test, since those kernels are slow to compile in interpret mode); and
    dx_dots=False, which leaves the sorted and combo backward's <xa, gB> to XLA ops instead of its dx
    expand (for A/Bs).
    """
    num_tokens = x.shape[0]
    num_adapters, _, rank = lora_a.shape
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank r={rank} must be in [1, {MAX_RANK}]")
    empty = empty_product(x, lora_a, lora_b, expert_idx, base)
    if empty is not None:
        return empty
    if base is not None and base.shape != (num_tokens, lora_b.shape[2]):
        raise ValueError(f"base must be [T, d_out]=[{num_tokens}, {lora_b.shape[2]}], got {base.shape}")
    lora_a = lora_a.astype(x.dtype)
    lora_b = lora_b.astype(x.dtype)
    cfg = default_config(num_tokens, expert_idx.shape[1], num_adapters, rank, d_out=lora_b.shape[2], path=path,
                         interpret=interpret, poison=poison, has_base=base is not None, **blocks)
    base_arg = jnp.zeros((0,), x.dtype) if base is None else base.astype(x.dtype)
    return _grouped_lora(x, lora_a, lora_b, scaling, expert_idx.astype(jnp.int32), expert_weight, base_arg, cfg)
