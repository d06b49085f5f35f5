"""What one hostile site's reply can do to a run through the real round loop (server/federation/rounds.py):
nothing. Three honest sites and one tampered site (tests/unit/federation/site_grid.py) answer the real
Federation; each attack is rejected with its reason, the run completes, and the global model is what
the honest sites alone would give."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

from server.federation.rounds import FAILURE_FILE, Federation, FederationFailedError
from server.ops.runs import export_encoders
from strategies.fedavg import SiteReply
from strategies.protocol.records import record_to_numpy
from strategies.protocol.secagg_stages import STAGE_KEY, handle_stage, keep_update, pack_groups, unpack_groups
from strategies.reply_checks import (
    ReplayGuard,
    ReplyProblemError,
    check_freshness,
    checked_count,
    lower_median,
    screen_update_norms,
)
from tests.unit.federation.site_grid import (
    SITE_NAMES,
    HonestSite,
    SiteGrid,
    Tamper,
    TamperedSite,
    error_reply,
    replaying,
    reply,
    shifted,
    with_count,
    with_manifest,
)
from visionfm_core.errors import ConfigError
from visionfm_core.run_config import RunConfig

HOSTILE = 4
STEPS = {1: 0.01, 2: 0.02, 3: 0.03}
EXAMPLES = {1: 10, 2: 20, 3: 30}


def _initial() -> dict[str, np.ndarray]:
    return {"fundus/backbone.cls_token": np.zeros((1, 1, 8), np.float32),
            "fundus/backbone.pos_embed": np.zeros((1, 5, 8), np.float32),
            "fundus/head.last_layer.weight": np.zeros((4, 8), np.float32)}


def _run(tmp_path: Path, hostile: TamperedSite, rounds: int = 3, **changes: object) -> tuple[Federation, SiteGrid]:
    sites = {node: HonestSite(STEPS[node], EXAMPLES[node]) for node in STEPS}
    grid = SiteGrid({**sites, HOSTILE: hostile})
    cfg = RunConfig(out_dir=str(tmp_path / "run"), num_rounds=rounds, min_sites=2, round_timeout=5,
                    rejoin_grace=0, arch="nano", image_size=32, patch_size=8, **changes)  # type: ignore[arg-type]
    federation = Federation(grid, cfg, _initial(), site_names=SITE_NAMES, poll_interval=0.0)  # type: ignore[arg-type]
    federation.run()
    return federation, grid


def _honest_fedavg(rounds: int) -> float:
    """Every weight after `rounds` rounds of FedAvg over the honest sites only (they all add a constant)."""
    step = sum(STEPS[n] * EXAMPLES[n] for n in STEPS) / sum(EXAMPLES.values())
    return rounds * step


def _assert_honest_model(federation: Federation, rounds: int, expected_per_round: float | None = None) -> None:
    value = _honest_fedavg(rounds) if expected_per_round is None else rounds * expected_per_round
    for key, array in federation.arrays.items():
        assert np.isfinite(array).all(), key
        np.testing.assert_allclose(array, value, rtol=1e-4, err_msg=key)


@pytest.mark.parametrize(("count", "reason"), [
    (math.nan, "is nan (not finite)"),
    (math.inf, "is inf (not finite)"),
    (-5.0, "not a whole number >= 0"),
    (2.5, "not a whole number >= 0"),
    (1e15, "above the coordinator's cap max-site-examples"),
    (1.7e308, "above the coordinator's cap max-site-examples"),
    (0.0, "arrays sent without a positive example count"),
])
@pytest.mark.parametrize("strategy", ["fedavg", "median"])
def test_an_implausible_example_count_rejects_the_reply_not_the_run(
        tmp_path: Path, count: float, reason: str, strategy: str) -> None:
    federation, _ = _run(tmp_path, TamperedSite(0.05, 40, tamper=with_count(count)), strategy=strategy)
    assert len(federation.rejected) == 3, federation.rejected  # once per round
    assert all("update from hostile rejected" in line for line in federation.rejected)
    assert all(reason in line and "fundus" in line for line in federation.rejected), federation.rejected
    if strategy == "fedavg":
        _assert_honest_model(federation, 3)
    else:
        _assert_honest_model(federation, 3, expected_per_round=STEPS[2])
    assert (tmp_path / "run" / "encoders" / "fundus.safetensors").is_file()


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\xff\xfenot json", "manifest is not JSON"),
    (b'{"key": "fundus/backbone.cls_token"}', "manifest is a JSON dict, not a list"),
    (b'[{"key": "fundus/backbone.cls_token", "dtype": "<f4", "shape": [1, 1, 8]}]', "is not {key, dtype, shape"),
    (b'[{"key": "fundus/backbone.cls_token", "dtype": "<f4", "shape": [1000000], "offset": 0}]',
     "reaches past the end"),
    (b'[{"key": "fundus/backbone.cls_token", "dtype": "<f8", "shape": [8], "offset": 0}]', "no __packed__/<f8"),
    (b'[{"key": "fundus/backbone.cls_token", "dtype": "|O", "shape": [8], "offset": 0}]', "no __packed__/|O"),
    (b'[{"key": "fundus/backbone.cls_token", "dtype": "<f4", "shape": [-8], "offset": 0}]', "shape is not a list"),
    (b'[{"key": "fundus/backbone.cls_token", "dtype": "<f4", "shape": [8], "offset": 0},'
     b' {"key": "fundus/backbone.cls_token", "dtype": "<f4", "shape": [8], "offset": 8}]', "names 'fundus/backbone"),
    (b'[{"key": "fundus/extra", "dtype": "<f4", "shape": [8], "offset": 0}]', "unknown key"),
])
def test_a_malformed_packing_manifest_rejects_the_reply_not_the_run(tmp_path: Path, raw: bytes, reason: str) -> None:
    federation, _ = _run(tmp_path, TamperedSite(0.05, 40, tamper=with_manifest(raw)), rounds=2)
    assert len(federation.rejected) == 2 and all(reason in line for line in federation.rejected), federation.rejected
    _assert_honest_model(federation, 2)


@pytest.mark.parametrize("strategy", ["fedavg", "median", "trimmed-mean"])
def test_with_defaults_a_site_adding_1e4_to_every_weight_is_rejected(
        tmp_path: Path, strategy: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        federation, _ = _run(tmp_path, TamperedSite(0.0, 40, tamper=shifted(1e4)), strategy=strategy)
    assert len(federation.rejected) == 3
    assert all("update norm" in line and "median update norm" in line for line in federation.rejected)
    assert "update from hostile rejected: fundus update norm" in caplog.text
    trained = [(r["round"], r["site"]) for r in federation.metrics.rows if r["phase"] in ("train", "transport")]
    assert trained and all(site != "hostile" for _, site in trained)  # a rejected update is not counted
    expected = None if strategy == "fedavg" else STEPS[2]  # median and 10% trim of 3: the middle site
    _assert_honest_model(federation, 3, expected)


def test_without_the_norm_bound_the_same_attack_moves_the_model(tmp_path: Path) -> None:
    """The control: the rejection above is the default bound's doing."""
    federation, _ = _run(tmp_path, TamperedSite(0.0, 40, tamper=shifted(1e4)), rounds=1, update_norm_factor=0.0)
    assert not federation.rejected
    assert float(federation.arrays["fundus/backbone.cls_token"].max()) > 1e3


