"""Server-side evaluation of each global encoder on public labelled data (in simulation: the bundled
datasets' held-out test splits, the same split every mode is compared on). Hospitals' data is never
used here: in deployment this runs only when the coordinator supplies public data."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from strategies.protocol.datasets import SimulationDataset, load_dataset
from strategies.protocol.scenario import load_scenario
from visionfm_core.pretraining import evaluate_encoder_arrays, modality_arrays
from visionfm_core.run_config import RunConfig
from visionfm_core.runtime import resolve_device


def _scorable(dataset: SimulationDataset) -> bool:
    """A probe needs labels on both sides: a folder dataset of unlabelled images (or without `test/`) has
    nothing to score, so its encoders are not probed (pretraining itself needs no labels)."""
    return any(i.label is not None for i in dataset.test) and any(i.label is not None for i in dataset.pool)


def scenario_test_evaluator(cfg: RunConfig):
    """Score every modality's encoder with k-NN/linear probe: fit on the dataset's labelled pool, score on
    its held-out test split."""
    scenario = load_scenario(cfg.scenario)
    device = resolve_device(cfg.device)

    def evaluate(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        for modality in cfg.modality_list:
            if modality not in scenario.datasets:
                continue
            shared = modality_arrays({k: torch.from_numpy(v) for k, v in arrays.items()}, modality)
            if not shared:
                continue
            dataset = load_dataset(scenario.datasets[modality], modality)
            if not _scorable(dataset):
                continue
            results[modality] = evaluate_encoder_arrays(shared, modality, dataset.pool,
                                                        dataset.test, dataset.num_classes, cfg, device)
        return results

    return evaluate


def scenario_colour_reference(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Per modality, the probe scores of colour statistics alone (no encoder) on the same pool and test
    split as `scenario_test_evaluator`: the floor an encoder's scores are read against."""
    from visionfm_core.evaluation.baselines import colour_reference

    scenario = load_scenario(cfg.scenario)
    results: dict[str, dict[str, float]] = {}
    for modality in cfg.modality_list:
        if modality in scenario.datasets:
            dataset = load_dataset(scenario.datasets[modality], modality)
            if not _scorable(dataset):
                continue
            results[modality] = colour_reference(dataset.pool, dataset.test, dataset.num_classes,
                                                 cfg.knn_k).as_metrics()
    return results
