"""The coordinator's read-only dashboard: a web page served by `visionfm-server start` over mutual TLS,
for the coordinator's operators only (see certs/operators.py)."""
