"""Backbones loaded the real way, offline: tiny SigLIP / Whisper / Qwen2-Audio encoder / Qwen2 saved with
`save_pretrained` into a temporary directory and loaded by the model from that path; the error for a missing one;
the meta-device parameter table."""
import copy
import warnings

import pytest
import torch

from omniret.config import preset
from omniret.model import OmniRet
from omniret.model.backbones import is_hub_name

warnings.filterwarnings("ignore", message=".*no fast backend.*")


def _save_backbones(cfg, root):
    """Random tiny backbones from the preset's arch, written with save_pretrained -> their directories."""
    from transformers import (AutoConfig, AutoModel, Qwen2AudioEncoderConfig, SiglipVisionConfig,
                              SiglipVisionModel, WhisperConfig, WhisperModel)
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(123)
    dirs = {}
    SiglipVisionModel(SiglipVisionConfig(**cfg.image_encoder.arch)).save_pretrained(root / "siglip")
    dirs["siglip"] = root / "siglip"
    WhisperEncoder(WhisperConfig(**cfg.audio_encoder.arch)).save_pretrained(root / "whisper_encoder")
    dirs["whisper_encoder"] = root / "whisper_encoder"
    WhisperModel(WhisperConfig(**cfg.audio_encoder.arch)).save_pretrained(root / "whisper_full")
    dirs["whisper_full"] = root / "whisper_full"
    qa = {k: v for k, v in cfg.audio_encoder.arch.items() if not k.startswith("decoder_")}
    Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**qa)).save_pretrained(root / "qwen2_audio")
    dirs["qwen2_audio"] = root / "qwen2_audio"
    arch = dict(cfg.llm.arch)
    AutoModel.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch)).save_pretrained(root / "llm")
    dirs["llm"] = root / "llm"
    return dirs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return _save_backbones(preset("tiny"), root)


def _cfg_with_paths(saved, audio="whisper_encoder"):
    cfg = preset("tiny")
    cfg.image_encoder.path = str(saved["siglip"])
    cfg.audio_encoder.path = str(saved[audio])
    if audio == "qwen2_audio":
        cfg.audio_encoder.kind = "qwen2_audio"
    cfg.llm.path = str(saved["llm"])
    return cfg


def _assert_same_weights(module, directory):
    from safetensors.torch import load_file

    saved = load_file(str(directory / "model.safetensors"))
    own = module.state_dict()
    matched = 0
    for k, v in saved.items():
        cands = [n for n in own if n == k or n.endswith("." + k) or k.endswith("." + n)]
        assert cands, f"saved weight {k} has no counterpart"
        assert torch.equal(own[cands[0]], v), k
        matched += 1
    assert matched > 0


@pytest.mark.parametrize("audio", ["whisper_encoder", "whisper_full", "qwen2_audio"])
def test_backbones_load_from_saved_directories(saved, audio, tmp_path):
    cfg = _cfg_with_paths(saved, audio)
    m = OmniRet.from_config(cfg).eval()
    _assert_same_weights(m.encoders["image"].tower, saved["siglip"])
    _assert_same_weights(m.composer.llm, saved["llm"])
    if audio != "whisper_full":
        _assert_same_weights(m.encoders["audio"].tower, saved[audio])
    items = ["text", {"text": "x <image>", "image": torch.rand(3, 20, 20)},
             {"audio": 0.1 * torch.sin(torch.arange(12000) / 5.0), "text": "tone"}]
    emb, _ = m(items)
    assert torch.isfinite(emb).all()
    # save_pretrained keeps only the trainable weights and the backbone paths
    m.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "random_backbones.safetensors").exists()
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert keys and not any(k.startswith(("encoders.", "composer.llm.")) for k in keys)
    loaded = OmniRet.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(m(items)[0], loaded(items)[0])


def test_missing_backbone_says_where_and_how(saved, tmp_path):
    cfg = _cfg_with_paths(saved)
    cfg.llm.path = str(tmp_path / "nowhere" / "gte-Qwen2-1.5B-instruct")
    cfg.llm.hub_id = "Alibaba-NLP/gte-Qwen2-1.5B-instruct"
    with pytest.raises(FileNotFoundError) as err:
        OmniRet.from_config(cfg)
    msg = str(err.value)
    assert cfg.llm.path in msg and "huggingface-cli download Alibaba-NLP/gte-Qwen2-1.5B-instruct" in msg
    assert msg.startswith("llm:")
    with pytest.raises(FileNotFoundError, match="image_encoder: no backbone directory"):
        OmniRet.from_config(preset("paper"))  # the paper preset's default paths do not exist here


def test_hub_names_only_when_written():
    assert is_hub_name("google/siglip-so400m-patch14-384")
    assert not is_hub_name("~/.cache/omniret/backbones/siglip")
    assert not is_hub_name("/abs/path")
    assert not is_hub_name("./rel/path")
    assert not is_hub_name("a/b/c")


def test_info_table_paper_on_meta(capsys):
    from omniret.cli import main

    assert main(["info", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "ASWP pooling" in out and "LoRA" in out and "84M reported" in out
    from omniret.model.summary import build_on_meta, parameter_table

    rows = {n: (t, tr) for n, t, tr in parameter_table(build_on_meta(preset("paper")))}
    assert rows["ASWP pooling"] == (4096 * 1536 + 128 * 4096,) * 2  # directions + references, all trainable
    assert rows["LLM (base weights)"][1] == 0 and rows["image encoder"][1] == 0
    assert 1.4e9 < rows["LLM (base weights)"][0] < 1.6e9  # GTE-Qwen2-1.5B
    assert 60e6 < rows["total"][1] < 110e6  # the paper's ~84M, give or take our open choices
    stage1 = {n: tr for n, _, tr in parameter_table(build_on_meta(preset("paper"), stage=1))}
    assert "LoRA" not in stage1
    assert stage1["total"] == rows["total"][1] - rows["LoRA"][1]
    # the meta table of the tiny preset equals the real model's counts
    import json

    assert main(["info", "--preset", "tiny", "--json"]) == 0
    table = {r["part"]: (r["parameters"], r["trainable"]) for r in json.loads(capsys.readouterr().out)}
    real = OmniRet.from_config("tiny")
    real.setup_stage(2)
    assert table["total"] == (sum(p.numel() for p in real.parameters()),
                              sum(p.numel() for p in real.parameters() if p.requires_grad))


def test_config_json_round_trip(tmp_path):
    for name in ("paper", "demo", "tiny"):
        cfg = preset(name)
        cfg.to_json(tmp_path / f"{name}.json")
        back = type(cfg).from_json(tmp_path / f"{name}.json")
        assert back == cfg
    with pytest.raises(ValueError, match="pooling"):
        preset("tiny", pooling="sum")
    with pytest.raises(ValueError, match="unknown OmniRetConfig fields"):
        type(cfg).from_dict({"nonsense": 1})
    assert copy.deepcopy(preset("tiny")) == preset("tiny")


def test_hf_tokenizer_special_tokens():
    """A Qwen2-like tokenizer that adds nothing gets EOS appended; a BERT-like one keeps its [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from omniret.model.composer import HFTokenizer

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "</s>": 3, "[CLS]": 4, "[SEP]": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    t = HFTokenizer(plain, append_eos=True)
    assert (t.prefix_ids, t.suffix_ids, t.encode("a b a")) == ([], [3], [1, 2, 1])
    assert HFTokenizer(plain, append_eos=False).suffix_ids == []
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 4), ("[SEP]", 5)])
    bert_like = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    t = HFTokenizer(bert_like, append_eos=True)
    assert (t.prefix_ids, t.suffix_ids) == ([4], [5])
