"""speed_perturb: a waveform played faster or slower by a seeded random factor; warp_frequencies: a
spectrogram stretched along its frequency axis by a seeded random factor; random_affine: an image slanted, zoomed
and shifted by seeded random amounts."""
import math

import pytest
import torch

from omniret.train.augment import insert_random_word, random_affine, speed_perturb, vocabulary_words, warp_frequencies


def test_length_and_pitch_follow_the_factor():
    rate, n = 16000, 16000
    t = torch.arange(n, dtype=torch.float64) / rate
    wave = torch.sin(2 * math.pi * 440.0 * t)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        factor = 0.8 + (1.25 - 0.8) * float(torch.rand((), generator=torch.Generator().manual_seed(seed)))
        out = speed_perturb(wave, g, 0.8, 1.25)
        assert out.dtype == wave.dtype and out.dim() == 1
        assert out.shape[0] == round(n / factor)
        # the tone's frequency moves with the factor: find the spectrum's peak
        spec = torch.fft.rfft(out * torch.hann_window(out.shape[0], dtype=out.dtype))
        peak = int(spec.abs().argmax()) * rate / out.shape[0]
        assert abs(peak - 440.0 * factor) < 3.0, (seed, factor, peak)


def test_seeded_and_bounded():
    wave = torch.randn(3000)
    a = speed_perturb(wave, torch.Generator().manual_seed(3))
    b = speed_perturb(wave, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    lengths = {speed_perturb(wave, torch.Generator().manual_seed(s)).shape[0] for s in range(20)}
    assert len(lengths) > 5 and min(lengths) >= round(3000 / 1.25) and max(lengths) <= round(3000 / 0.8)
    assert torch.equal(speed_perturb(wave, torch.Generator(), 1.0, 1.0), wave)
    assert speed_perturb(torch.randn(10), torch.Generator(), min_samples=400).shape[0] == 400


def test_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        speed_perturb(torch.randn(2, 100), torch.Generator())
    with pytest.raises(ValueError, match="low"):
        speed_perturb(torch.randn(100), torch.Generator(), 1.2, 0.9)


def test_warp_moves_a_peak_by_the_factor():
    bins, frames = 40, 7
    for seed in range(6):
        factor = 0.8 + (1.3 - 0.8) * float(torch.rand((), generator=torch.Generator().manual_seed(seed)))
        spec = torch.zeros(bins, frames, dtype=torch.float64)
        spec[12] = 1.0  # one band
        out = warp_frequencies(spec, torch.Generator().manual_seed(seed), 0.8, 1.3)
        assert out.shape == spec.shape and out.dtype == spec.dtype
        # the band's mass centre moves from 12 to 12 * factor (linear interpolation spreads it over two bins)
        centre = float((out[:, 0] * torch.arange(bins)).sum() / out[:, 0].sum())
        assert abs(centre - 12 * factor) < 0.5, (seed, factor, centre)
        assert torch.equal(out[:, 0], out[:, -1])  # every frame alike


def test_warp_identity_top_bin_and_seeding():
    spec = torch.randn(40, 9)
    assert torch.equal(warp_frequencies(spec, torch.Generator(), 1.0, 1.0), spec)
    a = warp_frequencies(spec, torch.Generator().manual_seed(5))
    assert torch.equal(a, warp_frequencies(spec, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, warp_frequencies(spec, torch.Generator().manual_seed(6)))
    # a compression (factor < 1) reads beyond the top bin: it repeats the top bin
    squeezed = warp_frequencies(spec, torch.Generator(), 0.5, 0.5)
    torch.testing.assert_close(squeezed[-1], spec[-1])
    torch.testing.assert_close(squeezed[10], spec[20])


def test_warp_bad_input():
    with pytest.raises(ValueError, match="bins, frames"):
        warp_frequencies(torch.randn(40), torch.Generator())
    with pytest.raises(ValueError, match="low"):
        warp_frequencies(torch.randn(4, 4), torch.Generator(), 1.2, 0.9)


def _centre(image):
    """The (row, column) mass centre of a (C, H, W) image's first channel."""
    w = image[0].double()
    rows = torch.arange(w.shape[0], dtype=torch.float64)[:, None]
    cols = torch.arange(w.shape[1], dtype=torch.float64)[None, :]
    return float((w * rows).sum() / w.sum()), float((w * cols).sum() / w.sum())


def test_affine_identity_shift_and_rotation():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(3, 16, 16)
    img[:, 6:10, 5:9] = 1.0  # a block left of centre
    torch.testing.assert_close(random_affine(img, g, 0.0, 0.0, 0.0), img)
    r0, c0 = _centre(img)
    for seed in range(6):
        out = random_affine(img, torch.Generator().manual_seed(seed), degrees=0.0, scale=0.0, translate=0.1)
        r, c = _centre(out)
        assert abs(r - r0) <= 0.1 * 16 + 1e-6 and abs(c - c0) <= 0.1 * 16 + 1e-6  # a shift within 10% of the size
        assert float(out.sum()) == pytest.approx(float(img.sum()), rel=1e-4)  # the block stays inside the image: nothing lost
    shifts = {_centre(random_affine(img, torch.Generator().manual_seed(s), 0.0, 0.0, 0.1)) for s in range(6)}
    assert len(shifts) == 6
    # a rotation about the centre keeps a centred block's centre and moves an off-centre one along a circle
    centred = torch.zeros(1, 15, 15)
    centred[:, 5:10, 5:10] = 1.0
    out = random_affine(centred, torch.Generator().manual_seed(1), degrees=30.0, scale=0.0, translate=0.0)
    assert _centre(out) == pytest.approx((7.0, 7.0), abs=1e-3)
    assert not torch.allclose(out, centred)


def test_affine_seeded_and_checked():
    img = torch.rand(3, 8, 8)
    a = random_affine(img, torch.Generator().manual_seed(4))
    assert a.shape == img.shape and a.dtype == img.dtype
    assert torch.equal(a, random_affine(img, torch.Generator().manual_seed(4)))
    assert not torch.equal(a, random_affine(img, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="C, H, W"):
        random_affine(torch.rand(8, 8), torch.Generator())
    with pytest.raises(ValueError, match="scale"):
        random_affine(img, torch.Generator(), scale=1.5)


def test_insert_random_word_adds_one_word_anywhere():
    words = ["apple", "river", "stone"]
    text = "the digit seven"
    gen = torch.Generator().manual_seed(0)
    positions, drawn = set(), set()
    for _ in range(200):
        out = insert_random_word(text, words, gen).split(" ")
        assert len(out) == 4
        at = next(i for i, w in enumerate(out) if w in words)
        assert out[:at] + out[at + 1:] == text.split(" ")  # the other words keep their order
        positions.add(at)
        drawn.add(out[at])
    assert positions == {0, 1, 2, 3} and drawn == set(words)  # every gap, every word
    a = [insert_random_word(text, words, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert a[0] == a[1]


class _Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_vocabulary_words_are_whole_lower_case_words_in_id_order():
    vocab = {"[PAD]": 0, "##ing": 5, "the": 9, "seven": 3, "apple": 7, "Paris": 8, "x1y": 6, "ox": 4, "river": 2,
             "café": 10, "stone": 11}
    assert vocabulary_words(_Vocab(vocab), exclude=("seven",)) == ["river", "apple", "the", "stone"]
    assert vocabulary_words(_Vocab(vocab), limit=2) == ["river", "seven"]
    with pytest.raises(ValueError, match="no whole words"):
        vocabulary_words(_Vocab({"##a": 0, "[CLS]": 1}))
    with pytest.raises(ValueError, match="no vocabulary"):
        vocabulary_words(object())


def test_add_filler_words_touches_only_text_only_queries():
    from omniret.train.augment import add_filler_words

    items = [{"text": "a seven", "instruction": "find it"}, {"image": torch.zeros(8, 8), "text": "plus one"},
             {"audio": torch.zeros(40), "text": "minus two"}, {"text": "the digit four"}]
    out = add_filler_words(items, ["apple"], 1.0, torch.Generator().manual_seed(0))
    assert sorted(out[0]["text"].split()) == ["a", "apple", "seven"] and out[0]["instruction"] == "find it"
    assert sorted(out[3]["text"].split()) == ["apple", "digit", "four", "the"]
    assert out[1] is items[1] and out[2] is items[2]
    assert items[0]["text"] == "a seven"  # the caller's items are not changed
    assert add_filler_words(items, ["apple"], 0.0, torch.Generator().manual_seed(0)) == items
    hits = sum(len(add_filler_words(items[:1], ["apple"], 0.3, g)[0]["text"].split()) == 3
               for g in [torch.Generator().manual_seed(s) for s in range(400)])
    assert 80 < hits < 160  # about 0.3 of 400
