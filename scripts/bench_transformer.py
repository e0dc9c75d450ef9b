"""Transformer throughput on Multi30k in one process: training target tokens/s and beam-search
sentences/s, at the small preset (what `slowmo-train +exp=wmt16_small_cpu` trains).

    python scripts/bench_transformer.py --data-root ../shared/data/translation/multi30k
    python scripts/bench_transformer.py --data-root ... --arch transformer_base --threads 2 --steps 10

Training: ``--steps`` optimizer steps (after ``--warmup`` untimed ones) of forward, label-smoothed
loss, backward and Adam on real token batches of ``--max-tokens`` padded tokens, exactly the task's
batches and loss (``slowmo_train.tasks.wmt16``). Decoding: beam search (``--beam``, lenpen 0.6,
max length 1.2 x source + 10) of the first ``--sentences`` test sentences in the task's length-sorted
batches. The model is untrained unless ``--weights`` points at a ``model_final.pt``: an untrained
model tends to decode to the maximum length, so its sentences/s is a lower bound.

The figures depend on the machine's load; this is not a timed test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from slowmo_train.config import DataConfig, EvalConfig, ModelConfig
from slowmo_train.data import subword
from slowmo_train.data.token_batches import TokenBatches
from slowmo_train.models import build_model
from slowmo_train.tasks.base import WorkerInfo
from slowmo_train.tasks.wmt16 import prepare_data, translate_corpus, translation_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data/translation/multi30k")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--arch", default="transformer_small")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--sentences", type=int, default=200)
    p.add_argument("--weights", default=None, help="a model_final.pt to decode with (default: untrained)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    worker = WorkerInfo(0, 1, 0, torch.device("cpu"))
    data = DataConfig(
        root=args.data_root,
        cache_dir=args.cache_dir,
        vocab_size=args.vocab_size,
        max_tokens=args.max_tokens,
        download="false",
    )
    spm_model, splits = prepare_data(data, worker)
    sp = subword.load(spm_model)
    model = build_model(ModelConfig(arch=args.arch, width=args.width), "wmt16", vocab_size=sp.get_piece_size())
    params = sum(x.numel() for x in model.parameters())
    print(
        f"{args.arch} width {args.width}: {params / 1e6:.2f}M parameters, vocabulary {sp.get_piece_size()}, "
        f"{args.threads} thread(s)"
    )

    batches = TokenBatches(splits["train"], np.arange(len(splits["train"])), args.max_tokens, 0, 1, 0, worker.device)
    it = batches.epoch(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98))
    model.train()
    tokens, start = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start, tokens = time.perf_counter(), 0
        loss, units = translation_loss(model, next(it))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens += units
    train_s = time.perf_counter() - start
    print(
        f"training: {tokens / train_s:.0f} target tokens/s ({args.steps} steps of <= {args.max_tokens} padded "
        f"tokens, {train_s / args.steps:.2f} s/step)"
    )

    if args.weights:
        model.load_state_dict(torch.load(Path(args.weights), map_location="cpu", weights_only=True))
    model.eval()
    n = min(args.sentences, len(splits["test"]))
    cfg = EvalConfig(beam=args.beam)
    start = time.perf_counter()
    out = translate_corpus(model, sp, splits["test"], np.arange(n), cfg, args.max_tokens, worker.device)
    decode_s = time.perf_counter() - start
    pieces = np.mean([len(sp.encode(h)) for h in out.values()])
    print(
        f"beam search: {n / decode_s:.1f} sentences/s (beam {args.beam}, {n} test sentences, "
        f"{'trained' if args.weights else 'untrained'} model; mean output {pieces:.1f} pieces)"
    )


if __name__ == "__main__":
    main()
