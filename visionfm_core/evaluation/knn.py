"""Weighted k-NN classification on frozen features (DINO's protocol: cosine similarity,
votes weighted by exp(similarity / T))."""

from __future__ import annotations

import numpy as np
import torch


def knn_predict_proba(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """Class probabilities [Q, C] for each query from its k nearest training features."""
    if len(train_features) == 0:
        raise ValueError("k-NN needs at least one training feature")
    train = torch.nn.functional.normalize(torch.from_numpy(train_features).float(), dim=1)
    query = torch.nn.functional.normalize(torch.from_numpy(query_features).float(), dim=1)
    labels = torch.from_numpy(train_labels).long()
    k = min(k, len(train))
    sims, idx = (query @ train.T).topk(k, dim=1)
    weights = (sims / temperature).exp()
    votes = torch.zeros(len(query), num_classes)
    votes.scatter_add_(1, labels[idx], weights)
    return (votes / votes.sum(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
