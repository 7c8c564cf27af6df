"""Our own decoding loop: greedy, sampling and beam search over an encoder-decoder with a fixed-size KV cache.

The model is anything with the `fiore.model` decoding contract (docs/design.md):
`new_cache(encoder_hidden, encoder_mask, max_length) -> cache`, `decode(ids, encoder_hidden, encoder_mask, cache)`,
`logits(hidden)` and `cache.select(index)`. Cross-attention K/V are computed once, in `new_cache`; each step feeds
one token per row.

Semantics follow transformers' `generate` (5.x) so that tokens match it exactly on the same weights:
- greedy/sampling: logits processors act on raw logits, in the order no-repeat-ngram, min-new-tokens, forced BOS,
  forced EOS, then (sampling only) temperature, top-k, top-p;
- beam search: processors act on log-softmaxed scores; 2*num_beams candidates per step, the first num_beams may
  finish (score = sum of log-probs / generated_length ** length_penalty), and transformers' early-stopping heuristic.

Each generated token also gets its log-probability under the model's unprocessed distribution (log-softmax of the
raw logits at that step, along the final beam for beam search); those feed the per-instance confidence scores.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import torch

__all__ = ["GenerationConfig", "Sequence", "generate"]

_NEG = -1.0e9  # transformers' "impossible" beam score; kept identical so ties break the same way


@dataclass
class GenerationConfig:
    """How to decode.

    `max_new_tokens` may be one int or one int per batch row (tasks of one image decoded together each keep their
    own limit); the decoder needs that many positions (`max_position_embeddings`). A row that reaches its limit
    without an end token is reported `truncated`.
    `forced_bos_token_id` forces the first generated token (Florence targets start with `<s>`);
    `forced_eos_token_id` forces the end token at the last allowed step (transformers' native default; the row is
    still reported truncated).
    """

    max_new_tokens: int | list[int] = 256
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    no_repeat_ngram_size: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = field(default=None, repr=False)
    min_new_tokens: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    decoder_start_token_id: int = 2
    eos_token_id: int = 2
    pad_token_id: int = 1
    # Sub-bin coordinates: with loc_window > 0, each generated location token (ids loc_token_start ..
    # loc_token_start + 999) also gets the expected bin under the model's distribution restricted to the
    # 2 * loc_window + 1 bins around it (`Sequence.token_bins`).
    loc_token_start: int | None = None
    loc_window: int = 0

    def validate(self, batch_size: int) -> list[int]:
        """Check the options; return the per-row token limits."""
        limits = self.max_new_tokens
        if isinstance(limits, SequenceABC):
            limits = [int(n) for n in limits]
            if len(limits) != batch_size:
                raise ValueError(f"max_new_tokens has {len(limits)} entries for a batch of {batch_size} rows")
        else:
            limits = [int(limits)] * batch_size
        if any(n < 1 for n in limits):
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported; use num_beams=1 with do_sample=True")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.loc_window < 0 or (self.loc_window > 0 and self.loc_token_start is None):
            raise ValueError(f"loc_window must be >= 0 and needs loc_token_start, got {self.loc_window}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return limits


@dataclass
class Sequence:
    """One decoded row.

    `ids`: generated tokens (decoder start excluded; the end token included when produced).
    `token_logprobs`: log-probability of each of `ids` under the model's unprocessed distribution at that step.
    `truncated`: the row hit `max_new_tokens` without choosing the end token itself.
    `score`: mean of `token_logprobs` (a length-normalised sequence log-likelihood; exp() of it is a probability).
    `token_bins`: with `GenerationConfig.loc_window`, the expected bin of each location token of `ids` (NaN for
    other tokens); None otherwise.
    """

    ids: list[int]
    token_logprobs: list[float]
    truncated: bool
    score: float
    token_bins: list[float] | None = None  # expected bin of each location token, NaN elsewhere (loc_window)


@torch.inference_mode()
def generate(model, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor | None, config: GenerationConfig):
    """Decode every row of an encoded batch.

    encoder_hidden (B, N, d), encoder_mask (B, N) bool (True = attend) or None. Returns `list[Sequence]` of length B.
    """
    B = encoder_hidden.shape[0]
    limits = config.validate(B)
    if config.num_beams > 1:
        return _beam_search(model, encoder_hidden, encoder_mask, config, limits)
    return _greedy_or_sample(model, encoder_hidden, encoder_mask, config, limits)


# ----------------------------------------------------------------------------------------------- logits processing


def _ban_repeated_ngrams(history: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid tokens that would repeat an n-gram of `history` (R, t) (decoder start included). scores (R, V)."""
    t = history.shape[1]
    if n <= 0 or t < n:
        return scores
    prefix = history[:, t + 1 - n :]  # (R, n-1): the n-gram the next token would complete starts with these
    windows = history.unfold(1, n, 1)  # (R, t-n+1, n)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1)
    if not bool(matches.any()):
        return scores
    V = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    # non-matching windows scatter into a spare column so they cannot unban anything
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], -float("inf"))


