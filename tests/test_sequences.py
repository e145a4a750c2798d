"""Sequence outputs (n, T, C): the per-sequence statistics of docs/math.md §12 against enumeration of every
label sequence, the padding mask, the estimators on the same labels, and the errors."""

import itertools

import numpy as np
import pytest

import fishercore as fc
from helpers import assert_raises_named, label_space, symmetric_spectrum

T, C, K = 3, 3, 4  # positions, classes, parameters


class Table:
    """A model given by its derivatives: input i (X[i, 0] = i) has outputs H[i] (T·C), ∂h/∂θ = U[i] (T·C, K) and
    ∂²h/∂θ² = W[i] — so the statistics can be checked against enumeration with nothing else in between."""

    def __init__(self, H, U, W, output_shape, second_order=True):
        self.H, self.U, self.W, self.second_order = H, U, W, second_order
        self.output_shape = output_shape
        self.n_outputs = H.shape[1]
        self.groups = fc.make_groups([("theta", (U.shape[2],))])

    def check_inputs(self, X):
        return X

    def _rows(self, X):
        return X[:, 0].astype(int)

    def outputs(self, X):
        return self.H[self._rows(X)]

    def derivatives(self, X, *, hessian=True):
        i = self._rows(X)
        w = self.W[i] if hessian and self.second_order else None
        return fc.Derivatives(self.H[i], (fc.ColumnBlock("theta", self.U[i], w),))


def table(family, n=5, seed=0):
    rng = np.random.default_rng(seed)
    width = C if family != "bernoulli" else 2
    H = 1.5 * rng.normal(size=(n, T * width))
    U, W = rng.normal(size=(2, n, T * width, K))
    return Table(H, U, W, (T, width)), np.arange(n, dtype=float)[:, None]


def sequence_space(family, h, width):
    """[(probability, score (T·width,))] of every label sequence, from each position's label space."""
    per = [label_space(family, h[t * width:(t + 1) * width]) for t in range(T)]
    return [(np.prod([p for p, _ in combo]), np.concatenate([s for _, s in combo]))
            for combo in itertools.product(*per)]


def enumerate_stats(family, model, keep=None):
    """Per-parameter means over inputs of I, v1, v2, c12 and var_x, by enumeration of the label sequences."""
    width = model.output_shape[1]
    per_input = []
    for i in range(model.H.shape[0]):
        u, w = model.U[i].copy(), model.W[i].copy()
        if keep is not None:  # masked positions: their outputs do not enter the log-likelihood
            drop = np.repeat(~keep[i], width)
            u[drop], w[drop] = 0.0, 0.0
        I = m4 = v2 = c = 0.0
        for prob, s in sequence_space(family, model.H[i], width):
            g = s @ u  # ∂ℓ/∂θ = Σ_t s_tᵀu_t
            b = s @ w  # Σ_t s_tᵀw_t; −∂²ℓ/∂θ² = I − b
            I, m4, v2, c = I + prob * g**2, m4 + prob * g**4, v2 + prob * b**2, c + prob * g**2 * b
        per_input.append((I, m4 - I**2, v2, -c))  # c12 = Cov(g², I − b) = −E[g² b], as E[b] = 0
    I, v1, v2, c12 = (np.array(x) for x in zip(*per_input))
    return {"fisher": I.mean(0), "v1": v1.mean(0), "v2": v2.mean(0), "c12": c12.mean(0), "var_x": I.var(0)}


@pytest.mark.parametrize("family", ["categorical", "bernoulli"])
@pytest.mark.parametrize("masked", [False, True])
def test_statistics_match_enumeration_of_label_sequences(family, masked):
    model, X = table(family)
    keep = None
    if masked:
        keep = np.ones((X.shape[0], T), dtype=bool)
        keep[0, 2] = keep[1, 0] = keep[3, :2] = False
    res = fc.analyze(model, X, family, mask=keep)
    assert isinstance(res.family, fc.Positions) and res.family.length == T
    want = enumerate_stats(fc.get_family(family), model, keep)
    for f, ref in want.items():
        np.testing.assert_allclose(getattr(res, f), ref, rtol=1e-12, atol=1e-13 * np.abs(ref).max(), err_msg=f)
    # every bound holds (sums over inputs of per-input bounds)
    assert np.all(res.v1_lower <= res.v1 * (1 + 1e-12)) and np.all(res.v1 <= res.v1_upper * (1 + 1e-12))
    assert np.all(res.v2_lower <= res.v2 * (1 + 1e-12)) and np.all(res.v2 <= res.v2_upper * (1 + 1e-12))


