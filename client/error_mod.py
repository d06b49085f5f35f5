"""What a site says when its ClientApp fails: the error's kind, never its text.

An exception's message and traceback name files, folders and values on the site (a DataError names
the image at fault), and Flower would send them to the coordinator as the reply's error reason. This
mod keeps the full error in the site's own log and answers with a reason that holds only the error
class and, for a configuration error, the config key at fault (errors built from numbers alone, a
spent privacy budget or a diverged loss, keep their text).
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from client.privacy.accountant import PrivacyBudgetExceeded
from client.privacy.ledger import PrivacyLedgerDamaged
from visionfm_core.errors import ConfigError
from visionfm_core.ssl.trainer import TrainingDivergedError

logger = logging.getLogger(__name__)


def public_reason(exc: BaseException) -> str:
    """The one line about `exc` that may leave the site."""
    kind = type(exc).__name__
    if isinstance(exc, (PrivacyBudgetExceeded, TrainingDivergedError)):
        return f"{kind}: {exc}"  # built from numbers only (epsilon, loss, step)
    if isinstance(exc, PrivacyLedgerDamaged):
        # Its text names the ledger by a hash of the dataset: that stays on the site.
        return f"{kind}: this site's privacy ledger does not verify; it trains nothing until its IT restores it"
    if isinstance(exc, ConfigError):
        return f"{kind} in config key {exc.key!r} (details in the site's log)"
    return f"{kind} at the site (details in the site's log)"


def safe_error_mod(msg: Message, context: Any, call_next: Any) -> Message:
    """Flower mod: an exception in the app becomes an error reply with `public_reason` only."""
    try:
        return call_next(msg, context)  # type: ignore[no-any-return]
    except Exception as exc:
        logger.exception("the ClientApp failed on a %s message", msg.metadata.message_type)
        return Message(Error(code=int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION), reason=public_reason(exc)),
                       reply_to=msg)
