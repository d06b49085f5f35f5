"""Sample-level differential privacy for a site: DP-SGD (one image is the unit) for pretraining and
fine-tuning, Poisson sampling, and the (epsilon, delta) budget the site spends and enforces."""

from client.privacy.accountant import (
    PrivacyBudget,
    PrivacyBudgetExceeded,
    SiteAccountant,
    combined_noise_multiplier,
    epsilon_of,
)
from client.privacy.dp_finetune import DPFineTuner
from client.privacy.dp_ssl import DPSSLTrainer
from client.privacy.dp_step import DPStepResult, NoiseSettings, dp_step, per_sample_gradients
from client.privacy.entry import dp_ssl_loader, new_dp_trainer
from client.privacy.noise import NoiseSource, SecureNoise, TorchNoise, noise_generator
from client.privacy.reporting import RELEASABLE_METRICS, releasable_metrics
from client.privacy.sampling import PoissonLoader, ssl_poisson_loader
from strategies.protocol.dp_config import DPConfig

__all__ = [
    "RELEASABLE_METRICS",
    "DPConfig",
    "DPFineTuner",
    "DPSSLTrainer",
    "DPStepResult",
    "NoiseSettings",
    "NoiseSource",
    "PoissonLoader",
    "PrivacyBudget",
    "PrivacyBudgetExceeded",
    "SecureNoise",
    "SiteAccountant",
    "TorchNoise",
    "combined_noise_multiplier",
    "dp_ssl_loader",
    "dp_step",
    "epsilon_of",
    "new_dp_trainer",
    "noise_generator",
    "per_sample_gradients",
    "releasable_metrics",
    "ssl_poisson_loader",
]
