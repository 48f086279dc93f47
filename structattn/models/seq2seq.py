"""Encoder-decoder with a latent alignment: soft, sparse, exact hard and variational attention.

The decoder has **no input feeding**: its state ``h_t`` depends on the previous target tokens
only, so the alignments ``z_t`` of different target steps are conditionally independent given
the data, exact enumeration costs one emission per source position, and the exact marginal
likelihood is one log-sum-exp per target token (Deng et al. 2018, "Latent Alignment and
Variational Attention").  The emission reads the context through
``p(y_t | h_t, c) = softmax(W_o tanh(W_h h_t + W_c c))``; ``c`` is the expected source state
(soft attention) or the source state at ``z_t`` (hard attention).
"""

from __future__ import annotations

import torch
from torch import nn

from structattn.distributions.categorical import CategoricalAlignment
from structattn.distributions.monotonic import MonotonicAlignment
from structattn.infer.estimators import AlignmentTerms, ExactEstimator, make_estimator
from structattn.infer.exact import marginal_log_likelihood, posterior
from structattn.infer.readout import gather
from structattn.nn.attention import LatentAttention
from structattn.nn.inference import InferenceNetwork
from structattn.nn.rnn import BiRNN

__all__ = ["MODES", "SOFT_MODES", "Seq2Seq"]

#: attention modes by name (see :class:`Seq2Seq`)
MODES = (
    "soft",
    "sparsemax",
    "entmax15",
    "marginal",
    "hard-score",
    "variational-enum",
    "variational-score",
    "variational-st",
    "monotonic",
)
SOFT_MODES = ("soft", "sparsemax", "entmax15")
_ESTIMATOR = {
    "marginal": "enum",
    "hard-score": "rloo",
    "variational-enum": "enum",
    "variational-score": "rloo",
    "variational-st": "st",
}


