"""The AMU: scores (SAPI, SAPW, baselines), granularities and budgets, checked against an
independent re-implementation of the unit structure written with plain index arithmetic."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selact import amu
from selact.amu import (
    STRATEGIES,
    conv2d_input_norms,
    keep_count,
    linear_input_norms,
    pool,
    threshold_keep,
    topk_keep,
)
from selact.config import GRANULARITIES, SelectiveConfig

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Relative rounding unit of each dtype (half an ulp at 1.0 is eps / 2; we use eps).
EPS = {dtype: torch.finfo(dtype).eps for dtype in DTYPES}
#: Tolerances for a product of two values rounded to ``dtype`` (two roundings, each <= eps / 2),
#: compared in float64: torch's assert_close defaults for each dtype cover that.
TOL = {
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
}

dtypes = st.sampled_from(DTYPES)
# Densities strictly below 1 (1.0 is "keep everything" and returns None; tested on its own).
densities = st.floats(min_value=1e-6, max_value=1.0, exclude_max=True, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)


@st.composite
def linear_shapes(draw):
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    return (*lead, draw(st.integers(1, 19)))


@st.composite
def conv_shapes(draw):
    return tuple(draw(st.integers(lo, hi)) for lo, hi in ((1, 3), (1, 9), (1, 4), (1, 4)))


def make_input(shape, dtype, seed, relu=False):
    """Gaussian input rounded to ``dtype``; ``relu`` adds exact zeros (ties among the scores)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (x.relu() if relu else x).to(dtype)


# --- an independent model of granularities ----------------------------------------------------


