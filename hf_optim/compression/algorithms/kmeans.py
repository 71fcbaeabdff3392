"""1-D k-means for weight clustering, batched over rows, and GPTQ-style assignment of weights to a codebook.

Every function works on ``values`` shaped ``[R, n]``: each row is clustered on its own (``R = 1`` for one codebook
per tensor, ``R = out_features`` for one per output channel). In one dimension a cluster is an interval of the
sorted values, so the nearest centroid is a binary search among the midpoints of the sorted centroids
(O(n log k)) and a Lloyd update reads interval sums off prefix sums of the sorted values — no ``[n, k]`` distance
matrix, and no atomics, so results are deterministic given the seed on any device.

``mask`` (bool, like ``values``) marks the entries that take part; the others (the exact zeros when sparsity is
preserved) neither shape the centroids nor get one: :func:`assign` and :func:`gptq_assign` give them index -1.

Example:
    >>> w = torch.randn(4, 64)
    >>> centroids = kmeans_1d(w, k=8, init="kmeans++", seed=0)          # [4, 8], each row sorted
    >>> idx = assign(w, centroids)                                        # [4, 64] in [0, 8)
    >>> error = (w - centroids.gather(1, idx)).pow(2).mean()
"""

from __future__ import annotations

import torch

INITS = ("linear", "density", "random", "kmeans++")


