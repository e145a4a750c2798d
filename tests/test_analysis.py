"""analyze(): the facts of docs/math.md §7, bounds for every parameter and input, merging, namespaces."""

import numpy as np
import pytest
from array_api_compat import array_namespace, device

import fishercore as fc
from helpers import (
    ACTIVATIONS,
    BATCH,
    FAMILIES,
    FIELDS,
    N_INPUTS,
    PIECEWISE_LINEAR,
    SMOOTH,
    AsColumns,
    Problem,
    assert_analysis_close,
    family_obj,
    full_columns,
    make_problem,
)

PROBLEMS = [Problem(arch, act, fam) for arch in ("1h", "3h") for act in ACTIVATIONS for fam in FAMILIES]


def _np(x):
    return np.asarray(x)


@pytest.mark.parametrize("p", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_bounds_hold_for_every_parameter_and_input(p):
    model, X = make_problem(p)
    family = family_obj(p.family)
    h, u, w = full_columns(model, X)
    s = fc.fisher_stats(h, u, w, family)
    for v, lo, hi in ((s.v1, s.v1_lower, s.v1_upper), (s.v2, s.v2_lower, s.v2_upper)):
        tol = 1e-12 * np.abs(hi).max() + 1e-300
        assert np.all(lo <= v + tol) and np.all(v <= hi + tol)
        assert np.all(lo >= 0) and np.all(v >= 0)
    assert np.all(s.fisher >= 0)
    res = fc.analyze(model, X, family)
    tol = 1e-12 * max(np.abs(res.v1_upper).max(), 1e-300)
    assert np.all(res.v1_lower <= res.v1 + tol) and np.all(res.v1 <= res.v1_upper + tol)
    assert np.all(res.v2_lower <= res.v2 + tol) and np.all(res.v2 <= res.v2_upper + tol)


@pytest.mark.parametrize("p", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_dense_path_equals_full_columns(p):
    """The per-neuron matmul aggregation equals statistics computed column by column."""
    model, X = make_problem(p)
    family = family_obj(p.family)
    fast = fc.analyze(model, X, family, batch_size=4)
    slow = fc.analyze(AsColumns(model), X, family, batch_size=5)
    assert_analysis_close(fast, slow, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family", FAMILIES)
def test_column_statistics_in_cache_sized_pieces_are_the_same(family, monkeypatch):
    """On eager CPU arrays the core takes a column block's statistics about CACHE_BYTES at a time
    (sums.cache_chunk); pieces of 1 and 7 columns give the numbers of the whole block."""
    import fishercore._batching as B
    import fishercore.sums as S

    model, X = make_problem(Problem("2h", "tanh", family))
    fam, X = family_obj(family), X[:10]  # two batches of 5
    whole = fc.analyze(AsColumns(model), X, fam, batch_size=5)
    widths, column_sums = [], S._column_sums
    monkeypatch.setattr(S, "_column_sums", lambda o, jac, *a, **k: widths.append(jac.shape[-1]) or column_sums(
        o, jac, *a, **k))
    C = model.n_outputs
    for columns in (1, 7):
        monkeypatch.setattr(B, "CACHE_BYTES", columns * 5 * C * 8)
        widths.clear()
        assert_analysis_close(fc.analyze(AsColumns(model), X, fam, batch_size=5), whole, rtol=1e-13, atol=1e-15)
        assert max(widths) == columns and len(widths) > 2 * len(model.groups)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_last_layer_v2_is_zero(activation, family):
    # Fact 2: the last layer is linear in its parameters.
    model, X = make_problem(Problem("2h", activation, family))
    res = fc.analyze(model, X, family_obj(family))
    last = res.unflatten(res.v2)
    assert np.all(last["4.weight"] == 0) and np.all(last["4.bias"] == 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", PIECEWISE_LINEAR)
def test_piecewise_linear_nets_have_v2_zero(activation, family):
    # Fact 3: relu, leaky relu, identity nets are piecewise linear in any single parameter.
    model, X = make_problem(Problem("3h", activation, family))
    res = fc.analyze(model, X, family_obj(family))
    assert np.all(res.v2 == 0) and np.all(res.v2_upper == 0)
    # and the Fisher is positive exactly where some input moves the outputs (a dead ReLU neuron's
    # parameters have u = 0 on every input, hence I = 0; identity and leaky ReLU have none)
    _, u, _ = full_columns(model, X)
    moved = np.abs(u).max(axis=(0, 1)) > 0
    np.testing.assert_array_equal(res.fisher > 0, moved)
    assert np.all(moved) or activation == "relu"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", [a for a in SMOOTH if a != "elu"])
def test_smooth_hidden_layers_have_v2_positive(activation, family):
    # Fact 3: sigmoid, tanh, softplus and GELU have curvature everywhere.  (ELU is linear for
    # z > 0, so a neuron active on every input can have v2 = 0; it is covered by the bounds tests.)
    model, X = make_problem(Problem("3h", activation, family))
    res = fc.analyze(model, X, family_obj(family))
    groups = res.unflatten(res.v2)
    for name in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"):
        assert np.all(groups[name] > 0), name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gaussian_v1_is_twice_fisher_squared(activation):
    # Fact 4, per input: v1 = 2 I², so mean v1 = 2 mean(I²); and the v1 bounds are equalities.
    model, X = make_problem(Problem("3h", activation, "gaussian"))
    h, u, w = full_columns(model, X)
    s = fc.fisher_stats(h, u, w, fc.Gaussian(variance=0.7))
    np.testing.assert_allclose(s.v1, 2 * s.fisher**2, rtol=1e-14)
    np.testing.assert_allclose(s.v1_lower, s.v1, rtol=1e-12)
    np.testing.assert_allclose(s.v1_upper, s.v1, rtol=1e-12)
    np.testing.assert_allclose(s.c12, 0)
    res = fc.analyze(model, X, fc.Gaussian(variance=0.7))
    np.testing.assert_allclose(res.v1, 2 * (res.var_x + res.fisher**2), rtol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_layer_scaling(family):
    # Fact 5 for one input: I(W_ab) = a_b² I(b_a); v1, v2, c12 scale with a_b⁴.
    model, X = make_problem(Problem("2h", "tanh", family, n=1))
    res = fc.analyze(model, X, family_obj(family))
    d = model.derivatives(X)
    for block in d.blocks:
        a = np.asarray(block.inputs)[0]
        for f, k in (("fisher", 2), ("v1", 4), ("v2", 4), ("c12", 4), ("v1_upper", 4), ("v1_lower", 4)):
            g = res.unflatten(getattr(res, f))
            np.testing.assert_allclose(g[block.weight], g[block.bias][:, None] * a[None, :] ** k, rtol=1e-12,
                                       atol=1e-300)


def test_batch_size_and_merge_are_exact():
    model, X = make_problem(Problem("3h", "sigmoid", "categorical", n=37))
    one = fc.analyze(model, X, batch_size=1000)
    for bs in (1, 5, 36):
        assert_analysis_close(fc.analyze(model, X, batch_size=bs), one, rtol=1e-12)
    merged = fc.analyze(model, X[:13]).merge(fc.analyze(model, X[13:]))
    assert merged.n_inputs == 37
    assert_analysis_close(merged, one, rtol=1e-12)
    with pytest.raises(ValueError, match="other: family"):
        one.merge(fc.analyze(model, X, "bernoulli"))
    with pytest.raises(TypeError, match="other"):
        one.merge(3)


def test_batches_sized_to_the_memory_budget_give_the_same_numbers():
    from fishercore._batching import CHUNK_SHARE, FIRST_BATCH, MAX_AUTO_BATCH, Batches, bytes_per_input, chunk_bytes

    model, X = make_problem(Problem("3h", "tanh", "categorical", n=90))
    one = fc.analyze(model, X, batch_size=90)
    d = model.derivatives(X[:FIRST_BATCH])
    per_input = bytes_per_input(d.blocks, FIRST_BATCH, model.workspace_per_input(True))
    held = sum(np.asarray(a).nbytes for b in d.blocks for a in (b.jac, b.diag_hess, b.inputs)) / FIRST_BATCH
    assert held < per_input < 40 * held
    resident = 2 * sum(g.size for g in model.groups) * 8

    def fixed(budget):  # what a batch cannot use: one chunk of a layer's sums and the final concatenation
        return max(chunk_bytes(b, budget * CHUNK_SHARE) for b in d.blocks) + resident

    # a budget that holds one input, a few, all at once: the same numbers
    budgets = [per_input * k + fixed(per_input * k * 4) for k in (1.2, 10.5, 1e6)]
    for budget in budgets:
        assert_analysis_close(fc.analyze(model, X, memory_budget=budget), one, rtol=1e-12)
    np.testing.assert_allclose(fc.estimate(model, X, seed=2, memory_budget=budgets[0]), fc.estimate(model, X, seed=2),
                               rtol=1e-13)
    # the sizes: the first batch measures, the rest fit the budget, capped at MAX_AUTO_BATCH
    for budget in budgets:
        batches = Batches(90, None, budget)
        spans = []
        for start, stop in batches:
            spans.append(stop - start)
            batches.fit(d.blocks, FIRST_BATCH, model, True, resident=resident)
        size = min(90 - spans[0], int((budget - fixed(budget)) // per_input))
        assert set(spans[1:-1]) <= {size} and spans[-1] <= size
        assert sum(spans) == 90 and len(spans) == len(batches)
    big = Batches(10**6, None, 1e15)
    big.fit(d.blocks, FIRST_BATCH, model, True)
    assert big.size == MAX_AUTO_BATCH
    # a budget that cannot hold one input is refused, saying what would
    with pytest.raises(ValueError, match=r"memory_budget: .* cannot hold .* give at least [0-9,]+ bytes"):
        fc.analyze(model, X, memory_budget=per_input)


def test_cpu_batches_keep_column_blocks_within_cpu_block_bytes():
    """On the CPU an automatic batch holds at most CPU_BLOCK_BYTES of its largest column block (dense blocks are
    not limited), but not fewer than FIRST_BATCH inputs for it; on a device (no cap) the budget alone sizes it."""
    from fishercore._batching import CPU_BLOCK_BYTES, FIRST_BATCH, MAX_AUTO_BATCH, Batches
    from fishercore._protocol import ColumnBlock

    model, X = make_problem(Problem("3h", "tanh", "categorical", n=4))
    dense = model.derivatives(X).blocks
    n, C, width, wide = 4, 10, 3000, 30_000  # 240 kB and 2.4 MB of columns per input in float64

    def column(k):
        return dense + (ColumnBlock("g", np.zeros((n, C, k)), np.zeros((n, C, k))),)

    assert FIRST_BATCH < CPU_BLOCK_BYTES // (C * width * 8) < MAX_AUTO_BATCH  # 52
    assert CPU_BLOCK_BYTES // (C * wide * 8) < FIRST_BATCH  # 5
    for held, cap in ((dense, MAX_AUTO_BATCH), (column(width), CPU_BLOCK_BYTES // (C * width * 8)),
                      (column(wide), FIRST_BATCH)):
        batches = Batches(10**6, None, 1e15)
        batches.fit(held, n, model, True)
        assert batches.size == cap
    blocks = column(width)
    uncapped = Batches(10**6, None, 1e15, cap=None)
    uncapped.fit(blocks, n, model, True)
    assert uncapped.size > MAX_AUTO_BATCH


def test_default_budget_is_512_mib_on_the_host_and_a_share_of_a_device(monkeypatch):
    """memory_budget=None: 512 MiB for host arrays; for arrays on an accelerator, DEVICE_SHARE of its free memory
    (faked here through Ops.free_device_memory), the same numbers; a device with nothing free is said so."""
    from fishercore._batching import DEFAULT_MEMORY_BUDGET, DEVICE_SHARE, batches_for, default_memory_budget
    from fishercore.backends import ops

    model, X = make_problem(Problem("2h", "tanh", "categorical", n=40))
    assert default_memory_budget(X) == DEFAULT_MEMORY_BUDGET == batches_for(X, None, None).budget
    one = fc.analyze(model, X, batch_size=40)
    monkeypatch.setattr(ops.Ops, "free_device_memory", lambda self, x: 2 * 2**30)
    assert batches_for(X, None, None).budget == DEVICE_SHARE * 2 * 2**30
    assert_analysis_close(fc.analyze(model, X), one, rtol=1e-12)
    monkeypatch.setattr(ops.Ops, "free_device_memory", lambda self, x: 0)
    with pytest.raises(ValueError, match="memory_budget: .* cannot hold"):
        fc.analyze(model, X)


def test_var_x_and_variance_formulas():
    model, X = make_problem(Problem("2h", "tanh", "categorical", n=9))
    res = fc.analyze(model, X)
    h, u, w = full_columns(model, X)
    s = fc.fisher_stats(h, u, w, "categorical")
    np.testing.assert_allclose(res.fisher, s.fisher.mean(0), rtol=1e-12)
    np.testing.assert_allclose(res.var_x, s.fisher.var(0), rtol=1e-12)
    n = X.shape[0]
    np.testing.assert_allclose(res.variance("i1", n_draws=3), s.v1.mean(0) / (n * 3), rtol=1e-12)
    np.testing.assert_allclose(res.variance("i2", n_draws=2, n_inputs=5),
                               s.fisher.var(0) / 5 + s.v2.mean(0) / 10, rtol=1e-12)


def test_optimal_combination():
    model, X = make_problem(Problem("3h", "tanh", "categorical", n=15))
    res = fc.analyze(model, X)
    a, v = res.alpha(), res.optimal_v()
    v1, v2, c = res.v1, res.v2, res.c12
    direct = a**2 * v1 + (1 - a) ** 2 * v2 + 2 * a * (1 - a) * c  # variance of α* Î1 + (1 − α*) Î2
    np.testing.assert_allclose(v, direct, rtol=1e-9, atol=1e-15)
    assert np.all(v <= np.minimum(v1, v2)) and np.all(v >= 0)
    for alpha in (0.0, 0.3, 1.0, 1.5):  # α* is the minimiser
        other = alpha**2 * v1 + (1 - alpha) ** 2 * v2 + 2 * alpha * (1 - alpha) * c
        assert np.all(v <= other * (1 + 1e-12) + 1e-300)
    last = res.unflatten(a)["6.weight"]  # last layer: v2 = c12 = 0, Î2 alone is optimal
    assert np.all(last == 0)


def test_sample_size():
    model, X = make_problem(Problem("2h", "tanh", "categorical", n=9))
    res = fc.analyze(model, X)
    eps, conf = 0.1, 0.95
    M = res.sample_size("i1", eps, conf)
    budget = (1 - conf) * eps**2 * res.fisher**2
    assert np.all(res.variance("i1", n_draws=1) / M <= budget * (1 + 1e-12))  # enough
    assert np.all((M == 1) | (res.variance("i1", n_draws=1) / (M - 1) > budget))  # and the least
    N = res.sample_size("i2", eps, conf, n_draws=4)
    assert np.all(res.variance("i2", n_draws=4, n_inputs=1) / N <= budget * (1 + 1e-12))
    last = res.unflatten(res.sample_size("i2"))["4.weight"]
    assert np.all(last == 1)  # Î2 exact in the last layer


def test_summary_table():
    model, X = make_problem(Problem("2h", "tanh", "categorical"))
    res = fc.analyze(model, X)
    table = res.summary()
    assert [r.group for r in table] == [g.name for g in model.groups]
    last = table[-1]
    assert last.v2 == 0 and last.i2_better == 1.0 and last.rel_std_i2 == 0
    text = str(table)
    assert text.splitlines()[0].split() == ["group", "size", "fisher", "v1", "v2", "rel_std_i1", "rel_std_i2",
                                            "i2_better"]
    assert len(text.splitlines()) == 1 + len(model.groups)
    np.testing.assert_allclose(table[0].fisher, np.mean(res.unflatten(res.fisher)["0.weight"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_results_keep_namespace_dtype_device(backend, family):
    """Arrays in = arrays out, and the same numbers as the NumPy float64 reference."""
    p = Problem("2h", "gelu", family, n=N_INPUTS)
    ref = fc.analyze(*make_problem(p), family_obj(family), batch_size=BATCH)
    model, X = make_problem(p, backend)
    res = fc.analyze(model, X, family_obj(family), batch_size=BATCH)
    for f in FIELDS:
        got = getattr(res, f)
        assert array_namespace(got) is backend.xp, f
        assert got.dtype == X.dtype and device(got) == device(X) and tuple(got.shape) == (ref.fisher.shape[0],)
        np.testing.assert_allclose(backend.to_numpy(got), getattr(ref, f), rtol=1e-10, atol=1e-14)
    for extra in (res.alpha(), res.variance("optimal", n_draws=2), res.sample_size("i1")):
        assert array_namespace(extra) is backend.xp and extra.dtype == X.dtype
    assert str(res.summary()) == str(ref.summary())


def test_float32_follows_float64(backend):
    p = Problem("2h", "tanh", "categorical", n=N_INPUTS)
    ref = fc.analyze(*make_problem(p), batch_size=BATCH)
    res = fc.analyze(*make_problem(p, backend, dtype=np.float32), batch_size=BATCH)
    assert res.fisher.dtype == backend.xp.float32
    # float32 keeps ~7 digits; the statistics are sums of O(C·width) products of O(1) terms,
    # and v1 subtracts I² from a fourth moment, so allow 1e-4 relative to each field's scale.
    for f in FIELDS:
        r = getattr(ref, f)
        np.testing.assert_allclose(backend.to_numpy(getattr(res, f)), r, rtol=1e-4, atol=1e-4 * np.abs(r).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip_exactly(backend, family, tmp_path):
    """A saved partial analysis loads back bit for bit, in the caller's library, and merges as before."""
    p = Problem("2h", "tanh", family, n=13)
    model, X = make_problem(p, backend)
    fam = family_obj(family)
    first = fc.analyze(model, X[:6, ...], fam, batch_size=BATCH)
    first.save(tmp_path / "partial.npz")
    loaded = fc.load_analysis(tmp_path / "partial.npz", model, like=X)
    assert loaded.n_inputs == 6 and loaded.groups == first.groups and loaded.family == fam
    for a, b in zip(first.sums, loaded.sums):
        assert array_namespace(b) is backend.xp and b.dtype == a.dtype and device(b) == device(a)
        np.testing.assert_array_equal(backend.to_numpy(b), backend.to_numpy(a))
    resumed = loaded.merge(fc.analyze(model, X[6:, ...], fam, batch_size=BATCH))
    assert_analysis_close(resumed, fc.analyze(model, X, fam, batch_size=BATCH), rtol=1e-12, atol=1e-14,
                          to_numpy=backend.to_numpy)


def test_load_refuses_other_models_and_other_files(tmp_path):
    model, X = make_problem(Problem("2h", "tanh", "categorical"))
    fc.analyze(model, X).save(tmp_path / "a.npz")
    other, _ = make_problem(Problem("1h", "tanh", "categorical"))
    with pytest.raises(ValueError, match="^path: .* holds an analysis of other parameter groups"):
        fc.load_analysis(tmp_path / "a.npz", other)
    np.savez(tmp_path / "b.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="^path: .* is not a saved FisherAnalysis"):
        fc.load_analysis(tmp_path / "b.npz")
    with pytest.raises(ValueError, match="^path: "):
        fc.load_analysis(tmp_path / "missing.npz")
    assert isinstance(fc.load_analysis(tmp_path / "a.npz").fisher, np.ndarray)
