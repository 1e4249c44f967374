"""The composer: the query template of Eq. 1, media placeholders replaced by resampled tokens, and the LLM.

An item is a plain string or a dict with any of `text`, `image`, `audio`, `video` (each media key holds one item
or a list) and an optional `instruction`. The content order is the dict's key order; a media placeholder in the
text (`<image>`, `<audio>`, `<video>`) puts the next media of that kind at that spot instead, so
`{"text": "a dog <audio> next to <image>", "audio": a, "image": i}` interleaves freely. Items with an
instruction (queries) are wrapped in `Instruct: {instruction}\\nQuery: {query}`; candidates carry none.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from omniret.config import OmniRetConfig
from omniret.modalities import MEDIA_MODALITIES, MODALITIES
from omniret.model.backbones import from_pretrained_kwargs, resolve_backbone_path, torch_dtype

__all__ = ["PLACEHOLDERS", "ParsedItem", "parse_item", "ByteTokenizer", "HFTokenizer", "Composer",
           "build_tokenizer", "build_llm"]

PLACEHOLDERS = {m: f"<{m}>" for m in MEDIA_MODALITIES}
_PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS.values()) + ")")
_KEYS = MODALITIES + ("instruction",)
TOKEN_KINDS = ("ids", "instruction")  # sequence entries that hold token ids (the rest are media)


@dataclass
class ParsedItem:
    """segments: ("text", str) or (modality, raw media) in order; instruction or None."""

    segments: list = field(default_factory=list)
    instruction: Optional[str] = None

    def media(self, modality: str) -> list:
        return [raw for kind, raw in self.segments if kind == modality]


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def parse_item(item: Union[str, dict], index: int = 0, instruction: Optional[str] = None) -> ParsedItem:
    """Resolve an item's content order (see the module docstring). `instruction` fills in a missing one."""
    name = f"items[{index}]"
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise ValueError(f"{name} must be a string or a dict with text/image/audio/video, got {type(item).__name__}")
    unknown = [k for k in item if k not in _KEYS]
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; allowed: {list(_KEYS)}")
    queues = {m: [x for x in _as_list(item[m]) if x is not None] if item.get(m) is not None else []
              for m in MEDIA_MODALITIES}
    text = item.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{name}['text'] must be a string, got {type(text).__name__}")
    pieces = _PLACEHOLDER_RE.split(text) if text else []
    wanted = {m: sum(p == PLACEHOLDERS[m] for p in pieces) for m in MEDIA_MODALITIES}
    for m in MEDIA_MODALITIES:
        if wanted[m] > len(queues[m]):
            raise ValueError(f"{name}: the text has {wanted[m]} {PLACEHOLDERS[m]} placeholders but only "
                             f"{len(queues[m])} {m} item(s)")
    placed = {m: queues[m][: wanted[m]] for m in MEDIA_MODALITIES}
    free = {m: queues[m][wanted[m]:] for m in MEDIA_MODALITIES}
    segments = []
    for key in item:
        if key == "text":
            used = {m: 0 for m in MEDIA_MODALITIES}
            for p in pieces:
                kind = next((m for m in MEDIA_MODALITIES if p == PLACEHOLDERS[m]), None)
                if kind is None:
                    if p:
                        segments.append(("text", p))
                else:
                    segments.append((kind, placed[kind][used[kind]]))
                    used[kind] += 1
        elif key in MEDIA_MODALITIES:
            segments.extend((key, raw) for raw in free[key])
    if not segments:
        raise ValueError(f"{name} is empty: it needs text or at least one image/audio/video")
    instr = item.get("instruction", None)
    if instr is None:
        instr = instruction
    if instr is not None and not isinstance(instr, str):
        raise ValueError(f"{name}['instruction'] must be a string, got {type(instr).__name__}")
    return ParsedItem(segments=segments, instruction=instr)


