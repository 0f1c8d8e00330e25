"""Tests of `memit_hf.algorithms`: the defining equations of the MEMIT, ROME and EMMET solves, their failure modes, and
the stateful interface (prepare per fingerprint, staged state committed or discarded, state dicts)."""

import pytest
import torch

from memit_hf.algorithms import (
    ALGORITHM_CONFIGS,
    ALGORITHM_NAMES,
    ALGORITHMS,
    EMMET,
    MEMIT,
    ROME,
    CovarianceConfig,
    EditAlgorithm,
    IllConditionedError,
    LayerProblem,
    MEMITConfig,
    cholesky_factor,
    equality_constrained_update,
    get_algorithm,
    get_config_class,
)
from memit_hf.algorithms.memit.algorithm import low_rank_solve
from memit_hf.statistics import LayerStatistics, SecondMoment


def statistics_of(covariance: torch.Tensor, key: str = "key-0", name: str = "m") -> LayerStatistics:
    """Layer statistics whose mean is exactly `covariance` (a count of 1)."""
    return LayerStatistics(name, SecondMoment(covariance, 1), {"corpus": "test", "num_tokens": 1}, key, "collected")


def make(name: str, lam: float = 1.0) -> EditAlgorithm:
    has_lambda = "mom2_update_weight" in get_config_class(name).field_names()
    return get_algorithm(name, {"mom2_update_weight": lam} if has_lambda else None)


def check(name: str, covariance: torch.Tensor, lam: float = 1.0) -> None:
    """The algorithm's `prepare`, which validates the statistics before any weight changes."""
    make(name, lam).prepare(statistics_of(covariance))