@pytest.mark.parametrize("relabel", [False, True])
def test_a_replayed_stale_reply_is_rejected(tmp_path: Path, relabel: bool) -> None:
    federation, _ = _run(tmp_path, TamperedSite(0.02, 20, tamper=replaying(1, relabel)), rounds=3)
    reason = "replayed update: identical to its update accepted in round 1" if relabel \
        else "stale reply: it answers round 1, this is round"
    assert [line.split(":")[0] for line in federation.rejected] == ["round 2", "round 3"], federation.rejected
    assert all(reason in line for line in federation.rejected), federation.rejected
    # Round 1 had the hostile site honest (step 0.02, 20 examples); rounds 2 and 3 the honest three only.
    round_one = (sum(STEPS[n] * EXAMPLES[n] for n in STEPS) + 0.02 * 20) / (sum(EXAMPLES.values()) + 20)
    np.testing.assert_allclose(federation.arrays["fundus/backbone.cls_token"], round_one + _honest_fedavg(2),
                               rtol=1e-4)


def test_a_reply_without_round_or_from_another_model_is_stale() -> None:
    with pytest.raises(ReplyProblemError, match="does not say which round"):
        check_freshness(None, None, 3, "abc")
    with pytest.raises(ReplyProblemError, match="another global model"):
        check_freshness(3, "old", 3, "abc")
    check_freshness(3, "abc", 3, "abc")
    guard = ReplayGuard()
    guard.remember("a", "u1", 1)
    guard.check("a", "u1", 1, "g")  # the same round: not a replay
    guard.check("b", "u1", 2, "g")  # another site's arrays: not its replay
    guard.remember("a", "g", 1)
    guard.check("a", "g", 2, "g")  # a site that learned nothing sends the global model back
    with pytest.raises(ReplyProblemError, match="round 1"):
        guard.check("a", "u1", 2, "g")


