"""One torch thread per test: the tiny models here gain nothing from more, and on a shared CPU
OpenMP's barrier waits make small operations many times slower with two."""

from __future__ import annotations

from tests.unit.tasks.helpers import single_torch_thread  # noqa: F401  (autouse fixture)
