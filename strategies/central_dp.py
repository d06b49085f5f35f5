"""Site-level (central) differential privacy for federated averaging, compatible with secure aggregation.

The privacy unit is a whole site. Each site clips its full update delta (all modalities together)
to L2 norm C on its own side, so a secure sum never needs to see an individual update; the server
adds Gaussian noise of std z * C to each modality's sum, i.e. z * C / n_m to the mean over that
modality's n_m sites. Sites are weighted equally: example-count weights would make the sensitivity
depend on private counts. One noised release per round is accounted with Opacus' RDP accountant,
sample rate = sites sampled per round / sites in the federation.

Noise comes from `strategies.secure_noise.SecureGaussian` (a CSPRNG keyed from the OS) unless a
numpy generator is passed (tests, reproducible experiments): a seeded or predictable generator would
let anyone who knows its state subtract the noise.

Trust model: the aggregator adds the noise, so it sees the un-noised sum (never one site's update
when secure aggregation is on); the guarantee protects against everyone who receives the model.

Adaptive clipping follows Andrew et al. 2021 ("Differentially private learning with adaptive
clipping"): each site reports whether its norm was <= C (a 0/1 tally that can ride inside the
secure sum); the server noises the count with std sigma_b and moves C geometrically towards the
target quantile. The update noise multiplier is raised so the pair of releases costs what one
release at the nominal multiplier z would: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from strategies.deltas import clip_to_norm
from strategies.fedavg import modality_of
from strategies.secure_noise import SecureGaussian
from visionfm_core.errors import ConfigError

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

NoiseRng = np.random.Generator | SecureGaussian


def _source(rng: NoiseRng | None) -> NoiseRng:
    return SecureGaussian() if rng is None else rng


@dataclass(frozen=True)
class ClippedUpdate:
    """A site's delta after clipping, its norm before, and whether it fitted (the adaptive tally)."""

    arrays: dict[str, np.ndarray]
    norm: float
    unclipped: bool


def clip_site_update(site_delta: Mapping[str, np.ndarray], clip_norm: float) -> ClippedUpdate:
    """Client side: clip the site's whole delta (every modality jointly) to L2 norm `clip_norm`."""
    if not clip_norm > 0:
        raise ConfigError("central_dp.clip_norm", f"must be positive, got {clip_norm}")
    arrays, norm = clip_to_norm(site_delta, clip_norm)
    return ClippedUpdate(arrays, norm, norm <= clip_norm)


def noise_std_of_mean(noise_multiplier: float, clip_norm: float, num_sites: int) -> float:
    """Std of the Gaussian noise on a mean of `num_sites` clipped deltas: z * C / n."""
    if num_sites < 1:
        raise ValueError(f"a mean needs at least one site, got {num_sites}")
    if noise_multiplier < 0:
        raise ConfigError("central_dp.noise_multiplier", f"must be >= 0, got {noise_multiplier}")
    return noise_multiplier * clip_norm / num_sites


def add_noise_to_means(
    means: Mapping[str, np.ndarray],
    sites_per_modality: Mapping[str, int],
    noise_multiplier: float,
    clip_norm: float,
    rng: NoiseRng | None = None,
) -> dict[str, np.ndarray]:
    """Noise per-modality means of clipped deltas (e.g. from secure aggregation) with std z*C/n_m.

    `rng`: None draws from a fresh CSPRNG (the default for real runs); a numpy generator for tests.
    """
    source = _source(rng)
    noised: dict[str, np.ndarray] = {}
    for key, value in means.items():
        modality = modality_of(key)
        if modality not in sites_per_modality:
            raise KeyError(f"no site count for modality {modality!r} (key {key!r})")
        std = noise_std_of_mean(noise_multiplier, clip_norm, sites_per_modality[modality])
        noise = np.asarray(source.normal(0.0, std, size=np.shape(value)), dtype=np.float32)
        noised[key] = np.add(value, noise, dtype=np.float32)
    return noised


