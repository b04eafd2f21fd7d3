"""LightningDataModule: text corpus -> tokenizer -> fixed-length blocks, with a deterministic split."""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from recyclegpt.core.precision import dtype_name, resolve_dtype
from recyclegpt.core.quantize import QUANTIZE_CHOICES
from recyclegpt.train.corpus import STDLIB, CorpusError, check_readable, read_texts, resolve
from recyclegpt.train.features import CacheReport, FeatureCache, FeatureDataset
from recyclegpt.train.tokenizer import TOKENIZER_FILE, load_any_tokenizer, train_bpe_tokenizer, wrap

BLOCKS_KEY = "input_ids"


def write_blocks(blocks: torch.Tensor, path: str | Path) -> None:
    """Token blocks [N, T] to a safetensors file (``data.train_blocks`` reads it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({BLOCKS_KEY: blocks.to(torch.long).contiguous()}, str(path))


def read_blocks(path: str | Path, block_size: int) -> torch.Tensor:
    """Token blocks [N, block_size] from a file :func:`write_blocks` wrote; CorpusError if it is not one."""
    try:
        blocks = load_file(str(path)).get(BLOCKS_KEY)
    except (OSError, SafetensorError) as error:
        raise CorpusError(f"cannot read token blocks from {path}: {error}") from error
    if blocks is None or blocks.dim() != 2 or blocks.dtype != torch.long or blocks.shape[0] == 0:
        raise CorpusError(f"{path} holds no {BLOCKS_KEY!r} tensor of token ids [blocks >= 1, tokens]")
    if blocks.shape[1] != block_size:
        raise CorpusError(f"{path} holds blocks of {blocks.shape[1]} tokens; data.block_size is {block_size}")
    return blocks


class TextDataModule(LightningDataModule):
    """Blocks of ``block_size`` tokens from plain-text files.

    Args:
        train_files: files, directories or globs; ``["stdlib"]`` is the Python standard library.
        val_files: held-out files; when None the last ``val_fraction`` of the train token stream.
        tokenizer: a model directory, ``.gguf`` file or ``tokenizer.json``; None trains a BPE.
        vocab_size: size of the BPE trained when ``tokenizer`` is None.
        tokenizer_dir: where the trained tokenizer.json is kept (and reused while the corpus is unchanged).
        max_corpus_bytes: read at most this many characters of training text (None: all).
        feature_cache: a directory for the frozen base's hidden states (frozen_base only): the base
            runs once per token, then batches are ``{"input_ids", "hidden"}``; None runs the base every step.
        feature_dtype: storage dtype of the cached states, ``bf16`` or ``fp32``.
        feature_precision: compute precision of the base while it fills the cache: ``auto`` (bf16
            autocast where the hardware has native bf16, else fp32; see recyclegpt.core.precision), ``fp32``, ``bf16``.
        feature_quantize: the base's weights while it fills the cache (``none``, or a ``--quantize``
            choice such as ``w8a8``): the states decoding with those weights computes, which are the
            states the module reads at decode time. A quantized copy computes them (in
            ``feature_precision``); the trained base stays unquantized.
        train_blocks: a safetensors file of token blocks [N, block_size] to train on instead of
            ``train_files`` (``recyclegpt-selfgen --blocks-out`` writes one, with the base's states
            as a ready feature cache); needs ``tokenizer``, the one that wrote its ids. Without
            ``val_files`` the last ``val_fraction`` of the blocks validate, and a cache of all of them
            does not match the rest (it is rebuilt).
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        tokenizer_dir: str = "runs/tokenizer",
        max_corpus_bytes: int | None = 4_000_000,
        max_val_bytes: int | None = 1_000_000,
        block_size: int = 256,
        val_fraction: float = 0.05,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        feature_cache: str | None = None,
        feature_dtype: str = "bf16",
        feature_precision: str = "auto",
        feature_quantize: str = "none",
        train_blocks: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.train_files = train_files or [STDLIB]
        self.val_files = val_files
        if not 0 < val_fraction < 1 and val_files is None:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        if feature_quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"feature_quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {feature_quantize!r}")
        if train_blocks is not None:
            if tokenizer is None:
                raise CorpusError(
                    "data.train_blocks holds a model's token ids: set model.pretrained, whose tokenizer wrote them"
                )
            check_readable([train_blocks], seed)
        else:
            check_readable(self.train_files, seed)
        if val_files is not None:
            check_readable(val_files, seed)
        self.tokenizer: PreTrainedTokenizerFast | None = None
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None
        self.cache_reports: dict[str, CacheReport] = {}

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer_path(self) -> Path:
        return Path(self.hparams.tokenizer_dir) / TOKENIZER_FILE

    def _fingerprint(self) -> str:
        files = [(str(p), p.stat().st_size) for p in resolve(self.train_files, self.hparams.seed)]
        key = [files, self.hparams.vocab_size, self.hparams.max_corpus_bytes]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def prepare_data(self) -> None:
        """Train the BPE once (rank 0); later runs with the same corpus reuse the saved file."""
        if self.hparams.tokenizer is not None:
            return
        stamp = self.tokenizer_path.with_suffix(".corpus-sha256")
        fingerprint = self._fingerprint()
        if self.tokenizer_path.exists() and stamp.exists() and stamp.read_text() == fingerprint:
            return
        texts = self._train_texts()
        tokenizer = train_bpe_tokenizer(texts, self.hparams.vocab_size)
        self.tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tokenizer_path.with_suffix(".tmp")
        tokenizer.backend_tokenizer.save(str(tmp))
        tmp.replace(self.tokenizer_path)
        stamp.write_text(fingerprint)

    def load_tokenizer(self) -> PreTrainedTokenizerFast:
        if self.tokenizer is None:
            if self.hparams.tokenizer is not None:
                self.tokenizer = load_any_tokenizer(self.hparams.tokenizer)
            else:
                from tokenizers import Tokenizer

                self.tokenizer = wrap(Tokenizer.from_file(str(self.tokenizer_path)))
        return self.tokenizer

    # ------------------------------------------------------------------ blocks
    def _train_texts(self) -> list[str]:
        files = resolve(self.train_files, self.hparams.seed)
        return read_texts(files, self.hparams.max_corpus_bytes)

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        """One stream of token ids, documents separated by the end-of-text token."""
        tokenizer = self.load_tokenizer()
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.extend(eos)
        return torch.tensor(ids, dtype=torch.long)

    def _blocks(self, tokens: torch.Tensor, what: str) -> torch.Tensor:
        size = self.hparams.block_size
        count = tokens.numel() // size
        if count == 0:
            raise CorpusError(f"{what} corpus has {tokens.numel()} tokens, fewer than one block of {size}")
        return tokens[: count * size].view(count, size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        self.load_tokenizer()
        if self.hparams.train_blocks is not None:
            self._setup_from_blocks(read_blocks(self.hparams.train_blocks, self.hparams.block_size))
            return
        train = self._tokens(self._train_texts())
        if self.val_files is None:
            cut = int(train.numel() * (1 - self.hparams.val_fraction))
            train_blocks = self._blocks(train[:cut], "training")
            self.val_blocks = self._blocks(train[cut:], "validation")
        else:
            train_blocks = self._blocks(train, "training")
            self.val_blocks = self._val_file_blocks()
        self.train_blocks = train_blocks

    def _val_file_blocks(self) -> torch.Tensor:
        texts = read_texts(resolve(self.val_files, self.hparams.seed), self.hparams.max_val_bytes)
        return self._blocks(self._tokens(texts), "validation")

    def _setup_from_blocks(self, blocks: torch.Tensor) -> None:
        """Training blocks as given; validation from ``val_files``, else the last ``val_fraction`` of them."""
        if int(blocks.min()) < 0 or int(blocks.max()) >= len(self.tokenizer):
            raise CorpusError(
                f"{self.hparams.train_blocks} holds token ids outside the tokenizer's {len(self.tokenizer)}"
            )
        if self.val_files is not None:
            self.train_blocks, self.val_blocks = blocks, self._val_file_blocks()
            return
        cut = min(int(blocks.shape[0] * (1 - self.hparams.val_fraction)), blocks.shape[0] - 1)
        if cut < 1:
            raise CorpusError(f"{self.hparams.train_blocks} has {blocks.shape[0]} blocks; 2 are needed to hold one out")
        self.train_blocks, self.val_blocks = blocks[:cut], blocks[cut:]

    def _features(self, blocks: torch.Tensor, split: str) -> FeatureDataset:
        """The trainer's frozen base over ``blocks``, from (or into) the feature cache."""
        trainer = self.trainer
        if not getattr(trainer.lightning_module, "frozen_base", False):
            raise ValueError("data.feature_cache needs model.regime frozen_base (the cached base must not train)")
        model = trainer.lightning_module.model
        cache = FeatureCache(Path(self.hparams.feature_cache) / split, self.hparams.feature_dtype)
        device = model.lm_head.weight.device
        compute = resolve_dtype(self.hparams.feature_precision, device)

        def forward_context() -> AbstractContextManager:
            if compute == torch.float32:
                return nullcontext()
            return torch.autocast(device.type, dtype=compute)

        hidden, report = cache.build_or_load(
            model,
            blocks,
            dtype_name(compute),
            forward_context,
            self.hparams.batch_size,
            quantize=self.hparams.feature_quantize,
        )
        self.cache_reports[split] = report
        return FeatureDataset(blocks, hidden)

    def train_dataloader(self) -> DataLoader:
        data = self.train_blocks
        if self.hparams.feature_cache is not None:
            data = self._features(self.train_blocks, "train")
        return DataLoader(
            data,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.hparams.num_workers,
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def val_dataloader(self) -> DataLoader:
        data = self.val_blocks
        if self.hparams.feature_cache is not None:
            limit = self.trainer.limit_val_batches
            if isinstance(limit, int):  # cache only the blocks validation reads
                data = data[: limit * self.hparams.batch_size]
            data = self._features(data, "val")
        return DataLoader(data, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