class ByPositions(Table):
    """The table, whose blocks also come a few positions at a time (``position_chunks``), as a large torch module's
    do when one input's columns exceed the memory budget."""

    position_chunks = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spans = []

    def derivatives_of(self, X, groups, *, hessian=True, positions=None):
        d = self.derivatives(X, hessian=hessian)
        self.spans.append(positions)
        if positions is None:
            return d
        (t0, t1), width, b = positions, self.output_shape[1], d.blocks[0]
        rows = slice(t0 * width, t1 * width)
        return fc.Derivatives(d.outputs, (fc.ColumnBlock("theta", b.jac[:, rows],
                                                         None if b.diag_hess is None else b.diag_hess[:, rows]),))


@pytest.mark.parametrize("family", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("span", [1, 2])
def test_a_few_positions_at_a_time_give_the_whole_sequences_statistics(family, masked, span):
    """Under a budget that holds ``span`` positions' columns, analyze takes each sequence a span of positions at a
    time and merges the per-sequence moments (the cross-position term Σ_{t≠r} I_t I_r exactly): every field of one
    call over whole sequences, the bounds included, with and without a mask."""
    from fishercore._batching import CHUNK_SHARE

    plain, X = table(family, seed=5)
    model = ByPositions(plain.H, plain.U, plain.W, plain.output_shape)
    keep = None
    if masked:
        keep = np.ones((X.shape[0], T), dtype=bool)
        keep[0, 2] = keep[1, 0] = keep[3, :2] = keep[4, :] = False
    per_position = 2 * model.n_outputs * K * 8 / T  # its columns and Hessian diagonals
    res = fc.analyze(model, X, family, mask=keep, memory_budget=(span + 0.5) * per_position / (1 - CHUNK_SHARE))
    want = [(t, min(T, t + span)) for t in range(0, T, span)]
    assert model.spans == want * X.shape[0]  # one input at a time, its positions a span at a time
    one = fc.analyze(plain, X, family, mask=keep)
    for f in ("fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper", "v2_lower", "v2_upper"):
        ref = getattr(one, f)
        np.testing.assert_allclose(getattr(res, f), ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max(), err_msg=f)


def test_a_masked_position_is_the_same_as_a_sequence_without_it():
    """Masking the last position equals a model with T − 1 positions (every field, the bounds included)."""
    model, X = table("categorical", seed=3)
    keep = np.ones((X.shape[0], T), dtype=bool)
    keep[:, -1] = False
    short = Table(model.H[:, :-C], model.U[:, :-C], model.W[:, :-C], (T - 1, C))
    a, b = fc.analyze(model, X, mask=keep), fc.analyze(short, X)
    for f in ("fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper", "v2_lower", "v2_upper"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-13, atol=1e-15, err_msg=f)


def test_one_position_is_the_plain_family():
    model, X = table("categorical", seed=4)
    one = Table(model.H[:, :C], model.U[:, :C], model.W[:, :C], (1, C))
    flat = Table(model.H[:, :C], model.U[:, :C], model.W[:, :C], (C,))
    a, b = fc.analyze(one, X), fc.analyze(flat, X)
    for f in ("fisher", "v1", "v2", "c12", "v1_lower", "v1_upper", "v2_lower", "v2_upper"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-13, atol=1e-15, err_msg=f)


@pytest.mark.parametrize("family", ["categorical", "bernoulli"])
def test_spectrum_is_that_of_the_sequence_by_enumeration(family):
    """λ(Λ) and λ(𝓜) of the whole sequence's score, by enumeration, against Positions.spectrum."""
    fam = fc.Positions(family, T)
    width = C if family == "categorical" else 2
    h = np.random.default_rng(7).normal(size=(1, T * width))
    space = sequence_space(fc.get_family(family), h[0], width)
    probs = np.array([p for p, _ in space])
    S = np.array([s for _, s in space])
    Lam = S.T @ (S * probs[:, None])
    vecs = np.einsum("ki,kj->kij", S, S).reshape(len(S), -1)
    mean = probs @ vecs
    M = (vecs - mean).T @ ((vecs - mean) * probs[:, None])
    block = np.eye(width) - np.ones((width, width)) / width if family == "categorical" else np.eye(width)
    P = np.kron(np.eye(T), block)
    lam = np.linalg.eigvalsh(P @ Lam @ P)
    lam = lam[lam > 1e-12] if family == "categorical" else lam
    ev = symmetric_spectrum(M, P)
    got = fam.spectrum(h)
    np.testing.assert_allclose([got.lam_min[0], got.lam_max[0], got.m_max[0]], [lam.min(), lam.max(), ev.max()],
                               rtol=1e-9)
    assert got.m_min[0] <= ev.min() + 1e-12


@pytest.mark.parametrize("family", ["categorical", "gaussian", "bernoulli"])
@pytest.mark.parametrize("estimator", ["i1", "i2"])
def test_estimates_use_one_label_per_position(family, estimator):
    """estimate() against Î1 = (Σ_t s_tᵀu_t)², Î2 = Σ_t (u_tᵀΛ_t u_t − s_tᵀw_t) on the labels sample_labels draws,
    written position by position; masked positions left out of both."""
    model, X = table(family, seed=5)
    width = model.output_shape[1]
    fam = fc.Gaussian(0.7) if family == "gaussian" else fc.get_family(family)
    keep = np.ones((X.shape[0], T), dtype=bool)
    keep[2, 1] = False
    M = 6
    y = fc.sample_labels(model, X, fam, n_draws=M, seed=11)
    assert y.shape[:3] == (M, X.shape[0], T)
    got = fc.estimate(model, X, fam, estimator=estimator, n_draws=M, seed=11, mask=keep)
    total = np.zeros(K)
    for m in range(M):
        for i in range(X.shape[0]):
            g, curv = np.zeros(K), np.zeros(K)
            for t in np.flatnonzero(keep[i]):
                sl = slice(t * width, (t + 1) * width)
                h, u, w = model.H[i, sl], model.U[i, sl], model.W[i, sl]
                s = fam.score(h[None], y[m, i, t][None])[0]
                g += s @ u
                lam = _output_fisher(fam, h)
                curv += np.einsum("ck,cd,dk->k", u, lam, u) - s @ w
            total += g**2 if estimator == "i1" else curv
    np.testing.assert_allclose(got, total / (M * X.shape[0]), rtol=1e-12, atol=1e-14)


def _output_fisher(fam, h):
    """Λ = −∂²ℓ/∂h² of one position, in closed form."""
    if fam.name == "categorical":
        p = np.exp(h - h.max())
        p /= p.sum()
        return np.diag(p) - np.outer(p, p)
    if fam.name == "bernoulli":
        p = 1 / (1 + np.exp(-h))
        return np.diag(p * (1 - p))
    return np.eye(h.shape[0]) / fam.variance


def test_errors_name_the_argument():
    model, X = table("categorical")
    assert_raises_named(lambda: fc.analyze(model, X, mask=np.ones((X.shape[0], T + 1), dtype=bool)),
                        ValueError, "mask:")
    assert_raises_named(lambda: fc.analyze(model, X, mask=np.ones((X.shape[0], T))), TypeError, "mask:")
    flat = Table(model.H, model.U, model.W, (T * C,))
    assert_raises_named(lambda: fc.analyze(flat, X, mask=np.ones((X.shape[0], T), dtype=bool)), ValueError, "mask:")
    assert_raises_named(lambda: fc.analyze(model, X, fc.Positions("categorical", T + 1)), ValueError, "family:")
    assert_raises_named(lambda: fc.estimate(model, X, labels=np.zeros((X.shape[0],), dtype=int)),
                        ValueError, "labels:")
    odd = Table(model.H, model.U, model.W, (T, C, 1))
    assert_raises_named(lambda: fc.analyze(odd, X), ValueError, "model:")


def test_saved_analysis_keeps_its_positions(tmp_path):
    model, X = table("categorical")
    res = fc.analyze(model, X)
    res.save(tmp_path / "seq.npz")
    back = fc.load_analysis(tmp_path / "seq.npz")
    assert back.family == res.family == fc.Positions("categorical", T)
    np.testing.assert_array_equal(back.v1, res.v1)


class Doubled(fc.Categorical):
    """A user's family that overrides moments (and knows nothing of diag_hess=None)."""

    def moments(self, outputs, jac, diag_hess):
        return fc.Moments(*(2.0 * m for m in super().moments(outputs, jac, diag_hess)))


@pytest.mark.parametrize("second_order", [True, False])
def test_first_order_only_keeps_a_user_familys_moments(second_order):
    """Without Hessian diagonals the built-in families skip the second-order work; a subclass that overrides
    moments still gets its own numbers (w = 0 handed to it), and v2, c12 stay NaN: not computed."""
    seq, X = table("categorical", seed=6)  # its first position, as a model with outputs (n, C)
    model = Table(seq.H[:, :C], seq.U[:, :C], seq.W[:, :C], (C,), second_order)
    plain, doubled = fc.analyze(model, X), fc.analyze(model, X, Doubled())
    np.testing.assert_allclose(doubled.fisher, 2 * plain.fisher, rtol=1e-13)
    np.testing.assert_allclose(doubled.v1, 2 * plain.v1, rtol=1e-13)
    assert np.isnan(plain.v2).all() != second_order and np.isnan(doubled.c12).all() != second_order


def test_gaussian_sequences_keep_v1_equal_to_twice_fisher_squared():
    """Fact 4 holds per input sequence: v1 = 2 I², and the v1 bounds are equalities (every eigenvalue of 𝓜 is 2/σ⁴,
    the cross blocks' 2 λ_t λ_r included)."""
    rng = np.random.default_rng(9)
    h, u, w = rng.normal(size=(4, T * C)), rng.normal(size=(4, T * C, K)), rng.normal(size=(4, T * C, K))
    s = fc.fisher_stats(h, u, w, fc.Positions(fc.Gaussian(variance=0.7), T))
    np.testing.assert_allclose(s.v1, 2 * s.fisher**2, rtol=1e-13)
    np.testing.assert_allclose(s.v1_upper, s.v1, rtol=1e-13)
    np.testing.assert_allclose(s.v1_lower, s.v1, rtol=1e-13)


def test_batches_summary_and_sample_sizes_of_a_sequence_analysis():
    """analyze_batches merges sequence analyses as analyze computes them; summary and sample sizes work as for
    any family."""
    model, X = table("categorical", n=6)
    whole = fc.analyze(model, X)
    merged = fc.analyze_batches(model, [X[:2], X[2:]])
    np.testing.assert_allclose(merged.v1, whole.v1, rtol=1e-13)
    assert merged.family == whole.family
    assert "theta" in str(whole.summary())
    assert whole.sample_size("i1").shape == (K,) and np.all(whole.sample_size("i2") >= 1)


def test_analyze_batches_takes_each_batchs_mask(tmp_path):
    """A loader yielding (inputs, mask): analyze_batches(mask_at=1) equals analyze with the whole mask, also after a
    resume from its checkpoint; a batch without the element is refused naming mask_at."""
    model, X = table("categorical", n=6)
    keep = np.ones((6, T), dtype=bool)
    keep[1, 2] = keep[4, :2] = False
    want = fc.analyze(model, X, mask=keep)
    loader = [(X[:4], keep[:4]), (X[4:], keep[4:])]
    got = fc.analyze_batches(model, loader, mask_at=1, checkpoint=tmp_path / "run.npz")
    for f in ("fisher", "v1", "v2", "c12", "var_x"):
        np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=1e-12, atol=1e-15)
    again = fc.analyze_batches(model, loader, mask_at=1, checkpoint=tmp_path / "run.npz")
    np.testing.assert_array_equal(again.v1, got.v1)
    with pytest.raises(ValueError, match="mask_at: batch 0 has no element 1"):
        fc.analyze_batches(model, [X[:4]], mask_at=1)
    with pytest.raises(ValueError, match="mask_at: expected the position"):
        fc.analyze_batches(model, loader, mask_at=0)
