import numpy as np

from visionfm_core.evaluation.knn import knn_predict_proba
from visionfm_core.evaluation.linear_probe import linear_probe_proba


def _clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centres = np.eye(3, 8) * 4
    return (centres[labels] + rng.normal(0, 0.5, (n, 8))).astype(np.float32), labels


def test_knn_and_linear_probe_separate_clear_clusters() -> None:
    x, y = _clusters(90, 0)
    q, qy = _clusters(30, 1)
    knn = knn_predict_proba(x, y, q, num_classes=3, k=5)
    lin = linear_probe_proba(x, y, q, num_classes=3)
    np.testing.assert_allclose(knn.sum(1), 1.0, atol=1e-5)
    assert (knn.argmax(1) == qy).mean() > 0.95
    assert (lin.argmax(1) == qy).mean() > 0.95


def test_knn_on_random_labels_is_near_chance() -> None:
    x, _ = _clusters(300, 2)
    y = np.random.default_rng(3).integers(0, 3, 300)
    q, _ = _clusters(300, 4)
    qy = np.random.default_rng(5).integers(0, 3, 300)
    assert (knn_predict_proba(x, y, q, 3, k=10).argmax(1) == qy).mean() < 0.5


def test_the_linear_probe_fits_on_one_thread_and_gives_the_callers_threads_back() -> None:
    # Its L-BFGS steps are microseconds of work: a second thread only adds waiting (seconds per probe on
    # a busy machine). The caller's thread count is restored afterwards.
    import torch

    x, y = _clusters(90, 0)
    seen: list[int] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(torch.get_num_threads()))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        linear_probe_proba(x, y, x, num_classes=3)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(previous)
