"""The node-config keys `visionfm-client join` gives its SuperNode (where the site's audit log, between-round
state and privacy ledger live). Kept apart from the modules that read them, so that `join` (and every other
`visionfm-client` command) starts without importing torch: only the ClientApp's executor needs it."""

from __future__ import annotations

AUDIT_LOG_KEY = "audit-log"  # the audit log's path
STATE_DIR_KEY = "state-dir"  # the site's folder for between-round state
KEEP_HOURS_KEY = "state-keep-hours"  # other runs' state folders idle this long are deleted
LEDGER_DIR_KEY = "privacy-ledger-dir"  # the site's privacy ledger folder (join sets <work>/privacy)
