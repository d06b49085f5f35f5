"""The ClientApp every site runs: thin Flower handlers around client/training.py.

Replies carry only weight arrays (the shared student backbone and, when configured, the projection
head) and numbers. The teacher, DINO centres and optimizer moments stay on the site (`SiteStateStore`:
Flower's `context.state` in simulation, files under the node's `state-dir` in deployment).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.error_mod import safe_error_mod
from client.finetuning import FineTuneResult, finetune_evaluate, finetune_round
from client.privacy.accountant import PrivacyBudget
from client.privacy.charging import LedgerScope
from client.privacy.ledger import LedgerBook
from client.privacy.site import ledger_folder, site_budget
from client.site import load_site_data, load_site_tasks
from client.site_state import SiteStateStore
from client.training import RoundResult, evaluate_round, train_round
from strategies.central_dp import clip_site_update
from strategies.compression import encode, payload_bytes
from strategies.fedavg import split_by_modality
from strategies.protocol.records import arrays_to_record, record_to_tensors
from strategies.protocol.secagg_stages import STAGE_KEY, handle_stage, keep_update, pack_groups, unpack_groups
from visionfm_core.compile import check_compile_mode
from visionfm_core.distributed import DistContext, launch
from visionfm_core.errors import ConfigError
from visionfm_core.memory import process_memory_mb
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import torch_threads
from visionfm_core.splits import ModalitySplit
from visionfm_core.tasks.splits import TaskSplit

logger = logging.getLogger(__name__)
LOCAL_STATE_PREFIX = "local-ssl-state/"
MODEL_DIGEST_KEY = "model-digest"
REPLY_INFO = "reply"
PERSONAL_HEAD_PREFIX = "personal-head/"

# Every reply passes the audit mod: it logs what leaves the site (keys, shapes, bytes, hashes). The error mod
# (outermost) keeps exception text, which names files on the site, out of error replies.
app = ClientApp(mods=[safe_error_mod, audit_mod])


def _run_config(msg: Message, context: Context) -> RunConfig:
    """The run config the server sent with the message (it wins over the app's defaults)."""
    flat: dict[str, Any] = dict(context.run_config)
    if "config" in msg.content.config_records:
        flat.update(dict(msg.content.config_records["config"]))
    flat.pop("server-round", None)
    flat.pop(MODEL_DIGEST_KEY, None)
    flat.pop(STAGE_KEY, None)
    cfg = RunConfig.from_flat(flat)
    site_compile = context.node_config.get("compile")
    if site_compile is not None:  # the site knows its hardware: its node-config key wins over the run's
        cfg = cfg.replace(compile=check_compile_mode(site_compile, "node config 'compile'"))
    return cfg


def reply_info(msg: Message) -> ConfigRecord:
    """Which round and global model a training reply answers (the server refuses stale replies)."""
    config = msg.content.config_records["config"]
    return ConfigRecord({"server-round": int(str(config["server-round"])),
                         MODEL_DIGEST_KEY: str(config.get(MODEL_DIGEST_KEY, ""))})


def _site_numbers(context: Context) -> dict[str, float]:
    """A simulated site reports its partition index (not identifying) so reports can use scenario names."""
    if "partition-id" in context.node_config:
        return {"site-index": float(context.node_config["partition-id"])}
    return {}


def _site_seed(context: Context) -> int:
    # Different sites must not draw identical crops/masks; the partition id (simulation) or the node id
    # (deployment) is a stable, non-identifying offset.
    return int(context.node_config.get("partition-id", context.node_id % 100_003)) + 1


def site_privacy(context: Context, cfg: RunConfig) -> tuple[PrivacyBudget | None, LedgerScope | None]:
    """Under DP: the site's own lifetime budget and its ledger (both from the node config, never the run's)."""
    if not cfg.dp:
        refuse_unprivate_run(context, cfg)
        return None, None
    book = LedgerBook(ledger_folder(context.node_config, cfg))
    book.verify_all()  # a damaged ledger stops the site before anything trains
    return site_budget(context.node_config, cfg), LedgerScope(book, int(context.run_id))


def refuse_unprivate_run(context: Context, cfg: RunConfig) -> None:
    """A site that joined with a lifetime budget (`privacy-epsilon`) touches its images only under DP-SGD:
    the coordinator's run config cannot turn its promise off (the budget is the site's, not the run's)."""
    if not cfg.dp and "privacy-epsilon" in context.node_config:
        raise ConfigError("dp", "this site joined with a lifetime privacy budget (privacy-epsilon): it trains and "
                                "evaluates only in runs with dp = true, and this run has dp = false")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local SSL round: global encoders in, updated shared weights and numbers out."""
    started = time.perf_counter()
    cfg = _run_config(msg, context)
    server_round = int(str(msg.content.config_records["config"]["server-round"]))
    if cfg.phase == "finetune":
        return _finetune_train(msg, context, cfg, server_round)
    site = load_site_data(context.node_config, cfg)
    store = SiteStateStore(context)
    local_states = store.load_all(LOCAL_STATE_PREFIX)
    global_arrays = record_to_tensors(msg.content.array_records["arrays"])
    budget, ledger = site_privacy(context, cfg)
    devices = site_devices(context)
    if devices > 1:
        # N worker processes train together; rank 0's result (identical weights on every worker) is sent.
        result = launch(_train_worker, (site, global_arrays, cfg, server_round, local_states, _site_seed(context)),
                        devices, cfg.device)
    else:
        with torch_threads(cfg.client_threads):
            result = train_round(site, global_arrays, cfg, server_round, local_states, site_seed=_site_seed(context),
                                 budget=budget, ledger=ledger)
    for modality, state in result.local_state.items():
        store.save(LOCAL_STATE_PREFIX + modality, state)
    metrics = dict(result.metrics)
    metrics["num-examples"] = float(sum(v for k, v in metrics.items() if k.endswith("/num-examples")))
    metrics.update(_site_numbers(context))
    outgoing = outgoing_arrays(cfg, context, global_arrays, result.arrays, metrics)
    metrics["bytes-sent"] = float(payload_bytes(outgoing))
    # The process's memory (a number, nothing about the data): the coordinator reports it per site.
    metrics.update({f"memory-{k.replace('_', '-')}": v for k, v in process_memory_mb().items()})
    # The site's own work this round (data, training, packing), so the server can tell it from overhead.
    metrics["compute-seconds"] = time.perf_counter() - started
    content = RecordDict({"arrays": arrays_to_record(outgoing), "metrics": MetricRecord(dict[str, Any](metrics)),
                          REPLY_INFO: reply_info(msg)})
    return Message(content=content, reply_to=msg)


def site_devices(context: Context) -> int:
    """The node-config key `devices` (default 1): worker processes, one per device, that train this site."""
    raw = context.node_config.get("devices", 1)
    try:
        devices = int(str(raw))
    except ValueError:
        raise ConfigError("devices", f"node config 'devices' must be a whole number >= 1, got {raw!r}") from None
    if devices < 1:
        raise ConfigError("devices", f"node config 'devices' must be >= 1, got {devices}")
    return devices


def _train_worker(ctx: DistContext, site: dict[str, ModalitySplit], global_arrays: dict[str, torch.Tensor],
                  cfg: RunConfig, server_round: int, local_states: dict[str, dict[str, torch.Tensor]],
                  site_seed: int) -> RoundResult:
    return train_round(site, global_arrays, cfg, server_round, local_states, site_seed=site_seed, dist=ctx)


def _finetune_worker(ctx: DistContext, site: dict[str, TaskSplit], global_arrays: dict[str, torch.Tensor],
                     cfg: RunConfig, server_round: int, personal_heads: dict[str, dict[str, torch.Tensor]],
                     site_seed: int) -> FineTuneResult:
    return finetune_round(site, global_arrays, cfg, server_round, personal_heads, site_seed=site_seed, dist=ctx)


def outgoing_arrays(cfg: RunConfig, context: Context, global_arrays: dict[str, torch.Tensor],
                    trained: dict[str, torch.Tensor], metrics: dict[str, float]) -> dict[str, np.ndarray]:
    """What the reply carries: the trained arrays; their encoded delta (compression); or nothing at all
    under secure aggregation, where the delta waits on the site for the masked exchange. With central DP
    the site's whole delta is clipped first (the server adds the noise)."""
    reference = {k: global_arrays[k].numpy() for k in trained}
    delta = {k: v.numpy() - reference[k] for k, v in trained.items()}
    if cfg.central_dp_clip > 0:
        delta = clip_site_update(delta, cfg.central_dp_clip).arrays
    if cfg.secure_aggregation and cfg.max_update_norm > 0:
        # The server cannot bound an update it never sees: under secure aggregation each site bounds its
        # own, per modality, before masking (a malicious site can skip this; only the sum is protected).
        delta = {k: v for arrays in split_by_modality(delta).values()
                 for k, v in clip_site_update(arrays, cfg.max_update_norm).arrays.items()}
    if cfg.secure_aggregation:
        # Central DP weighs sites equally (example counts would make the sensitivity data-dependent).
        weights = {k.split("/", 1)[0]: 1 if cfg.central_dp_clip > 0 else int(v)
                   for k, v in metrics.items() if k.endswith("/num-examples")}
        keep_update(context, reference, {k: reference[k] + d for k, d in delta.items()}, weights)
        return {}
    if cfg.compression == "none":
        return {k: reference[k] + d for k, d in delta.items()}
    return encode(delta, cfg.compression).arrays


def _personal_heads(context: Context) -> dict[str, dict[str, torch.Tensor]]:
    return SiteStateStore(context).load_all(PERSONAL_HEAD_PREFIX)


def _finetune_train(msg: Message, context: Context, cfg: RunConfig, server_round: int) -> Message:
    """One fine-tuning round; a personal head is kept in the node's state and never put in the reply. The
    update leaves as pretraining's does (`outgoing_arrays`): clipped at the site under central DP, and
    only through the masked sum under secure aggregation."""
    started = time.perf_counter()
    site = load_site_tasks(context.node_config, cfg)
    global_arrays = record_to_tensors(msg.content.array_records["arrays"])
    budget, ledger = site_privacy(context, cfg)
    devices = site_devices(context)
    if devices > 1:
        if cfg.dp:
            raise ConfigError("devices", "DP-SGD runs on one device per site: set devices = 1")
        # N worker processes fine-tune together; rank 0's result (the same weights on every worker) is sent.
        result = launch(_finetune_worker, (site, global_arrays, cfg, server_round, _personal_heads(context),
                                           _site_seed(context)), devices, cfg.device)
    else:
        with torch_threads(cfg.client_threads):
            result = finetune_round(site, global_arrays, cfg, server_round, _personal_heads(context),
                                    site_seed=_site_seed(context), budget=budget, ledger=ledger)
    for modality, head in result.local_heads.items():
        SiteStateStore(context).save(PERSONAL_HEAD_PREFIX + modality, head)
    for modality, stats in result.local_stats.items():  # the site's own log only
        logger.info("fine-tune round %d, %s: %s", server_round, modality,
                    ", ".join(f"{k} {v:.4g}" for k, v in sorted(stats.items())))
    metrics = dict(result.metrics)
    metrics["num-examples"] = float(sum(v for k, v in metrics.items() if k.endswith("/num-examples")))
    metrics.update(_site_numbers(context))
    outgoing = outgoing_arrays(cfg, context, global_arrays, result.arrays, metrics)
    metrics["bytes-sent"] = float(payload_bytes(outgoing))
    metrics["compute-seconds"] = time.perf_counter() - started
    content = RecordDict({"arrays": arrays_to_record(outgoing), "metrics": MetricRecord(dict[str, Any](metrics)),
                          REPLY_INFO: reply_info(msg)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Secure-aggregation stages driven by the server (see strategies/protocol/secagg_stages.py)."""
    stage = str(msg.content.config_records["config"][STAGE_KEY])
    replies = handle_stage(stage, unpack_groups(msg.content), context)
    return Message(content=pack_groups(replies), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global encoders on this site's own labelled validation split.

    Under DP (`dp = true`) the site scores nothing and sends nothing about its data: scores fitted or
    measured on its images are un-noised statistics outside the budget. The run is then scored only on
    the coordinator's own held-out data (`server-eval`, the bundled test split in simulation)."""
    cfg = _run_config(msg, context)
    if cfg.dp:
        return Message(content=RecordDict({"metrics": MetricRecord({"dp-withheld": 1.0})}), reply_to=msg)
    refuse_unprivate_run(context, cfg)
    site: dict[str, TaskSplit] | dict[str, ModalitySplit]
    with torch_threads(cfg.client_threads):
        global_arrays = record_to_tensors(msg.content.array_records["arrays"])
        if cfg.phase == "finetune":
            site = load_site_tasks(context.node_config, cfg)
            metrics = finetune_evaluate(site, global_arrays, cfg, _personal_heads(context))
        else:
            site = load_site_data(context.node_config, cfg)
            metrics = evaluate_round(site, global_arrays, cfg)
    metrics["num-examples"] = float(sum(len(s.val) for s in site.values()))
    metrics.update(_site_numbers(context))
    return Message(content=RecordDict({"metrics": MetricRecord(dict[str, Any](metrics))}), reply_to=msg)