def test_counts_and_weights_never_overflow() -> None:
    assert checked_count(1_000_000.0, 1_000_000, "x") == 1_000_000
    for bad in (1.7e308, math.inf, -math.inf, math.nan, True, "12"):
        with pytest.raises(ReplyProblemError):
            checked_count(bad, 1_000_000, "x")
    with pytest.raises(ConfigError, match="max-site-examples"):
        RunConfig(max_site_examples=2**60)


def test_norm_screen_uses_the_lower_median_so_two_sites_suffice() -> None:
    assert lower_median([1.0, 631_500.0]) == 1.0 and lower_median([3.0, 1.0, 2.0]) == 2.0
    replies = [SiteReply("a", {}, {}), SiteReply("b", {}, {})]
    screen = screen_update_norms(replies, [{"fundus": 1.0}, {"fundus": 631_500.0}], 4.0)
    assert [r.site for r in screen.kept] == ["a"] and screen.rejected[0][0] == "b"


def test_every_site_failing_stops_the_run_as_failed_and_resume_continues(tmp_path: Path) -> None:
    hostile = TamperedSite(0.05, 40)
    federation, grid = _run(tmp_path, hostile, rounds=1)  # round 1 is good and checkpointed
    out = tmp_path / "run"
    for node in list(grid.sites):
        grid.sites[node] = error_reply_site
    cfg = federation.cfg.replace(num_rounds=5, resume=True, max_failed_rounds=2)
    failing = Federation(grid, cfg, _initial(), site_names=SITE_NAMES, poll_interval=0.0)  # type: ignore[arg-type]
    with pytest.raises(FederationFailedError, match=r"2 round\(s\) in a row without enough accepted updates"):
        failing.run()
    failure = json.loads((out / FAILURE_FILE).read_text())
    assert failure["last-good-round"] == 2 and "max-failed-rounds" in failure["reason"]
    assert (out / "checkpoints" / "round-0002" / "round.json").is_file()  # round 2 kept the model, saved
    assert not (out / "checkpoints" / "round-0004").exists()
    # The sites recover: --resume continues after the last good round and finishes.
    for node in STEPS:
        grid.sites[node] = HonestSite(STEPS[node], EXAMPLES[node])
    grid.sites[HOSTILE] = HonestSite(0.02, 20)
    resumed = Federation(grid, cfg, _initial(), site_names=SITE_NAMES, poll_interval=0.0)  # type: ignore[arg-type]
    resumed.run()
    assert not (out / FAILURE_FILE).exists() and (out / "checkpoints" / "round-0005" / "round.json").is_file()


def error_reply_site(msg, context):  # type: ignore[no-untyped-def]
    return error_reply(msg)


def test_a_non_finite_global_model_stops_the_run_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    federation, _ = _run(tmp_path, TamperedSite(0.05, 40), rounds=1)
    previous = dict(federation.arrays)
    federation.arrays = {**previous, "fundus/head.last_layer.weight": np.full((4, 8), np.inf, np.float32)}
    with pytest.raises(FederationFailedError, match=r"not finite \(fundus/head.last_layer.weight\)"):
        federation._check_global_model(2, previous)
    assert federation.arrays is previous


def test_export_refuses_a_non_finite_encoder(tmp_path: Path) -> None:
    import torch

    from visionfm_core.models.checkpoint import save_encoder

    folder = tmp_path / "run" / "encoders"
    poisoned = {"cls_token": torch.full((1, 1, 8), float("inf"))}
    save_encoder(folder / "fundus.safetensors", poisoned, {"modality": "fundus"})
    with pytest.raises(ConfigError, match=r"fundus\.safetensors is not finite"):
        export_encoders(tmp_path / "run", tmp_path / "export")
    assert not (tmp_path / "export" / "fundus.safetensors").exists()


# -- the fine-tuning phase -------------------------------------------------------------------------------

