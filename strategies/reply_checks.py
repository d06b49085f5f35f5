"""What the coordinator checks in a site's reply beyond its arrays: the example counts it reports, which
round and global model it answers, whether it replays an earlier update, and how far it moves the model.

Every site is a possible adversary, so nothing a reply says is used before it is checked, and a check
that fails rejects that one reply (with a reason safe to log: counts, rounds, norms and key names, never
array contents); it never fails the run.

* Example counts: finite, whole, positive where arrays were sent, and at most `max_site_examples`
  (the coordinator's cap). FedAvg weights are computed from the checked counts in float64, so no
  count can overflow the sum or take all the weight beyond what the cap allows.
* Freshness: a reply names the round and the digest of the global model it started from; another
  round's or another model's reply is stale. An update whose arrays are byte-identical to one accepted
  in an earlier round is a replay (unless it equals the current global model: a site that learned
  nothing).
* Update norms (the safe default): per modality, a site's update norm ||w_site - w_global|| above
  `factor` x the round's lower median norm is rejected. The lower median is an honest site's norm as
  long as fewer than half the sites send oversized updates, including with only two sites.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from strategies.deltas import delta, l2_norm
from strategies.fedavg import SiteReply, split_by_modality


class ReplyProblemError(ValueError):
    """Why a reply cannot be used; the message is safe to log (no array contents, no site data)."""


def checked_count(value: object, cap: int, name: str) -> int:
    """A reported example count as an int in [0, cap]; `ReplyProblemError` when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ReplyProblemError(f"example count {name} is a {type(value).__name__}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ReplyProblemError(f"example count {name} is {number} (not finite)")
    if number < 0 or number != math.floor(number):
        raise ReplyProblemError(f"example count {name} is {number:g} (not a whole number >= 0)")
    if number > cap:
        raise ReplyProblemError(f"example count {name} is {number:g}, above the coordinator's cap "
                           f"max-site-examples = {cap}")
    return int(number)


def model_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A fingerprint of a set of arrays (keys, dtypes, shapes and bytes), order-independent."""
    hasher = hashlib.blake2b(digest_size=16)
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        hasher.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        hasher.update(value.tobytes() if value.ndim == 0 else value.view(np.uint8).data)
    return hasher.hexdigest()


def check_freshness(reported_round: object, reported_digest: object, server_round: int, global_digest: str) -> None:
    """`ReplyProblemError` unless the reply answers this round's global model."""
    if reported_round is None or reported_digest is None:
        raise ReplyProblemError("reply does not say which round and global model it answers")
    if isinstance(reported_round, bool) or not isinstance(reported_round, (int, float)) \
            or not math.isfinite(float(reported_round)):
        raise ReplyProblemError("reply's round is not a number")
    if int(reported_round) != server_round:
        raise ReplyProblemError(f"stale reply: it answers round {int(reported_round)}, this is round {server_round}")
    if reported_digest != global_digest:
        raise ReplyProblemError(f"stale reply: it started from another global model than round {server_round}'s")


@dataclass
class ReplayGuard:
    """Remembers the digests of each site's accepted updates, so an earlier round's update sent again by
    the same site is refused."""

    seen: dict[tuple[str, str], int] = field(default_factory=dict)  # (site, digest) -> round first accepted

    def check(self, site: str, update_digest: str, server_round: int, unchanged_digest: str) -> None:
        """`ReplyProblemError` when `site` had these exact arrays accepted in an earlier round (unless they are
        the current global model, `unchanged_digest`: a site that learned nothing sends it back)."""
        first = self.seen.get((site, update_digest))
        if first is not None and first != server_round and update_digest != unchanged_digest:
            raise ReplyProblemError(f"replayed update: identical to its update accepted in round {first}")

    def remember(self, site: str, update_digest: str, server_round: int) -> None:
        self.seen.setdefault((site, update_digest), server_round)


def update_norms(update: SiteReply, reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per modality, the L2 norm of the site's change from the global model it started from."""
    groups = split_by_modality(update.arrays)
    return {modality: l2_norm(delta(arrays, reference)) for modality, arrays in groups.items()}


def lower_median(values: Sequence[float]) -> float:
    """The middle value, or the lower of the two middle ones (a majority of values lies at or above it)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class NormScreen:
    """The outcome of screening one round's updates by norm."""

    kept: list[SiteReply]
    rejected: list[tuple[str, str]]  # (site, reason)
    bounds: dict[str, float]  # modality -> the norm bound used


def screen_update_norms(updates: Sequence[SiteReply], norms: Sequence[Mapping[str, float]],
                        factor: float) -> NormScreen:
    """Reject each update with a modality whose norm exceeds `factor` x that modality's lower median norm
    over this round's updates. `norms[i]` are `update_norms(updates[i], global model)`."""
    by_modality: dict[str, list[float]] = {}
    for site_norms in norms:
        for modality, norm in site_norms.items():
            by_modality.setdefault(modality, []).append(norm)
    bounds = {modality: factor * lower_median(values) for modality, values in by_modality.items()}
    kept: list[SiteReply] = []
    rejected: list[tuple[str, str]] = []
    for update, site_norms in zip(updates, norms, strict=True):
        over = [(m, n) for m, n in site_norms.items() if not n <= bounds[m]]
        if over:
            modality, norm = over[0]
            rejected.append((update.site, f"{modality} update norm {norm:.4g} exceeds {factor:g} x the round's "
                                          f"median update norm {bounds[modality] / factor:.4g} "
                                          "(update-norm-factor)"))
        else:
            kept.append(update)
    return NormScreen(kept, rejected, bounds)


def first_non_finite(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The first key (sorted) whose array holds NaN or Inf, else None."""
    for key in sorted(arrays):
        if not np.isfinite(arrays[key]).all():
            return key
    return None
