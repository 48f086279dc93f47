"""Encoder-decoder with a latent alignment: soft, sparse, structured, exact hard and
variational attention.

The decoder has **no input feeding**: its state ``h_t`` depends on the previous target tokens
only, so the alignments ``z_t`` of different target steps are conditionally independent given
the data, exact enumeration costs one emission per source position, and the exact marginal
likelihood is one log-sum-exp per target token (Deng et al. 2018, "Latent Alignment and
Variational Attention").  The emission reads the context through the shared
:class:`~structattn.nn.EmissionHead`, ``p(y_t | h_t, c) = softmax(W_o tanh(W_h h_t + W_c c))``;
``c`` is the expected source state (soft attention) or the source state at ``z_t`` (hard
attention).  How the alignment is trained and read is the job of the mode object
(:mod:`structattn.models.modes`).

Two options serve word alignment (both off by default):

* ``lexical_emission``: the source states become ``[enc_k ; emb(x_k)]``, and the emission adds a
  direct term ``W_x emb(x_z)`` to its logits, so ``p(y_t | h_t, z_t = k)`` can name a
  translation of the source WORD at ``k`` and the posterior ``p(z_t | x, y)`` behaves like a
  neural IBM Model 1 rather than following the context a BiRNN state mixes in.
* ``batch_vocabulary``: while training, the emission softmax runs over the target words of the
  batch only (Jean et al. 2015, without importance correction).  The exact modes evaluate the
  emission at every source position, so their ``(batch, T, S, V)`` logits shrink to
  ``(batch, T, S, V_batch)``; evaluation (``model.eval()``: likelihoods, alignments, beam
  search) always uses the full softmax.  The training objective is therefore the likelihood
  under a batch-restricted softmax, not the full one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from structattn.models._inputs import check_batch, check_ids, check_source
from structattn.models.modes import SEQ2SEQ_MODES, DecodeStep, ModeOptions, Pieces, make_mode
from structattn.nn.heads import EmissionHead
from structattn.nn.normalizers import Normalizer
from structattn.nn.rnn import BiRNN

__all__ = ["MODES", "Seq2Seq"]

#: the attention modes registered when this module is imported (see :class:`Seq2Seq`)
MODES = tuple(SEQ2SEQ_MODES)


class Seq2Seq(nn.Module):
    """Bi-LSTM encoder, LSTM decoder (no input feeding), latent attention, one mode object.

    Modes (``mode=``, a name in :data:`structattn.models.modes.SEQ2SEQ_MODES`; add your own
    with :func:`~structattn.models.modes.register_mode`):

    - ``soft``, ``sparsemax``, ``entmax15``: soft attention with that normaliser; trained by
      ``log p(y | x, c = E[enc_z])``.
    - ``segmentation``: structured attention (Kim et al. 2017), a binary chain CRF over the
      source per target step, trained end to end through its marginals.
    - ``tree``: soft attention over source states enriched with syntactic self-attention (a
      latent non-projective dependency tree over the source).
    - ``marginal``: hard attention trained by the exact marginal likelihood (alignments
      summed out).
    - ``hard-score``: hard attention sampled from the prior, score function with the
      leave-one-out baseline (``num_samples`` draws), maximising ``E_p[log p(y | z)]``.
    - ``variational-enum``: an inference network ``q(z | x, y)`` that also reads the
      emission's evidence, and the exact ELBO.
    - ``variational-enum-plain``: the same with the guide of Deng et al. alone (no evidence).
    - ``variational-score``: the same ELBO, sampled, with the leave-one-out baseline.
    - ``variational-st``: the same ELBO, straight-through Gumbel-softmax, analytic KL.
    - ``monotonic``: hard monotonic attention (Wu & Cotterell 2019), exact ``log p(y | x)``
      by the forward algorithm, decoded with a forward filter.
    - ``neural-hmm``: neural HMM attention (Wang et al. 2018), moving either way: attention
      scores plus learned jump-width scores; exact ``log p(y | x)`` by the forward algorithm.

    Batches are :class:`structattn.data.batching.Seq2SeqBatch`: ``source (batch, S)``,
    ``target (batch, T + 1)`` framed ``bos y_1 .. y_n eos``, with boolean masks.

    Args:
        source_vocab_size, target_vocab_size: vocabulary sizes.
        mode: a registered mode name.
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
        normalizer: replaces the mode's normalizer (a registered name or a
            :class:`~structattn.nn.Normalizer` object), e.g. ``mode="soft",
            normalizer="entmax"`` or a normalizer of your own; hard-attention modes need a
            per-query (categorical) one.
        lexical_emission: append the source word embedding to the source states and read it
            directly into the emission logits (see the module docstring).
        contextual_emission: whether the emission reads the encoder state at the aligned
            position (``False``, with ``lexical_emission``: only the word embedding there).
        stateful_emission: whether the emission reads the decoder state (``False``: the
            decoder state steers the alignment only).
        batch_vocabulary: train with the emission softmax restricted to the batch's target
            words (see the module docstring).
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
        normalizer: str | Normalizer | None = None,
        lexical_emission: bool = False,
        contextual_emission: bool = True,
        stateful_emission: bool = True,
        batch_vocabulary: bool = False,
    ) -> None:
        super().__init__()
        if hidden % 2:
            raise ValueError(f"hidden must be even (bidirectional encoder), got {hidden}")
        for name, size in (("source_vocab_size", source_vocab_size),
                           ("target_vocab_size", target_vocab_size)):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        for name, flag in (("lexical_emission", lexical_emission),
                           ("contextual_emission", contextual_emission),
                           ("stateful_emission", stateful_emission),
                           ("batch_vocabulary", batch_vocabulary)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if not (contextual_emission or lexical_emission):
            raise ValueError("contextual_emission=False needs lexical_emission=True (the "
                             "emission would read no source)")
        self.lexical_emission = lexical_emission
        self.batch_vocabulary = batch_vocabulary
        lexical_dim = embed_dim if lexical_emission else 0
        source_dim = hidden + lexical_dim
        options = ModeOptions(embed_dim=embed_dim, hidden=hidden,
                              target_vocab_size=target_vocab_size, score=score,
                              num_samples=num_samples, temperature=temperature,
                              max_jump=max_jump, normalizer=normalizer, source_dim=source_dim)
        self.strategy = make_mode(mode, options)
        self.mode = mode
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.source_vocab_size = source_vocab_size
        self.target_vocab_size = target_vocab_size
        self.chunk_elements = chunk_elements
        self.src_embed = nn.Embedding(source_vocab_size, embed_dim, padding_idx=pad_id)
        self.encoder = BiRNN(embed_dim, hidden, cell="lstm")
        self.tgt_embed = nn.Embedding(target_vocab_size, embed_dim, padding_idx=pad_id)
        self.decoder = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.attention = self.strategy.make_attention()
        self.head = EmissionHead(hidden, source_dim, hidden, target_vocab_size,
                                 lexical_dim=lexical_dim, contextual=contextual_emission,
                                 stateful=stateful_emission)

    # ---------------------------------------------------------------- building blocks

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """Source states ``(batch, S, hidden)`` the decoder attends to
        (``(batch, S, hidden + embed_dim)`` with ``lexical_emission``)."""
        check_source(source, source_mask, self.source_vocab_size)
        embedded = self.dropout(self.src_embed(source))
        enc = self.encoder(embedded, source_mask)
        if self.lexical_emission:
            enc = torch.cat([enc, embedded], -1)
        return self.strategy.source_states(self, enc, source_mask)

    def decode(self, inputs: torch.Tensor, state=None):
        """Decoder states ``(batch, T, hidden)`` for input ids ``(batch, T)``, and the state."""
        check_ids(inputs, self.target_vocab_size, "target")
        outputs, state = self.decoder(self.dropout(self.tgt_embed(inputs)), state)
        return self.dropout(outputs), state

    def output_logits(self, states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``(..., V)``; broadcasts states against contexts."""
        return self.head.logits(states, context)

    def emission_table(self, pieces: Pieces) -> torch.Tensor:
        """``log p(y_t | h_t, enc_k)`` for every real (target, source) pair: ``(batch, T, S)``."""
        return self.head.table(pieces.states, pieces.enc, pieces.targets, pieces.target_mask,
                               pieces.source_mask, self.chunk_elements, pieces.vocabulary)

    def training_vocabulary(self, targets: torch.Tensor,
                            target_mask: torch.Tensor) -> torch.Tensor | None:
        """The ids the emission softmax is restricted to for this batch: its real target words
        and the padding id (soft modes score padded steps before masking them) while training
        with ``batch_vocabulary``, else None (the full vocabulary)."""
        if not (self.batch_vocabulary and self.training):
            return None
        padding = targets.new_tensor([self.pad_id])
        return torch.unique(torch.cat([targets[target_mask], padding]))

    def pieces(self, batch) -> Pieces:
        """Encode and decode a batch: what every mode's objective reads."""
        check_batch(batch, self.source_vocab_size, self.target_vocab_size)
        enc = self.encode(batch.source, batch.source_mask)
        states, _ = self.decode(batch.target[:, :-1])
        targets, target_mask = batch.target[:, 1:], batch.target_mask[:, 1:]
        return Pieces(batch=batch, enc=enc, source_mask=batch.source_mask, states=states,
                      targets=targets, target_mask=target_mask,
                      vocabulary=self.training_vocabulary(targets, target_mask))

    def guide(self, batch):
        """``q(z | x, y)``, batch shape ``(batch, T)`` (variational modes only)."""
        return self.strategy.guide(self, self.pieces(batch))

    # ---------------------------------------------------------------- objectives

    def token_log_likelihood(self, batch) -> torch.Tensor:
        """Per-token ``log p(y_t | y_<t, x)`` of this model, ``(batch, T)`` (0 at padding).

        Soft modes: the soft-attention likelihood.  Latent modes: the exact marginal over the
        prior alignment (variational models are scored by their prior, as at test time).
        """
        return self.strategy.token_log_likelihood(self, self.pieces(batch))

    def log_likelihood(self, batch) -> torch.Tensor:
        """``log p(y | x)`` per sequence, ``(batch,)``."""
        return self.strategy.log_likelihood(self, self.pieces(batch))

    def loss(self, batch) -> dict[str, torch.Tensor]:
        """Training loss per target token (``"loss"``), and logged extras."""
        return self.strategy.loss(self, self.pieces(batch))

    @torch.no_grad()
    def alignments(self, batch) -> dict[str, torch.Tensor]:
        """Alignments of a batch, each ``(batch, T, S)`` (or ``(batch, T)`` for argmaxes).

        ``prior``: the attention weights ``p(z_t | x, y_<t)`` (soft attention in soft modes);
        ``posterior``: the exact ``p(z_t | x, y)`` of the hard-attention reading of the model;
        ``guide``: ``q(z_t | x, y)`` in variational modes; ``prior_argmax`` and
        ``posterior_map``: their argmaxes.
        """
        return self.strategy.alignments(self, self.pieces(batch))

    # ---------------------------------------------------------------- decoding

    def next_log_probs(self, states: torch.Tensor, enc: torch.Tensor,
                       source_mask: torch.Tensor, memory: Any = None) -> DecodeStep:
        """One decoding step for states ``(N, 1, hidden)``: next-token ``log_probs (N, V)``
        given the mode's decoding ``memory`` (see :meth:`Seq2SeqMode.start_decoding`)."""
        return self.strategy.decode_step(self, states, enc, source_mask, memory)

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
        step (the mode's :meth:`~structattn.models.modes.Seq2SeqMode.decode_step`).  Returns
        token ids without bos/eos; ``beam_size=1`` is greedy decoding.

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
        memory = self.strategy.start_decoding(self, enc, mask)
        for step in range(max_length + 1):
            states, state = self.decode(tokens[:, -1:], state)
            step_scores = self.next_log_probs(states, enc, mask, memory)
            log_probs = step_scores.log_probs.view(batch, beam_size, vocab)
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
            memory = self.strategy.follow(memory, step_scores, origin, word.view(-1))
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
