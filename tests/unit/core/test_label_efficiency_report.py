"""The simulation report's label-efficiency section: always where the curve comes from; the bench's numbers
and plot when its JSON sits in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

from simulations.label_efficiency import TITLE, append_label_efficiency_section, label_efficiency_lines

SUMMARY = {
    "vessels": {
        "random_init": {"2": {"mean": 0.41, "std": 0.02}, "all": {"mean": 0.6, "std": 0.01}},
        "federated_ssl": {"2": {"mean": 0.47, "std": 0.03}, "all": {"mean": 0.62, "std": 0.0}},
    },
    "disc": {"random_init": {"4": {"mean": 120.5, "std": 10.0}}},
}


def test_without_the_bench_json_the_section_says_how_to_draw_the_curve(tmp_path: Path) -> None:
    text = "\n".join(label_efficiency_lines(tmp_path))
    assert "python bench/bench_label_efficiency.py" in text and "|" not in text and "![" not in text


def test_with_the_bench_json_and_plot_the_section_shows_both(tmp_path: Path) -> None:
    (tmp_path / "label_efficiency.json").write_text(json.dumps({"summary": SUMMARY}))
    (tmp_path / "label_efficiency.png").write_bytes(b"\x89PNG")
    lines = label_efficiency_lines(tmp_path)
    assert "| random init | 0.410 ± 0.020 | 0.600 ± 0.010 |" in lines
    assert "| federated SSL | 0.470 ± 0.030 | 0.620 ± 0.000 |" in lines
    assert "| init | 2 labels | all labels |" in lines  # counts in order, "all" last
    assert "| random init | 120.500 ± 10.000 |" in lines
    assert "![label efficiency](label_efficiency.png)" in lines


def test_a_broken_json_is_named_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "label_efficiency.json").write_text("{not json")
    text = "\n".join(label_efficiency_lines(tmp_path))
    assert "could not be read" in text and "bench/bench_label_efficiency.py" in text


def test_the_section_is_appended_once_and_refreshed(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    report.write_text("# run\n\nbody\n")
    append_label_efficiency_section(tmp_path)
    (tmp_path / "label_efficiency.json").write_text(json.dumps({"summary": SUMMARY}))
    append_label_efficiency_section(tmp_path)
    text = report.read_text()
    assert text.startswith("# run\n\nbody\n") and text.count(TITLE) == 1 and "0.470 ± 0.030" in text
    append_label_efficiency_section(tmp_path / "no-report-here")  # no report: nothing to do, no error
