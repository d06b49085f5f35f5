"""One typed configuration for a federated (or simulated) run.

Flower passes run config as a flat mapping with kebab-case keys (nested TOML tables are flattened with
dots, so `[ssl] out-dim = 1024` arrives as `ssl.out-dim`). `RunConfig.from_flat` turns that into typed
fields, rejecting unknown keys by name; `to_flat` gives it back for Flower and for the saved copy of
the resolved config that sits beside every run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from visionfm_core.compile_mode import check_compile_mode
from visionfm_core.config_values import parse_bool, parse_float, parse_int
from visionfm_core.errors import ConfigError
from visionfm_core.modalities import canonical_modality

SSL_PREFIX = "ssl."
PRIVACY_PREFIX = "privacy."
NESTED = {SSL_PREFIX: "ssl", PRIVACY_PREFIX: "privacy"}
STRATEGIES = ("fedavg", "median", "trimmed-mean", "krum", "multi-krum")
CODECS = ("none", "fp16", "bf16", "int8")
PHASES = ("pretrain", "finetune")
FINETUNE_ENCODER = ("frozen", "trained")
FINETUNE_HEAD = ("shared", "personal")
FINETUNE_TASKS = ("classification", "segmentation", "landmarks", "detection", "regression")
FINETUNE_MODES = ("binary", "multiclass", "ordinal")
TRACKERS = ("", "none", "mlflow", "tensorboard")


@dataclass
class RunConfig:
    """Hyperparameters of a run. Site facts (data path, modalities held) come from node config."""

    num_rounds: int = 3
    local_steps: int = 10
    batch_size: int = 32
    arch: str = "micro"
    image_size: int = 32
    patch_size: int = 4
    modalities: str = "fundus"
    objective: str = "ibot"
    # How a site's local teacher follows the new global student each round (README: Design decisions):
    # "ema" keeps local knowledge (FedEMA-style), "reset" restarts it from the global model.
    teacher_sync: str = "ema"
    teacher_ema: float = 0.5
    share_head: bool = True
    # Aggregation: "fedavg" (streaming weighted mean), or robust "median", "trimmed-mean", "krum",
    # "multi-krum"; optional bound on each site's update norm (0 = off).
    strategy: str = "fedavg"
    trim_beta: float = 0.1
    byzantine: int = 1
    max_update_norm: float = 0.0
    # Safe default against a site's oversized update: a reply whose update norm (per modality, from the
    # global model it started from) exceeds this factor times the round's median update norm is rejected
    # (0 = off). The median is the lower median, so it stays an honest site's norm while fewer than half
    # the sites are outliers; a modality only one site sent cannot be judged this way.
    update_norm_factor: float = 4.0
    # The most examples a site may report for one modality (its FedAvg weight is capped by it: a larger,
    # non-finite, fractional or non-positive count rejects the reply).
    max_site_examples: int = 1_000_000
    # Rounds in a row in which no update was accepted before the run stops as failed (0 = never).
    max_failed_rounds: int = 3
    # Transport codec of site updates: "none" (fp32), "fp16", "bf16", "int8".
    compression: str = "none"
    # SecAgg+: the server only ever sees each modality's sum over at least `secagg-threshold` of its sites.
    secure_aggregation: bool = False
    secagg_threshold: float = 0.6
    secagg_clip_range: float = 0.5
    # Site-level (central) DP: each site clips its whole update to this L2 norm (0 = off), sites count
    # equally, and the server adds Gaussian noise of std central-dp-noise x clip / n to each mean.
    central_dp_clip: float = 0.0
    central_dp_noise: float = 0.0
    central_dp_delta: float = 1e-5
    min_sites: int = 1
    round_timeout: float = 1800.0
    # Many sites: the share of connected sites each round asks (seeded by `seed`, at least `min-sites`),
    # and the seconds a round waits for them (0 = up to `round-timeout`); later replies are dropped.
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    round_deadline: float = 0.0
    # Seconds a round waits for a site that was sent the previous round but is offline now (a crashed
    # site whose supervisor restarts it) before going on without it; 0 = never wait.
    rejoin_grace: float = 60.0
    eval_every: int = 1
    knn_k: int = 20
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    # torch.compile of the SSL and fine-tuning steps: "auto" (CUDA only), "on", "off"; a site's node-config
    # key `compile` wins (it knows its hardware). See visionfm_core/compile.py.
    compile: str = "auto"
    client_threads: int = 0
    num_workers: int = 0
    out_dir: str = "runs/latest"
    # Simulation only: the scenario that defines the simulated sites (bundled name or TOML path).
    scenario: str = ""
    # Optional public, labelled data the server evaluates every global encoder on (simulation: bundled).
    server_eval: str = ""
    progress: bool = False
    # Continue a run folder from its last complete round checkpoint instead of starting afresh.
    resume: bool = False
    # Federated fine-tuning after pretraining (0 = none): the global encoder "frozen" or "trained", the
    # classification head "shared" (averaged) or "personal" (kept on each site, never sent).
    finetune_rounds: int = 0
    finetune_epochs: int = 1
    # The fine-tuning recipe of `visionfm finetune` for the run's task unless set: learning rate (0 = the
    # task's: segmentation 2e-3, others 1e-3), layer-wise lr decay of the encoder (0 = the task's: 0.65 for
    # a pretrained encoder; segmentation from a scratch `init-encoders` 1.0) and the least optimiser steps
    # each site (and each baseline arm) trains over all fine-tuning rounds, spread evenly over them (-1 = the
    # task's `--min-steps`: segmentation 800, others 300; 0 = just `finetune-epochs` per round). The server
    # resolves them once and sends the values, so every site and arm trains with the same recipe.
    finetune_lr: float = 0.0
    finetune_layer_decay: float = 0.0
    finetune_min_steps: int = -1
    finetune_batch_size: int = 32
    # The server's step along the sites' averaged fine-tuning update each round (FedAvg with a server
    # learning rate, as FedOpt's server optimisers and FedExP take one): 1 = plain FedAvg, > 1 goes further
    # along the average, whose noise averaging over the sites has lowered.
    finetune_server_lr: float = 1.0
    finetune_encoder: str = "trained"
    finetune_head: str = "shared"
    finetune_task: str = "classification"
    # Any task but classification: the task's settings as JSON (what its adapter's `to_config` gives,
    # e.g. {"num_classes": 2, "class_names": ["background", "vessel"]}); every site builds the same head.
    finetune_task_config: str = ""
    # Preprocessing overrides as JSON on top of the task's own defaults (`visionfm finetune`'s: tiles at
    # the working scale for dense tasks, the fundus field of view), e.g. {"fov_diameter": 512}.
    finetune_preprocess: str = ""
    # The fine-tuning input's width:height, the same at every site (they share the weights): "auto" (OCT
    # 2:1, other modalities square; nothing is measured on a site's images), "square", "W:H" or a number,
    # or per modality, e.g. "oct=550:224,fundus=square" (unlisted modalities: auto). Tiled dense tasks
    # train on square tiles whatever it says.
    finetune_input_aspect: str = "auto"
    # Simulation only: a bundled labelled task set shared out to the sites (strategies/protocol/task_sets.py,
    # e.g. "hrf-vessels"); it sets the task and its settings. Deployed sites name a `task-manifest`.
    finetune_data: str = ""
    finetune_mode: str = "multiclass"
    # Classes per modality, e.g. "fundus=5,oct=4"; unset modalities take the simulation dataset's count.
    finetune_classes: str = ""
    # A folder of <modality>.safetensors encoders to fine-tune instead of pretraining first.
    init_encoders: str = ""
    # Which phase a message belongs to; set by the server for each phase, not by users.
    phase: str = "pretrain"
    # Sample-level DP-SGD at every site (each site's budget comes from its own node config).
    dp: bool = False
    # Experiment tracking of the run's config, per-round metrics and final encoders: "mlflow" or
    # "tensorboard" ("" = none). Local files in the run folder (OUT/mlruns, OUT/tensorboard) unless
    # `tracking-uri` names another store (an MLflow tracking URI, or a TensorBoard log folder).
    tracking: str = ""
    tracking_uri: str = ""
    ssl: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def modality_list(self) -> list[str]:
        """Canonical modality names of the global model, in the configured order."""
        return [canonical_modality(m) for m in self.modalities.split(",") if m.strip()]

    @property
    def total_steps(self) -> int:
        """Local optimisation steps over the whole run: every schedule spans these."""
        return self.num_rounds * self.local_steps

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        positive = ("num_rounds", "local_steps", "batch_size", "image_size", "patch_size", "min_sites", "knn_k")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(_kebab(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 < float(getattr(self, name)) <= 1.0:
                raise ConfigError(_kebab(name), f"must be in (0, 1], got {getattr(self, name)}")
        if self.round_deadline < 0:
            raise ConfigError("round-deadline", f"must be >= 0 seconds (0 = none), got {self.round_deadline}")
        if self.rejoin_grace < 0:
            raise ConfigError("rejoin-grace", f"must be >= 0 seconds, got {self.rejoin_grace}")
        self.compile = check_compile_mode(self.compile, "compile")
        if self.objective not in ("dino", "ibot"):
            raise ConfigError("objective", f"must be 'dino' or 'ibot', got {self.objective!r}")
        if self.teacher_sync not in ("ema", "reset"):
            raise ConfigError("teacher-sync", f"must be 'ema' or 'reset', got {self.teacher_sync!r}")
        if not 0.0 <= self.teacher_ema < 1.0:
            raise ConfigError("teacher-ema", f"must be in [0, 1), got {self.teacher_ema}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val-fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.strategy not in STRATEGIES:
            raise ConfigError("strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.compression not in CODECS:
            raise ConfigError("compression", f"must be one of {', '.join(CODECS)}, got {self.compression!r}")
        if self.secure_aggregation and self.strategy != "fedavg":
            raise ConfigError("strategy", f"'secure-aggregation = true' reveals only sums, and 'strategy = "
                                          f"{self.strategy}' needs every site's own update: use 'fedavg' (with "
                                          "'max-update-norm' to bound each update at its site before masking)")
        if self.secure_aggregation and self.compression != "none":
            raise ConfigError("compression", f"'secure-aggregation = true' quantises updates itself: "
                                             f"'compression = {self.compression}' must be 'none'")
        if not self.update_norm_factor == 0 and not self.update_norm_factor >= 1:
            raise ConfigError("update-norm-factor", f"must be 0 (off) or >= 1, got {self.update_norm_factor}")
        if not 1 <= self.max_site_examples <= 2**53:
            raise ConfigError("max-site-examples", f"must be in [1, 2**53], got {self.max_site_examples}")
        if self.max_failed_rounds < 0:
            raise ConfigError("max-failed-rounds", f"must be >= 0, got {self.max_failed_rounds}")
        if self.central_dp_clip < 0 or self.central_dp_noise < 0:
            raise ConfigError("central-dp-clip", "clip norm and noise multiplier must be >= 0")
        if self.central_dp_noise > 0 and self.central_dp_clip == 0:
            raise ConfigError("central-dp-clip", "central DP noise needs a clip norm")
        if not self.modality_list:
            raise ConfigError("modalities", "names no modality")
        if self.tracking not in TRACKERS:
            raise ConfigError("tracking", f"must be 'mlflow' or 'tensorboard' (or empty), got {self.tracking!r}")
        self._validate_finetune()

    def _validate_finetune(self) -> None:
        for name in ("finetune_epochs", "finetune_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(_kebab(name), f"must be >= 1, got {getattr(self, name)}")
        if self.finetune_rounds < 0:
            raise ConfigError("finetune-rounds", f"must be >= 0, got {self.finetune_rounds}")
        if not self.finetune_lr >= 0:  # also refuses nan
            raise ConfigError("finetune-lr", f"must be > 0 (or 0: the task's default), got {self.finetune_lr}")
        if not 0 <= self.finetune_layer_decay <= 1:
            raise ConfigError("finetune-layer-decay", f"must lie in (0, 1] (or 0: the task's default), "
                                                      f"got {self.finetune_layer_decay}")
        if not 0 < self.finetune_server_lr <= 10:
            raise ConfigError("finetune-server-lr", f"must lie in (0, 10] (1 = plain FedAvg), "
                                                    f"got {self.finetune_server_lr}")
        if self.finetune_min_steps < -1:
            raise ConfigError("finetune-min-steps", f"must be >= 0 (or -1: the task's default), "
                                                    f"got {self.finetune_min_steps}")
        choices = {"finetune-encoder": (self.finetune_encoder, FINETUNE_ENCODER),
                   "finetune-head": (self.finetune_head, FINETUNE_HEAD),
                   "finetune-task": (self.finetune_task, FINETUNE_TASKS),
                   "finetune-mode": (self.finetune_mode, FINETUNE_MODES), "phase": (self.phase, PHASES)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        self.finetune_class_counts()  # parses, or names the bad entry
        self.finetune_task_settings()  # parses, or names the key
        self.finetune_preprocess_options()
        self.finetune_input_aspects()
        if self.init_encoders and self.finetune_rounds == 0:
            raise ConfigError("init-encoders", "only the fine-tuning phase uses it: set finetune-rounds > 0")
        if self.finetune_rounds > 0 and self.compression != "none":
            raise ConfigError("compression", "the fine-tuning phase sends uncompressed updates: use 'none'")

    def finetune_class_counts(self) -> dict[str, int]:
        """`finetune-classes` as {canonical modality: number of classes}."""
        counts: dict[str, int] = {}
        for entry in filter(None, (part.strip() for part in self.finetune_classes.split(","))):
            name, sep, value = entry.partition("=")
            try:
                count = int(value)
            except ValueError:
                count = 0
            if not sep or count < 2:
                raise ConfigError("finetune-classes", f"expected '<modality>=<classes >= 2>', got {entry!r}")
            counts[canonical_modality(name.strip())] = count
        return counts

    def finetune_task_settings(self) -> dict[str, Any]:
        """`finetune-task-config` as a dict ({} when unset)."""
        if not self.finetune_task_config.strip():
            return {}
        try:
            settings = json.loads(self.finetune_task_config)
        except json.JSONDecodeError as exc:
            raise ConfigError("finetune-task-config", f"not valid JSON ({exc.msg} at char {exc.pos})") from exc
        if not isinstance(settings, dict):
            raise ConfigError("finetune-task-config", "must be a JSON object of task settings")
        return settings

    def finetune_preprocess_options(self) -> dict[str, Any]:
        """`finetune-preprocess` as a dict of preprocessing settings ({} when unset)."""
        if not self.finetune_preprocess.strip():
            return {}
        try:
            options = json.loads(self.finetune_preprocess)
        except json.JSONDecodeError as exc:
            raise ConfigError("finetune-preprocess", f"not valid JSON ({exc.msg} at char {exc.pos})") from exc
        # The run's image size, its input aspect (finetune-input-aspect) and the encoder's normalisation.
        fixed = {"image_size", "image_height", "mean", "std"}
        if not isinstance(options, dict) or fixed & set(options):
            raise ConfigError("finetune-preprocess", "must be a JSON object of preprocessing settings other than "
                                                     "image_size, image_height (set finetune-input-aspect), mean "
                                                     "and std")
        return options

    def finetune_input_aspects(self) -> dict[str, str]:
        """`finetune-input-aspect` per canonical modality ({"*": setting} when one setting serves all);
        every setting is checked (auto, square, W:H or a positive number)."""
        from visionfm_core.tasks.aspect import parse_aspect

        text = self.finetune_input_aspect.strip()
        entries = [part.strip() for part in text.split(",")] if "=" in text else [f"*={text or 'auto'}"]
        settings: dict[str, str] = {}
        for entry in entries:
            name, sep, value = entry.partition("=")
            try:
                if not sep or not name.strip() or not value.strip():
                    raise ConfigError("finetune-input-aspect", "")
                modality = "*" if name.strip() == "*" else canonical_modality(name.strip())
                parse_aspect(value)
            except ConfigError as exc:
                raise ConfigError("finetune-input-aspect", f"expected auto, square, W:H or a positive number, "
                                                           f"or '<modality>=<one of those>' entries, got "
                                                           f"{entry if sep else text!r}") from exc
            settings[modality] = value.strip()
        return settings

    def finetune_aspect_setting(self, modality: str) -> str:
        """The `finetune-input-aspect` setting that applies to `modality` ("auto" when it is not listed)."""
        settings = self.finetune_input_aspects()
        return settings.get(canonical_modality(modality), settings.get("*", "auto"))

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from Flower-style flat config; unknown keys are an error that names them."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {name: {} for name in NESTED.values()}
        for key, value in flat.items():
            prefix = next((p for p in NESTED if key.startswith(p)), None)
            if prefix is not None:
                nested[NESTED[prefix]][key[len(prefix):].replace("-", "_")] = value
                continue
            name = key.replace("-", "_")
            if name not in names or name in nested:
                raise ConfigError(key, "unknown run-config key")
            kwargs[name] = _coerce(key, value, names[name].type)
        kwargs.update(nested)
        return cls(**kwargs)

    def to_flat(self) -> dict[str, Any]:
        """Flat kebab-case mapping (Flower UserConfig); round-trips through `from_flat`."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in NESTED.values():
                continue
            flat[_kebab(f.name)] = getattr(self, f.name)
        for prefix, name in NESTED.items():
            for key, value in getattr(self, name).items():
                flat[prefix + _kebab(key)] = value
        return flat

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if kind == "bool":
            return parse_bool(value)
        if kind == "int":
            return parse_int(value)
        if kind == "float":
            return parse_float(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"expected {kind}, got {value!r}") from exc
    return value