def units(shape, layout, granularity, block):
    """(group, unit) ids per element of an input of ``shape``, flattened.

    Units of the same group compete for the budget; elements of a unit are kept together.
    Written from DESIGN.md and the table in selact.amu.select, not from its code.
    """
    index = torch.arange(math.prod(shape))
    if layout == "linear":
        k_size = shape[-1]
        lead = shape[:-1]
        tokens = math.prod(lead[1:]) if lead else 1
        k, row = index % k_size, index // k_size
        sample, token = row // tokens, row % tokens
        zero = torch.zeros_like(index)
        return {
            "element": (row, k),
            "block": (row, k // block),
            "channel": (sample, k),
            "spatial": (sample, token),
            "batch_shared": (zero, k),
        }[granularity]
    b_size, c_size, h_size, w_size = shape
    w, h = index % w_size, (index // w_size) % h_size
    c, b = (index // (w_size * h_size)) % c_size, index // (w_size * h_size * c_size)
    position = h * w_size + w
    positions = h_size * w_size
    return {
        "element": (b, c * positions + position),
        "block": (b, (c // block) * positions + position),
        "channel": (b, c),
        "spatial": (b, position),
        "batch_shared": (torch.zeros_like(b), c),
    }[granularity]


def check_mask(x, mask, layout, granularity, block, density, scores, count=True, order=True):
    """Shape, structure, budget and choice of a top-k mask, against the model above.

    ``scores`` (float64, shaped like ``x``) are the element scores the strategy should use; units
    are scored by their mean. Kept units must score at least as high as dropped ones of the same
    group, up to the rounding of the layer's dtype (4 eps of the largest score: an element score
    and a mean of a few of them are each rounded at most twice).
    """
    assert mask is not None
    assert mask.dtype == torch.bool
    assert torch.broadcast_shapes(mask.shape, x.shape) == x.shape
    kept = mask.expand(x.shape).reshape(-1).long()
    group, unit = units(tuple(x.shape), layout, granularity, block)
    key = group * (int(unit.max()) + 1) + unit
    slots = int(key.max()) + 1
    present = torch.zeros(slots, dtype=torch.bool).index_fill_(0, key, True)

    def per_unit(values, reduce):
        out = torch.zeros(slots, dtype=values.dtype)
        return out.scatter_reduce(0, key, values, reduce, include_self=False)[present]

    lo, hi = per_unit(kept, "amin"), per_unit(kept, "amax")
    assert torch.equal(lo, hi), "a unit is partly kept: the mask does not follow the granularity"
    unit_kept = hi.bool()
    unit_group = per_unit(group, "amax")
    unit_size = per_unit(torch.ones_like(kept), "sum")
    unit_score = per_unit(scores.reshape(-1).double(), "mean")
    tol = 4 * EPS[x.dtype] * float(scores.abs().max()) + 1e-30
    for g in unit_group.unique():
        in_group = unit_group == g
        n = int(in_group.sum())
        k = int(unit_kept[in_group].sum())
        if count:
            assert k == keep_count(density, n), (k, n, density)
        if order and 0 < k < n:
            kept_scores = unit_score[in_group & unit_kept]
            dropped_scores = unit_score[in_group & ~unit_kept]
            assert float(kept_scores.min()) >= float(dropped_scores.max()) - tol
        sizes = unit_size[in_group]
        if count and bool((sizes == sizes[0]).all()):
            # Equal units: the kept fraction of the elements is exactly the kept unit fraction.
            fraction = float(kept[(group == g)].double().mean())
            assert fraction == pytest.approx(keep_count(density, n) / n, rel=1e-12)


def config(**fields):
    return SelectiveConfig(**fields)


# --- keep_count and topk_keep -----------------------------------------------------------------


def test_keep_count_examples():
    assert keep_count(0.35, 100) == 35  # 0.35 * 100 is 35.00000000000001 in floats
    assert keep_count(0.5, 7) == 4
    assert keep_count(0.1, 10) == 1
    assert keep_count(1.0, 13) == 13
    assert keep_count(1e-9, 5) == 1
    assert keep_count(1e-12, 10**6) == 1
    assert keep_count(0.999999, 3) == 3


@settings(max_examples=300, deadline=None)
@given(density=st.floats(min_value=1e-12, max_value=1.0), n=st.integers(1, 10**6))
def test_keep_count_is_ceil_of_density_times_n(density, n):
    k = keep_count(density, n)
    assert 1 <= k <= n
    # k is ceil(density * n) up to float noise of the product.
    assert k >= density * n - 1e-6 or k == n
    assert k == 1 or k - 1 < density * n + 1e-6


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 5),
    n=st.integers(1, 23),
    dtype=dtypes,
    density=densities,
    seed=seeds,
    relu=st.booleans(),
)
def test_topk_keep_keeps_the_k_largest_of_each_row(rows, n, dtype, density, seed, relu):
    scores = make_input((rows, n), dtype, seed, relu).abs()
    keep = topk_keep(scores, density)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    k = keep_count(density, n)
    assert keep.sum(1).tolist() == [k] * rows
    for row in range(rows):
        kept, dropped = scores[row][keep[row]], scores[row][~keep[row]]
        if dropped.numel():
            assert kept.min() >= dropped.max()


# --- SAPI and SAPW scores ---------------------------------------------------------------------


def expected_linear_norms(weight):
    """‖W[:, i]‖₂ for each input i, by loops in float64."""
    n_out, k_in = weight.shape
    return torch.tensor(
        [math.sqrt(sum(float(weight[o, i]) ** 2 for o in range(n_out))) for i in range(k_in)],
        dtype=torch.float64,
    )


def expected_conv_norms(weight, groups):
    """For input channel c: the norm of every weight that reads c, i.e. over the outputs of c's
    group and the kernel, by loops in float64 (W[:, c] when groups == 1)."""
    c_out, in_per_group, kh, kw = weight.shape
    out_per_group = c_out // groups
    norms = []
    for c in range(in_per_group * groups):
        g, j = divmod(c, in_per_group)
        total = 0.0
        for o in range(g * out_per_group, (g + 1) * out_per_group):
            for u in range(kh):
                for v in range(kw):
                    total += float(weight[o, j, u, v]) ** 2
        norms.append(math.sqrt(total))
    return torch.tensor(norms, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 7), k=st.integers(1, 9), dtype=dtypes, seed=seeds)
def test_linear_input_norms_are_column_norms(n, k, dtype, seed):
    weight = make_input((n, k), dtype, seed)
    norms = linear_input_norms(weight)
    assert norms.shape == (k,)
    expected = expected_linear_norms(weight)
    torch.testing.assert_close(norms.double(), expected, **TOL[torch.float32])
    torch.testing.assert_close(
        amu.input_norms(weight, "linear").double(), expected, **TOL[torch.float32]
    )


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    dtype=dtypes,
    seed=seeds,
)
def test_conv2d_input_norms_per_input_channel(
    groups, in_per_group, out_per_group, kh, kw, dtype, seed
):
    weight = make_input((groups * out_per_group, in_per_group, kh, kw), dtype, seed)
    norms = conv2d_input_norms(weight, groups)
    assert norms.shape == (groups * in_per_group, 1, 1)
    expected = expected_conv_norms(weight, groups)
    torch.testing.assert_close(norms.reshape(-1).double(), expected, **TOL[torch.float32])
    via_amu = amu.input_norms(weight, "conv", groups)
    torch.testing.assert_close(via_amu.reshape(-1).double(), expected, **TOL[torch.float32])


def test_conv2d_input_norms_grouped_example():
    # groups=2, 2 inputs per group, 1 output per group: channel c reads only W[c // 2, c % 2].
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1, 1)
    assert conv2d_input_norms(weight, 2).reshape(-1).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert conv2d_input_norms(weight.reshape(1, 4, 1, 1), 1).reshape(-1).tolist() == [
        1.0,
        2.0,
        3.0,
        4.0,
    ]
    # groups=1, two outputs: the norm is over the outputs (and the kernel).
    weight = torch.tensor([[3.0, 0.0], [4.0, 1.0]]).reshape(2, 2, 1, 1)
    assert conv2d_input_norms(weight, 1).reshape(-1).tolist() == [5.0, 1.0]


