"""The coordinator's operations plane: SuperLink and gateway processes, the control API, jobs,
runs and their summaries, the deployment app. Starts federations; holds no round logic."""