class Seq2Seq(nn.Module):
    """Bi-LSTM encoder, LSTM decoder (no input feeding), latent attention.

    Modes (``mode=``):

    - ``soft``, ``sparsemax``, ``entmax15``: soft attention with that normaliser; trained by
      ``log p(y | x, c = E[enc_z])``.
    - ``marginal``: hard attention trained by the exact marginal likelihood (alignments
      summed out).
    - ``hard-score``: hard attention sampled from the prior, score function with the
      leave-one-out baseline (``num_samples`` draws), maximising ``E_p[log p(y | z)]``.
    - ``variational-enum``: an inference network ``q(z | x, y)`` and the exact ELBO.
    - ``variational-score``: the same ELBO, sampled, with the leave-one-out baseline.
    - ``variational-st``: the same ELBO, straight-through Gumbel-softmax, analytic KL.
    - ``monotonic``: hard monotonic attention (Wu & Cotterell 2019): ``z_t`` stays or moves
      forward by at most ``max_jump`` source positions, ``p(z_t = k | z_{t-1} = j)`` is the
      softmax of the attention scores over ``j <= k <= j + max_jump``; trained by the exact
      ``log p(y | x)`` with the alignment summed out (forward algorithm).

    Batches are :class:`structattn.data.batching.Seq2SeqBatch`: ``source (batch, S)``,
    ``target (batch, T + 1)`` framed ``bos y_1 .. y_n eos``, with boolean masks.

    Args:
        source_vocab_size, target_vocab_size: vocabulary sizes.
        mode: one of :data:`MODES`.
        embed_dim: embedding size.
        hidden: encoder (both directions together) and decoder size; even.
        score: attention scorer (``"bilinear"``, ``"dot"``, ``"additive"``).
        dropout: dropout on embeddings and decoder states.
        num_samples: draws per query for the sampling estimators.
        temperature: Gumbel-softmax temperature of ``variational-st``.
        pad_id, bos_id, eos_id: special target ids.
        chunk_elements: upper bound on the logits computed at once when the emission is
            evaluated at every source position.
        max_jump: largest forward move of the ``monotonic`` mode (``None``: unbounded).
    """

    def __init__(
        self,
        source_vocab_size: int,
        target_vocab_size: int,
        *,
        mode: str = "soft",
        embed_dim: int = 64,
        hidden: int = 128,
        score: str = "bilinear",
        dropout: float = 0.0,
        num_samples: int = 4,
        temperature: float = 1.0,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        chunk_elements: int = 1 << 24,
        max_jump: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if hidden % 2:
            raise ValueError(f"hidden must be even (bidirectional encoder), got {hidden}")
        self.mode = mode
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.target_vocab_size = target_vocab_size
        self.chunk_elements = chunk_elements
        self.max_jump = max_jump
        self.src_embed = nn.Embedding(source_vocab_size, embed_dim, padding_idx=pad_id)
        self.encoder = BiRNN(embed_dim, hidden, cell="lstm")
        self.tgt_embed = nn.Embedding(target_vocab_size, embed_dim, padding_idx=pad_id)
        self.decoder = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        normalizer = mode if mode in ("sparsemax", "entmax15") else "softmax"
        self.attention = LatentAttention(hidden, hidden, score=score, normalizer=normalizer)
        self.combine_state = nn.Linear(hidden, hidden)
        self.combine_context = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, target_vocab_size)
        self.inference = None
        if mode.startswith("variational"):
            # q reads the model's source states (one extra bi-GRU, over the target only)
            self.inference = InferenceNetwork(
                embed_dim, hidden, hidden=hidden, target_vocab=target_vocab_size,
                encode_source=False,
            )
        self.estimator = None
        if mode in _ESTIMATOR:
            name = _ESTIMATOR[mode]
            kwargs = {}
            if name == "rloo":
                kwargs["num_samples"] = num_samples
            elif name == "st":
                kwargs["temperature"] = temperature
            self.estimator = make_estimator(name, **kwargs)

    # ---------------------------------------------------------------- building blocks

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """Source states ``(batch, S, hidden)``."""
        lengths = source_mask.sum(-1)
        if bool((lengths == 0).any()):
            raise ValueError("source_mask has an empty source sequence")
        return self.encoder(self.dropout(self.src_embed(source)), source_mask)

    def decode(self, inputs: torch.Tensor, state=None):
        """Decoder states ``(batch, T, hidden)`` for input ids ``(batch, T)``, and the state."""
        outputs, state = self.decoder(self.dropout(self.tgt_embed(inputs)), state)
        return self.dropout(outputs), state

    def output_logits(self, states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``(..., V)``; broadcasts states against contexts."""
        return self.out(torch.tanh(self.combine_state(states) + self.combine_context(context)))

    def emission_table(
        self,
        states: torch.Tensor,
        enc: torch.Tensor,
        targets: torch.Tensor,
        target_mask: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``log p(y_t | h_t, enc_k)`` for every source position: ``(batch, T, S)``.

        Only (target, source) pairs that are both real are evaluated (others are 0), in
        chunks of at most ``chunk_elements`` logits.
        """
        batch, length, _ = states.shape
        keys = enc.shape[1]
        valid = torch.ones(batch, length, keys, dtype=torch.bool, device=states.device)
        if target_mask is not None:
            valid = valid & target_mask[:, :, None]
        if source_mask is not None:
            valid = valid & source_mask[:, None, :]
        rows, steps, positions = valid.nonzero(as_tuple=True)
        state_part = self.combine_state(states)[rows, steps]           # (N, H)
        context_part = self.combine_context(enc)[rows, positions]      # (N, H)
        words = targets[rows, steps].unsqueeze(-1)
        chunk = max(1, self.chunk_elements // self.target_vocab_size)
        pieces = []
        for start in range(0, rows.shape[0], chunk):
            hidden = torch.tanh(state_part[start:start + chunk] + context_part[start:start + chunk])
            log_probs = self.out(hidden).log_softmax(-1)
            pieces.append(log_probs.gather(-1, words[start:start + chunk]).squeeze(-1))
        values = torch.cat(pieces) if pieces else state_part.new_zeros(0)
        table = values.new_zeros(batch, length, keys)
        return table.index_put((rows, steps, positions), values)

    def _emission_at(self, states, enc, targets, z: torch.Tensor) -> torch.Tensor:
        """``log p(y_t | h_t, c(z))`` at alignments ``z``: ``(n, batch, T)``."""
        context = gather(enc, z)                                       # (n, B, T, H)
        log_probs = self.output_logits(states, context).log_softmax(-1)
        index = targets.expand(log_probs.shape[:-1]).unsqueeze(-1)
        return log_probs.gather(-1, index).squeeze(-1)

    def _pieces(self, batch):
        inputs, targets = batch.target[:, :-1], batch.target[:, 1:]
        target_mask = batch.target_mask[:, 1:]
        enc = self.encode(batch.source, batch.source_mask)
        states, _ = self.decode(inputs)
        prior = self.attention(states, enc, batch.source_mask)
        return enc, states, prior, targets, target_mask

    def guide(self, batch, enc: torch.Tensor | None = None):
        """``q(z | x, y)``, batch shape ``(batch, T)`` (variational modes only).

        ``enc``: the source states ``(batch, S, hidden)`` if already computed.
        """
        if self.inference is None:
            raise ValueError(f"mode {self.mode!r} has no inference network")
        if enc is None:
            enc = self.encode(batch.source, batch.source_mask)
        return self.inference(batch.target[:, 1:], enc, batch.source_mask,
                              batch.target_mask[:, 1:])

    # ---------------------------------------------------------------- objectives

    def soft_log_likelihood(self, batch) -> torch.Tensor:
        """Per-token ``log p(y_t | y_<t, x)`` under soft attention, ``(batch, T)`` (0 at pad)."""
        enc, states, prior, targets, target_mask = self._pieces(batch)
        return self._soft_token_log_probs(enc, states, prior, targets, target_mask)

    def _soft_token_log_probs(self, enc, states, prior, targets, target_mask):
        logits = self.output_logits(states, gather(enc, prior.attention))
        token = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return token.masked_fill(~target_mask, 0.0)

    def token_log_likelihood(self, batch) -> torch.Tensor:
        """Per-token ``log p(y_t | y_<t, x)`` of this model, ``(batch, T)``.

        Soft modes: the soft-attention likelihood.  Latent modes: the exact marginal over the
        prior alignment (variational models are scored by their prior, as at test time).
        """
        if self.mode == "monotonic":
            raise ValueError("mode 'monotonic' has no per-token likelihood; use log_likelihood")
        enc, states, prior, targets, target_mask = self._pieces(batch)
        if self.mode in SOFT_MODES:
            return self._soft_token_log_probs(enc, states, prior, targets, target_mask)
        table = self.emission_table(states, enc, targets, target_mask, batch.source_mask)
        return marginal_log_likelihood(prior, table, target_mask)

    def _monotonic(self, batch, enc, states, targets, target_mask, emission=True):
        """The monotonic alignment chain: the posterior (with emissions) or the prior."""
        scores, _ = self.attention.scores(states, enc)
        table = None
        if emission:
            table = self.emission_table(states, enc, targets, target_mask, batch.source_mask)
        return MonotonicAlignment(
            scores, table, target_lengths=target_mask.sum(-1),
            source_lengths=batch.source_mask.sum(-1), max_jump=self.max_jump)

    def log_likelihood(self, batch) -> torch.Tensor:
        """``log p(y | x)`` per sequence, ``(batch,)`` (see :meth:`token_log_likelihood`)."""
        if self.mode != "monotonic":
            return self.token_log_likelihood(batch).sum(-1)
        enc, states, _, targets, target_mask = self._pieces(batch)
        return self._monotonic(batch, enc, states, targets, target_mask).log_marginal_likelihood

    def loss(self, batch) -> dict[str, torch.Tensor]:
        """Training loss per target token, and logged extras."""
        tokens = batch.target_mask[:, 1:].sum().clamp_min(1)
        if self.mode == "monotonic":
            total = -self.log_likelihood(batch).sum()
            return {"loss": total / tokens, "nll": total.detach() / tokens}
        enc, states, prior, targets, target_mask = self._pieces(batch)
        if self.mode in SOFT_MODES:
            log_lik = self._soft_token_log_probs(enc, states, prior, targets, target_mask)
            total = -log_lik.sum()
            return {"loss": total / tokens, "nll": total.detach() / tokens}
        if isinstance(self.estimator, ExactEstimator):
            log_likelihood = self.emission_table(states, enc, targets, target_mask,
                                                 batch.source_mask)
        else:
            def log_likelihood(z: torch.Tensor) -> torch.Tensor:
                return self._emission_at(states, enc, targets, z)

        terms = AlignmentTerms(prior=prior, log_likelihood=log_likelihood, mask=target_mask)
        guide = self.guide(batch, enc) if self.inference is not None else None
        surrogate = self.estimator.loss(terms, guide)
        objective = -self.estimator.stats["objective"]
        return {"loss": surrogate / tokens,
                "objective": torch.as_tensor(objective) / tokens}

    # ---------------------------------------------------------------- alignments

    @torch.no_grad()
    def alignments(self, batch) -> dict[str, torch.Tensor]:
        """Alignments of a batch, each ``(batch, T, S)`` (or ``(batch, T)`` for argmaxes).

        ``prior``: the attention weights ``p(z_t | x, y_<t)`` (soft attention in soft modes);
        ``posterior``: the exact ``p(z_t | x, y)`` of the hard-attention reading of the model;
        ``guide``: ``q(z_t | x, y)`` in variational modes; ``prior_argmax`` and
        ``posterior_map``: their argmaxes.
        """
        enc, states, prior, targets, target_mask = self._pieces(batch)
        if self.mode == "monotonic":
            prior_chain = self._monotonic(batch, enc, states, targets, target_mask, False)
            posterior_chain = self._monotonic(batch, enc, states, targets, target_mask)
            prior_marginals = prior_chain.node_marginals
            post = posterior_chain.node_marginals
            return {"prior": prior_marginals, "posterior": post,
                    "prior_argmax": prior_marginals.argmax(-1),
                    "posterior_map": posterior_chain.argmax}
        table = self.emission_table(states, enc, targets, target_mask, batch.source_mask)
        dense_prior = prior if isinstance(prior, CategoricalAlignment) else CategoricalAlignment(
            probs=prior.attention.clamp_min(0), validate_args=False)
        post = posterior(dense_prior, table)
        result = {"prior": prior.attention, "posterior": post,
                  "prior_argmax": prior.attention.argmax(-1), "posterior_map": post.argmax(-1)}
        if self.inference is not None:
            result["guide"] = self.guide(batch, enc).attention
        return result

    # ---------------------------------------------------------------- decoding

    def _monotone_predict(self, states, enc, source_mask, filtered):
        """``log p(z_t = k | y_<t, x)`` ``(N, S)`` from the filter ``log p(z_{t-1} | y_<t, x)``."""
        scores, _ = self.attention.scores(states, enc)                 # (N, 1, S)
        positions = torch.arange(enc.shape[1], device=enc.device)
        jump = positions[:, None] - positions[None, :]                 # [next, previous]
        allowed = (jump >= 0) if self.max_jump is None else (jump >= 0) & (jump <= self.max_jump)
        allowed = allowed & source_mask[:, :, None]
        moves = scores[:, 0, :, None].masked_fill(~allowed, -torch.inf)     # (N, next, prev)
        moves = torch.where(allowed, moves - moves.logsumexp(1, keepdim=True), -torch.inf)
        return (moves + filtered[:, None, :]).logsumexp(-1)

    def _next_log_probs(self, states, enc, source_mask, filtered=None) -> torch.Tensor:
        """``log p(y_t | y_<t, x)`` over the vocabulary for one step: ``(N, V)``.

        ``monotonic`` mode also returns the per-position joint ``(N, S, V)`` for the filter.
        """
        if self.mode == "monotonic":
            predicted = self._monotone_predict(states, enc, source_mask, filtered)
            log_probs = self.output_logits(states, enc).log_softmax(-1)     # (N, S, V)
            joint = predicted.unsqueeze(-1) + log_probs
            return joint.logsumexp(1), joint
        prior = self.attention(states, enc, source_mask)               # batch (N, 1)
        if self.mode in SOFT_MODES:
            return self.output_logits(states, gather(enc, prior.attention)).log_softmax(-1)[:, 0]
        log_probs = self.output_logits(states.unsqueeze(2), enc.unsqueeze(1)).log_softmax(-1)
        log_prior = prior.attention.clamp_min(1e-30).log()            # (N, 1, S)
        return (log_prior.unsqueeze(-1) + log_probs).logsumexp(-2)[:, 0]

    @torch.no_grad()
    def beam_search(
        self,
        source: torch.Tensor,
        source_mask: torch.Tensor,
        beam_size: int = 5,
        max_length: int = 50,
    ) -> list[list[int]]:
        """Best target per source by beam search over ``log p(y | x)``.

        For latent modes each step scores the exact marginal over the alignment of that
        step.  Returns token ids without bos/eos; ``beam_size=1`` is greedy decoding.

        Args:
            source: ``(batch, S)`` ids; source_mask: ``(batch, S)`` bool.
            beam_size: hypotheses kept per source.
            max_length: longest output (without eos).
        """
        if beam_size < 1 or max_length < 1:
            raise ValueError("beam_size and max_length must be positive")
        batch = source.shape[0]
        enc = self.encode(source, source_mask)
        enc = enc.repeat_interleave(beam_size, 0)
        mask = source_mask.repeat_interleave(beam_size, 0)
        scores = torch.full((batch, beam_size), -torch.inf, device=source.device)
        scores[:, 0] = 0.0
        tokens = torch.full((batch * beam_size, 1), self.bos_id, dtype=torch.long,
                            device=source.device)
        finished = torch.zeros(batch, beam_size, dtype=torch.bool, device=source.device)
        state = None
        vocab = self.target_vocab_size
        filtered = None
        if self.mode == "monotonic":  # the virtual start z_{-1} = 0
            filtered = torch.full(mask.shape, -torch.inf, device=source.device)
            filtered[:, 0] = 0.0
        for step in range(max_length + 1):
            states, state = self.decode(tokens[:, -1:], state)
            if self.mode == "monotonic":
                log_probs, joint = self._next_log_probs(states, enc, mask, filtered)
            else:
                log_probs = self._next_log_probs(states, enc, mask)
            log_probs = log_probs.view(batch, beam_size, vocab)
            if step == max_length:  # out of room: every open hypothesis must end here
                log_probs = torch.where(
                    torch.arange(vocab, device=source.device) == self.eos_id, log_probs,
                    torch.full_like(log_probs, -torch.inf))
            # a finished hypothesis only extends by padding, at no cost
            done = torch.full_like(log_probs, -torch.inf)
            done[..., self.pad_id] = 0.0
            log_probs = torch.where(finished.unsqueeze(-1), done, log_probs)
            candidates = (scores.unsqueeze(-1) + log_probs).view(batch, -1)
            scores, flat = candidates.topk(beam_size, dim=-1)
            origin = flat // vocab + torch.arange(batch, device=source.device)[:, None] * beam_size
            word = flat % vocab
            origin = origin.view(-1)
            tokens = torch.cat([tokens[origin], word.view(-1, 1)], 1)
            state = tuple(s[:, origin] for s in state)
            if filtered is not None:  # condition the alignment filter on the chosen word
                chosen = joint[origin].gather(
                    -1, word.view(-1, 1, 1).expand(-1, joint.shape[1], 1)).squeeze(-1)
                filtered = chosen - chosen.logsumexp(-1, keepdim=True)
                filtered = torch.nan_to_num(filtered, nan=-torch.inf)
            finished = finished.view(-1)[origin].view(batch, beam_size) | (word == self.eos_id)
            if bool(finished.all()):
                break
        best = scores.argmax(-1) + torch.arange(batch, device=source.device) * beam_size
        outputs = []
        for row in tokens[best].tolist():
            ids = []
            for token in row[1:]:
                if token in (self.eos_id, self.pad_id):
                    break
                ids.append(token)
            outputs.append(ids)
        return outputs
