"""A site's (epsilon, delta) privacy budget and the accountant that spends it.

Every DP-SGD step is one Poisson-subsampled Gaussian mechanism, recorded as (noise multiplier, sample
rate, steps) in Opacus' history format and composed by Opacus' RDP accountant (or its PRV accountant,
which gives tighter epsilons and is slower). The site checks a round against its budget *before*
training it, so a round that would overshoot is refused instead of half-spent.

The history is the only state; it serialises to one float64 tensor (for a site's local state) or to
JSON, and is mechanism-agnostic, so a site may switch between RDP and PRV between rounds.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from strategies.protocol.dp_config import MECHANISMS, Mechanism
from visionfm_core.errors import CheckpointError, ConfigError, VisionFMError

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus' format

HISTORY_KEY = "privacy.history"


@dataclass(frozen=True)
class PrivacyBudget:
    """The most a site will spend on its images: (epsilon, delta)-DP with one image as the unit.

    Set by the site (node config), never by the coordinator: a server could otherwise raise it.
    `epsilon=math.inf` means no budget (DP noise without a cap, e.g. for experiments).
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not (isinstance(self.epsilon, int | float) and self.epsilon > 0):
            raise ConfigError("privacy.epsilon", f"must be a positive number, got {self.epsilon!r}")
        if not (isinstance(self.delta, int | float) and 0.0 < self.delta < 1.0):
            raise ConfigError("privacy.delta", f"must lie in (0, 1), got {self.delta!r}")
        object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "delta", float(self.delta))

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], prefix: str = "privacy-") -> PrivacyBudget:
        """Read `privacy-epsilon` and `privacy-delta` from a site's node config (numbers or strings)."""
        values: dict[str, float] = {}
        for name in ("epsilon", "delta"):
            key = f"{prefix}{name}"
            if key not in node_config:
                raise ConfigError(key, "missing: a site that trains with DP must set its budget")
            try:
                values[name] = float(node_config[key])
            except (TypeError, ValueError) as exc:
                raise ConfigError(key, f"expected a number, got {node_config[key]!r}") from exc
        return cls(epsilon=values["epsilon"], delta=values["delta"])


class PrivacyBudgetExceeded(VisionFMError):  # noqa: N818 - the name the issue uses
    """Training would take the site past its budget; nothing was trained."""

    def __init__(self, site: str, budget: PrivacyBudget, spent: float, projected: float, steps: int) -> None:
        super().__init__(
            f"{site}: privacy budget (epsilon={budget.epsilon:g}, delta={budget.delta:g}) would be exceeded: "
            f"epsilon spent so far {spent:.4g}, after {steps} more step(s) it would be {projected:.4g}; "
            "training refused"
        )
        self.site = site
        self.budget = budget
        self.spent = spent
        self.projected = projected
        self.steps = steps


def combined_noise_multiplier(*noise_multipliers: float) -> float:
    """The noise multiplier of one Gaussian mechanism equivalent to releasing several, on the same
    sampled batch, each with its own clip C_k and noise sigma_k * C_k: 1/sigma^2 = sum_k 1/sigma_k^2.

    (Scale each release by 1/(sigma_k C_k): the noise becomes N(0, I) and one image moves the joint
    vector by at most sqrt(sum_k 1/sigma_k^2).) A zero entry means an un-noised release: result 0.
    """
    if not noise_multipliers:
        raise ValueError("combined_noise_multiplier needs at least one noise multiplier")
    if any(s <= 0 for s in noise_multipliers):
        return 0.0
    return 1.0 / math.sqrt(sum(1.0 / (s * s) for s in noise_multipliers))


def _new_opacus_accountant(mechanism: str) -> IAccountant:
    return PRVAccountant() if mechanism == "prv" else RDPAccountant()


def epsilon_of(history: Sequence[HistoryEntry], delta: float, mechanism: Mechanism = "rdp") -> float:
    """Epsilon at `delta` of a history, computed by Opacus' own accountant (0 for an empty history,
    infinity when any step had no noise)."""
    entries = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not entries:
        return 0.0
    if any(s <= 0 for s, _, _ in entries):
        return math.inf
    accountant = _new_opacus_accountant(mechanism)
    accountant.history = list(entries)
    return float(accountant.get_epsilon(delta=delta))


