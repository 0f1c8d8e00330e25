"""AlphaEdit (Fang et al., https://huggingface.co/papers/2410.02355): the update projected onto the null space of
the preserved keys, with the keys of earlier edits in the system, solved in float64."""

import torch

from ..base import EditAlgorithm, LayerProblem
from .config import AlphaEditConfig


class AlphaEdit(EditAlgorithm):
    """`Delta^T = (P (K K^T + sum_p K_p K_p^T) + alpha I)^-1 P K R^T` (the reference's `AlphaEdit_main.py`), with `P`
    the projector onto the eigenvectors of `C0` that span its null space and `alpha` the ridge `L2`.

    As published: the null space holds the eigenvalues of `C0` below `nullspace_threshold` (2e-2, absolute) and
    `alpha = alphaedit_l2` (10, absolute). Options: a threshold relative to the largest eigenvalue, an energy share
    of the trace, and `alpha` in units of `trace(C0) / d_in` (see [`AlphaEditConfig`]). Both are prepared once per
    statistics fingerprint; the eigendecomposition of `C0` is cached beside the statistics. For a preserved key `x`
    (`P x = 0`), `Delta x = 0` exactly.

    Returned as `B = R` and `A = ((P G + alpha I)^-1 P K)^T`, so the update stays rank <= n.
    """

    config_class = AlphaEditConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._ranks: dict[str, int] = {}
        self._energies: dict[str, float] = {}

    def derive(self, statistics):
        # The spectrum is cached beside the statistics (any threshold reuses it): eigh of a 14336-wide float64
        # matrix takes minutes on a CPU.
        eigenvalues, eigenvectors = statistics.spectrum()  # ascending, of C0 = E[k k^T]
        rule = self.config.effective_nullspace_rule
        if rule == "energy":
            in_null = torch.cumsum(eigenvalues, 0) <= self.config.nullspace_energy * eigenvalues.sum()
        elif rule == "relative":
            in_null = eigenvalues < self.config.nullspace_threshold * eigenvalues[-1]
        else:  # the reference: an absolute threshold
            in_null = eigenvalues < self.config.nullspace_threshold
        null = eigenvectors[:, in_null]  # (d_in, r)
        self._ranks[statistics.module_name] = null.shape[1]
        self._energies[statistics.module_name] = float(eigenvalues[in_null].sum() / eigenvalues.sum())
        alpha = self.config.ridge_l2
        if self.config.alphaedit_l2_relative:
            alpha *= float(eigenvalues.mean())  # in units of trace(C0) / d_in
        return null @ null.T, alpha  # (d_in, d_in) projector, absolute ridge

    def solve(self, problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        projector, alpha = self.prepared(problem.module_name)
        keys = problem.keys  # (n, d_in)
        gram = keys.T @ keys
        earlier = self.layer_state(problem.module_name).get("key_gram")
        if earlier is not None:
            gram = gram + earlier
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        system = projector @ gram + alpha * eye
        adjusted = torch.linalg.solve(system, projector @ keys.T)  # (d_in, n)
        self.accumulate_gram(problem.module_name, "key_gram", keys)
        return problem.residuals.T.contiguous(), adjusted.T.contiguous()

    def diagnostics(self) -> dict[str, float]:
        ranks = {f"nullspace_rank/{name}": float(rank) for name, rank in self._ranks.items()}
        return ranks | {f"nullspace_energy/{name}": energy for name, energy in self._energies.items()}
