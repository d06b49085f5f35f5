"""Downstream tasks on a pretrained encoder: one fine-tuning trainer, a small adapter per task.

- `trainer`: `FineTuner` (fit / train_epochs / evaluate / predict), `FineTuneConfig`,
  `get_weights` / `set_weights` (the federated seams).
- `adapters`: classification (binary, multi-class, multi-label, ordinal), segmentation (UNETR),
  landmarks (heatmaps), detection (CenterNet-style boxes), regression.
- `samples`, `manifests`, `public_sets`, `splits`: what a site's downstream data looks like.
- `persistence`: a fine-tuned model in one safetensors file; `pipeline`: the single-site workflows.
"""
