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


def test_attribute_probes_read_tone_and_gender_from_file_names_over_several_splits():
    """attribute_probes takes the families, tones and genders from the emoji files' names: features that plant the
    tone are read on held-out families, features that do not are not; several seeds average one probe per seed (each
    equal to held_out_attribute_probe with that seed); a row count that does not match the files is refused."""
    import numpy as np

    from omniret.data.real_probe import attribute_probes, held_out_attribute_probe
    from omniret.data.sources.emoji import TONES

    tones = sorted(TONES)  # the five modifier code points
    paths, tone_index = [], []
    for base in range(0x1F440, 0x1F440 + 30):  # 30 families: the plain emoji and its five tones, as a woman too
        for gender in ("", "-200D-2640-FE0F"):
            for t in [None] + tones:
                name = f"{base:X}" + (f"-{t}" if t else "") + gender
                paths.append(f"/media/emoji/{name}.png")
                tone_index.append(0 if t is None else 1 + tones.index(t))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(len(paths), 9))
    planted = x.copy()
    planted[:, :6] += 4.0 * np.eye(6)[tone_index]  # one direction per tone
    got = attribute_probes(planted, paths, seeds=(0, 1, 2))
    assert got["tone"]["accuracy"] > 0.9 and got["tone"]["majority"] < 0.25
    assert len(got["tone"]["accuracies"]) == 3 and got["gender"]["accuracy"] < 0.7  # no gender planted
    families = [p.split("/")[-1].split("-")[0].removesuffix(".png") for p in paths]
    tone_names = ["none"] + [TONES[t] for t in tones]
    for seed, acc in zip((0, 1, 2), got["tone"]["accuracies"]):
        want = held_out_attribute_probe(planted, [tone_names[i] for i in tone_index], families, seed=seed)
        assert acc == want["accuracy"]
    assert attribute_probes(x, paths)["tone"]["accuracy"] < 0.35  # noise: near the majority share
    with pytest.raises(ValueError, match="feature rows"):
        attribute_probes(x[:-1], paths)
