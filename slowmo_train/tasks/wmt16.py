"""English -> German translation with an encoder-decoder transformer, the SlowMo paper's third job
(Wang et al., ICLR 2020, Sec. 5: WMT16 En-De, transformer big, Adam + inverse-sqrt, 25 epochs,
8 nodes x 8 GPUs, about 200k tokens per update). On a CPU it runs on Multi30k (same layout, 29k pairs).

    slowmo-train task=wmt16 algorithm=local_sgd optim=adam data.root=../shared/data/translation/multi30k

- Vocabulary: a joint sentencepiece model of ``data.vocab_size`` pieces learned on both training
  sides, trained by local rank 0 and cached (data/subword.py); the other ranks wait and reuse it.
- Batches: ``data.max_tokens`` padded tokens per worker with length bucketing (data/token_batches.py);
  the loss's unit is target tokens.
- Loss: label-smoothed cross-entropy (eps 0.1; Szegedy et al., 2016), padding ignored, mean per
  target token.
- Evaluation (collective; every rank returns the same numbers): validation ``loss`` (label-smoothed),
  ``nll`` and ``ppl`` every time; ``bleu`` (sacrebleu, Post 2018, on detokenised beam-search output
  of ``eval.bleu_split``) at the final evaluation and every ``eval.bleu_every_evals``-th one.
  The headline metric is ``bleu`` when every evaluation computes it (``eval.bleu_every_evals=1``);
  otherwise it is the validation ``ppl`` (lower is better), because the trainer tracks the headline
  at every evaluation and a BLEU that was not measured is never reported. BLEU then appears in the
  evaluations that compute it, always including the final one (``summary.json``: ``final_eval``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from torch import nn

from slowmo_train import control
from slowmo_train.beam_search import beam_search
from slowmo_train.config import DataConfig, EvalConfig, download_mode
from slowmo_train.data import subword
from slowmo_train.data.cifar10 import default_cache_dir
from slowmo_train.data.token_batches import TokenBatches, eval_batches
from slowmo_train.data.translation import (
    ParallelCorpus,
    TranslationDataError,
    encode_or_load,
    ensure_text,
    missing_files,
    read_lines,
    split_files,
    training_indices,
)
from slowmo_train.data.vocab import PAD
from slowmo_train.models import build_model
from slowmo_train.tasks.base import HeadlineMetric, Task, TaskArgs, WorkerInfo

log = logging.getLogger(__name__)

LABEL_SMOOTHING = 0.1


def prepare_data(data_cfg: DataConfig, worker: WorkerInfo) -> tuple[Path, dict[str, ParallelCorpus]]:
    """The sentencepiece model and the encoded splits. Local rank 0 fetches the text if needed,
    learns the vocabulary and encodes the splits into the cache; the other ranks wait, then load."""
    cache = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else default_cache_dir()
    src, tgt = data_cfg.src_lang, data_cfg.tgt_lang

    def build() -> tuple[Path, dict[str, ParallelCorpus]]:
        ensure_text(data_cfg.root, src, tgt, download_mode(data_cfg) if worker.local_rank == 0 else "false")
        model = subword.train_or_load(list(split_files(data_cfg.root, "train", src, tgt)), data_cfg.vocab_size, cache)
        sp = subword.load(model)
        return model, {
            split: encode_or_load(sp, model.parent, *split_files(data_cfg.root, split, src, tgt))
            for split in ("train", "valid", "test")
        }

    if worker.local_rank == 0:
        out = build()
    control.barrier()
    if worker.local_rank != 0:
        out = build()
    return out


def translation_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Label-smoothed cross-entropy per target token; the unit count is the batch's target tokens."""
    logits = model(batch["src"], batch["prev"])
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch["tgt"].reshape(-1),
        ignore_index=PAD,
        label_smoothing=LABEL_SMOOTHING,
        reduction="sum",
    )
    return loss / batch["ntokens"], batch["ntokens"]


def validation_loss(model: nn.Module, corpus: ParallelCorpus, max_tokens: int, worker: WorkerInfo) -> dict[str, float]:
    """Label-smoothed loss, NLL (nats per target token) and perplexity over every rank's share
    (collective). The sums stay on the device until one read at the end, then one control all-reduce."""
    sums = torch.zeros(2, dtype=torch.float64, device=worker.device)
    tokens = 0
    positions = np.arange(len(corpus))[worker.rank :: worker.world_size]
    with torch.no_grad():
        for _, batch in eval_batches(corpus, positions, max_tokens, worker.device):
            logits = model(batch["src"], batch["prev"]).float().reshape(-1, model.vocab_size)
            tgt = batch["tgt"].reshape(-1)
            ls = F.cross_entropy(logits, tgt, ignore_index=PAD, label_smoothing=LABEL_SMOOTHING, reduction="sum")
            nll = F.cross_entropy(logits, tgt, ignore_index=PAD, reduction="sum")
            sums += torch.stack([ls.double(), nll.double()])
            tokens += batch["ntokens"]  # a host count, from the batch's construction
    ls, nll, n = control.all_reduce([*sums.cpu().tolist(), tokens])
    nll = nll / max(n, 1)
    return {"loss": ls / max(n, 1), "nll": nll, "ppl": math.exp(min(nll, 50.0))}