def private_mean_by_modality(
    clipped_deltas: Sequence[Mapping[str, np.ndarray]],
    noise_multiplier: float,
    clip_norm: float,
    rng: NoiseRng | None = None,
) -> dict[str, np.ndarray]:
    """Server side without secure aggregation: per-modality unweighted mean of clipped deltas plus noise."""
    sums: dict[str, np.ndarray] = {}
    holders: dict[str, set[int]] = {}
    for index, arrays in enumerate(clipped_deltas):
        for key, value in arrays.items():
            holders.setdefault(modality_of(key), set()).add(index)
            if key in sums:
                sums[key] += value
            else:
                sums[key] = np.asarray(value, dtype=np.float64).copy()
    counts = {modality: len(sites) for modality, sites in holders.items()}
    means = {key: (total / counts[modality_of(key)]).astype(np.float32) for key, total in sums.items()}
    return add_noise_to_means(means, counts, noise_multiplier, clip_norm, rng)


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier for the update when sigma_b is spent on the clipping tally (Andrew et al. 2021)."""
    if not count_noise_std > noise_multiplier / 2:
        raise ConfigError(
            "central_dp.count_noise_std",
            f"must exceed noise_multiplier/2 = {noise_multiplier / 2:g}, got {count_noise_std:g}",
        )
    return (noise_multiplier**-2 - (2.0 * count_noise_std) ** -2) ** -0.5


@dataclass
class AdaptiveClipNorm:
    """Server-held clip norm that tracks the `target_quantile` of site update norms.

    Defaults follow Andrew et al. 2021 (quantile 0.5, geometric learning rate 0.2); they suggest a
    count noise std of about (expected sites per round) / 20.
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 0.0

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ConfigError("central_dp.clip_norm", f"must be positive, got {self.clip_norm}")
        if not 0.0 < self.target_quantile < 1.0:
            raise ConfigError("central_dp.target_quantile", f"must lie in (0, 1), got {self.target_quantile}")
        if self.count_noise_std < 0:
            raise ConfigError("central_dp.count_noise_std", f"must be >= 0, got {self.count_noise_std}")

    def update(self, unclipped_count: int, num_sites: int, rng: NoiseRng | None = None) -> float:
        """Fold in one round's tally (sites whose norm was <= clip_norm); returns the new clip norm.

        `rng`: None draws the count noise from a CSPRNG; a numpy generator for tests."""
        if not 0 <= unclipped_count <= num_sites or num_sites < 1:
            raise ValueError(f"unclipped count {unclipped_count} does not fit {num_sites} sites")
        noisy_count = unclipped_count + float(_source(rng).normal(0.0, self.count_noise_std))
        fraction = noisy_count / num_sites
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip_norm


@dataclass
class SiteLevelAccountant:
    """(epsilon, delta) spent by site-level DP over rounds: one sampled Gaussian release per round."""

    noise_multiplier: float
    sample_rate: float = 1.0
    # Made at the first round: importing Opacus costs about a second, and every ServerApp builds an
    # accountant whether or not its run uses central DP.
    _accountant: RDPAccountant | None = field(default=None, repr=False)
    rounds: int = 0

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError("central_dp.noise_multiplier", "must be positive to give any guarantee")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError("central_dp.sample_rate", f"must lie in (0, 1], got {self.sample_rate}")

    def _rdp(self) -> RDPAccountant:
        if self._accountant is None:
            from opacus.accountants import RDPAccountant

            self._accountant = RDPAccountant()
        return self._accountant

    def step(self, rounds: int = 1) -> None:
        """Account for `rounds` more noised aggregations."""
        for _ in range(rounds):
            self._rdp().step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.rounds += rounds

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (0 before the first round)."""
        if not 0.0 < delta < 1.0:
            raise ConfigError("central_dp.delta", f"must lie in (0, 1), got {delta}")
        if self.rounds == 0:
            return 0.0
        return float(self._rdp().get_epsilon(delta=delta))

    def rounds_within(self, epsilon: float, delta: float, max_rounds: int = 1_000_000) -> int:
        """How many rounds in total fit in (epsilon, delta) at this noise and sample rate."""
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as rdp_analysis

        orders = RDPAccountant.DEFAULT_ALPHAS
        # RDP composes additively: T rounds cost T times one round at every order.
        one_round = np.asarray(
            rdp_analysis.compute_rdp(q=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=1, orders=orders)
        )

        def spent(rounds: int) -> float:
            with warnings.catch_warnings():
                # Far-off probes of the search hit the edge of Opacus' alpha grid; only the answer matters.
                warnings.simplefilter("ignore", UserWarning)
                value, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rounds * one_round, delta=delta)
            return float(value)

        low, high = 0, max_rounds
        while low < high:
            middle = (low + high + 1) // 2
            if spent(middle) <= epsilon:
                low = middle
            else:
                high = middle - 1
        return low
