"""A small encoder-decoder with a latent alignment, for the aligned-copy task.

No input feeding: the decoder state ``h_t`` depends on the previous *target tokens* only, so
the alignments ``z_t`` are conditionally independent given the data and the exact marginal
likelihood ``sum_t log sum_k p(z_t = k) p(y_t | h_t, enc_k)`` is one log-sum-exp per query.
"""

from __future__ import annotations

import pyro
import pyro.distributions as pdist
import torch
from torch import nn

from structattn.data.copy import CopyBatch
from structattn.infer.exact import marginal_log_likelihood, posterior
from structattn.infer.readout import gather
from structattn.infer.sites import sample_alignment
from structattn.models._inputs import check_ids
from structattn.nn.attention import LatentAttention
from structattn.nn.heads import EmissionHead
from structattn.nn.normalizers import Normalizer
from structattn.nn.rnn import BiRNN

__all__ = ["AlignedCopyModel"]


class AlignedCopyModel(nn.Module):
    """Bi-GRU encoder, GRU decoder over the previous targets, latent bilinear attention.

    The emission is the shared :class:`~structattn.nn.EmissionHead`,
    ``p(y_t | h_t, c) = softmax(out(tanh(W_h h_t + W_c c)))``; with ``c = sum_k a_tk enc_k``
    it is soft attention, with ``c = enc_{z_t}`` hard attention.

    Args:
        vocab_size: number of token types (source and target share it).
        hidden: hidden size ``H``.
        normalizer: a per-query normalizer for the prior (name or object): ``"softmax"``,
            ``"sparsemax"``, ``"entmax15"``, ...
    """

    def __init__(
        self, vocab_size: int, hidden: int = 64, normalizer: str | Normalizer = "softmax"
    ) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if hidden % 2:
            raise ValueError(f"hidden must be even (bidirectional encoder), got {hidden}")
        self.vocab_size = vocab_size
        self.src_embed = nn.Embedding(vocab_size, hidden)
        self.encoder = BiRNN(hidden, hidden, cell="gru")
        self.tgt_embed = nn.Embedding(vocab_size + 1, hidden)  # last id: begin-of-sequence
        self.decoder = nn.GRU(hidden, hidden, batch_first=True)
        self.attention = LatentAttention(hidden, hidden, score="bilinear", normalizer=normalizer)
        self.head = EmissionHead(hidden, hidden, hidden, vocab_size)

    def encode(self, batch: CopyBatch) -> torch.Tensor:
        """Source states ``(batch, S, H)``."""
        check_ids(batch.src, self.vocab_size, "batch.src")
        return self.encoder(self.src_embed(batch.src), batch.src_mask)

    def decode(self, batch: CopyBatch) -> torch.Tensor:
        """Decoder states ``(batch, T, H)`` from the previous target tokens."""
        check_ids(batch.tgt, self.vocab_size, "batch.tgt")
        bos = torch.full_like(batch.tgt[:, :1], self.vocab_size)
        inputs = self.tgt_embed(torch.cat([bos, batch.tgt[:, :-1]], 1))
        states, _ = self.decoder(inputs)
        return states

    def emission_logits(self, states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Output logits ``(..., T, V)``; broadcasts over enumeration dims of ``context``."""
        return self.head.logits(states, context)

    def forward(self, batch: CopyBatch):
        """Prior alignment (batch shape ``(batch, T)``), source states, decoder states."""
        enc = self.encode(batch)
        states = self.decode(batch)
        return self.attention(states, enc, batch.src_mask), enc, states

    def emission_log_prob(
        self, batch: CopyBatch, enc: torch.Tensor, states: torch.Tensor
    ) -> torch.Tensor:
        """``log p(y_t | h_t, enc_k)`` for every source position ``k``: ``(batch, T, S)``."""
        return self.head.log_prob(states.unsqueeze(2), enc.unsqueeze(1), batch.tgt.unsqueeze(-1))

    def soft_log_likelihood(self, batch: CopyBatch) -> torch.Tensor:
        """Summed ``log p(y | x)`` under soft attention (expectation inside)."""
        prior, enc, states = self(batch)
        token = self.head.log_prob(states, gather(enc, prior.attention), batch.tgt)
        return token.masked_fill(~batch.tgt_mask, 0.0).sum()

    def marginal_log_likelihood(self, batch: CopyBatch) -> torch.Tensor:
        """Summed exact ``log p(y | x)`` with the hard alignment summed out."""
        prior, enc, states = self(batch)
        emission = self.emission_log_prob(batch, enc, states)
        return marginal_log_likelihood(prior, emission, batch.tgt_mask).sum()

    def alignments(self, batch: CopyBatch) -> dict[str, torch.Tensor]:
        """Soft attention, exact posterior ``p(z | x, y)`` and their argmaxes, ``(batch, T, S)``."""
        prior, enc, states = self(batch)
        post = posterior(prior, self.emission_log_prob(batch, enc, states))
        return {
            "soft": prior.attention,
            "posterior": post,
            "soft_argmax": prior.attention.argmax(-1),
            "posterior_map": post.argmax(-1),
        }

    def pyro_model(
        self, batch: CopyBatch, estimator: str | None = "enum", register: bool = True
    ) -> None:
        """The same model as a Pyro program: ``z`` per (batch, target) position, ``y`` observed.

        With ``estimator="enum"`` and ``TraceEnum_ELBO(max_plate_nesting=2)`` and an empty
        guide its loss is ``-marginal_log_likelihood``; ``estimator=None`` leaves ``z`` to a
        guide.  ``register=False`` skips ``pyro.module`` (the parameters are then not in
        Pyro's param store: train them with a torch optimizer on ``differentiable_loss``).
        """
        if register:
            pyro.module("aligned_copy", self)
        prior, enc, states = self(batch)
        batch_size, length = batch.tgt.shape
        with pyro.plate("batch", batch_size, dim=-2), pyro.plate("target", length, dim=-1):
            z = sample_alignment("z", prior, estimator=estimator, mask=batch.tgt_mask)
            logits = self.emission_logits(states, gather(enc, z))
            with pyro.poutine.mask(mask=batch.tgt_mask):
                pyro.sample("y", pdist.Categorical(logits=logits), obs=batch.tgt)
