"""visionfm_core is the ML library: importing every module of it must not pull in Flower or Ray."""

from __future__ import annotations

import subprocess
import sys


def test_visionfm_core_never_imports_flower_or_ray() -> None:
    code = (
        "import importlib, pkgutil, sys, visionfm_core\n"
        "mods = list(pkgutil.walk_packages(visionfm_core.__path__, 'visionfm_core.'))\n"
        "for m in mods:\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('flwr', 'ray'))\n"
        "print(len(mods), bad[:5])\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert int(done.stdout.split()[0]) > 20  # the walk really covered the package