class SiteAccountant:
    """Spends a site's `PrivacyBudget`; `label` names the site (or dataset) in errors, on the site only."""

    def __init__(self, budget: PrivacyBudget, mechanism: Mechanism = "rdp", label: str = "this site") -> None:
        if mechanism not in MECHANISMS:
            raise ConfigError(
                "privacy.accountant", f"must be one of {', '.join(MECHANISMS)}, got {mechanism!r}"
            )
        self.budget = budget
        self.mechanism: Mechanism = mechanism
        self.label = label
        self._history: list[HistoryEntry] = []
        self._cached: float | None = 0.0  # epsilon of the current history, recomputed lazily
        # RDP of one step per (noise multiplier, sample rate): RDP composes by addition, so predicting a
        # round costs one table look-up instead of Opacus' series for every fractional order again.
        self._rdp_per_step: dict[tuple[float, float], np.ndarray] = {}

    @property
    def history(self) -> list[HistoryEntry]:
        """(noise_multiplier, sample_rate, steps) entries; consecutive equal mechanisms are merged."""
        return list(self._history)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._history)

    def spend(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` Poisson-subsampled Gaussian steps (call after they ran)."""
        _check_mechanism(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        self._history = _appended(self._history, noise_multiplier, sample_rate, steps)
        self._cached = None

    def epsilon_spent(self) -> float:
        """Epsilon spent so far at the budget's delta."""
        if self._cached is None:
            self._cached = self._epsilon(self._history)
        return self._cached

    def epsilon_after(
        self, steps: int, noise_multiplier: float | None = None, sample_rate: float | None = None
    ) -> float:
        """Epsilon the site would have spent after `steps` more steps (default: the last mechanism used)."""
        sigma, rate = self._mechanism_or_last(noise_multiplier, sample_rate)
        _check_mechanism(sigma, rate, steps)
        if steps == 0:
            return self.epsilon_spent()
        return self._epsilon(_appended(self._history, sigma, rate, steps))

    def _epsilon(self, history: Sequence[HistoryEntry]) -> float:
        """Opacus' epsilon of `history`; for RDP the same sums as `RDPAccountant.get_privacy_spent`."""
        if self.mechanism != "rdp" or not history or any(s <= 0 for s, _, _ in history):
            return epsilon_of(history, self.budget.delta, self.mechanism)
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = sum([self._rdp_one_step(s, q) * n for s, q, n in history])
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=self.budget.delta)
        return float(epsilon)

    def _rdp_one_step(self, sigma: float, rate: float) -> np.ndarray:
        key = (sigma, rate)
        if key not in self._rdp_per_step:
            self._rdp_per_step[key] = _rdp_one_step(sigma, rate)
        return self._rdp_per_step[key]

    def can_train(
        self, steps: int, noise_multiplier: float | None = None, sample_rate: float | None = None
    ) -> bool:
        """Whether `steps` more steps stay within the budget (predicted before training)."""
        return self.epsilon_after(steps, noise_multiplier, sample_rate) <= self.budget.epsilon

    def check(
        self, steps: int, noise_multiplier: float | None = None, sample_rate: float | None = None
    ) -> None:
        """Raise PrivacyBudgetExceeded (naming budget and spending) unless `can_train(...)`."""
        projected = self.epsilon_after(steps, noise_multiplier, sample_rate)
        if not projected <= self.budget.epsilon:
            raise PrivacyBudgetExceeded(self.label, self.budget, self.epsilon_spent(), projected, steps)

    def remaining_steps(self, noise_multiplier: float, sample_rate: float, limit: int = 1_000_000) -> int:
        """The most further steps at this mechanism that stay within the budget (capped at `limit`)."""
        with warnings.catch_warnings():
            # Far-off probes of the search hit the edge of Opacus' alpha grid; only the answer matters.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return self._remaining_steps(noise_multiplier, sample_rate, limit)

    def _remaining_steps(self, noise_multiplier: float, sample_rate: float, limit: int) -> int:
        if not self.can_train(1, noise_multiplier, sample_rate):
            return 0
        # Gallop up to the first failing count, then bisect: O(log answer) epsilon evaluations.
        low, high = 1, 2
        while high <= limit and self.can_train(high, noise_multiplier, sample_rate):
            low, high = high, high * 2
        if high > limit:
            return (
                limit
                if self.can_train(limit, noise_multiplier, sample_rate)
                else self._bisect_steps(low, limit, noise_multiplier, sample_rate)
            )
        return self._bisect_steps(low, high, noise_multiplier, sample_rate)

    def _bisect_steps(self, low: int, high: int, noise_multiplier: float, sample_rate: float) -> int:
        """The largest count in [low, high) that fits, given that `low` fits and `high` does not."""
        while high - low > 1:
            middle = (low + high) // 2
            if self.can_train(middle, noise_multiplier, sample_rate):
                low = middle
            else:
                high = middle
        return low

    def noise_multiplier_for(self, sample_rate: float, steps: int) -> float:
        """The smallest noise multiplier (Opacus' search) with which `steps` more steps end exactly within
        the budget, given what is spent already. Raises PrivacyBudgetExceeded if nothing is left."""
        if math.isinf(self.budget.epsilon):
            raise ConfigError("privacy.epsilon", "an unlimited budget does not determine a noise multiplier")
        if self._history:
            # Opacus' search knows one mechanism only; search ours over the whole history instead.
            return self._search_noise(sample_rate, steps)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(
                get_noise_multiplier(
                    target_epsilon=self.budget.epsilon,
                    target_delta=self.budget.delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=self.mechanism,
                )
            )

    def _search_noise(self, sample_rate: float, steps: int) -> float:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return self._bisect_noise(sample_rate, steps)

    def _bisect_noise(self, sample_rate: float, steps: int) -> float:
        low, high = 0.0, 10.0
        while not self.can_train(steps, high, sample_rate):
            high *= 2
            if high > 1e6:
                raise PrivacyBudgetExceeded(self.label, self.budget, self.epsilon_spent(), math.inf, steps)
        while high - low > 1e-3 * high:
            middle = (low + high) / 2
            if self.can_train(steps, middle, sample_rate):
                high = middle
            else:
                low = middle
        return high

    def _mechanism_or_last(
        self, noise_multiplier: float | None, sample_rate: float | None
    ) -> tuple[float, float]:
        if noise_multiplier is None or sample_rate is None:
            if not self._history:
                raise ConfigError(
                    "privacy.noise-multiplier",
                    "no step was taken yet: give the noise multiplier and sample rate",
                )
            last_sigma, last_rate, _ = self._history[-1]
            noise_multiplier = last_sigma if noise_multiplier is None else noise_multiplier
            sample_rate = last_rate if sample_rate is None else sample_rate
        return float(noise_multiplier), float(sample_rate)

    # ----------------------------------------------------------------------------------------------
    # Serialisation: the history is all the state there is.

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """`{"privacy.history": float64 [n, 3]}` (noise multiplier, sample rate, steps per row)."""
        rows = [[s, q, float(n)] for s, q, n in self._history]
        return {HISTORY_KEY: torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 3)}

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_tensors()`; a missing key leaves a fresh accountant, a malformed one raises."""
        if HISTORY_KEY not in state:
            return
        table = state[HISTORY_KEY]
        if table.ndim != 2 or table.shape[1] != 3:
            raise CheckpointError(
                "<local state>", f"'{HISTORY_KEY}' has shape {tuple(table.shape)}, expected [n, 3]"
            )
        self._load_rows(table.to(torch.float64).tolist(), f"'{HISTORY_KEY}'")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: mechanism, budget, history and the epsilon spent (for reports kept on the site)."""
        return {
            "mechanism": self.mechanism,
            "epsilon_budget": self.budget.epsilon,
            "delta": self.budget.delta,
            "epsilon_spent": self.epsilon_spent(),
            "history": [[s, q, n] for s, q, n in self._history],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], label: str = "this site") -> SiteAccountant:
        try:
            budget = PrivacyBudget(float(data["epsilon_budget"]), float(data["delta"]))
            accountant = cls(budget, data.get("mechanism", "rdp"), label)
            rows = data.get("history", [])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError("<accountant json>", f"malformed: {exc}") from exc
        accountant._load_rows(rows, "history")
        return accountant

    def _load_rows(self, rows: Sequence[Sequence[float]], where: str) -> None:
        history: list[HistoryEntry] = []
        for row in rows:
            try:
                sigma, rate, steps = float(row[0]), float(row[1]), float(row[2])
                _check_mechanism(sigma, rate, int(steps))
                if steps != int(steps):
                    raise ValueError(f"fractional step count {steps}")
            except (ValueError, TypeError, IndexError, ConfigError) as exc:
                raise CheckpointError(
                    "<accountant state>", f"{where}: bad entry {list(row)!r}: {exc}"
                ) from exc
            history.append((sigma, rate, int(steps)))
        self._history = history
        self._cached = None


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(sigma: float, rate: float) -> np.ndarray:
    """Opacus' RDP of one subsampled Gaussian step at every default order. Cached for the process: a
    site's lifetime ledger holds only a few distinct mechanisms, each costly to evaluate (fractional
    orders), and every accountant built from the ledger needs them again."""
    value = np.asarray(rdp_analysis.compute_rdp(q=rate, noise_multiplier=sigma, steps=1,
                                                orders=RDPAccountant.DEFAULT_ALPHAS))
    value.setflags(write=False)  # shared between accountants
    return value


def _check_mechanism(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise ConfigError("privacy.noise-multiplier", f"must be a finite number >= 0, got {noise_multiplier}")
    if not 0.0 < sample_rate <= 1.0:
        raise ConfigError("privacy.sample-rate", f"must lie in (0, 1], got {sample_rate}")
    if steps < 0:
        raise ConfigError("steps", f"must be >= 0, got {steps}")


def _appended(history: Sequence[HistoryEntry], sigma: float, rate: float, steps: int) -> list[HistoryEntry]:
    """History plus `steps` steps, merged into the last entry when the mechanism is the same (as Opacus)."""
    out = list(history)
    if out and out[-1][0] == sigma and out[-1][1] == rate:
        out[-1] = (sigma, rate, out[-1][2] + steps)
    else:
        out.append((float(sigma), float(rate), int(steps)))
    return out