# -------------------------------------------------------------------------------------------------------
# tokenizers: encode(text) -> ids without special tokens; prefix/suffix special ids around a sequence
# -------------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS 256, EOS 257, PAD 258. Needs no files (the tiny preset)."""

    vocab_size = 259
    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258

    def __init__(self, append_eos: bool = True):
        self.prefix_ids = [self.bos_token_id]
        self.suffix_ids = [self.eos_token_id] if append_eos else []

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A `transformers` tokenizer. The special tokens it puts around a sequence are found by tokenising a probe
    with and without them; EOS is appended when it adds none and `append_eos` (last-token pooling needs it)."""

    def __init__(self, tokenizer, append_eos: bool = True):
        self.tok = tokenizer
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        if at is None:
            self.prefix_ids, self.suffix_ids = [], []
        else:
            self.prefix_ids, self.suffix_ids = list(full[:at]), list(full[at + len(plain):])
        if not self.suffix_ids and append_eos and tokenizer.eos_token_id is not None:
            self.suffix_ids = [tokenizer.eos_token_id]

    def encode(self, text: str) -> list:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def build_tokenizer(cfg: OmniRetConfig):
    if cfg.tokenizer == "byte":
        return ByteTokenizer(cfg.append_eos)
    from transformers import AutoTokenizer

    source = cfg.tokenizer if cfg.tokenizer is not None else resolve_backbone_path(cfg.llm, "llm")
    if source is None:
        raise ValueError("tokenizer: the LLM is built from `arch` (no path), so set config.tokenizer to 'byte' or "
                         "to a tokenizer directory")
    kwargs = {k: v for k, v in from_pretrained_kwargs(source, "float32").items() if k != "dtype"}
    return HFTokenizer(AutoTokenizer.from_pretrained(source, **kwargs), cfg.append_eos)


def build_llm(cfg: OmniRetConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    path = resolve_backbone_path(cfg.llm, "llm")
    if path is None:
        arch = dict(cfg.llm.arch)
        model_type = arch.pop("model_type", None)
        if model_type is None:
            raise ValueError("llm.arch needs 'model_type' (e.g. 'qwen2', 'bert') when llm.path is None")
        llm = AutoModel.from_config(AutoConfig.for_model(model_type, **arch)).to(torch_dtype(cfg.llm.dtype))
    else:
        llm = AutoModel.from_pretrained(path, **from_pretrained_kwargs(path, cfg.llm.dtype))
    if hasattr(llm, "pooler"):  # BERT-style poolers are unused (we pool hidden states ourselves)
        llm.pooler = None
    return llm


# -------------------------------------------------------------------------------------------------------
class Composer(nn.Module):
    """Builds `inputs_embeds` from parsed items and resampled media, and runs the (frozen, + LoRA) LLM."""

    def __init__(self, cfg: OmniRetConfig, llm: Optional[nn.Module] = None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.llm = build_llm(cfg) if llm is None else llm
        self.llm.requires_grad_(False)
        self.tokenizer = build_tokenizer(cfg) if tokenizer is None else tokenizer
        self.hidden_size = int(self.llm.config.hidden_size)
        tmpl = cfg.query_template
        if tmpl.count("{query}") != 1 or "{instruction}" not in tmpl.split("{query}")[0]:
            raise ValueError(f"query_template must hold {{instruction}} then {{query}} once, got {tmpl!r}")
        self._template_head, self._template_tail = tmpl.split("{query}")

    def tokenize(self, parsed: ParsedItem) -> list:
        """-> the item's sequence as ("ids", list[int]) and (modality, k-th media of that modality) entries; with
        `config.pool_instruction` False the template's head (`Instruct: {instruction}\nQuery: `) is an
        ("instruction", list[int]) entry: the LLM reads it, the pooling head does not (`pool_mask`)."""
        segments = list(parsed.segments)
        if parsed.instruction is not None:
            head = "instruction" if not self.cfg.pool_instruction else "text"
            segments = ([(head, self._template_head.format(instruction=parsed.instruction))] + segments
                        + ([("text", self._template_tail)] if self._template_tail else []))
        seq = [("ids", list(self.tokenizer.prefix_ids))]
        counters = {}
        for kind, value in segments:
            if kind in ("text", "instruction"):
                ids = self.tokenizer.encode(value)[: self.cfg.max_text_tokens]
                if ids:
                    seq.append(("ids" if kind == "text" else "instruction", ids))
            else:
                seq.append((kind, counters.get(kind, 0)))
                counters[kind] = counters.get(kind, 0) + 1
        seq.append(("ids", list(self.tokenizer.suffix_ids)))
        return [(k, v) for k, v in seq if not (k == "ids" and not v)]

    @staticmethod
    def pool_mask(sequences: list, mask: torch.Tensor) -> torch.Tensor:
        """The positions the pooling head reads: `mask` without the instruction entries' tokens (GritLM and
        NV-Embed leave the instruction out of the pooled tokens: it is the same for every query of a task)."""
        out = mask.clone()
        for b, seq in enumerate(sequences):
            at = 0
            for kind, value in seq:
                if kind not in TOKEN_KINDS:  # a media entry: the instruction comes before the first one
                    break
                if kind == "instruction":
                    out[b, at:at + len(value)] = False
                at += len(value)
        return out

    def build_inputs(self, sequences: list, media_offsets: list, resampled: dict):
        """sequences: per item, the output of `tokenize`; media_offsets[i][modality]: index of item i's first
        media of that modality in resampled[modality] ((n, Nq, D), or a list of (N_k, D) without a resampler).
        -> inputs_embeds (B, T, D), mask (B, T)."""
        embed = self.llm.get_input_embeddings()
        dtype = embed.weight.dtype
        device = embed.weight.device
        # One gather from one table (every text token's embedding, then every media latent, then a zero row for
        # padding) instead of a few small ops per item: per-item ops cost more than the LLM on small batches,
        # and selecting rows one by one makes backward write a full-size gradient per row.
        media_rows, media_start, media_len = [], {}, {}
        for kind, x in resampled.items():
            if isinstance(x, torch.Tensor):
                media_rows.append(x.reshape(-1, x.shape[-1]))
                sizes = [x.shape[1]] * x.shape[0]
            else:
                media_rows.append(torch.cat(list(x)))
                sizes = [t.shape[0] for t in x]
            starts = [0]
            for n in sizes[:-1]:
                starts.append(starts[-1] + n)
            media_start[kind], media_len[kind] = starts, sizes
        ids = [i for seq in sequences for kind, value in seq if kind in TOKEN_KINDS for i in value]
        base, offset = {}, len(ids)
        for kind, rows in zip(resampled, media_rows):
            base[kind] = offset
            offset += rows.shape[0]
        pad_row = offset
        index, lengths, next_id = [], [], 0
        for seq, offsets in zip(sequences, media_offsets):
            row = []
            for kind, value in seq:
                if kind in TOKEN_KINDS:
                    row.extend(range(next_id, next_id + len(value)))
                    next_id += len(value)
                else:
                    k = offsets[kind] + value
                    first = base[kind] + media_start[kind][k]
                    row.extend(range(first, first + media_len[kind][k]))
            index.append(row)
            lengths.append(len(row))
        limit = getattr(self.llm.config, "max_position_embeddings", None)
        if limit is not None and max(lengths) > limit:
            i = max(range(len(lengths)), key=lengths.__getitem__)
            raise ValueError(f"item {i} of this batch is {lengths[i]} tokens long (text + "
                             f"{self.cfg.media_latents} per media item), more than the LLM's {limit} positions; "
                             "use fewer media or shorter text")
        T = max(lengths)
        # right padding: causal LLMs then see no padding before a valid token
        flat = [i for row in index for i in row + [pad_row] * (T - len(row))]
        table = torch.cat([embed(torch.tensor(ids, dtype=torch.long, device=device))]
                          + [rows.to(dtype) for rows in media_rows]
                          + [torch.zeros(1, embed.weight.shape[1], dtype=dtype, device=device)])
        embeds = table[torch.tensor(flat, dtype=torch.long, device=device)].view(len(index), T, -1)
        mask = torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return embeds, mask

    def forward(self, inputs_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask.long())
        return out.last_hidden_state

    def add_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = self.cfg
        targets = cfg.lora_target_modules
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets if isinstance(targets, str) else list(targets), bias="none")
        inject_adapter_in_model(lcfg, self.llm)
        for name, p in self.llm.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()  # adapters train in fp32 over a bf16/fp16 base (peft casts the input)
