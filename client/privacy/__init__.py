"""Sample-level differential privacy for a site: DP-SGD (one image is the unit), Poisson sampling, and
the (epsilon, delta) budget the site spends and enforces."""

from client.privacy.accountant import (
    PrivacyBudget,
    PrivacyBudgetExceeded,
    SiteAccountant,
    combined_noise_multiplier,
    epsilon_of,
)
from client.privacy.config import DPConfig
from client.privacy.dp_step import DPStepResult, NoiseSettings, dp_step, noise_generator, per_sample_gradients
from client.privacy.sampling import PoissonLoader, ssl_poisson_loader

__all__ = [
    "DPConfig",
    "DPStepResult",
    "NoiseSettings",
    "PoissonLoader",
    "PrivacyBudget",
    "PrivacyBudgetExceeded",
    "SiteAccountant",
    "combined_noise_multiplier",
    "dp_step",
    "epsilon_of",
    "noise_generator",
    "per_sample_gradients",
    "ssl_poisson_loader",
]