def _process(scores, history, step, limits, config: GenerationConfig):
    """transformers' order: no-repeat-ngram, min-new-tokens, forced BOS, forced EOS.

    scores (R, V); history (R, step+1) tokens so far; limits (R,) long, the per-row max_new_tokens.
    """
    scores = _ban_repeated_ngrams(history, scores, config.no_repeat_ngram_size)
    if step < config.min_new_tokens:
        scores = scores.clone()
        scores[:, config.eos_token_id] = -float("inf")
    if step == 0 and config.forced_bos_token_id is not None:
        scores = torch.full_like(scores, -float("inf"))
        scores[:, config.forced_bos_token_id] = 0.0
    if config.forced_eos_token_id is not None:
        last = limits == step + 1  # rows whose next token is their last
        if bool(last.any()):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, config.forced_eos_token_id] = 0.0
            scores = torch.where(last.unsqueeze(1), forced, scores)
    return scores


def _warp(scores: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as in transformers. scores (R, V)."""
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - config.top_p)
        remove[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def _chosen_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] without materialising the full (R, V) log-softmax. logits (R, V), tokens (R,)."""
    return logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


LOC_BINS = 1000


def _expected_bins(logits: torch.Tensor, tokens: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """(R,) expected bin of each chosen location token over the bins within `loc_window` of it, under the softmax of
    `logits` (R, V) (raw or log-softmaxed: the same) restricted to that window; NaN where the token is no location.

    Why a window and not all 1000 bins: a box's corner can have mass far away (another object's edge), which a full
    expectation would average in; the window refines the chosen bin between its neighbours only. On a one-hot
    distribution it is the chosen bin itself.
    """
    k = tokens - config.loc_token_start
    is_loc = (k >= 0) & (k < LOC_BINS)
    bins = k.clamp(0, LOC_BINS - 1).unsqueeze(1) + torch.arange(
        -config.loc_window, config.loc_window + 1, device=tokens.device
    )
    inside = (bins >= 0) & (bins < LOC_BINS)
    window = logits.gather(1, bins.clamp(0, LOC_BINS - 1) + config.loc_token_start).masked_fill(~inside, -float("inf"))
    expected = (window.softmax(-1) * bins).sum(-1)
    return torch.where(is_loc, expected, torch.full_like(expected, float("nan")))


# ------------------------------------------------------------------------------------------------- greedy / sample


def _greedy_or_sample(model, encoder_hidden, encoder_mask, config: GenerationConfig, limits: list[int]):
    B = encoder_hidden.shape[0]
    device = encoder_hidden.device
    L = max(limits)
    limit = torch.tensor(limits, device=device)
    tokens = torch.full((B, L + 1), config.pad_token_id, dtype=torch.long, device=device)
    tokens[:, 0] = config.decoder_start_token_id
    logprobs = torch.zeros(B, L, dtype=torch.float32, device=device)
    lengths = torch.zeros(B, dtype=torch.long)
    bins = torch.full((B, L), float("nan"), device=device) if config.loc_window else None

    cache = model.new_cache(encoder_hidden, encoder_mask, L)  # the last token is never fed back: L positions
    rows = torch.arange(B, device=device)  # batch row of each live cache row
    all_live = True  # while no row has finished, plain slices replace index lookups
    enc_h, enc_m, row_limit = encoder_hidden, encoder_mask, limit
    for step in range(L):
        ids = tokens[:, step : step + 1] if all_live else tokens[rows, step : step + 1]
        logits = model.logits(model.decode(ids, enc_h, enc_m, cache))[:, -1].float()  # (R, V)
        history = tokens[:, : step + 1] if all_live else tokens[rows, : step + 1]
        scores = _process(logits, history, step, row_limit, config)
        if config.do_sample:
            probs = _warp(scores, config).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=config.generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        lp = _chosen_logprob(logits, nxt)
        at = slice(None) if all_live else rows
        tokens[at, step + 1] = nxt
        logprobs[at, step] = lp
        if bins is not None:
            bins[at, step] = _expected_bins(logits, nxt, config)
        done = (nxt == config.eos_token_id) | (row_limit == step + 1)
        if bool(done.any()):
            lengths[rows[done].cpu()] = step + 1
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            # drop finished rows from the batch: they would otherwise cost cross-attention reads every step
            rows, row_limit = rows[keep], row_limit[keep]
            enc_h = enc_h.index_select(0, keep)
            enc_m = None if enc_m is None else enc_m.index_select(0, keep)
            cache = cache.select(keep)
            all_live = False
    del cache
    return [
        _finish(tokens[i, 1 : n + 1], logprobs[i, :n], None if bins is None else bins[i, :n], limits[i], config)
        for i, n in enumerate(lengths.tolist())
    ]


def _finish(ids, logprobs, bins: torch.Tensor | None, limit: int, config: GenerationConfig) -> Sequence:
    ids_list, lps = ids.tolist(), logprobs.tolist()
    n = len(ids_list)
    ended = n > 0 and ids_list[-1] == config.eos_token_id
    forced_end = config.forced_eos_token_id is not None and n == limit
    truncated = not ended or forced_end
    score = sum(lps) / n if n else 0.0
    token_bins = None if bins is None else bins.tolist()
    return Sequence(ids=ids_list, token_logprobs=lps, truncated=truncated, score=score, token_bins=token_bins)


# ----------------------------------------------------------------------------------------------------- beam search


def _beam_search(model, encoder_hidden, encoder_mask, config: GenerationConfig, limits: list[int]):
    """Vectorised beam search with transformers' (>= 4.50) semantics, items dropped from the batch once final.

    Per item: `k` running beams and `k` finished slots. Each step takes the top 2k of (running score + log-prob)
    over k*V candidates; candidates among the first k that end (EOS or length limit) compete for the finished slots
    with score sum_logprob / length**length_penalty; the best k that did not end keep running.
    """
    B, device = encoder_hidden.shape[0], encoder_hidden.device
    k, lp_pow, eos = config.num_beams, config.length_penalty, config.eos_token_id
    L = max(limits)
    K2 = 2 * k
    top_k_mask = torch.arange(K2, device=device) < k  # (2k,) only the first k candidates may finish

    run_seq = torch.full((B, k, L + 1), config.pad_token_id, dtype=torch.long, device=device)
    run_seq[:, :, 0] = config.decoder_start_token_id
    run_lp = torch.zeros(B, k, L, device=device)  # raw log-prob of each chosen token
    run_bins = torch.full((B, k, L), float("nan"), device=device)  # expected bin of each location token
    run_score = torch.zeros(B, k, device=device)
    run_score[:, 1:] = _NEG  # all beams start identical: only the first one may expand at step 0
    fin_seq, fin_lp, fin_bins = run_seq.clone(), run_lp.clone(), run_bins.clone()
    fin_score = torch.full((B, k), _NEG, device=device)
    fin_len = torch.zeros(B, k, dtype=torch.long, device=device)
    is_fin = torch.zeros(B, k, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)

    # final results per original item, filled when an item leaves the batch
    out_seq = fin_seq.clone()
    out_lp, out_bins, out_score, out_len = fin_lp.clone(), fin_bins.clone(), fin_score.clone(), fin_len.clone()

    cache = model.new_cache(encoder_hidden, encoder_mask, L)  # the last token is never fed back: L positions
    cache = cache.select(torch.arange(B, device=device).repeat_interleave(k))
    enc_h = encoder_hidden.repeat_interleave(k, 0)
    enc_m = None if encoder_mask is None else encoder_mask.repeat_interleave(k, 0)
    items = torch.arange(B, device=device)  # original item of each live item
    item_limit = torch.tensor(limits, device=device)

    for step in range(L):
        Bl = items.numel()
        flat_seq = run_seq.view(Bl * k, L + 1)
        logits = model.logits(model.decode(flat_seq[:, step : step + 1], enc_h, enc_m, cache))[:, -1].float()
        raw = torch.log_softmax(logits, dim=-1)  # (Bl*k, V)
        del logits
        V = raw.shape[-1]
        scores = _process(raw, flat_seq[:, : step + 1], step, item_limit.repeat_interleave(k), config)
        scores = (scores.view(Bl, k, V) + run_score.unsqueeze(-1)).view(Bl, k * V)

        cand_score, cand_idx = torch.topk(scores, K2)  # (Bl, 2k), sorted
        src_beam = cand_idx // V
        tok = cand_idx % V
        cand_seq = run_seq.gather(1, src_beam[..., None].expand(-1, -1, L + 1)).clone()
        cand_seq[:, :, step + 1] = tok
        cand_lp = run_lp.gather(1, src_beam[..., None].expand(-1, -1, L))
        raw_tok = raw.view(Bl, k * V).gather(1, cand_idx)
        cand_lp[:, :, step] = raw_tok
        cand_bins = run_bins.gather(1, src_beam[..., None].expand(-1, -1, L))
        if config.loc_window:
            parent_rows = (torch.arange(Bl, device=device).unsqueeze(1) * k + src_beam).reshape(-1)
            cand_bins[:, :, step] = _expected_bins(raw[parent_rows], tok.reshape(-1), config).view(Bl, K2)
        ends = (tok == eos) | (item_limit == step + 1).unsqueeze(1)  # (Bl, 2k)

        # beams that keep running: the best k candidates that did not end
        keep_score = cand_score + ends.float() * _NEG
        nxt = torch.topk(keep_score, k).indices  # (Bl, k)
        run_seq = cand_seq.gather(1, nxt[..., None].expand(-1, -1, L + 1))
        run_lp = cand_lp.gather(1, nxt[..., None].expand(-1, -1, L))
        run_bins = cand_bins.gather(1, nxt[..., None].expand(-1, -1, L))
        run_score = keep_score.gather(1, nxt)
        parent = src_beam.gather(1, nxt)  # (Bl, k) beam each new running beam continues

        # finished slots: merge the candidates that just ended (among the first k) into the best k so far
        gen_len = step + 1
        just_fin = ends & top_k_mask
        new_fin = cand_score / (gen_len**lp_pow)
        full = is_fin.all(-1, keepdim=True) & (config.early_stopping is True)
        new_fin = new_fin + full.float() * _NEG + (~improvable).float() * _NEG + (~just_fin).float() * _NEG
        m_score = torch.cat([fin_score, new_fin], 1)
        best = torch.topk(m_score, k).indices
        fin_score = m_score.gather(1, best)
        fin_seq = torch.cat([fin_seq, cand_seq], 1).gather(1, best[..., None].expand(-1, -1, L + 1))
        fin_lp = torch.cat([fin_lp, cand_lp], 1).gather(1, best[..., None].expand(-1, -1, L))
        fin_bins = torch.cat([fin_bins, cand_bins], 1).gather(1, best[..., None].expand(-1, -1, L))
        fin_len = torch.cat([fin_len, torch.full_like(cand_idx, gen_len)], 1).gather(1, best)
        is_fin = torch.cat([is_fin, just_fin], 1).gather(1, best)

        # transformers' stopping heuristic: can a running beam still beat the worst finished one?
        cur = gen_len  # generated tokens so far
        if config.early_stopping == "never" and lp_pow > 0.0:
            hyp_len = item_limit.unsqueeze(1).float()
        else:
            hyp_len = torch.full((Bl, 1), float(cur), device=device)
        best_possible = run_score[:, :1] / (hyp_len**lp_pow)
        worst = torch.where(is_fin, fin_score.min(1, keepdim=True).values, torch.full_like(fin_score, _NEG))
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)

        # an item is final once it cannot improve, is full under early_stopping=True, or reached its limit
        item_done = (~improvable).squeeze(1) | (item_limit == step + 1)
        if config.early_stopping is True:
            item_done |= is_fin.all(-1)
        if bool(item_done.any()):
            gone = items[item_done]
            out_seq[gone], out_lp[gone], out_bins[gone] = fin_seq[item_done], fin_lp[item_done], fin_bins[item_done]
            out_score[gone], out_len[gone] = fin_score[item_done], fin_len[item_done]
        live = (~item_done).nonzero().squeeze(1)
        if live.numel() == 0:
            break
        rows = (live.unsqueeze(1) * k + parent[live]).reshape(-1)  # cache rows the surviving beams continue
        if live.numel() == Bl:
            cache = cache.reorder(rows)  # beams stay within their item: cross-attention K/V need no copy
        else:
            cache = cache.select(rows)
        if live.numel() != Bl:
            items, item_limit = items[live], item_limit[live]
            run_seq, run_lp, run_score, parent = run_seq[live], run_lp[live], run_score[live], parent[live]
            fin_seq, fin_lp, fin_score, fin_len = fin_seq[live], fin_lp[live], fin_score[live], fin_len[live]
            run_bins, fin_bins = run_bins[live], fin_bins[live]
            is_fin, improvable = is_fin[live], improvable[live]
            row_keep = (live.unsqueeze(1) * k + torch.arange(k, device=device)).reshape(-1)
            enc_h = enc_h.index_select(0, row_keep)
            enc_m = None if enc_m is None else enc_m.index_select(0, row_keep)
    del cache

    results = []
    for i in range(B):
        n = int(out_len[i, 0])
        bins = out_bins[i, 0, :n] if config.loc_window else None
        results.append(_finish(out_seq[i, 0, 1 : n + 1], out_lp[i, 0, :n], bins, limits[i], config))
    return results
