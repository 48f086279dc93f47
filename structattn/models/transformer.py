"""A Transformer encoder-decoder whose last cross-attention is a latent alignment.

The decoder stack (causal self-attention, soft cross-attention) turns the target prefix into
states ``h_t`` that depend on ``y_<t`` and ``x`` only; one more cross-attention, the
**alignment**, gives ``p(z_t | x, y_<t)`` over source positions, and the output layer reads the
value at ``z_t``: ``p(y_t | h_t, v_z) = softmax(W_o tanh(W_h h_t + W_c v_z))``.  Nothing feeds
``z_t`` back into later states, so the alignments of different steps are conditionally
independent and exact enumeration costs one emission per source position (the construction of
Deng et al. 2018, "Latent Alignment and Variational Attention", on a Transformer).

Modes are classes in :data:`TRANSFORMER_MODES`: soft attention (``soft``, ``sparsemax``,
``entmax15``, ``entmax-learned`` with one learned alpha per head) reads the expected value;
latent modes (``marginal``, ``hard-score``, ``variational-enum``) train the hard alignment with
an estimator of :mod:`structattn.infer`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from structattn._registry import class_decorator
from structattn.infer.estimators import AlignmentTerms, ExactEstimator, make_estimator
from structattn.infer.exact import marginal_log_likelihood, posterior
from structattn.infer.readout import gather
from structattn.models._inputs import check_batch, check_ids, check_source
from structattn.nn.inference import InferenceNetwork
from structattn.nn.multihead import HeadwiseEntmaxNormalizer, MultiheadAttention
from structattn.nn.normalizers import Normalizer, make_normalizer
from structattn.nn.transformer import (
    TransformerDecoder,
    TransformerEncoder,
    make_positional_encoding,
)

__all__ = [
    "TRANSFORMER_MODES",
    "LatentTransformerMode",
    "SoftTransformerMode",
    "TransformerMode",
    "TransformerSeq2Seq",
    "register_transformer_mode",
]

#: modes of :class:`TransformerSeq2Seq` by name; add to it with :func:`register_transformer_mode`
TRANSFORMER_MODES: dict[str, type[TransformerMode]] = {}


def register_transformer_mode(
        name: str) -> Callable[[type[TransformerMode]], type[TransformerMode]]:
    """Class decorator: make a :class:`TransformerMode` available as ``mode=name``."""
    return class_decorator(TRANSFORMER_MODES, name, TransformerMode, set_name=True)


class TransformerMode(nn.Module, abc.ABC):
    """How a :class:`TransformerSeq2Seq` trains and reads its alignment.

    Class attributes:
        layer_normalizer: the normalizer of every multi-head attention in the stacks.
        alignment_normalizer: the normalizer of the latent alignment (name or factory).
    """

    name: str = ""
    layer_normalizer: str = "softmax"
    alignment_normalizer: str = "softmax"
    alignment_kwargs: dict[str, Any] = {}

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.num_samples = num_samples

    def make_alignment_normalizer(self) -> Normalizer:
        return make_normalizer(self.alignment_normalizer, **self.alignment_kwargs)

    def make_inference(self, model: TransformerSeq2Seq) -> nn.Module | None:
        """An inference network ``q(z | x, y)`` or None."""
        return None

    @abc.abstractmethod
    def loss(self, model: TransformerSeq2Seq, pieces: dict) -> dict[str, torch.Tensor]:
        """Training loss per target token and logged extras."""

    @abc.abstractmethod
    def token_log_likelihood(self, model: TransformerSeq2Seq, pieces: dict) -> torch.Tensor:
        """``log p(y_t | y_<t, x)`` per token, ``(batch, T)``, 0 at padding."""

    @abc.abstractmethod
    def next_log_probs(self, model, states, values, prior) -> torch.Tensor:
        """``log p(y_t | y_<t, x)`` over the vocabulary for states ``(N, 1, d)``: ``(N, V)``."""


class SoftTransformerMode(TransformerMode):
    """Soft attention: the output layer reads the expected value ``E_p[v_z]``."""

    def token_log_likelihood(self, model, pieces):
        return model.soft_token_log_probs(pieces)

    def loss(self, model, pieces):
        total = -self.token_log_likelihood(model, pieces).sum()
        tokens = pieces["target_mask"].sum().clamp_min(1)
        return {"loss": total / tokens, "nll": total.detach() / tokens}

    def next_log_probs(self, model, states, values, prior):
        context = gather(values, prior.attention)
        return model.output_logits(states, context).log_softmax(-1)[:, 0]


@register_transformer_mode("soft")
class SoftmaxTransformerMode(SoftTransformerMode):
    """Softmax everywhere (the standard Transformer)."""


@register_transformer_mode("sparsemax")
class SparsemaxTransformerMode(SoftTransformerMode):
    """Sparsemax heads and alignment: exact zeros."""

    layer_normalizer = "sparsemax"
    alignment_normalizer = "sparsemax"


@register_transformer_mode("entmax15")
class Entmax15TransformerMode(SoftTransformerMode):
    """1.5-entmax heads and alignment."""

    layer_normalizer = "entmax15"
    alignment_normalizer = "entmax15"


@register_transformer_mode("entmax-learned")
class LearnedEntmaxTransformerMode(SoftTransformerMode):
    """Adaptively sparse (Correia et al. 2019): one learned alpha per head, and one for the
    alignment."""

    objective = "entmax-attention NLL (alpha learned per head)"

    layer_normalizer = "entmax-heads"
    alignment_normalizer = "entmax-heads"
    alignment_kwargs = {"num_heads": 1}


class LatentTransformerMode(TransformerMode):
    """Hard attention: ``z_t`` is a latent variable trained by an estimator of
    :mod:`structattn.infer`; prediction marginalises it exactly."""

    estimator_name: str = "enum"

    def __init__(self, num_samples: int) -> None:
        super().__init__(num_samples)
        kwargs = {"num_samples": num_samples} if self.estimator_name == "rloo" else {}
        self.estimator = make_estimator(self.estimator_name, **kwargs)

    def token_log_likelihood(self, model, pieces):
        return marginal_log_likelihood(pieces["prior"], model.emission_table(pieces),
                                       pieces["target_mask"])

    def loss(self, model, pieces):
        if isinstance(self.estimator, ExactEstimator):
            log_likelihood = model.emission_table(pieces)
        else:
            def log_likelihood(z: torch.Tensor) -> torch.Tensor:
                return model.emission_at(pieces, z)
        terms = AlignmentTerms(prior=pieces["prior"], log_likelihood=log_likelihood,
                               mask=pieces["target_mask"])
        guide = model.guide_of(pieces)
        surrogate = self.estimator.loss(terms, guide)
        tokens = pieces["target_mask"].sum().clamp_min(1)
        objective = torch.as_tensor(self.estimator.stats["objective"])
        return {"loss": surrogate / tokens, "objective": -objective / tokens}

    def next_log_probs(self, model, states, values, prior):
        log_probs = model.output_logits(states.unsqueeze(2), values.unsqueeze(1)).log_softmax(-1)
        log_prior = prior.attention.clamp_min(1e-30).log()            # (N, 1, S)
        return (log_prior.unsqueeze(-1) + log_probs).logsumexp(-2)[:, 0]


@register_transformer_mode("marginal")
class MarginalTransformerMode(LatentTransformerMode):
    """Exact marginal likelihood: the alignment summed out (model-side enumeration)."""


@register_transformer_mode("hard-score")
class ScoreTransformerMode(LatentTransformerMode):
    """Alignments sampled from the prior; score function with the leave-one-out baseline."""

    estimator_name = "rloo"


@register_transformer_mode("variational-enum")
class VariationalTransformerMode(LatentTransformerMode):
    """An inference network ``q(z | x, y)`` and the exact ELBO (enumerated)."""

    def make_inference(self, model):
        return InferenceNetwork(model.d_model, model.d_model, hidden=model.d_model,
                                target_vocab=model.target_vocab_size, encode_source=False)


class TransformerSeq2Seq(nn.Module):
    """Transformer encoder-decoder with a latent last cross-attention.

    The training and evaluation surface is that of :class:`~structattn.models.Seq2Seq`:
    ``loss(batch)``, ``token_log_likelihood(batch)``, ``log_likelihood(batch)``,
    ``alignments(batch)``, ``beam_search(source, source_mask)``; batches are
    :class:`structattn.data.batching.Seq2SeqBatch` (``source (batch, S)``, ``target (batch,
    T + 1)`` framed ``bos y_1 .. y_n eos``, boolean masks).  :meth:`attention_sparsity` and
    :meth:`alphas` report the share of exact zeros and the learned alphas per head.

    Args:
        source_vocab_size, target_vocab_size: vocabulary sizes.
        mode: a :data:`TRANSFORMER_MODES` name.
        d_model, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout:
            the stacks' sizes (``num_decoder_layers`` counts the layers before the alignment).
        positional: ``"sinusoidal"`` or ``"learned"`` (see
            :data:`~structattn.nn.transformer.POSITIONAL_ENCODINGS`).
        max_length: longest source or target sequence.
        num_samples: draws per query for ``hard-score``.
        pad_id, bos_id, eos_id: special target ids.
    """

    def __init__(
        self,
        source_vocab_size: int,
        target_vocab_size: int,
        *,
        mode: str = "soft",
        d_model: int = 64,
        num_heads: int = 4,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 1,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        positional: str = "sinusoidal",
        max_length: int = 256,
        num_samples: int = 4,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
    ) -> None:
        super().__init__()
        if mode not in TRANSFORMER_MODES:
            raise ValueError(f"mode must be one of {sorted(TRANSFORMER_MODES)}, got {mode!r}")
        for value, name in ((source_vocab_size, "source_vocab_size"),
                            (target_vocab_size, "target_vocab_size"), (d_model, "d_model")):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.mode = mode
        self.strategy = TRANSFORMER_MODES[mode](num_samples)
        self.d_model = d_model
        self.source_vocab_size, self.target_vocab_size = source_vocab_size, target_vocab_size
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.src_embed = nn.Embedding(source_vocab_size, d_model, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(target_vocab_size, d_model, padding_idx=pad_id)
        for embedding in (self.src_embed, self.tgt_embed):
            # std d^-1/2, so that the scaled embeddings are of unit size like the positions
            nn.init.normal_(embedding.weight, std=d_model ** -0.5)
            embedding.weight.data[pad_id] = 0.0
        self.positional = make_positional_encoding(positional, d_model, max_length)
        self.dropout = nn.Dropout(dropout)
        layer_kwargs = dict(dim_feedforward=dim_feedforward, dropout=dropout,
                            normalizer=self.strategy.layer_normalizer)
        self.encoder = TransformerEncoder(num_encoder_layers, d_model, num_heads, **layer_kwargs)
        self.decoder = TransformerDecoder(num_decoder_layers, d_model, num_heads, **layer_kwargs)
        self.align_query = nn.Linear(d_model, d_model)
        self.align_key = nn.Linear(d_model, d_model)
        self.align_value = nn.Linear(d_model, d_model)
        self.align_normalizer = self.strategy.make_alignment_normalizer()
        self.combine_state = nn.Linear(d_model, d_model)
        self.combine_context = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, target_vocab_size)
        self.inference = self.strategy.make_inference(self)

    # ---------------------------------------------------------------- building blocks

    def _embed(self, embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.positional(embedding(ids) * math.sqrt(self.d_model)))

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """Source states ``(batch, S, d_model)``."""
        check_source(source, source_mask, self.source_vocab_size)
        return self.encoder(self._embed(self.src_embed, source), source_mask)

    def decode(self, inputs: torch.Tensor, memory: torch.Tensor,
               source_mask: torch.Tensor) -> torch.Tensor:
        """Decoder states ``(batch, T, d_model)`` for input ids ``(batch, T)``."""
        check_ids(inputs, self.target_vocab_size, "target")
        return self.decoder(self._embed(self.tgt_embed, inputs), memory, source_mask)

    def alignment(self, states: torch.Tensor, memory: torch.Tensor, source_mask: torch.Tensor):
        """``p(z_t | x, y_<t)``: batch ``(batch, T)`` over source positions, and the values
        ``(batch, S, d_model)`` the output layer reads."""
        scores = self.align_query(states) @ self.align_key(memory).transpose(-1, -2)
        scores = _at_least_float32(scores) / math.sqrt(self.d_model)
        return self.align_normalizer(scores, source_mask[:, None, :]), self.align_value(memory)

    def output_logits(self, states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``(..., V)``; broadcasts states against contexts."""
        return self.out(torch.tanh(self.combine_state(states) + self.combine_context(context)))

    def emission_table(self, pieces: dict) -> torch.Tensor:
        """``log p(y_t | h_t, v_s)`` for every source position ``s``: ``(batch, T, S)``."""
        log_probs = self.output_logits(pieces["states"].unsqueeze(2),
                                       pieces["values"].unsqueeze(1))
        log_probs = _at_least_float32(log_probs).log_softmax(-1)
        targets = pieces["targets"][:, :, None, None].expand(-1, -1, log_probs.shape[2], 1)
        table = log_probs.gather(-1, targets).squeeze(-1)
        valid = pieces["target_mask"][:, :, None] & pieces["source_mask"][:, None, :]
        return table.masked_fill(~valid, 0.0)

    def emission_at(self, pieces: dict, z: torch.Tensor) -> torch.Tensor:
        """``log p(y_t | h_t, v_z)`` at alignments ``z (n, batch, T)``: ``(n, batch, T)``."""
        context = gather(pieces["values"], z)
        log_probs = _at_least_float32(self.output_logits(pieces["states"], context))
        log_probs = log_probs.log_softmax(-1)
        index = pieces["targets"].expand(log_probs.shape[:-1]).unsqueeze(-1)
        return log_probs.gather(-1, index).squeeze(-1)

    def pieces(self, batch) -> dict:
        """Everything a mode needs for one batch: states, prior, values, targets, masks."""
        check_batch(batch, self.source_vocab_size, self.target_vocab_size)
        memory = self.encode(batch.source, batch.source_mask)
        states = self.decode(batch.target[:, :-1], memory, batch.source_mask)
        prior, values = self.alignment(states, memory, batch.source_mask)
        return {"memory": memory, "states": states, "prior": prior, "values": values,
                "targets": batch.target[:, 1:], "target_mask": batch.target_mask[:, 1:],
                "source_mask": batch.source_mask, "target": batch.target}

    def soft_token_log_probs(self, pieces: dict) -> torch.Tensor:
        """``log p(y_t | h_t, E_p[v_z])`` per token, ``(batch, T)``, 0 at padding."""
        context = gather(pieces["values"], pieces["prior"].attention)
        log_probs = _at_least_float32(self.output_logits(pieces["states"], context))
        token = log_probs.log_softmax(-1).gather(-1, pieces["targets"].unsqueeze(-1))
        return token.squeeze(-1).masked_fill(~pieces["target_mask"], 0.0)

    def guide_of(self, pieces: dict):
        """``q(z | x, y)`` with batch ``(batch, T)``, or None without an inference network."""
        if self.inference is None:
            return None
        return self.inference(pieces["targets"], pieces["memory"], pieces["source_mask"],
                              pieces["target_mask"])

    def guide(self, batch):
        """``q(z | x, y)``, batch shape ``(batch, T)`` (variational modes only)."""
        if self.inference is None:
            raise ValueError(f"mode {self.mode!r} has no inference network")
        return self.guide_of(self.pieces(batch))

    # ---------------------------------------------------------------- objectives

    def soft_log_likelihood(self, batch) -> torch.Tensor:
        """Per-token ``log p(y_t | y_<t, x)`` under soft attention, ``(batch, T)`` (0 at pad)."""
        return self.soft_token_log_probs(self.pieces(batch))

    def loss(self, batch) -> dict[str, torch.Tensor]:
        """Training loss per target token, and logged extras."""
        return self.strategy.loss(self, self.pieces(batch))

    def token_log_likelihood(self, batch) -> torch.Tensor:
        """Per-token ``log p(y_t | y_<t, x)``, ``(batch, T)`` (0 at padding): soft modes read
        the expected value, latent modes sum the prior alignment out exactly."""
        return self.strategy.token_log_likelihood(self, self.pieces(batch))

    def log_likelihood(self, batch) -> torch.Tensor:
        """``log p(y | x)`` per sequence, ``(batch,)``."""
        return self.token_log_likelihood(batch).sum(-1)

    # ---------------------------------------------------------------- reports

    @torch.no_grad()
    def alignments(self, batch) -> dict[str, torch.Tensor]:
        """``prior`` and exact ``posterior`` ``(batch, T, S)`` of the latent alignment, their
        argmaxes ``prior_argmax`` and ``posterior_map`` ``(batch, T)``, and ``guide`` with an
        inference network (as :meth:`structattn.models.Seq2Seq.alignments`)."""
        pieces = self.pieces(batch)
        prior = pieces["prior"]
        post = posterior(prior, self.emission_table(pieces))
        result = {"prior": prior.attention, "posterior": post,
                  "prior_argmax": prior.attention.argmax(-1), "posterior_map": post.argmax(-1)}
        guide = self.guide_of(pieces)
        if guide is not None:
            result["guide"] = guide.attention
        return result

    @torch.no_grad()
    def attention_sparsity(self, batch) -> dict[str, float]:
        """Share of exact zeros among the weights of valid (query, key) pairs, per attention
        layer (``encoder.layers.0.self_attn``, ..., and ``alignment``), in eval mode."""
        counts: dict[str, list[int]] = {}
        handles = []
        for name, module in self.named_modules():
            if isinstance(module, MultiheadAttention):
                handles.append(module.register_forward_pre_hook(
                    _ask_weights, with_kwargs=True))
                handles.append(module.register_forward_hook(
                    _count_zeros(counts, name), with_kwargs=True))
        training = self.training
        self.eval()  # dropout would add zeros of its own
        try:
            pieces = self.pieces(batch)
        finally:
            self.train(training)
            for handle in handles:
                handle.remove()
        valid = pieces["target_mask"][:, :, None] & pieces["source_mask"][:, None, :]
        zeros = ((pieces["prior"].attention == 0) & valid).sum()
        counts["alignment"] = [int(zeros), int(valid.sum())]
        return {name: zeros / max(total, 1) for name, (zeros, total) in counts.items()}

    def alphas(self) -> dict[str, list[float]]:
        """Learned alpha per head for every entmax-heads attention (empty in other modes)."""
        found = {}
        for name, module in self.named_modules():
            if isinstance(module, MultiheadAttention) and module.alphas() is not None:
                found[name] = module.alphas().tolist()
        if isinstance(self.align_normalizer, HeadwiseEntmaxNormalizer):
            found["alignment"] = self.align_normalizer.alpha.detach().tolist()
        return found

    # ---------------------------------------------------------------- decoding

    @torch.no_grad()
    def beam_search(
        self,
        source: torch.Tensor,
        source_mask: torch.Tensor,
        beam_size: int = 5,
        max_length: int = 50,
    ) -> list[list[int]]:
        """Best target per source by beam search over ``log p(y | x)``; latent modes score
        each step by the exact marginal over its alignment.  Token ids without bos/eos;
        ``beam_size=1`` is greedy decoding."""
        if beam_size < 1 or max_length < 1:
            raise ValueError("beam_size and max_length must be positive")
        batch, device, vocab = source.shape[0], source.device, self.target_vocab_size
        memory = self.encode(source, source_mask).repeat_interleave(beam_size, 0)
        mask = source_mask.repeat_interleave(beam_size, 0)
        scores = torch.full((batch, beam_size), -torch.inf, device=device)
        scores[:, 0] = 0.0
        tokens = torch.full((batch * beam_size, 1), self.bos_id, dtype=torch.long,
                            device=device)
        finished = torch.zeros(batch, beam_size, dtype=torch.bool, device=device)
        for step in range(max_length + 1):
            # the prefix is re-read each step: no cache, so every mode decodes the same way
            states = self.decode(tokens, memory, mask)[:, -1:]
            prior, values = self.alignment(states, memory, mask)
            log_probs = _at_least_float32(self.strategy.next_log_probs(self, states, values,
                                                                       prior))
            log_probs = log_probs.view(batch, beam_size, vocab)
            if step == max_length:  # out of room: every open hypothesis must end here
                log_probs = torch.where(torch.arange(vocab, device=device) == self.eos_id,
                                        log_probs, torch.full_like(log_probs, -torch.inf))
            done = torch.full_like(log_probs, -torch.inf)
            done[..., self.pad_id] = 0.0
            log_probs = torch.where(finished.unsqueeze(-1), done, log_probs)
            candidates = (scores.unsqueeze(-1) + log_probs).view(batch, -1)
            scores, flat = candidates.topk(beam_size, dim=-1)
            origin = (flat // vocab + torch.arange(batch, device=device)[:, None] * beam_size)
            word = flat % vocab
            origin = origin.view(-1)
            tokens = torch.cat([tokens[origin], word.view(-1, 1)], 1)
            finished = finished.view(-1)[origin].view(batch, beam_size) | (word == self.eos_id)
            if bool(finished.all()):
                break
        best = scores.argmax(-1) + torch.arange(batch, device=device) * beam_size
        outputs = []
        for row in tokens[best].tolist():
            ids = []
            for token in row[1:]:
                if token in (self.eos_id, self.pad_id):
                    break
                ids.append(token)
            outputs.append(ids)
        return outputs


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (bf16 autocast) in float32: the alignment and the emissions are
    distributions the estimators differentiate and sum over; float64 stays float64."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _ask_weights(module, args, kwargs):
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def _count_zeros(counts: dict[str, list[int]], name: str):
    def hook(module, args, kwargs, output):
        weights = output[1]                                       # (batch, heads, L, S)
        valid = torch.ones_like(weights, dtype=torch.bool)
        padding = kwargs.get("key_padding_mask")
        if padding is not None:
            valid = valid & ~padding[:, None, None, :]
        if kwargs.get("is_causal", False):
            valid = valid & torch.ones(weights.shape[-2:], dtype=torch.bool,
                                       device=weights.device).tril()
        zeros, total = counts.setdefault(name, [0, 0])
        counts[name] = [zeros + int(((weights == 0) & valid).sum()), total + int(valid.sum())]
    return hook
