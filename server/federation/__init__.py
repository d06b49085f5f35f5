"""The coordinator's federation logic: the ServerApp, the round loop, the fine-tuning phase,
checkpoints, central evaluation and reports. Never imports the operations plane (server.ops)."""
