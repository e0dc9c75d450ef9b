"""Batched beam search with incremental decoding (cached keys/values per decoder layer).

Scoring follows fairseq's ``SequenceGenerator`` (Ott et al., 2019) as the SlowMo paper's WMT16 runs
used it: hypotheses are ranked by ``sum log p / length ** lenpen`` (length counting the final
end-of-sentence), a sentence is finished once ``beam`` hypotheses have ended (only end-of-sentence
candidates ranked within the top ``beam`` count), and a hypothesis is forced to end at
``max_len_a * source_length + max_len_b`` tokens. Finished sentences leave the batch, so decoding
shrinks as it goes.

With ``incremental=False`` every step re-runs the decoder on the whole prefix (quadratic); it exists
so a test can check that the cached path produces the same tokens.

    python -c "import torch; from slowmo_train.models.transformer import transformer; \
from slowmo_train.beam_search import beam_search; m = transformer('transformer_small', 50).eval(); \
print(beam_search(m, torch.randint(4, 50, (2, 7)), beam=4))"
"""

from __future__ import annotations

import torch

from slowmo_train.data.vocab import BOS, EOS, PAD
from slowmo_train.models.transformer import Transformer


@torch.no_grad()
def beam_search(
    model: Transformer,
    src: torch.Tensor,
    beam: int = 4,
    lenpen: float = 0.6,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    incremental: bool = True,
) -> list[list[int]]:
    """Best hypothesis (token ids without BOS/EOS) for each row of the right-padded ``src`` (B, S)."""
    was_training = model.training
    model.eval()
    device, bsz, k = src.device, src.shape[0], beam
    src_len = (src != PAD).sum(1)
    max_len = (max_len_a * src_len.float() + max_len_b).long().clamp(min=1)  # (B,)
    memory, mask = model.encode(src)
    rows = torch.arange(bsz, device=device).repeat_interleave(k)
    memory, mask = memory.index_select(0, rows), mask.index_select(0, rows)
    active = torch.arange(bsz, device=device)  # original sentence of each active group
    tokens = torch.full((bsz * k, 1), BOS, dtype=torch.long, device=device)
    scores = torch.full((bsz, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(bsz)]
    cache = model.new_cache() if incremental else None
    step = 0
    while active.numel():
        n = active.numel()
        if incremental:
            logits = model.decode(tokens[:, -1:], memory, mask, cache, start=step)[:, -1]
        else:
            logits = model.decode(tokens, memory, mask)[:, -1]
        lprobs = torch.log_softmax(logits.float(), dim=-1)
        lprobs[:, PAD] = float("-inf")
        lprobs[:, BOS] = float("-inf")
        at_limit = (max_len[active] <= step + 1).repeat_interleave(k)
        lprobs[at_limit, :EOS] = float("-inf")
        lprobs[at_limit, EOS + 1 :] = float("-inf")
        vocab = lprobs.shape[1]
        cand = (scores.view(n, k, 1) + lprobs.view(n, k, vocab)).view(n, k * vocab)
        cand_scores, cand_idx = cand.topk(2 * k, dim=1)  # (n, 2k), best first
        cand_beam, cand_tok = cand_idx // vocab, cand_idx % vocab
        is_eos = (cand_tok == EOS) & torch.isfinite(cand_scores)

        # end-of-sentence candidates within the top k finish a hypothesis
        sents = active.tolist()
        for g, j in (is_eos[:, :k]).nonzero().tolist():
            hyp = tokens[g * k + int(cand_beam[g, j]), 1:].tolist()
            finished[sents[g]].append((float(cand_scores[g, j]) / (step + 1) ** lenpen, hyp))
        counts = torch.tensor([len(finished[s]) for s in sents], device=device)
        done = (counts >= k) | (max_len[active] <= step + 1)

        # the k best candidates that do not end continue (stable sort keeps score order)
        rank = torch.arange(2 * k, device=device).expand(n, 2 * k) + is_eos.long() * 2 * k
        keep = rank.argsort(dim=1)[:, :k]
        next_scores = cand_scores.gather(1, keep)
        next_beam = cand_beam.gather(1, keep)
        next_tok = cand_tok.gather(1, keep)

        alive = (~done).nonzero().squeeze(1)
        rows = (alive[:, None] * k + next_beam[alive]).view(-1)  # flat indices of surviving beams
        tokens = torch.cat([tokens.index_select(0, rows), next_tok[alive].view(-1, 1)], dim=1)
        scores = next_scores[alive]
        active = active[alive]
        memory, mask = memory.index_select(0, rows), mask.index_select(0, rows)
        if cache is not None:
            model.reorder_cache(cache, rows)
        step += 1
    model.train(was_training)
    return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]