def test_input_norms_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout 'conv3d'"):
        amu.input_norms(torch.ones(2, 2), "conv3d")


@settings(max_examples=60, deadline=None)
@given(shape=linear_shapes(), n_out=st.integers(1, 5), dtype=dtypes, seed=seeds)
def test_sapi_and_sapw_scores_linear(shape, n_out, dtype, seed):
    x = make_input(shape, dtype, seed)
    weight = make_input((n_out, shape[-1]), dtype, seed + 1)
    assert torch.equal(STRATEGIES["sapi"].scores(x, None), x.abs())
    scores = STRATEGIES["sapw"].scores(x, linear_input_norms(weight))
    assert scores.shape == x.shape
    expected = x.double().abs() * expected_linear_norms(weight)
    torch.testing.assert_close(scores.double(), expected, **TOL[dtype])


@settings(max_examples=60, deadline=None)
@given(
    shape=conv_shapes(),
    groups=st.sampled_from([1, 2, 3]),
    out_per_group=st.integers(1, 3),
    dtype=dtypes,
    seed=seeds,
)
def test_sapw_scores_conv(shape, groups, out_per_group, dtype, seed):
    b, _, h, w = shape
    shape = (b, groups * max(1, shape[1] // groups), h, w)
    weight = make_input((groups * out_per_group, shape[1] // groups, 3, 3), dtype, seed + 1)
    x = make_input(shape, dtype, seed)
    scores = STRATEGIES["sapw"].scores(x, conv2d_input_norms(weight, groups))
    expected = x.double().abs() * expected_conv_norms(weight, groups).reshape(-1, 1, 1)
    torch.testing.assert_close(scores.double(), expected, **TOL[dtype])


# --- masks: every granularity, both layouts, top-k --------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    shape=linear_shapes(),
    granularity=st.sampled_from(GRANULARITIES),
    block=st.integers(1, 9),
    dtype=dtypes,
    density=densities,
    seed=seeds,
    relu=st.booleans(),
)
def test_sapi_mask_linear(shape, granularity, block, dtype, density, seed, relu):
    x = make_input(shape, dtype, seed, relu)
    cfg = config(strategy="sapi", density=density, granularity=granularity, block=block)
    mask = amu.mask(x, None, cfg, layout="linear")
    check_mask(x, mask, "linear", granularity, block, density, x.double().abs())


@settings(max_examples=150, deadline=None)
@given(
    shape=conv_shapes(),
    granularity=st.sampled_from(GRANULARITIES),
    block=st.integers(1, 9),
    dtype=dtypes,
    density=densities,
    seed=seeds,
    relu=st.booleans(),
)
def test_sapi_mask_conv(shape, granularity, block, dtype, density, seed, relu):
    x = make_input(shape, dtype, seed, relu)
    cfg = config(strategy="sapi", density=density, granularity=granularity, block=block)
    mask = amu.mask(x, None, cfg, layout="conv")
    check_mask(x, mask, "conv", granularity, block, density, x.double().abs())


@settings(max_examples=100, deadline=None)
@given(
    shape=linear_shapes(),
    n_out=st.integers(1, 5),
    granularity=st.sampled_from(GRANULARITIES),
    block=st.integers(1, 9),
    dtype=dtypes,
    density=densities,
    seed=seeds,
)
def test_sapw_mask_linear(shape, n_out, granularity, block, dtype, density, seed):
    x = make_input(shape, dtype, seed)
    weight = make_input((n_out, shape[-1]), dtype, seed + 1)
    cfg = config(strategy="sapw", density=density, granularity=granularity, block=block)
    mask = amu.mask(x, weight, cfg, layout="linear")
    scores = x.double().abs() * expected_linear_norms(weight)
    check_mask(x, mask, "linear", granularity, block, density, scores)
    # Precomputed norms (what a layer caches) give the same mask.
    cached = amu.mask(x, None, cfg, layout="linear", norms=linear_input_norms(weight))
    assert torch.equal(cached, mask)


@settings(max_examples=100, deadline=None)
@given(
    shape=conv_shapes(),
    groups=st.sampled_from([1, 2, 3]),
    out_per_group=st.integers(1, 3),
    granularity=st.sampled_from(GRANULARITIES),
    block=st.integers(1, 9),
    dtype=dtypes,
    density=densities,
    seed=seeds,
)
def test_sapw_mask_conv(shape, groups, out_per_group, granularity, block, dtype, density, seed):
    b, _, h, w = shape
    shape = (b, groups * max(1, shape[1] // groups), h, w)
    weight = make_input((groups * out_per_group, shape[1] // groups, 2, 2), dtype, seed + 1)
    x = make_input(shape, dtype, seed)
    cfg = config(strategy="sapw", density=density, granularity=granularity, block=block)
    mask = amu.mask(x, weight, cfg, layout="conv", groups=groups)
    scores = x.double().abs() * expected_conv_norms(weight, groups).reshape(-1, 1, 1)
    check_mask(x, mask, "conv", granularity, block, density, scores)


def test_sapw_prefers_inputs_with_heavy_weights():
    # Equal |x|: SAPI has nothing to choose by, SAPW keeps the inputs whose columns are heavy.
    x = torch.ones(2, 4)
    weight = torch.tensor([[0.1, 5.0, 0.2, 3.0], [0.1, 0.0, 0.2, 4.0]])
    mask = amu.mask(x, weight, config(strategy="sapw", density=0.5), layout="linear")
    assert mask.tolist() == [[False, True, False, True]] * 2


def test_sapw_without_weight_raises():
    with pytest.raises(ValueError, match="needs the layer's weight"):
        amu.mask(torch.ones(2, 4), None, config(strategy="sapw"), layout="linear")


@pytest.mark.parametrize(
    "shape, granularity, mask_shape",
    [
        ((2, 3, 8), "element", (2, 3, 8)),
        ((2, 3, 8), "block", (2, 3, 8)),
        ((2, 3, 8), "channel", (2, 1, 8)),
        ((2, 3, 8), "spatial", (2, 3, 1)),
        ((2, 3, 8), "batch_shared", (8,)),
        ((2, 4, 3, 3), "element", (2, 4, 3, 3)),
        ((2, 4, 3, 3), "block", (2, 4, 3, 3)),
        ((2, 4, 3, 3), "channel", (2, 4, 1, 1)),
        ((2, 4, 3, 3), "spatial", (2, 1, 3, 3)),
        ((2, 4, 3, 3), "batch_shared", (1, 4, 1, 1)),
    ],
)
def test_mask_shapes_of_each_granularity(shape, granularity, mask_shape):
    # Coarse masks stay compact (what kernels rely on) and broadcast to the input.
    layout = "linear" if len(shape) == 3 else "conv"
    cfg = config(density=0.5, granularity=granularity, block=2)
    mask = amu.mask(torch.randn(shape), None, cfg, layout=layout)
    assert tuple(mask.shape) == mask_shape


def test_block_mean_uses_the_real_size_of_a_partial_block():
    # K=10, G=4: blocks of 4, 4 and 2 features with mean |x| 1, 0 and 1.5. Keeping one block of
    # three keeps the partial one; averaging it over G=4 (0.75) would keep the first instead.
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0]])
    cfg = config(density=0.3, granularity="block", block=4)
    assert amu.mask(x, None, cfg, layout="linear").tolist() == [[False] * 8 + [True] * 2]
    mask = amu.mask(x, None, cfg.replace(density=0.5), layout="linear")
    assert mask.tolist() == [[True] * 4 + [False] * 4 + [True] * 2]


def test_conv_block_groups_consecutive_channels_at_one_position():
    # C=5, G=2: channel blocks {0,1}, {2,3}, {4} at each of the 2 positions: 6 units, keep 3.
    x = torch.zeros(1, 5, 1, 2)
    x[0, 0:2, 0, 0] = 1.0  # block 0 at position 0
    x[0, 4, 0, 0] = 2.0  # block 2 (partial) at position 0
    x[0, 2:4, 0, 1] = 3.0  # block 1 at position 1
    mask = amu.mask(x, None, config(density=0.5, granularity="block", block=2), layout="conv")
    assert mask[0, :, 0, 0].tolist() == [True, True, False, False, True]
    assert mask[0, :, 0, 1].tolist() == [False, False, True, True, False]


def test_batch_shared_pools_scores_over_the_rows():
    # Feature 0 is large in one row only, feature 1 moderately large in every row: summed over
    # the batch, feature 0 wins; one shared mask.
    x = torch.tensor([[10.0, 3.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.1], [0.0, 3.0, 0.1, 0.0]])
    mask = amu.mask(x, None, config(density=0.25, granularity="batch_shared"), layout="linear")
    assert mask.tolist() == [True, False, False, False]
    mask = amu.mask(x, None, config(density=0.5, granularity="batch_shared"), layout="linear")
    assert mask.tolist() == [True, True, False, False]


# --- baselines and density 1.0 ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["sapi", "sapw", "random"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("layout, shape", [("linear", (3, 2, 5)), ("conv", (2, 3, 4, 4))])
@pytest.mark.parametrize("budget", ["topk", "threshold"])
def test_density_one_keeps_everything(strategy, granularity, layout, shape, budget):
    x = torch.randn(shape)
    weight = torch.randn(4, 5) if layout == "linear" else torch.randn(4, 3, 3, 3)
    cfg = config(strategy=strategy, density=1.0, granularity=granularity, budget=budget)
    assert amu.mask(x, weight, cfg, layout=layout) is None


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("layout, shape", [("linear", (3, 2, 5)), ("conv", (2, 3, 4, 4))])
def test_dense_keeps_everything(density, layout, shape):
    x = torch.randn(shape)
    assert amu.mask(x, None, config(strategy="dense", density=density), layout=layout) is None


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from(["linear", "conv"]),
    dtype=dtypes,
    seed=seeds,
    density=st.floats(min_value=0.01, max_value=1.0),
    granularity=st.sampled_from(GRANULARITIES),
    budget=st.sampled_from(["topk", "threshold"]),
)
def test_zero_skip_keeps_exactly_the_nonzeros(layout, dtype, seed, density, granularity, budget):
    shape = (3, 2, 7) if layout == "linear" else (2, 3, 4, 5)
    x = make_input(shape, dtype, seed, relu=True)
    x[..., 0] = 0.0
    cfg = config(strategy="zero_skip", density=density, granularity=granularity, budget=budget)
    mask = amu.mask(x, None, cfg, layout=layout)  # no threshold needed either
    assert mask.dtype == torch.bool
    assert torch.equal(mask, x != 0)


@settings(max_examples=60, deadline=None)
@given(
    shape=linear_shapes(),
    granularity=st.sampled_from(GRANULARITIES),
    block=st.integers(1, 9),
    dtype=dtypes,
    density=densities,
    seed=seeds,
)
def test_random_mask_has_the_budget_and_structure(shape, granularity, block, dtype, density, seed):
    x = make_input(shape, dtype, seed)
    cfg = config(strategy="random", density=density, granularity=granularity, block=block)
    mask = amu.mask(x, None, cfg, layout="linear")
    check_mask(x, mask, "linear", granularity, block, density, x.double(), order=False)


@pytest.mark.parametrize("layout, shape", [("linear", (4, 64)), ("conv", (2, 8, 4, 4))])
def test_random_mask_has_the_right_count_and_changes_between_calls(layout, shape):
    x = torch.ones(shape)  # all scores equal for SAPI: only the randomness decides
    cfg = config(strategy="random", density=0.5)
    first = amu.mask(x, None, cfg, layout=layout)
    second = amu.mask(x, None, cfg, layout=layout)
    per_unit = math.prod(shape[1:])
    assert first.reshape(shape[0], -1).sum(1).tolist() == [per_unit // 2] * shape[0]
    assert second.reshape(shape[0], -1).sum(1).tolist() == [per_unit // 2] * shape[0]
    assert not torch.equal(first, second)


def test_random_mask_ignores_the_input_values():
    # A random baseline must not prefer large inputs: over many calls each feature is kept
    # about half the time although feature 0 is huge (binomial std of a mean of 400: 0.025).
    x = torch.tensor([[100.0, 1.0, 1.0, 1.0]])
    cfg = config(strategy="random", density=0.5)
    kept = torch.stack([amu.mask(x, None, cfg, layout="linear")[0] for _ in range(400)])
    assert (kept.double().mean(0) - 0.5).abs().max() < 0.1


# --- threshold budget ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    layout=st.sampled_from(["linear", "conv"]),
    granularity=st.sampled_from(GRANULARITIES),
    block=st.integers(1, 5),
    dtype=st.just(torch.float32),
    seed=seeds,
    t=st.floats(min_value=0.0, max_value=2.5, width=32),
)
def test_threshold_keeps_pooled_scores_above_it(layout, granularity, block, dtype, seed, t):
    shape = (3, 2, 7) if layout == "linear" else (2, 5, 3, 3)
    x = make_input(shape, dtype, seed)
    threshold = torch.tensor(t)
    cfg = config(density=0.5, granularity=granularity, block=block, budget="threshold")
    mask = amu.mask(x, None, cfg, layout=layout, threshold=threshold)
    pooled = pool(x.abs(), layout, granularity, block)
    expected = pooled.expand(pooled.scores.float() > threshold)
    assert torch.equal(mask, expected)
    # and it follows the granularity's structure (the count is the threshold's business)
    check_mask(x, mask, layout, granularity, block, 0.5, x.double().abs(), count=False, order=True)


@settings(max_examples=100, deadline=None)
@given(shape=linear_shapes(), dtype=dtypes, seed=seeds, data=st.data())
def test_threshold_keeps_exactly_the_scores_above_it_in_every_dtype(shape, dtype, seed, data):
    # Element granularity: the pooled score is |x| itself, exact in every dtype, so the mask
    # must be exactly |x| > t, t being the float32 threshold the layer holds. Half the examples
    # put t just below one of the scores (3/4 of the way from the next lower representable
    # value), where rounding t to the scores' dtype would change the answer.
    x = make_input(shape, dtype, seed)
    if data.draw(st.booleans(), label="near a score"):
        b = x.abs().reshape(-1)[data.draw(st.integers(0, x.numel() - 1), label="index")]
        a = torch.nextafter(b, torch.zeros_like(b))
        t = float(a) + 0.75 * (float(b) - float(a))
    else:
        t = data.draw(st.floats(min_value=0.0, max_value=2.5, width=32), label="t")
    threshold = torch.tensor(t, dtype=torch.float32)
    cfg = config(density=0.5, budget="threshold")
    mask = amu.mask(x, None, cfg, layout="linear", threshold=threshold)
    assert torch.equal(mask, x.abs().float() > threshold)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_threshold_keep_does_not_round_the_threshold_to_the_scores_dtype(dtype):
    # A float32 threshold between two adjacent representable scores a < t < b must keep b.
    # Rounding t to the scores' dtype first may round it up to b and drop every score equal to
    # b: in half precision, where scores tie often, that moves the calibrated density.
    a = torch.tensor(0.5, dtype=dtype)
    b = torch.nextafter(a, torch.tensor(1.0, dtype=dtype))
    t = torch.tensor((0.25 * a.float() + 0.75 * b.float()).item())  # closer to b than to a
    assert a.float() < t < b.float()
    scores = torch.stack([a, b]).reshape(1, 2)
    assert threshold_keep(scores, t).tolist() == [[False, True]]


def test_threshold_budget_without_threshold_raises():
    cfg = config(density=0.5, budget="threshold")
    with pytest.raises(ValueError, match="needs a calibrated threshold"):
        amu.mask(torch.randn(2, 4), None, cfg, layout="linear")


def test_observe_gets_pooled_scores_and_forces_topk():
    # The calibration path: the pooled scores are reported and the mask is top-k even with a
    # threshold budget and no threshold.
    seen = []
    x = torch.randn(2, 4, 3, 3)
    cfg = config(density=0.25, granularity="channel", budget="threshold")
    mask = amu.mask(x, None, cfg, layout="conv", observe=seen.append)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], x.abs().mean((2, 3)), rtol=0, atol=0)
    assert mask.shape == (2, 4, 1, 1)
    assert mask.reshape(2, 4).sum(1).tolist() == [1, 1]


def test_unknown_layout_or_granularity_in_pool():
    with pytest.raises(ValueError, match="not defined for layout 'conv3d'"):
        pool(torch.ones(2, 3), "conv3d", "element")
    with pytest.raises(ValueError, match="granularity 'row'"):
        pool(torch.ones(2, 3), "linear", "row")
