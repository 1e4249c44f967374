"""omniret.data.real_probe: the held-out attribute probe on synthetic features."""
import pytest


def test_held_out_attribute_probe_reads_a_planted_attribute_and_not_noise():
    """Synthetic features: an attribute planted along one direction is read on held-out groups far above the
    majority rate; labels unrelated to the features are not. Groups whose members all share a label are left out."""
    import numpy as np

    from omniret.data.real_probe import held_out_attribute_probe

    rng = np.random.default_rng(0)
    groups = [f"g{i // 6}" for i in range(240)] + ["same"] * 5
    labels = [str(i % 3) for i in range(240)] + ["0"] * 5
    x = rng.normal(size=(245, 12))
    x[:, 4] += 3.0 * np.array([int(v) for v in labels])  # the planted attribute
    got = held_out_attribute_probe(x, labels, groups)
    assert got["test_items"] == 78 and got["accuracy"] > 0.75 and got["majority"] < 0.4
    noise = [str(v) for v in rng.integers(0, 3, 245)]
    assert held_out_attribute_probe(x, noise, groups)["accuracy"] < 0.55
    with pytest.raises(ValueError, match="3 or more"):
        held_out_attribute_probe(x[:12], labels[:12], groups[:12])