def _weights(values: torch.Tensor, weights: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    w = torch.ones_like(values) if weights is None else weights.to(values).expand_as(values)
    return w * mask if mask is not None else w


def init_centroids(
    values: torch.Tensor,
    k: int,
    method: str = "kmeans++",
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Starting centroids ``[R, k]`` (sorted per row) for :func:`kmeans_1d`.

    ``linear``: evenly spaced from min to max; ``density``: the (i + ½)/k quantiles (dense regions get more
    centroids); ``random``: k distinct entries drawn uniformly; ``kmeans++``: each next centroid drawn with
    probability ∝ weight · distance² to the nearest one chosen so far (Arthur & Vassilvitskii 2007).

    Example:
        >>> init_centroids(torch.tensor([[0.0, 1.0, 2.0, 4.0]]), k=3, method="linear").tolist()
        [[0.0, 2.0, 4.0]]
    """
    if method not in INITS:
        raise ValueError(f"init={method!r} must be one of {INITS}.")
    values = values.float()
    rows, n = values.shape
    valid = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
    count = valid.sum(1, keepdim=True)
    generator = torch.Generator(device=values.device).manual_seed(seed)
    if method == "linear":
        lo = torch.where(valid, values, torch.inf).amin(1, keepdim=True)
        hi = torch.where(valid, values, -torch.inf).amax(1, keepdim=True)
        lo, hi = torch.where(count > 0, lo, 0.0), torch.where(count > 0, hi, 0.0)  # a row with nothing to cluster
        steps = torch.linspace(0.0, 1.0, k, device=values.device)
        centroids = lo + (hi - lo) * steps
    elif method == "density":
        ordered = torch.where(valid, values, torch.inf).sort(1).values  # excluded entries sort last
        quantiles = (torch.arange(k, device=values.device) + 0.5) / k
        positions = (quantiles * count).long().clamp(max=n - 1)
        centroids = ordered.gather(1, positions)
        centroids = torch.where(torch.isfinite(centroids), centroids, 0.0)
    elif method == "random":
        scores = torch.rand(values.shape, generator=generator, device=values.device)
        scores = torch.where(valid, scores, -1.0)  # excluded entries are picked only when a row runs out
        centroids = values.gather(1, scores.topk(min(k, n), dim=1).indices)
        if k > n:
            centroids = torch.cat([centroids, centroids[:, :1].expand(rows, k - n)], 1)
    else:
        w = _weights(values, weights, valid)
        fallback = valid.float() + (count == 0)  # rows whose entries all have weight 0 sample uniformly
        first = torch.multinomial(fallback, 1, generator=generator)
        chosen = [values.gather(1, first)]
        dist = (values - chosen[0]).square()
        for _ in range(k - 1):
            score = w * dist
            # a row whose every entry already sits on a centroid repeats one (an empty cluster, harmless)
            score = torch.where(score.sum(1, keepdim=True) > 0, score, fallback)
            pick = values.gather(1, torch.multinomial(score, 1, generator=generator))
            chosen.append(pick)
            dist = torch.minimum(dist, (values - pick).square())
        centroids = torch.cat(chosen, 1)
    return centroids.sort(1).values


def _midpoints(centroids: torch.Tensor) -> torch.Tensor:
    return ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()


def assign(values: torch.Tensor, centroids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest centroid for every entry, ``[R, n]`` int64 (-1 where ``mask`` is False).

    ``centroids`` is ``[R, k]`` (or ``[1, k]``, shared by all rows), sorted along each row.

    Example:
        >>> assign(torch.tensor([[0.1, 0.9, 2.2]]), torch.tensor([[0.0, 1.0, 2.0]])).tolist()
        [[0, 1, 2]]
    """
    bounds = _midpoints(centroids.float()).expand(values.shape[0], -1).contiguous()
    # cluster j holds bounds[j-1] <= v < bounds[j], the same convention as the Lloyd step below
    idx = torch.searchsorted(bounds, values.float().contiguous(), right=True)
    return idx if mask is None else torch.where(mask, idx, -1)


def kmeans_1d(
    values: torch.Tensor,
    k: int,
    init: str = "kmeans++",
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    max_iter: int = 30,
    seed: int = 0,
) -> torch.Tensor:
    """Weighted k-means (Lloyd) of each row of ``values`` ``[R, n]``; returns sorted centroids ``[R, k]``.

    Minimises ``Σ weights · (value - centroid)²`` over the entries where ``mask`` holds. ``weights`` broadcasts
    against ``values`` (e.g. ‖X_j‖² per input feature, so the error on busy inputs counts more). Stops when no
    centroid moves or after ``max_iter`` updates; a cluster left empty keeps its centroid.

    Example:
        >>> c = kmeans_1d(torch.tensor([[0.0, 0.1, 5.0, 5.2]]), k=2, init="linear")
        >>> [round(x, 2) for x in c[0].tolist()]
        [0.05, 5.1]
    """
    values = values.float().contiguous()
    w = _weights(values, weights, mask).double()
    centroids = init_centroids(values, k, init, mask, w, seed)
    ordered, order = values.sort(1)
    w_sorted = w.gather(1, order)
    zero = torch.zeros(values.shape[0], 1, dtype=torch.float64, device=values.device)
    prefix_w = torch.cat([zero, w_sorted.cumsum(1)], 1)
    prefix_wv = torch.cat([zero, (w_sorted * ordered.double()).cumsum(1)], 1)
    first = torch.zeros(values.shape[0], 1, dtype=torch.long, device=values.device)
    last = torch.full_like(first, values.shape[1])
    for _ in range(max_iter):
        edges = torch.cat([first, torch.searchsorted(ordered, _midpoints(centroids)), last], 1)  # [R, k + 1]
        mass = prefix_w.gather(1, edges[:, 1:]) - prefix_w.gather(1, edges[:, :-1])
        moment = prefix_wv.gather(1, edges[:, 1:]) - prefix_wv.gather(1, edges[:, :-1])
        updated = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centroids.double()).float().sort(1).values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with λ = dampening · mean diag(H), as GPTQ uses it."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    damp = dampening * h.diagonal().mean()
    for _ in range(6):  # a nearly singular H gets more damping rather than a failed factorisation
        factor, info = torch.linalg.cholesky_ex(h + damp * torch.eye(len(h), dtype=h.dtype, device=h.device))
        if int(info) == 0:
            break
        damp = damp * 10
    else:
        raise ValueError("The calibration Hessian is not positive definite even after damping; use more data.")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


@torch.no_grad()
def gptq_assign(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    centroids: torch.Tensor,
    mask: torch.Tensor | None = None,
    dampening: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> torch.Tensor:
    """Assign each weight of ``weight`` ``[out, in]`` to a centroid, compensating errors GPTQ-style.

    Columns are rounded one at a time to the nearest centroid of their row's codebook (``centroids`` ``[out, k]``
    or ``[1, k]``, sorted); each column's error is spread over the columns not yet rounded through the inverse of
    ``hessian`` = Σ x xᵀ of the layer's inputs (Frantar et al. 2022), so the layer's *output* error stays small
    rather than each weight's. ``act_order`` rounds the inputs with the largest activations first. Entries where
    ``mask`` is False become exactly zero (index -1), with their error compensated the same way.

    Example:
        >>> idx = gptq_assign(w, stats.hessian, kmeans_1d(w.reshape(1, -1), 16))  # doctest: +SKIP
    """
    w = weight.detach().float().clone()
    out, cols = w.shape
    perm = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(cols, device=w.device)
    w = w[:, perm]
    keep = None if mask is None else mask[:, perm]
    factor = _inverse_hessian_factor(hessian[perm][:, perm], dampening).float()
    bounds = _midpoints(centroids.float()).expand(out, -1).contiguous()
    table = centroids.float().expand(out, -1)
    idx = torch.empty(out, cols, dtype=torch.long, device=w.device)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        inv = factor[start:stop, start:stop]
        for i in range(stop - start):
            column = block[:, i]
            nearest = torch.searchsorted(bounds, column.unsqueeze(1).contiguous(), right=True)
            rounded = table.gather(1, nearest).squeeze(1)
            nearest = nearest.squeeze(1)
            if keep is not None:
                rounded = torch.where(keep[:, start + i], rounded, 0.0)
                nearest = torch.where(keep[:, start + i], nearest, -1)
            idx[:, start + i] = nearest
            error = (column - rounded) / inv[i, i]
            block[:, i:] -= error.unsqueeze(1) * inv[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, stop:] -= errors @ factor[start:stop, stop:]  # the block's errors reach the later columns at once
    return idx[:, torch.argsort(perm)]
