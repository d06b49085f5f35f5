"""What `visionfm simulate` prints after a run with a fine-tuning phase."""

from __future__ import annotations

from pathlib import Path

from server.federation.report import MetricsLog
from simulations.cli import _print_finetune_scores, console


def test_the_last_fine_tune_rounds_scores_are_printed_server_first(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.rows = []
    for ft_round, dice in ((1, 0.2), (2, 0.61)):
        log.add(1 + ft_round, "hospital-b", "fundus", "finetune-evaluate",
                {"dice": dice - 0.1, "finetune-round": ft_round})
        log.add(1 + ft_round, "global-test", "fundus", "finetune-evaluate", {"dice": dice, "iou": dice / 2,
                                                                              "finetune-round": ft_round})
    with console.capture() as captured:
        _print_finetune_scores("federated", log)
    text = " ".join(captured.get().split())  # the console wraps long titles
    assert "fine-tune round 2" in text and "0.610" in text and "0.305" in text and "0.200" not in text
    assert text.index("global-test") < text.index("hospital-b")
    with console.capture() as nothing:
        _print_finetune_scores("federated", MetricsLog(tmp_path / "empty"))
    assert nothing.get() == ""
