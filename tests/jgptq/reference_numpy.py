"""Float64 NumPy transcription of the reference GPTQ (IST-DASLab ``gptq.py``/``quant.py``), test-only.

Written from ``shared/reference/gptq.md`` §2.1-2.3 in the reference's own layout (``W [out, in]``,
columns = input channels), with its own loops and the reference's order of operations
(right-looking in-block updates, two Cholesky factorisations), so it shares no code path with
``jgptq.gptq``. One deliberate, documented deviation, matching jgptq's contract: with
``fp16_scales=True`` (default) each scale is rounded to float16 (kept in ``[2^-24, 65504]``) as soon
as it is found and the asym zero is derived from the rounded scale (and clipped to ``[0, maxq]``);
``fp16_scales=False`` gives the reference's float scales. Grid parameters are computed in float32
like the reference (torch fp32); everything else in float64.
"""

from __future__ import annotations

import numpy as np


def find_params(x: np.ndarray, maxq: int, sym: bool, fp16_scales: bool = True,
                mse: bool = False, norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (output channel) scale and zero of ``x [out, cols]`` -> ``([out], [out])``."""
    x = np.asarray(x, np.float64)
    xmin = np.minimum(x.min(axis=1), 0.0)
    xmax = np.maximum(x.max(axis=1), 0.0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        neg = xmin < 0
        xmin = np.where(neg, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = np.where(both0, -1.0, xmin)
    xmax = np.where(both0, 1.0, xmax)

    def params(lo, hi):
        # the reference computes the grid in float32 (torch); doing the same keeps fp16 rounding
        # boundaries identical for unchanged weights (static groups, per channel, RTN)
        lo = lo.astype(np.float32)
        hi = hi.astype(np.float32)
        scale = ((hi - lo) / np.float32(maxq)).astype(np.float64)
        if fp16_scales:
            scale = np.clip(scale, 2.0 ** -24, 65504.0).astype(np.float16).astype(np.float64)
            scale = np.maximum(scale, 2.0 ** -24)
        if sym:
            zero = np.full_like(scale, (maxq + 1) / 2)
        else:
            zero = np.round(-lo / scale.astype(np.float32)).astype(np.float64)
            if fp16_scales:
                zero = np.clip(zero, 0, maxq)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse:
        best = np.full(x.shape[0], np.inf)
        for i in range(int(maxshrink * grid)):
            p = np.float32(1 - np.float32(i) / np.float32(grid))
            s1, z1 = params(p * xmin, p * xmax)
            if sym:
                z1 = zero
            q = quantize(x, s1[:, None], z1[:, None], maxq)
            err = np.sum(np.abs(q - x) ** norm, axis=1)
            better = err < best
            best = np.where(better, err, best)
            scale = np.where(better, s1, scale)
            zero = np.where(better, z1, zero)
    return scale, zero


def codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: int) -> np.ndarray:
    return np.clip(np.round(x / scale) + zero, 0, maxq)


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: int) -> np.ndarray:
    return scale * (codes(x, scale, zero, maxq) - zero)


def fasterquant(w_kn: np.ndarray, h: np.ndarray, *, bits: int, group_size: int, sym: bool,
                actorder: bool, static_groups: bool, percdamp: float = 0.01,
                blocksize: int = 128, fp16_scales: bool = True, mse: bool = False) -> dict:
    """Reference GPTQ of a Flax kernel ``w_kn [in, out]`` with Hessian ``h [in, in]`` (float64).

    Returns ``codes [in, out]``, ``scales``/``zeros`` ``[G, out]`` (group order of the reference's
    ``g_idx``), ``g_idx [in]``, ``losses [in, out]`` (``(w-q)^2/d^2/2``), ``loss`` (their sum),
    ``tie_margin [in, out]`` (distance of ``w/scale`` from a rounding tie, 0.5 = far) and ``order``
    (input channels in processing order).
    """
    W = np.array(w_kn, np.float64).T.copy()          # [out, in] like the reference
    H = np.array(h, np.float64).copy()
    rows, columns = W.shape
    maxq = 2 ** bits - 1
    fp = dict(fp16_scales=fp16_scales, mse=mse)

    if group_size == -1:
        scale, zero = find_params(W, maxq, sym, **fp)

    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if static_groups and group_size != -1:
        groups = [find_params(W[:, i:i + group_size], maxq, sym, **fp)
                  for i in range(0, columns, group_size)]

    if actorder:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = np.argsort(perm)

    Losses = np.zeros_like(W)
    Q = np.zeros_like(W)
    Margin = np.zeros_like(W)   # distance of w/scale from a rounding tie (test diagnostics)

    damp = percdamp * np.mean(np.diag(H))
    H[np.arange(columns), np.arange(columns)] += damp
    L = np.linalg.cholesky(H)
    Linv = np.linalg.inv(L)
    Hinv = Linv.T @ Linv                              # cholesky_inverse
    Hinv = np.linalg.cholesky(Hinv).T                 # upper factor

    dyn_scales, dyn_zeros = [], []
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Losses1 = np.zeros_like(W1)
        Margin1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size != -1:
                if not static_groups:
                    if (i1 + i) % group_size == 0:
                        scale, zero = find_params(W[:, i1 + i:i1 + i + group_size], maxq, sym, **fp)
                        dyn_scales.append(scale)
                        dyn_zeros.append(zero)
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[idx // group_size]
            c = codes(w, scale, zero, maxq)
            frac = w / scale
            Margin1[:, i] = np.abs(np.abs(frac - np.floor(frac)) - 0.5)
            q = scale * (c - zero)
            Q1[:, i] = c
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        Margin[:, i1:i2] = Margin1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    order = np.arange(columns)
    if actorder:
        Q = Q[:, invperm]
        Losses = Losses[:, invperm]
        Margin = Margin[:, invperm]
        order = perm

    if group_size == -1:
        scales, zeros = scale[None], zero[None]
        g_idx = np.zeros(columns, np.int32)
    elif static_groups:
        scales = np.stack([g[0] for g in groups])
        zeros = np.stack([g[1] for g in groups])
        g_idx = np.arange(columns) // group_size
    else:
        scales, zeros = np.stack(dyn_scales), np.stack(dyn_zeros)
        g_idx = (invperm if actorder else np.arange(columns)) // group_size
    return dict(codes=Q.T.astype(np.int64), scales=scales, zeros=zeros,
                g_idx=np.asarray(g_idx, np.int32), losses=Losses.T, loss=float(Losses.sum()),
                damp=percdamp, tie_margin=Margin.T, order=order)


def rtn(w_kn: np.ndarray, *, bits: int, group_size: int, sym: bool, fp16_scales: bool = True
        ) -> np.ndarray:
    """Round-to-nearest codes ``[in, out]`` on the reference grid (groups contiguous)."""
    W = np.asarray(w_kn, np.float64).T
    maxq = 2 ** bits - 1
    gs = W.shape[1] if group_size == -1 else group_size
    out = np.zeros_like(W)
    for i in range(0, W.shape[1], gs):
        s, z = find_params(W[:, i:i + gs], maxq, sym, fp16_scales)
        out[:, i:i + gs] = codes(W[:, i:i + gs], s[:, None], z[:, None], maxq)
    return out.T.astype(np.int64)


def hessian_running_mean(batches: list[np.ndarray]) -> np.ndarray:
    """Reference ``add_batch`` over a list of ``[batch, seq, n]`` (or ``[tokens, n]``) arrays."""
    n = batches[0].shape[-1]
    H = np.zeros((n, n))
    nsamples = 0
    for inp in batches:
        inp = np.asarray(inp, np.float64)
        if inp.ndim == 2:
            inp = inp[None]
        tmp = inp.shape[0]
        inp = inp.reshape(-1, n).T
        H *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = np.sqrt(2 / nsamples) * inp
        H += inp @ inp.T
    return H


def codes_agreement(got: np.ndarray, r: dict, tie_tol: float = 1e-3) -> tuple[float, int]:
    """Fraction of equal codes outside "tie cascades", and the number of excused output channels.

    An output channel whose first differing code (in processing order) sat within ``tie_tol`` of a
    rounding tie in the reference is excused: float32 vs float64 legitimately rounds such a value
    either way, and the different error then propagates along that channel.
    """
    got = np.asarray(got)
    diff = got != r["codes"]
    rank = np.empty(len(r["order"]), np.int64)
    rank[r["order"]] = np.arange(len(r["order"]))      # processing position of each input
    keep = np.ones(got.shape[1], bool)
    for n in np.flatnonzero(diff.any(axis=0)):
        rows = np.flatnonzero(diff[:, n])
        first = rows[np.argmin(rank[rows])]
        if r["tie_margin"][first, n] < tie_tol:
            keep[n] = False
    if not keep.any():
        return 0.0, int((~keep).sum())
    return float(np.mean(~diff[:, keep])), int((~keep).sum())