def translate_corpus(
    model: nn.Module,
    sp,
    corpus: ParallelCorpus,
    positions: np.ndarray,
    cfg: EvalConfig,
    max_tokens: int,
    device: torch.device,
) -> dict[int, str]:
    """Detokenised beam-search translations of the source sentences at ``positions``."""
    out = {}
    # a beam multiplies the decoder's batch: keep the padded tokens per call near max_tokens
    for pairs, batch in eval_batches(corpus, positions, max(1, max_tokens // cfg.beam), device):
        hyps = beam_search(model, batch["src"], cfg.beam, cfg.lenpen, cfg.max_len_a, cfg.max_len_b)
        out.update(zip(pairs.tolist(), (sp.decode(h) for h in hyps)))
    return out


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenisation, the WMT standard) of detokenised text."""
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def bleu_eval(
    model: nn.Module,
    sp,
    corpus: ParallelCorpus,
    references: list[str],
    cfg: EvalConfig,
    max_tokens: int,
    worker: WorkerInfo,
) -> dict[str, float]:
    """BLEU of the first ``cfg.bleu_max_sentences`` sentences, translated in shards over the ranks."""
    n = len(corpus) if cfg.bleu_max_sentences is None else min(len(corpus), cfg.bleu_max_sentences)
    start = time.perf_counter()
    mine = translate_corpus(
        model, sp, corpus, np.arange(n)[worker.rank :: worker.world_size], cfg, max_tokens, worker.device
    )
    for shard in control.all_gather_object(mine):
        mine.update(shard)
    hyps = [mine[i] for i in range(n)]
    return {"bleu": corpus_bleu(hyps, references[:n]), "bleu_sentences_per_s": n / (time.perf_counter() - start)}


def build_wmt16(args: TaskArgs) -> Task:
    data_cfg, worker, eval_cfg = args.data, args.worker, args.eval
    spm_model, splits = prepare_data(data_cfg, worker)
    sp = subword.load(spm_model)
    model = build_model(args.model, "wmt16", vocab_size=sp.get_piece_size()).to(worker.device)
    indices = training_indices(splits["train"], data_cfg.train_subset, data_cfg.max_positions, args.seed)
    batches = TokenBatches(
        splits["train"], indices, data_cfg.max_tokens, worker.rank, worker.world_size, args.seed, worker.device
    )
    references = read_lines(split_files(data_cfg.root, eval_cfg.bleu_split, data_cfg.src_lang, data_cfg.tgt_lang)[1])
    if worker.rank == 0:
        log.info(
            "wmt16: vocabulary %d pieces (%s); %d training pairs (%d dropped as longer than %d tokens or "
            "left over), %d batches of <= %d tokens per worker",
            sp.get_piece_size(),
            spm_model,
            batches.pairs,
            len(splits["train"]) - batches.pairs,
            data_cfg.max_positions,
            batches.steps_per_epoch,
            data_cfg.max_tokens,
        )
    evals = {"count": 0}

    def evaluate(m: nn.Module, final: bool = False) -> dict[str, float]:
        evals["count"] += 1
        was_training = m.training
        m.eval()
        try:
            out = validation_loss(m, splits["valid"], data_cfg.max_tokens, worker)
            every = eval_cfg.bleu_every_evals
            if final or (every and evals["count"] % every == 0):
                out.update(
                    bleu_eval(m, sp, splits[eval_cfg.bleu_split], references, eval_cfg, data_cfg.max_tokens, worker)
                )
        finally:
            m.train(was_training)
        return out

    if eval_cfg.bleu_every_evals == 1:
        metric = HeadlineMetric("bleu", higher_is_better=True, split=eval_cfg.bleu_split)
    else:
        metric = HeadlineMetric("ppl", higher_is_better=False, split="valid")
    return Task(
        model=model,
        train_batches=batches.epoch,
        steps_per_epoch=batches.steps_per_epoch,
        loss=translation_loss,
        evaluate=evaluate,
        metric=metric,
        # nominal sentences per worker and step (for the plan and logs; batching is by tokens)
        batch_size=max(1, round(batches.pairs / (batches.steps_per_epoch * worker.world_size))),
        train_size=batches.pairs,
        unit="tokens",
        artifacts={"spm_model": str(spm_model)},
    )


def check_wmt16_data(data_cfg: DataConfig) -> None:
    """Fail before any worker starts when data.root lacks the text and may not fetch it."""
    if download_mode(data_cfg) == "false" and missing_files(data_cfg.root, data_cfg.src_lang, data_cfg.tgt_lang):
        ensure_text(data_cfg.root, data_cfg.src_lang, data_cfg.tgt_lang, "false")


__all__ = ["TranslationDataError", "build_wmt16", "check_wmt16_data", "corpus_bleu", "translation_loss"]
