"""The federation protocol: what the site (client/) and the coordinator (server/) both speak.

Packed Flower records, the secure-aggregation stages over messages, the task-model builders both
sides must agree on, DP-SGD settings, Flower process helpers, and the scenario and dataset
definitions simulated sites and the server read. May import flwr, strategies and certs; never
client, server or simulations."""

from visionfm_core.telemetry import disable_telemetry

disable_telemetry()