@pytest.mark.parametrize(("tamper", "reason"), [
    (with_count(1e15), "above the coordinator's cap"),
    (with_count(math.nan), "not finite"),
    (shifted(1e4), "update norm"),
    (replaying(1, relabel=True), "replayed update"),
    (with_manifest(b"not json"), "manifest is not JSON"),
])
def test_the_fine_tuning_phase_rejects_the_same_attacks(tmp_path: Path, tamper: Tamper, reason: str) -> None:
    from server.federation.finetune_phase import FineTunePhase
    from visionfm_core.pretraining import initial_global_arrays

    cfg = RunConfig(out_dir=str(tmp_path / "run"), num_rounds=1, finetune_rounds=3, finetune_classes="fundus=2",
                    min_sites=2, round_timeout=5, rejoin_grace=0, arch="nano", image_size=32, patch_size=8)
    pretrained = {k: v.numpy() for k, v in initial_global_arrays(cfg).items()}
    sites = {node: HonestSite(STEPS[node], EXAMPLES[node]) for node in STEPS}
    grid = SiteGrid({**sites, HOSTILE: TamperedSite(0.02, 20, tamper=tamper)})
    phase = FineTunePhase(grid, cfg, pretrained, site_names=SITE_NAMES, poll_interval=0.0)  # type: ignore[arg-type]
    start = dict(phase.arrays)
    phase.run()
    rejected = phase.rejected
    assert not [r for r in phase.metrics.rows if r["phase"] == "finetune" and r["site"] == "hostile"
                and int(r["finetune_round"]) > 1]
    attacked_rounds = 2 if "replayed" in reason else 3  # a replay needs round 1's update to replay
    assert len(rejected) == attacked_rounds and all(reason in r and "hostile" in r for r in rejected), rejected
    assert (tmp_path / "run" / "finetuned" / "fundus.safetensors").is_file()
    # The honest sites' FedAvg every round (round 1 also the hostile site's honest update, for a replay).
    honest = _honest_fedavg(3)
    if "replayed" in reason:
        both = (sum(STEPS[n] * EXAMPLES[n] for n in STEPS) + 0.02 * 20) / (sum(EXAMPLES.values()) + 20)
        honest = both + _honest_fedavg(2)
    for key, value in phase.arrays.items():
        np.testing.assert_allclose(value, start[key] + np.float32(honest), rtol=1e-4, atol=1e-5, err_msg=key)


# -- secure aggregation: the server sees sums only ------------------------------------------------------

@dataclass
class SecureSite(HonestSite):
    """A site under SecAgg+: keeps its update on the site (strategies/protocol/secagg_stages.py) and answers
    the protocol's stages with the real client code; `count` overrides the example count it reports in the clear."""

    count: float | None = None

    def __call__(self, msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            stage = str(msg.content.config_records["config"][STAGE_KEY])
            return reply(msg, pack_groups(handle_stage(stage, unpack_groups(msg.content), context)))
        if msg.metadata.message_type == MessageType.EVALUATE:
            return super().__call__(msg, context)
        content = self.train_content(msg, context.node_id)
        received = record_to_numpy(msg.content.array_records["arrays"])
        keep_update(context, received, self.sent[-1], {"fundus": self.examples})
        metrics = dict(content.metric_records["metrics"])
        if self.count is not None:
            metrics["fundus/num-examples"] = self.count
        return reply(msg, RecordDict({"metrics": MetricRecord(metrics), "reply": content.config_records["reply"]}))


@pytest.mark.parametrize(("count", "reason"), [(1e15, "above the coordinator's cap"), (math.nan, "not finite"),
                                               (1.7e308, "above the coordinator's cap")])
def test_under_secure_aggregation_counts_in_the_clear_are_checked(tmp_path: Path, count: float, reason: str) -> None:
    sites: dict[int, SecureSite] = {node: SecureSite(STEPS[node], EXAMPLES[node]) for node in STEPS}
    sites[HOSTILE] = SecureSite(0.5, 40, count=count)
    grid = SiteGrid(dict(sites))
    cfg = RunConfig(out_dir=str(tmp_path / "run"), num_rounds=2, min_sites=2, round_timeout=5, rejoin_grace=0,
                    arch="nano", image_size=32, patch_size=8, secure_aggregation=True)
    federation = Federation(grid, cfg, _initial(), site_names=SITE_NAMES, poll_interval=0.0)  # type: ignore[arg-type]
    federation.run()
    assert len(federation.rejected) == 2 and all(reason in r and "hostile" in r for r in federation.rejected)
    # The securely aggregated mean is the honest sites' (up to SecAgg+'s quantisation).
    for key, value in federation.arrays.items():
        assert np.isfinite(value).all()
        np.testing.assert_allclose(value, _honest_fedavg(2), atol=2e-3, err_msg=key)
