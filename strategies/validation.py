"""Always-on checks of a site's reply against the global model, before any aggregation.

A reply that fails is not repaired: it is set aside as a `RejectedUpdate` naming the site (its
pseudonymous node id) and the key at fault, and logged. Reasons only ever name parameter keys,
shapes, dtypes and counts, never array contents, so they are safe to log and to report.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from strategies.fedavg import MODALITY_SEPARATOR, SiteReply

logger = logging.getLogger(__name__)

EXPECTED_DTYPE = np.dtype(np.float32)


@dataclass(frozen=True)
class RejectedUpdate:
    """Why one site's reply was not aggregated; `key` names the array or count at fault, if any."""

    site: str
    reason: str
    key: str | None = None

    def __str__(self) -> str:
        where = f" ({self.key})" if self.key else ""
        return f"site {self.site}: {self.reason}{where}"


def _modality(key: str) -> str | None:
    head, sep, _ = key.partition(MODALITY_SEPARATOR)
    return head if sep and head else None


def _check_counts(reply: SiteReply, sent_modalities: set[str]) -> RejectedUpdate | None:
    for modality, count in reply.num_examples.items():
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            return RejectedUpdate(reply.site, f"example count is {type(count).__name__}, not int", modality)
        if count < 0:
            return RejectedUpdate(reply.site, f"negative example count {int(count)}", modality)
    for modality in sorted(sent_modalities):
        if reply.num_examples.get(modality, 0) <= 0:
            return RejectedUpdate(reply.site, "arrays sent without a positive example count", modality)
    return None


def _check_keys(
    reply: SiteReply, global_arrays: Mapping[str, np.ndarray], sent_modalities: set[str]
) -> RejectedUpdate | None:
    for key in reply.arrays:
        if _modality(key) is None:
            return RejectedUpdate(reply.site, "key has no '<modality>/' prefix", key)
        if key not in global_arrays:
            return RejectedUpdate(reply.site, "unknown key (not in the global model)", key)
    for key in global_arrays:
        if _modality(key) in sent_modalities and key not in reply.arrays:
            return RejectedUpdate(reply.site, "missing key (partial update of a modality)", key)
    return None


def _check_arrays(reply: SiteReply, global_arrays: Mapping[str, np.ndarray]) -> RejectedUpdate | None:
    for key, value in reply.arrays.items():
        if not isinstance(value, np.ndarray):
            return RejectedUpdate(reply.site, f"value is {type(value).__name__}, not a numpy array", key)
        if value.dtype != EXPECTED_DTYPE:
            return RejectedUpdate(reply.site, f"dtype {value.dtype}, expected {EXPECTED_DTYPE}", key)
        expected_shape = np.shape(global_arrays[key])
        if value.shape != expected_shape:
            return RejectedUpdate(reply.site, f"shape {value.shape}, expected {expected_shape}", key)
    # Finiteness last: it is the only check that reads every value.
    for key, value in reply.arrays.items():
        finite = np.isfinite(value)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            return RejectedUpdate(reply.site, f"{bad} of {value.size} values are NaN or Inf", key)
    return None


def validate_reply(
    reply: SiteReply,
    global_arrays: Mapping[str, np.ndarray],
    announced_modalities: Collection[str] | None = None,
) -> RejectedUpdate | None:
    """Check one reply; None when it may be aggregated, else the first problem found.

    Checks, cheapest first: every key has a modality prefix and exists in the global model; a
    modality the site sends is sent whole (no missing keys) with a positive example count; the
    modality was announced by the site (when `announced_modalities` is given); every array is a
    float32 numpy array of the global shape; no value is NaN or Inf.
    """
    if not reply.arrays:
        return RejectedUpdate(reply.site, "reply holds no arrays")
    sent = {m for m in (_modality(key) for key in reply.arrays) if m is not None}
    if announced_modalities is not None:
        unannounced = sorted(sent - set(announced_modalities))
        if unannounced:
            return RejectedUpdate(reply.site, "modality the site did not announce", unannounced[0])
    return _check_keys(reply, global_arrays, sent) or _check_counts(reply, sent) or _check_arrays(reply, global_arrays)


def screen_replies(
    replies: Iterable[SiteReply],
    global_arrays: Mapping[str, np.ndarray],
    announced: Mapping[str, Collection[str]] | None = None,
) -> tuple[list[SiteReply], list[RejectedUpdate]]:
    """Split replies into (accepted, rejected), logging each rejection by site.

    `announced` maps a site to the modalities it declared; a site missing from it announced nothing,
    so every array it sends is rejected. Without `announced` the modality check is skipped.
    """
    accepted: list[SiteReply] = []
    rejected: list[RejectedUpdate] = []
    for reply in replies:
        site_modalities = None if announced is None else announced.get(reply.site, ())
        problem = validate_reply(reply, global_arrays, site_modalities)
        if problem is None:
            accepted.append(reply)
        else:
            logger.warning("rejected update: %s", problem)
            rejected.append(problem)
    return accepted, rejected