def solve(name: str, keys, residuals, covariance, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    algorithm = make(name, lam)
    statistics = statistics_of(covariance)
    if name == "rome":
        algorithm.prepare(statistics)
    return algorithm.solve(LayerProblem("m", 0, keys, residuals, statistics))


def random_problem(n: int, d_in: int, d_out: int, seed: int = 0, tokens: int | None = None):
    """Float64 keys `(n, d_in)`, residuals `(n, d_out)` and a well-conditioned covariance `(d_in, d_in)`."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=generator, dtype=torch.float64)
    residuals = torch.randn(n, d_out, generator=generator, dtype=torch.float64)
    samples = torch.randn(tokens or 4 * d_in, d_in, generator=generator, dtype=torch.float64)
    covariance = samples.T @ samples / samples.shape[0]
    return keys, residuals, covariance


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_registry():
    assert set(ALGORITHMS) == set(ALGORITHM_CONFIGS) == {"memit", "rome", "memit_seq", "emmet", "alphaedit"}
    assert isinstance(get_algorithm("memit"), MEMIT)
    assert get_algorithm("memit", MEMITConfig(mom2_update_weight=3.0)).config.mom2_update_weight == 3.0
    assert isinstance(get_algorithm("rome"), ROME)
    with pytest.raises(ValueError, match=r"Unknown algorithm `grace`; choose one of \['alphaedit', 'emmet', 'memit'"):
        get_algorithm("grace")


@pytest.mark.parametrize("n, d_in, d_out", [(1, 12, 7), (5, 16, 9), (20, 16, 6), (40, 24, 10)])
@pytest.mark.parametrize("lam", [0.5, 1500.0])
def test_memit_satisfies_normal_equation(n, d_in, d_out, lam):
    keys, residuals, covariance = random_problem(n, d_in, d_out, seed=n)
    lora_B, lora_A = solve("memit", keys, residuals, covariance, lam)
    assert lora_B.shape == (d_out, n) and lora_A.shape == (n, d_in)
    assert lora_B.dtype == lora_A.dtype == torch.float64
    delta = lora_B @ lora_A
    # MEMIT Eq. 14 in its normal-equation form: Delta (lam C + K K^T) = R K^T, with K^T = keys and R^T = residuals.
    lhs = delta @ (lam * covariance + keys.T @ keys)
    rhs = residuals.T @ keys
    assert relative_error(lhs, rhs) < 1e-6
    # The factors are the reference's `resid` and `adj`: B = R, A^T = (lam C + K K^T)^-1 K.
    torch.testing.assert_close(lora_B, residuals.T, rtol=0, atol=0)
    explicit = residuals.T @ keys @ torch.linalg.inv(lam * covariance + keys.T @ keys)
    assert relative_error(delta, explicit) < 1e-6
    assert torch.linalg.matrix_rank(delta) <= min(n, d_in, d_out)


@pytest.mark.parametrize("n, d_in", [(1, 12), (3, 24), (6, 24), (7, 24)])
@pytest.mark.parametrize("lam", [0.5, 1500.0])
def test_memit_low_rank_solve_equals_the_full_system(n, d_in, lam):
    """Prepared, MEMIT keeps the Cholesky factor of lambda C and solves a batch of at most d_in / 4 keys through it
    (Woodbury); the solution equals the full system's to float64 precision, and larger batches solve the full
    system."""
    keys, residuals, covariance = random_problem(n, d_in, 5, seed=n)
    statistics = statistics_of(covariance)
    full_B, full_A = make("memit", lam).solve(LayerProblem("m", 0, keys, residuals, statistics))  # not prepared
    algorithm = make("memit", lam)
    algorithm.prepare(statistics)
    factor = algorithm.prepared_for(statistics)
    torch.testing.assert_close(factor @ factor.T, lam * covariance, rtol=1e-12, atol=1e-12)
    lora_B, lora_A = algorithm.solve(LayerProblem("m", 0, keys, residuals, statistics))
    assert torch.equal(lora_B, full_B)
    if 4 * n <= d_in:
        assert torch.equal(lora_A, low_rank_solve(keys, factor, "system").T)
        assert relative_error(lora_A, full_A) < 1e-12
    else:
        assert torch.equal(lora_A, full_A)
    assert algorithm.prepared_for(statistics_of(covariance, key="other")) is None  # another fingerprint: full system


def test_memit_low_rank_solve_only_where_the_preserved_term_is_lambda_c():
    keys, residuals, covariance = random_problem(2, 16, 3, seed=3)
    statistics = statistics_of(covariance)
    sequential = get_algorithm("memit_seq", {"mom2_update_weight": 2.0})
    sequential.prepare(statistics)
    assert sequential.prepared_for(statistics) is None  # its preserved term grows with every edit

    class Scaled(MEMIT):
        def preserved(self, problem):
            return 3 * super().preserved(problem)

    scaled = Scaled(MEMITConfig(mom2_update_weight=2.0))
    scaled.prepare(statistics)
    assert scaled.preserved_factor(LayerProblem("m", 0, keys, residuals, statistics)) is None
    _, lora_A = scaled.solve(LayerProblem("m", 0, keys, residuals, statistics))
    expected = torch.linalg.solve(6.0 * covariance + keys.T @ keys, keys.T).T
    assert relative_error(lora_A, expected) < 1e-12


def test_memit_least_squares_optimality():
    """Delta minimises lam * tr(D C D^T) + ||D K - R||^2: perturbing it in any direction raises the objective."""
    keys, residuals, covariance = random_problem(6, 10, 5, seed=3)
    lam = 2.0
    lora_B, lora_A = solve("memit", keys, residuals, covariance, lam)
    delta = lora_B @ lora_A

    def objective(d):
        return lam * torch.trace(d @ covariance @ d.T) + ((d @ keys.T - residuals.T) ** 2).sum()

    best = objective(delta)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        direction = torch.randn(delta.shape, generator=generator, dtype=torch.float64)
        assert objective(delta + 1e-3 * direction) > best


def test_memit_large_lambda_shrinks_update():
    keys, residuals, covariance = random_problem(3, 8, 4, seed=5)
    norms = []
    for lam in (1.0, 10.0, 100.0, 1000.0):
        lora_B, lora_A = solve("memit", keys, residuals, covariance, lam)
        norms.append(float((lora_B @ lora_A).norm()))
    assert norms == sorted(norms, reverse=True)
    assert norms[-1] < 0.05 * norms[0]


@pytest.mark.parametrize("n, d_in, d_out", [(1, 12, 7), (4, 16, 9), (10, 16, 6)])
def test_rome_writes_every_residual_exactly(n, d_in, d_out):
    keys, residuals, covariance = random_problem(n, d_in, d_out, seed=10 + n)
    lora_B, lora_A = solve("rome", keys, residuals, covariance, 1500.0)
    assert lora_B.shape == (d_out, n) and lora_A.shape == (n, d_in)
    delta = lora_B @ lora_A
    # Delta k_i = r_i for every request.
    assert relative_error(keys @ delta.T, residuals) < 1e-9
    assert torch.linalg.matrix_rank(delta) <= n
    # Minimum disturbance w.r.t. C: the row space of Delta C is spanned by the keys, i.e. Delta = M K^T C^-1.
    c_inv_k = torch.linalg.solve(covariance, keys.T)  # (d_in, n)
    coefficients = torch.linalg.lstsq(c_inv_k, delta.T).solution  # (n, d_out)
    assert relative_error(c_inv_k @ coefficients, delta.T) < 1e-9


def test_rome_single_request_is_the_rank_one_formula():
    keys, residuals, covariance = random_problem(1, 14, 8, seed=21)
    lora_B, lora_A = solve("rome", keys, residuals, covariance, 0.0)
    k, r = keys[0], residuals[0]
    c_inv_k = torch.linalg.solve(covariance, k)
    expected = torch.outer(r, c_inv_k) / (k @ c_inv_k)
    assert relative_error(lora_B @ lora_A, expected) < 1e-10


def test_rome_has_no_lambda():
    """lambda cancels out of ROME's solution, so its configuration has no field for it and rejects one."""
    assert ALGORITHM_CONFIGS["rome"].field_names() == ()
    with pytest.raises(ValueError, match=r"\['mom2_update_weight'\], which are not hyperparameters of `rome`"):
        get_algorithm("rome", {"mom2_update_weight": 1.0})


def emmet(ridge: float, lam: float = 1.0, accumulate_keys: bool = True) -> EMMET:
    return get_algorithm(
        "emmet", {"mom2_update_weight": lam, "emmet_ridge": ridge, "accumulate_keys": accumulate_keys}
    )


def emmet_closed_form(keys, residuals, system, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EMMET's update `R (K^T C^-1 K + rho I)^-1 K^T C^-1` with `rho = ridge * mean(diag(K^T C^-1 K))`, from explicit
    inverses (another route than the Cholesky solves), and `rho`."""
    c_inv = torch.linalg.inv(system)
    gram = keys @ c_inv @ keys.T  # (n, n) = K^T C^-1 K
    rho = ridge * gram.diagonal().mean()
    eye = torch.eye(len(keys), dtype=torch.float64)
    return residuals.T @ torch.linalg.inv(gram + rho * eye) @ keys @ c_inv, rho


@pytest.mark.parametrize("n, d_in, d_out", [(1, 12, 7), (4, 16, 9), (10, 16, 6)])
def test_emmet_without_ridge_writes_every_residual_with_minimum_disturbance(n, d_in, d_out):
    """With `emmet_ridge=0` EMMET is the equality-constrained update (ROME's joint form): Delta k_i = r_i for every
    request, and Delta C lies in the span of the keys (Delta C = B K^T with C = lambda C0), to float64 rounding."""
    keys, residuals, covariance = random_problem(n, d_in, d_out, seed=30 + n)
    lam = 3.0
    statistics = statistics_of(covariance)
    algorithm = emmet(0.0, lam)
    algorithm.prepare(statistics)
    lora_B, lora_A = algorithm.solve(LayerProblem("m", 0, keys, residuals, statistics))
    assert lora_B.shape == (d_out, n) and lora_A.shape == (n, d_in) and lora_B.dtype == lora_A.dtype == torch.float64
    delta = lora_B @ lora_A
    assert relative_error(keys @ delta.T, residuals) < 1e-10  # the equality constraints
    assert relative_error(delta @ (lam * covariance), lora_B @ keys) < 1e-10  # minimum disturbance w.r.t. C
    expected, _ = emmet_closed_form(keys, residuals, lam * covariance, 0.0)
    assert relative_error(delta, expected) < 1e-10
    rome_B, rome_A = solve("rome", keys, residuals, covariance)  # lambda cancels out of the unrelaxed form
    assert relative_error(delta, rome_B @ rome_A) < 1e-10


@pytest.mark.parametrize("ridge", [0.1, 2.0])
def test_emmet_ridge_solve_is_the_closed_form(ridge):
    """With a ridge, Delta = R (K^T C^-1 K + rho I)^-1 K^T C^-1 (rho relative to the mean diagonal of K^T C^-1 K):
    the factors are B = R (K^T C^-1 K + rho I)^-1 and A = (C^-1 K)^T, so each constraint is relaxed by exactly the
    ridge's share, Delta K = R - rho B."""
    keys, residuals, covariance = random_problem(6, 16, 5, seed=41)
    lam = 2.0
    lora_B, lora_A = emmet(ridge, lam).solve(LayerProblem("m", 0, keys, residuals, statistics_of(covariance)))
    delta = lora_B @ lora_A
    expected, rho = emmet_closed_form(keys, residuals, lam * covariance, ridge)
    assert relative_error(delta, expected) < 1e-10
    assert relative_error(lora_A.T, torch.linalg.solve(lam * covariance, keys.T)) < 1e-10
    assert relative_error(delta @ keys.T + rho * lora_B, residuals.T) < 1e-10  # the relaxed constraints
    assert relative_error(delta @ keys.T, residuals.T) > 0.01  # which the ridge really relaxes


@pytest.mark.parametrize("accumulate_keys", [True, False])
def test_emmet_preserves_the_keys_of_earlier_batches_when_it_accumulates_them(accumulate_keys):
    """A second batch is solved with C = lambda C0 + K1^T K1 (the committed key Gram of the first batch), or with
    lambda C0 alone when `accumulate_keys=False` (which then holds no state)."""
    (k1, r1, covariance), (k2, r2, _) = random_problem(4, 16, 6, seed=50), random_problem(4, 16, 6, seed=51)
    lam, ridge = 0.5, 0.1
    statistics = statistics_of(covariance)
    algorithm = emmet(ridge, lam, accumulate_keys)
    algorithm.solve(LayerProblem("m", 0, k1, r1, statistics))
    algorithm.commit()
    if accumulate_keys:
        assert algorithm.state_dict().keys() == {"m::key_gram"}
        assert torch.equal(algorithm.layer_state("m")["key_gram"], k1.T @ k1)
    else:
        assert algorithm.state_dict() == {}
    lora_B, lora_A = algorithm.solve(LayerProblem("m", 0, k2, r2, statistics))
    system = lam * covariance + (k1.T @ k1 if accumulate_keys else 0)
    expected, _ = emmet_closed_form(k2, r2, system, ridge)
    assert relative_error(lora_B @ lora_A, expected) < 1e-10


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_rome_duplicate_keys_are_ill_conditioned(seed):
    """Two requests with the same key (e.g. the same subject) and different residuals cannot both be written."""
    keys, residuals, covariance = random_problem(2, 10, 4, seed=seed)
    keys[1] = keys[0]
    with pytest.raises(
        IllConditionedError,
        match=r"K\^T C\^-1 K \(are two requests' keys identical\?\) is not numerically positive definite",
    ):
        solve("rome", keys, residuals, covariance, 1.0)


def singular_covariance(d: int = 10, rank: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    samples = torch.randn(rank, d, generator=generator, dtype=torch.float64)
    return samples.T @ samples


def indefinite_covariance(d: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(-1.0, 2.0, d, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("algorithm", ["memit", "rome"])
@pytest.mark.parametrize("build", [singular_covariance, indefinite_covariance], ids=["singular", "indefinite"])
def test_prepare_rejects_bad_covariance(algorithm, build):
    with pytest.raises(IllConditionedError, match=r"C of `m` is not numerically positive definite"):
        check(algorithm, build())


def test_memit_solve_rejects_singular_system():
    """A singular covariance with fewer keys than its null space cannot be solved (lam C + K K^T is singular)."""
    covariance = singular_covariance(d=10, rank=4)
    keys = torch.randn(2, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    residuals = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(
        IllConditionedError, match=r"lambda \* C \+ K K\^T of `m` is not numerically positive definite"
    ):
        solve("memit", keys, residuals, covariance, 1.0)


def test_memit_solve_with_enough_keys_tolerates_singular_covariance():
    """MEMIT only needs lam C + K K^T to be definite: keys spanning C's null space make the system solvable."""
    covariance = singular_covariance(d=6, rank=3)
    keys, residuals, _ = random_problem(8, 6, 3, seed=9)
    lora_B, lora_A = solve("memit", keys, residuals, covariance, 1.0)
    lhs = lora_B @ lora_A @ (covariance + keys.T @ keys)
    assert relative_error(lhs, residuals.T @ keys) < 1e-6


@pytest.mark.parametrize("name", ["memit", "memit_seq", "emmet"])
@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_lambda_must_be_positive(name, lam):
    """One rule for every method with a preserved term `lambda C0` (`CovarianceConfig`): lambda 0 makes the system
    of a batch smaller than the key width singular."""
    with pytest.raises(ValueError, match=r"`mom2_update_weight` must be positive"):
        get_algorithm(name, {"mom2_update_weight": lam})
    assert isinstance(get_config_class(name)(), CovarianceConfig)
    _, _, covariance = random_problem(1, 8, 2)
    check(name, covariance, 1.0)  # passes
    check("rome", covariance)  # ROME does not use lambda


@pytest.mark.parametrize("algorithm", ["memit", "rome"])
@pytest.mark.parametrize("where", ["covariance", "keys"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_is_rejected(algorithm, where, value):
    keys, residuals, covariance = random_problem(3, 8, 4)
    if where == "covariance":
        covariance[2, 5] = value
        with pytest.raises(IllConditionedError, match="has non-finite entries"):
            check(algorithm, covariance)
        return
    keys[1, 3] = value
    with pytest.raises(IllConditionedError, match="has non-finite entries; the statistics or keys are corrupted"):
        solve(algorithm, keys, residuals, covariance)


def test_cholesky_factor():
    _, _, covariance = random_problem(1, 9, 2, seed=11)
    factor = cholesky_factor(covariance, "C")
    torch.testing.assert_close(factor @ factor.T, covariance, rtol=1e-12, atol=1e-12)
    assert torch.equal(factor, torch.tril(factor))
    assert issubclass(IllConditionedError, ValueError)
    with pytest.raises(IllConditionedError, match=r"^X is not numerically positive definite"):
        cholesky_factor(torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64), "X")


def test_prepare_derives_once_per_fingerprint():
    """ROME's Cholesky factor of C is cached per statistics key: the same key reuses it, a new key recomputes it."""
    _, _, covariance = random_problem(1, 8, 2, seed=4)
    rome = make("rome")
    rome.prepare(statistics_of(covariance, key="a"))
    factor = rome.prepared("m")
    torch.testing.assert_close(factor @ factor.T, covariance, rtol=1e-12, atol=1e-12)
    rome.prepare(statistics_of(covariance * 2, key="a"))  # same fingerprint key: not recomputed
    assert rome.prepared("m") is factor
    rome.prepare(statistics_of(covariance * 2, key="b"))
    torch.testing.assert_close(rome.prepared("m") @ rome.prepared("m").T, covariance * 2, rtol=1e-12, atol=1e-12)


class CountingAlgorithm(MEMIT):
    """MEMIT that records the Gram matrix of the keys it solved (a stand-in for a sequential method's state)."""

    def solve(self, problem):
        previous = self.layer_state(problem.module_name).get("gram", torch.zeros(problem.keys.shape[1]))
        self.stage(problem.module_name, gram=previous + (problem.keys**2).sum(0))
        return super().solve(problem)


def test_state_is_staged_then_committed_or_discarded():
    keys, residuals, covariance = random_problem(3, 6, 2, seed=1)
    statistics = statistics_of(covariance)
    algorithm = CountingAlgorithm(MEMITConfig(mom2_update_weight=1.0))
    algorithm.solve(LayerProblem("m", 0, keys, residuals, statistics))
    assert algorithm.layer_state("m") == {} and algorithm.state_dict() == {}  # staged, not yet visible
    algorithm.commit()
    expected = (keys**2).sum(0)
    assert torch.equal(algorithm.layer_state("m")["gram"], expected)
    algorithm.solve(LayerProblem("m", 0, keys, residuals, statistics))
    algorithm.discard()  # a failed edit leaves the committed state alone
    assert torch.equal(algorithm.state_dict()["m::gram"], expected)

    restored = CountingAlgorithm(MEMITConfig(mom2_update_weight=1.0))
    restored.load_state_dict(algorithm.state_dict())
    assert torch.equal(restored.layer_state("m")["gram"], expected)
    with pytest.raises(ValueError, match=r"State entry `gram` is not named `<module>::<key>`"):
        restored.load_state_dict({"gram": expected})


# ------------------------------------------------------------------------------- one check per registered method
def two_batches(method: str, lam: float, **config):
    """Solve two batches on one layer with `method`, committing the first: the second batch's factors, the keys and
    residuals of both, and the second moment `C0`."""
    (k1, r1, covariance), (k2, r2, _) = random_problem(3, 12, 5, seed=70), random_problem(4, 12, 5, seed=71)
    fields = get_config_class(method).field_names()
    values = {"mom2_update_weight": lam} if "mom2_update_weight" in fields else {}
    algorithm = get_algorithm(method, values | config)
    statistics = statistics_of(covariance)
    algorithm.prepare(statistics)
    algorithm.solve(LayerProblem("m", 0, k1, r1, statistics))
    algorithm.commit()
    lora_B, lora_A = algorithm.solve(LayerProblem("m", 0, k2, r2, statistics))
    assert lora_B.shape == (5, 4) and lora_A.shape == (4, 12) and lora_B.dtype == lora_A.dtype == torch.float64
    return lora_B @ lora_A, lora_B, (k1, r1), (k2, r2), covariance


def memit_equation():
    """MEMIT Eq. 14 in normal-equation form, `Delta (lambda C0 + K K^T) = R K^T`; stateless, so the first batch
    changes nothing."""
    lam = 2.0
    delta, _, _, (keys, residuals), c0 = two_batches("memit", lam)
    assert relative_error(delta @ (lam * c0 + keys.T @ keys), residuals.T @ keys) < 1e-10


def memit_seq_equation():
    """`Delta (lambda C0 + K1 K1^T + K K^T) = R K^T`: the committed key Gram of the first batch is preserved."""
    lam = 2.0
    delta, _, (k1, _), (keys, residuals), c0 = two_batches("memit_seq", lam)
    assert relative_error(delta @ (lam * c0 + k1.T @ k1 + keys.T @ keys), residuals.T @ keys) < 1e-10


def rome_equation():
    """Every residual written exactly, `Delta K = R`, with minimum `C0`-norm: `Delta C0` lies in the span of the
    keys (its part orthogonal to them vanishes)."""
    delta, _, _, (keys, residuals), c0 = two_batches("rome", 1.0)
    assert relative_error(keys @ delta.T, residuals) < 1e-10
    basis, _ = torch.linalg.qr(keys.T)  # (d_in, n), orthonormal span of the keys
    orthogonal = torch.eye(len(c0), dtype=torch.float64) - basis @ basis.T
    assert float((delta @ c0 @ orthogonal).norm() / (delta @ c0).norm()) < 1e-10


def emmet_equation():
    """With `C = lambda C0 + K1 K1^T` and `rho = ridge * mean(diag(K^T C^-1 K))`: `Delta (rho C + K K^T) = R K^T`
    (the ridge-relaxed equality constraints, MEMIT's form with rho in the place of lambda)."""
    lam, ridge = 2.0, 0.3
    delta, _, (k1, _), (keys, residuals), c0 = two_batches("emmet", lam, emmet_ridge=ridge)
    system = lam * c0 + k1.T @ k1
    rho = ridge * (keys @ torch.linalg.solve(system, keys.T)).diagonal().mean()
    assert relative_error(delta @ (rho * system + keys.T @ keys), residuals.T @ keys) < 1e-10


def reference_alphaedit_update(covariance, threshold, l2, keys, residuals, earlier_gram):
    """The reference's formula (jianghoucheng/AlphaEdit: `get_project` in `experiments/evaluate.py`, the solve in
    `AlphaEdit_main.py`), transcribed in float64 with the reference's shapes: `P = U_s U_s^T` for the singular vectors
    of `C0` whose singular value is below `threshold`, then `solve(P (K K^T + cache_c) + L2 I, P K R^T)`, which is
    `Delta^T` (`K` is `(d_in, n)`, `R` is `(d_out, n)`)."""
    U, S, _ = torch.linalg.svd(covariance, full_matrices=False)
    small = (S < threshold).nonzero(as_tuple=True)[0]
    P = U[:, small] @ U[:, small].T
    layer_ks, resid = keys.T, residuals.T
    eye = torch.eye(layer_ks.shape[0], dtype=torch.float64)
    upd_matrix = torch.linalg.solve(P @ (layer_ks @ layer_ks.T + earlier_gram) + l2 * eye, P @ layer_ks @ resid.T)
    return upd_matrix.T, P


def alphaedit_equation():
    """As published: `P` spans the eigenvectors of `C0` with eigenvalue below the absolute `nullspace_threshold`,
    `alpha = alphaedit_l2` absolute, and the update equals the reference's formula with the first batch's keys in
    `cache_c` (float64, to 1e-12); `Delta (I - P) = 0` (the preserved directions are untouched)."""
    threshold, l2 = 0.6, 0.5  # inside the spectrum of the test's C0 (about 0.2 .. 3)
    delta, _, (k1, _), (keys, residuals), c0 = two_batches(
        "alphaedit", 1.0, nullspace_threshold=threshold, alphaedit_l2=l2
    )
    expected, projector = reference_alphaedit_update(c0, threshold, l2, keys, residuals, k1.T @ k1)
    assert 0 < int(torch.linalg.matrix_rank(projector)) < len(c0)  # a proper subspace: both conditions say something
    assert relative_error(delta, expected) < 1e-12
    eye = torch.eye(len(c0), dtype=torch.float64)
    assert float((delta @ (eye - projector)).norm() / delta.norm()) < 1e-12


DEFINING_EQUATIONS = {
    "memit": memit_equation,
    "memit_seq": memit_seq_equation,
    "rome": rome_equation,
    "emmet": emmet_equation,
    "alphaedit": alphaedit_equation,
}
"""One check of the defining equation per registered method: a method registered without one fails below."""


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_every_registered_method_satisfies_its_defining_equation(name):
    assert name in DEFINING_EQUATIONS, f"`{name}` is registered without a check of its defining equation here."
    DEFINING_EQUATIONS[name]()


def test_alphaedit_defaults_are_the_published_ones():
    config = get_config_class("alphaedit")()
    assert (config.nullspace_threshold, config.effective_nullspace_rule, config.alphaedit_l2_relative) == (
        2e-2,
        "absolute",
        False,
    )
    assert config.alphaedit_l2 is None and config.ridge_l2 == 10.0  # None: per model, 10 unless a model says else


def test_alphaedit_relative_threshold_and_ridge_options():
    """`nullspace_rule="relative"`: eigenvalues below `threshold` times the largest; `alphaedit_l2_relative`: `alpha
    = alphaedit_l2 * trace(C0) / d_in`. The normal equations `(P (K1 K1^T + K K^T) + alpha I) Delta^T = P K R^T`."""
    threshold, l2 = 0.3, 0.5
    delta, _, (k1, _), (keys, residuals), c0 = two_batches(
        "alphaedit",
        1.0,
        nullspace_threshold=threshold,
        nullspace_rule="relative",
        alphaedit_l2=l2,
        alphaedit_l2_relative=True,
    )
    eigenvalues, eigenvectors = torch.linalg.eigh(c0)
    null = eigenvectors[:, eigenvalues < threshold * eigenvalues[-1]]
    assert 0 < null.shape[1] < len(c0)
    projector = null @ null.T
    eye = torch.eye(len(c0), dtype=torch.float64)
    assert float((delta @ (eye - projector)).norm() / delta.norm()) < 1e-10
    alpha = l2 * eigenvalues.mean()
    lhs = (projector @ (k1.T @ k1 + keys.T @ keys) + alpha * eye) @ delta.T
    assert relative_error(lhs, projector @ keys.T @ residuals) < 1e-10
    # The published rule with the threshold that selects the same eigenvalues, and the ridge in absolute units: equal.
    published, *_ = two_batches(
        "alphaedit", 1.0, nullspace_threshold=float(threshold * eigenvalues[-1]), alphaedit_l2=float(alpha)
    )
    assert relative_error(published, delta) < 1e-12


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nullspace_rule": "energy"}, "needs `nullspace_energy`"),
        ({"nullspace_rule": "relative", "nullspace_energy": 0.1}, "use `nullspace_rule='energy'`"),
        ({"nullspace_rule": "relative", "nullspace_threshold": 2.0}, r"must be in \(0, 1\) for rule 'relative'"),
        ({"nullspace_threshold": 0.0}, "nullspace_threshold"),
        ({"nullspace_rule": "largest"}, "must be one of"),
        ({"alphaedit_l2": 0.0}, "alphaedit_l2"),
    ],
)
def test_alphaedit_config_refuses_inconsistent_rules(values, message):
    with pytest.raises(ValueError, match=message):
        get_config_class("alphaedit")(**values)


def test_alphaedit_configuration_saved_before_the_published_defaults_keeps_its_meaning():
    """A saved configuration without `nullspace_rule` was solved with the relative threshold and ridge: continuing it
    keeps them; today's configurations pass unchanged."""
    config_class = get_config_class("alphaedit")
    legacy = {"nullspace_threshold": 0.01, "nullspace_energy": None, "alphaedit_l2": 10.0}
    assert config_class.upgrade_saved(legacy) == legacy | {"nullspace_rule": "relative", "alphaedit_l2_relative": True}
    energy = {"nullspace_threshold": 0.01, "nullspace_energy": 0.05, "alphaedit_l2": 10.0}
    assert config_class.upgrade_saved(energy)["nullspace_rule"] == "energy"
    today = config_class().to_dict()
    assert config_class.upgrade_saved(today) == today
    assert get_config_class("memit").upgrade_saved({"mom2_update_weight": 1.0}) == {"mom2_update_weight": 1.0}


def test_published_emmet_is_the_reference_formula():
    """`PUBLISHED_EMMET` (scalable-model-editing/unified-model-editing `emmet_main.py`): `C = lambda C0 (+ mu I)`,
    `D = K^T C^-1 K + emmet_lambda I` (only for more than one edit), `Delta = R D^-1 K^T C^-1`, with no earlier keys
    in `C`; transcribed with the reference's shapes, float64, to 1e-12."""
    from memit_hf.algorithms.emmet import PUBLISHED_EMMET

    lam, mu = 2.0, 0.3
    delta, _, _, (keys, residuals), c0 = two_batches("emmet", lam, update_norm_weight=mu, **PUBLISHED_EMMET)
    layer_ks, resid = keys.T, residuals.T  # (d_in, n), (d_out, n)
    cov = lam * c0 + mu * torch.eye(len(c0), dtype=torch.float64)
    C_inv = torch.inverse(cov)
    D = layer_ks.T @ C_inv @ layer_ks + 0.1 * torch.eye(layer_ks.shape[1], dtype=torch.float64)
    adj_k = (torch.inverse(D) @ layer_ks.T @ C_inv).T
    assert relative_error(delta, resid @ adj_k.T) < 1e-12
    # One edit: the reference adds no ridge (ROME's exact write).
    algorithm = get_algorithm("emmet", {"mom2_update_weight": lam, **PUBLISHED_EMMET})
    statistics = statistics_of(c0)
    single = torch.matmul(*algorithm.solve(LayerProblem("m", 0, keys[:1], residuals[:1], statistics)))
    assert relative_error(keys[:1] @ single.T, residuals[:1]) < 1e-12


def test_update_norm_weight_adds_mu_identity_to_the_preserved_term():
    """ENCORE's norm constraint: `Delta (lambda C0 + mu I + sum_p K_p K_p^T + K K^T) = R K^T` (memit_seq), and the
    update is smaller than without it."""
    lam, mu = 2.0, 5.0
    delta, _, (k1, _), (keys, residuals), c0 = two_batches("memit_seq", lam, update_norm_weight=mu)
    eye = torch.eye(len(c0), dtype=torch.float64)
    assert relative_error(delta @ (lam * c0 + mu * eye + k1.T @ k1 + keys.T @ keys), residuals.T @ keys) < 1e-10
    plain, *_ = two_batches("memit_seq", lam)
    assert float(delta.norm()) < float(plain.norm())
    with pytest.raises(ValueError, match="update_norm_weight"):
        get_config_class("memit_seq")(update_norm_weight=-1.0)
    assert "update_norm_weight" not in get_config_class("memit").field_names()  # the published MEMIT has no mu


def test_rome_and_emmet_share_the_equality_constrained_solve():
    """ROME is EMMET with ridge 0 (and lambda, which cancels out, without accumulated keys): bit-identical factors."""
    keys, residuals, covariance = random_problem(5, 12, 4, seed=80)
    statistics = statistics_of(covariance)
    rome = make("rome")
    rome.prepare(statistics)
    rome_B, rome_A = rome.solve(LayerProblem("m", 0, keys, residuals, statistics))
    factor = cholesky_factor(covariance, "C")
    shared_B, shared_A = equality_constrained_update(keys, residuals, factor)
    assert torch.equal(rome_B, shared_B) and torch.equal(rome_A, shared_A)
    emmet_B, emmet_A = emmet(0.0, 1.0, accumulate_keys=False).solve(LayerProblem("m", 0, keys, residuals, statistics))
    assert torch.equal(emmet_B, rome_B) and torch.equal(emmet_A, rome_A)
