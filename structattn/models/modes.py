"""Attention modes of :class:`~structattn.models.seq2seq.Seq2Seq`: one class each, in a registry.

A mode says how the model's latent alignment is trained and read: the loss, the likelihood it
reports, the alignments it plots, and the next-token scores beam search uses. ``Seq2Seq`` owns
the networks (encoder, decoder, attention, emission head) and asks its mode for everything
else, so a new mode is one class::

    @register_mode("my-mode")
    class MyMode(SoftMode):
        normalizer = "entmax"
        normalizer_options = {"alpha": 1.3}

after which ``Seq2Seq(..., mode="my-mode")`` trains, scores and decodes with it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from structattn._registry import class_decorator
from structattn.distributions.categorical import CategoricalAlignment
from structattn.distributions.monotonic import MonotonicAlignment
from structattn.infer.estimators import AlignmentTerms, make_estimator
from structattn.infer.exact import marginal_log_likelihood, posterior
from structattn.infer.readout import gather
from structattn.nn.attention import LatentAttention
from structattn.nn.inference import InferenceNetwork
from structattn.nn.normalizers import Normalizer

__all__ = [
    "SEQ2SEQ_MODES",
    "ChainMemory",
    "DecodeStep",
    "LatentMode",
    "ModeOptions",
    "Pieces",
    "Seq2SeqMode",
    "SoftMode",
    "make_mode",
    "register_mode",
]

#: mode classes by name; add to it with :func:`register_mode`
SEQ2SEQ_MODES: dict[str, type[Seq2SeqMode]] = {}


def register_mode(name: str) -> Callable[[type[Seq2SeqMode]], type[Seq2SeqMode]]:
    """Class decorator: make a :class:`Seq2SeqMode` subclass available as ``mode=name``."""
    return class_decorator(SEQ2SEQ_MODES, name, Seq2SeqMode)


@dataclass
class ModeOptions:
    """What a mode may need to build its own parts (sizes and estimator settings)."""

    embed_dim: int
    hidden: int
    target_vocab_size: int
    score: str = "bilinear"
    num_samples: int = 4
    temperature: float = 1.0
    max_jump: int | None = None
    normalizer: str | Normalizer | None = None
    source_dim: int | None = None

    @property
    def key_dim(self) -> int:
        """Size of the source states attention reads (``source_dim``, else ``hidden``)."""
        return self.hidden if self.source_dim is None else self.source_dim


def make_mode(name: str, options: ModeOptions) -> Seq2SeqMode:
    """The mode registered as ``name``, built for ``options``."""
    if name not in SEQ2SEQ_MODES:
        raise ValueError(f"mode must be one of {tuple(SEQ2SEQ_MODES)}, got {name!r}")
    return SEQ2SEQ_MODES[name](options)


@dataclass
class Pieces:
    """One batch run through the networks: the inputs every mode's objective reads.

    Attributes:
        enc: source states ``(batch, S, key_dim)``; source_mask: ``(batch, S)``.
        states: decoder states ``(batch, T, hidden)``.
        targets: ``(batch, T)`` ids; target_mask: ``(batch, T)``.
        batch: the batch itself (for modes that read more of it).
        vocabulary: ids the emission softmax is restricted to while training (the batch
            vocabulary), or None for the full vocabulary.
    """

    batch: Any
    enc: torch.Tensor
    source_mask: torch.Tensor
    states: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    vocabulary: torch.Tensor | None = None

    def num_tokens(self) -> torch.Tensor:
        """Real target tokens in the batch (at least 1): the loss is per token."""
        return self.target_mask.sum().clamp_min(1)


@dataclass
class DecodeStep:
    """One beam-search step: next-token scores and what the mode needs to follow a choice.

    Attributes:
        log_probs: ``log p(y_t | y_<t, x)`` over the vocabulary, ``(N, V)``.
        joint: optional per-key joint ``(N, S, V)`` (stateful modes condition on it).
        alignment: optional ``log p(z_t | y_<t, x)`` ``(N, S)`` (chain modes condition on it).
    """

    log_probs: torch.Tensor
    joint: torch.Tensor | None = None
    alignment: torch.Tensor | None = None


@dataclass
class ChainMemory:
    """Decoding state of the chain modes.

    Attributes:
        filtered: ``log p(z_{t-1} | y_<t, x)`` ``(N, S)``; None before the first step.
        emission_log_probs, emission_probs: a state-free emission's ``log p(y | z = k)`` and
            its ``exp``, ``(N, S, V)``, computed once per source; None for a stateful one.
    """

    filtered: torch.Tensor | None = None
    emission_log_probs: torch.Tensor | None = None
    emission_probs: torch.Tensor | None = None


class Seq2SeqMode(nn.Module, abc.ABC):
    """One attention mode: loss, likelihood, alignments and next-step scores.

    Subclasses set ``normalizer`` (and ``normalizer_options``) for the model's attention and
    implement the abstract methods. Every method receives the model (for its networks) and,
    where it needs them, the batch's :class:`Pieces`. ``options.normalizer`` (a name or a
    :class:`~structattn.nn.Normalizer` object) replaces the class's normalizer in modes that
    declare ``accepts_normalizer``.
    """

    normalizer: ClassVar[str] = "softmax"
    normalizer_options: ClassVar[dict[str, Any]] = {}
    accepts_normalizer: ClassVar[bool] = True
    #: what the mode minimises per target token, for results tables ("" : unnamed)
    objective: ClassVar[str] = ""

    def __init__(self, options: ModeOptions) -> None:
        super().__init__()
        if options.normalizer is not None and not self.accepts_normalizer:
            raise ValueError(
                f"normalizer: mode {type(self).__name__} has its own alignment structure and "
                "takes no other normalizer"
            )
        self.options = options

    def make_attention(self) -> LatentAttention:
        """The model's attention module (scorer + this mode's normalizer)."""
        hidden, keys = self.options.hidden, self.options.key_dim
        if self.options.normalizer is not None:
            return LatentAttention(hidden, keys, score=self.options.score,
                                   normalizer=self.options.normalizer)
        return LatentAttention(hidden, keys, score=self.options.score,
                               normalizer=self.normalizer, **self.normalizer_options)

    def source_states(self, model, enc: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """Source states the decoder attends to (default: the encoder's, unchanged)."""
        return enc

    @abc.abstractmethod
    def loss(self, model, pieces: Pieces) -> dict[str, torch.Tensor]:
        """``{"loss": per-token training loss, ...logged extras}``."""

    @abc.abstractmethod
    def token_log_likelihood(self, model, pieces: Pieces) -> torch.Tensor:
        """Per-token ``log p(y_t | y_<t, x)``, ``(batch, T)``, 0 at padding."""

    def log_likelihood(self, model, pieces: Pieces) -> torch.Tensor:
        """``log p(y | x)`` per sequence, ``(batch,)``."""
        return self.token_log_likelihood(model, pieces).sum(-1)

    @abc.abstractmethod
    def alignments(self, model, pieces: Pieces) -> dict[str, torch.Tensor]:
        """``prior``, ``posterior`` ``(batch, T, S)`` and their argmaxes (see Seq2Seq)."""

    def guide(self, model, pieces: Pieces):
        """``q(z | x, y)``; only variational modes have one."""
        raise ValueError(f"mode {type(self).__name__} has no inference network")

    def start_decoding(self, model, enc: torch.Tensor, source_mask: torch.Tensor) -> Any:
        """The mode's decoding state before the first step (None: memoryless)."""
        return None

    @abc.abstractmethod
    def decode_step(self, model, states, enc, source_mask, memory: Any) -> DecodeStep:
        """Next-token scores for decoder states ``(N, 1, hidden)``."""

    def follow(self, memory: Any, step: DecodeStep, origin: torch.Tensor,
               word: torch.Tensor) -> Any:
        """The decoding state after hypotheses ``origin`` chose ``word`` (both ``(N,)``)."""
        return memory


def _hard_reading(model, pieces: Pieces, prior,
                  table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Prior weights and the exact posterior of the hard-attention reading of the model
    (``table``: the emission table, when the caller has it already)."""
    table = model.emission_table(pieces) if table is None else table
    weights = prior.attention
    dense = CategoricalAlignment(probs=weights.clamp_min(0), validate_args=False)
    post = posterior(dense, table)
    return {"prior": weights, "posterior": post, "prior_argmax": weights.argmax(-1),
            "posterior_map": post.argmax(-1)}


class SoftMode(Seq2SeqMode):
    """Soft attention: ``log p(y | x, c = attention @ enc)`` with the class's normalizer."""

    objective = "soft-attention NLL"

    def loss(self, model, pieces):
        total = -self.token_log_likelihood(model, pieces).sum()
        tokens = pieces.num_tokens()
        return {"loss": total / tokens, "nll": total.detach() / tokens}

    def token_log_likelihood(self, model, pieces):
        weights = model.attention.weights(pieces.states, pieces.enc, pieces.source_mask)
        token = model.head.log_prob(pieces.states, gather(pieces.enc, weights), pieces.targets,
                                    pieces.vocabulary)
        return token.masked_fill(~pieces.target_mask, 0.0)

    def alignments(self, model, pieces):
        prior = model.attention(pieces.states, pieces.enc, pieces.source_mask)
        return _hard_reading(model, pieces, prior)

    def decode_step(self, model, states, enc, source_mask, memory):
        weights = model.attention.weights(states, enc, source_mask)
        return DecodeStep(model.head.logits(states, gather(enc, weights)).log_softmax(-1)[:, 0])


@register_mode("soft")
class SoftmaxMode(SoftMode):
    """Soft attention with softmax weights."""


@register_mode("sparsemax")
class SparsemaxMode(SoftMode):
    """Soft attention with sparsemax weights (Martins & Astudillo 2016)."""

    objective = "sparsemax-attention NLL"

    normalizer = "sparsemax"


@register_mode("entmax15")
class Entmax15Mode(SoftMode):
    """Soft attention with 1.5-entmax weights (Peters et al. 2019)."""

    objective = "entmax15-attention NLL"

    normalizer = "entmax15"


@register_mode("segmentation")
class SegmentationMode(SoftMode):
    """Structured attention (Kim et al. 2017): per target step a binary chain CRF over the
    source selects positions; the context is the selection marginals rescaled to sum to
    ``lambda = 2``, and the model trains end to end through forward-backward."""

    objective = "segmentation-attention NLL (structured, through the marginals)"

    normalizer = "segmentation"


@register_mode("tree")
class TreeSourceMode(SoftMode):
    """Soft attention over source states enriched by syntactic self-attention (Kim et al.
    2017): every source word reads its expected parent under a latent non-projective
    dependency tree over the source, ``enc'_i = tanh(W [enc_i; sum_j p(head(i) = j) enc_j])``.
    """

    objective = "soft-attention NLL over tree-enriched source states"

    def __init__(self, options: ModeOptions) -> None:
        super().__init__(options)
        keys = options.key_dim
        self.parser = LatentAttention(keys, keys, score="bilinear", normalizer="tree")
        self.merge = nn.Linear(2 * keys, keys)

    def source_states(self, model, enc, source_mask):
        parents = gather(enc, self.parser.weights(enc, enc, source_mask))
        return torch.tanh(self.merge(torch.cat([enc, parents], -1)))


class LatentMode(Seq2SeqMode):
    """Hard attention ``z_t ~ p(z_t | x, y_<t)`` trained by an estimator of
    :mod:`structattn.infer`; likelihoods are exact marginals over the prior.

    Class attributes:
        estimator: the estimator's name (``enum``, ``rloo``, ``st``, ...).
        exact: the estimator reads the full emission table (else a callable at alignments).
        variational: train with an inference network ``q(z | x, y)`` (the ELBO).
        guide_evidence: the inference network also reads the emission table
            ``log p(y_t | z_t = k)`` as a detached feature with a learned weight (see
            :class:`~structattn.nn.InferenceNetwork`); needs ``exact``, which computes the
            table anyway.
    """

    estimator: ClassVar[str] = "enum"
    exact: ClassVar[bool] = True
    variational: ClassVar[bool] = False
    guide_evidence: ClassVar[bool] = False

    def __init__(self, options: ModeOptions) -> None:
        super().__init__(options)
        if self.guide_evidence and not (self.variational and self.exact):
            raise ValueError(f"guide_evidence: mode {type(self).__name__} must be variational "
                             "and exact (the evidence is the emission table)")
        self.estimate = make_estimator(self.estimator, **self.estimator_options())
        self.inference = None
        if self.variational:
            # q reads the model's source states (one extra bi-GRU, over the target only)
            self.inference = InferenceNetwork(
                options.embed_dim, options.key_dim, hidden=options.hidden,
                target_vocab=options.target_vocab_size, encode_source=False,
                evidence=self.guide_evidence,
            )

    def estimator_options(self) -> dict[str, Any]:
        """Keyword arguments of the estimator."""
        return {}

    def guide(self, model, pieces, table: torch.Tensor | None = None):
        """``q(z | x, y)``; ``table``: the emission table of ``pieces`` if already computed
        (read as evidence by a guide with ``guide_evidence``)."""
        if self.inference is None:
            return super().guide(model, pieces)
        evidence = None
        if self.guide_evidence:
            evidence = model.emission_table(pieces) if table is None else table
        return self.inference(pieces.targets, pieces.enc, pieces.source_mask, pieces.target_mask,
                              evidence)

    def loss(self, model, pieces):
        prior = model.attention(pieces.states, pieces.enc, pieces.source_mask)
        if self.exact:
            log_likelihood = model.emission_table(pieces)
        else:
            log_likelihood = self.sampled_log_likelihood(model, pieces)
        terms = AlignmentTerms(prior=prior, log_likelihood=log_likelihood,
                               mask=pieces.target_mask)
        table = log_likelihood if self.exact else None
        guide = self.guide(model, pieces, table) if self.variational else None
        surrogate = self.estimate.loss(terms, guide)
        tokens = pieces.num_tokens()
        objective = torch.as_tensor(-self.estimate.stats["objective"])
        return {"loss": surrogate / tokens, "objective": objective / tokens}

    @staticmethod
    def sampled_log_likelihood(model, pieces: Pieces) -> Callable[[torch.Tensor], torch.Tensor]:
        """``z -> log p(y | z)`` for sampled alignments: ids ``(n, batch, T)`` or relaxed
        one-hot weights ``(n, batch, T, S)``; result ``(n, batch, T)``.

        A state-free emission is one softmax per source word, so sampled ids read its table
        (``(batch, T, S)``, computed once) instead of a softmax per sample; relaxed weights
        always mix the source states (their gradient flows through the context)."""
        table = None if model.head.stateful else model.emission_table(pieces)

        def log_likelihood(z: torch.Tensor) -> torch.Tensor:
            if table is not None and not z.is_floating_point():
                return table.expand(z.shape + table.shape[-1:]).gather(
                    -1, z.unsqueeze(-1)).squeeze(-1)
            return model.head.log_prob(pieces.states, gather(pieces.enc, z), pieces.targets,
                                       pieces.vocabulary)

        return log_likelihood

    def token_log_likelihood(self, model, pieces):
        prior = model.attention(pieces.states, pieces.enc, pieces.source_mask)
        return marginal_log_likelihood(prior, model.emission_table(pieces), pieces.target_mask)

    def alignments(self, model, pieces):
        prior = model.attention(pieces.states, pieces.enc, pieces.source_mask)
        table = model.emission_table(pieces)
        found = _hard_reading(model, pieces, prior, table)
        if self.variational:
            found["guide"] = self.guide(model, pieces, table).attention
        return found

    def start_decoding(self, model, enc, source_mask):
        # a state-free emission is the same at every step: one softmax per source word,
        # kept as probabilities (N, S, V) so that each step's mixture is one batched matmul
        return None if model.head.stateful else model.head.state_free_log_probs(enc).exp()

    def decode_step(self, model, states, enc, source_mask, memory):
        prior = model.attention(states, enc, source_mask)                     # batch (N, 1)
        if memory is not None:
            # words below exp(-87) at every position underflow to -inf: never a beam's choice
            return DecodeStep(torch.bmm(prior.attention, memory).log()[:, 0])
        log_probs = model.head.logits(states.unsqueeze(2), enc.unsqueeze(1)).log_softmax(-1)
        log_prior = prior.attention.clamp_min(1e-30).log()                  # (N, 1, S)
        return DecodeStep((log_prior.unsqueeze(-1) + log_probs).logsumexp(-2)[:, 0])


@register_mode("marginal")
class MarginalMode(LatentMode):
    """Hard attention trained by the exact marginal likelihood (alignments summed out)."""

    objective = "exact marginal NLL (alignment summed out)"


@register_mode("hard-score")
class HardScoreMode(LatentMode):
    """Hard attention sampled from the prior, score function with the leave-one-out
    baseline, maximising ``E_p[log p(y | z)]``."""

    objective = "-E_p[log p(y|z)] (score function, leave-one-out baseline)"

    estimator = "rloo"
    exact = False

    def estimator_options(self):
        return {"num_samples": self.options.num_samples}


@register_mode("variational-enum")
class VariationalEnumMode(LatentMode):
    """An inference network ``q(z | x, y)`` and the exact ELBO.

    The guide reads the model's emission table ``log p(y_t | z_t = k)`` as a detached feature
    with a learned weight (``guide_evidence``): without it, the guide collapses onto a frequent
    source word when the emission is a word translation table (see
    :class:`~structattn.nn.InferenceNetwork`).
    """

    objective = "negative ELBO, exact expectation under q"

    variational = True
    guide_evidence = True


@register_mode("variational-enum-plain")
class PlainVariationalEnumMode(VariationalEnumMode):
    """``variational-enum`` with the guide of Deng et al. 2018 alone: bilinear scores of the
    target bi-GRU against the source states, no emission evidence."""

    objective = "negative ELBO, exact expectation under q (no evidence)"

    guide_evidence = False


@register_mode("variational-score")
class VariationalScoreMode(HardScoreMode):
    """The ELBO, sampled from ``q``, with the leave-one-out baseline."""

    objective = "negative ELBO, sampled (leave-one-out baseline)"

    variational = True


@register_mode("variational-st")
class VariationalStraightThroughMode(LatentMode):
    """The ELBO with straight-through Gumbel-softmax samples and the analytic KL."""

    objective = "negative ELBO, straight-through Gumbel, analytic KL"

    estimator = "st"
    exact = False
    variational = True

    def estimator_options(self):
        return {"temperature": self.options.temperature}


@register_mode("monotonic")
class MonotonicMode(Seq2SeqMode):
    """Hard monotonic attention (Wu & Cotterell 2019): ``z_t`` stays or moves forward by at
    most ``max_jump`` source positions, ``p(z_t = k | z_{t-1} = j)`` is the softmax of the
    attention scores over ``j <= k <= j + max_jump``; trained by the exact ``log p(y | x)``
    with the alignment summed out (forward algorithm), decoded with a forward filter.

    Subclasses with other moves change :meth:`make_attention` only: the attention must return
    a chain prior (a :class:`~structattn.MonotonicAlignment` or subclass) whose
    ``with_emissions`` conditions it and whose ``move_log_probs`` the decoder filters with.
    """

    normalizer = "monotonic"
    accepts_normalizer = False
    objective = "exact monotonic-alignment marginal NLL"

    def make_attention(self):
        return LatentAttention(self.options.hidden, self.options.key_dim,
                               score=self.options.score, normalizer="monotonic",
                               max_jump=self.options.max_jump)

    def _chain(self, model, pieces, emission: bool = True) -> MonotonicAlignment:
        # the prior p(z | x, y_<t); conditioned on the emissions it is the posterior chain
        prior = model.attention(pieces.states, pieces.enc, pieces.source_mask)
        return prior.with_emissions(model.emission_table(pieces)) if emission else prior

    def loss(self, model, pieces):
        total = -self.log_likelihood(model, pieces).sum()
        tokens = pieces.num_tokens()
        return {"loss": total / tokens, "nll": total.detach() / tokens}

    def token_log_likelihood(self, model, pieces):
        raise ValueError(f"mode {type(self).__name__} has no per-token likelihood; use "
                         "log_likelihood")

    def log_likelihood(self, model, pieces):
        return self._chain(model, pieces).log_marginal_likelihood

    def alignments(self, model, pieces):
        prior = self._chain(model, pieces, emission=False).node_marginals
        chain = self._chain(model, pieces)
        return {"prior": prior, "posterior": chain.node_marginals,
                "prior_argmax": prior.argmax(-1), "posterior_map": chain.argmax}

    def start_decoding(self, model, enc, source_mask):
        if model.head.stateful:
            return ChainMemory()
        # a state-free emission is the same at every step: one softmax per source word
        log_probs = model.head.state_free_log_probs(enc)                  # (N, S, V)
        return ChainMemory(None, log_probs, log_probs.exp())

    def decode_step(self, model, states, enc, source_mask, memory):
        """``log p(y_t | y_<t, x)`` from the filter ``memory.filtered`` (see
        :class:`ChainMemory`)."""
        first, moves = model.attention(states, enc, source_mask).move_log_probs()
        if memory.filtered is None:
            predicted = first                                                   # (N, S)
        else:
            predicted = (moves[:, 0] + memory.filtered[:, None, :]).logsumexp(-1)  # (N, next)
        if memory.emission_probs is not None:
            # sum_k p(z_t = k) p(y | k): one batched matmul; words below exp(-87) everywhere
            # underflow to -inf and are never a beam's choice
            mixture = torch.bmm(predicted.exp().unsqueeze(1), memory.emission_probs)
            return DecodeStep(mixture.log()[:, 0], alignment=predicted)
        joint = predicted.unsqueeze(-1) + model.head.logits(states, enc).log_softmax(-1)
        return DecodeStep(joint.logsumexp(1), joint, predicted)

    def follow(self, memory, step, origin, word):
        # condition the alignment filter on the chosen word
        if step.joint is not None:
            chosen = step.joint[origin].gather(
                -1, word.view(-1, 1, 1).expand(-1, step.joint.shape[1], 1)).squeeze(-1)
        else:
            # every hypothesis of a source shares its emission table: rows need no reordering
            emission = memory.emission_log_probs[torch.arange(len(word)), :, word]  # (N, S)
            chosen = step.alignment[origin] + emission
        filtered = torch.nan_to_num(chosen - chosen.logsumexp(-1, keepdim=True), nan=-torch.inf)
        return ChainMemory(filtered, memory.emission_log_probs, memory.emission_probs)


@register_mode("neural-hmm")
class NeuralHMMMode(MonotonicMode):
    """Neural HMM attention (Wang et al. 2018): ``z_t`` may move either way, scored by the
    attention scores plus a learned score of the jump width (``max_jump``, default 7: wider
    jumps share the end buckets), as in the HMM word aligner; trained by the exact
    ``log p(y | x)`` (forward algorithm), decoded with a forward filter."""

    normalizer = "jump"
    objective = "exact neural-HMM marginal NLL (forward algorithm)"

    def make_attention(self):
        width = 7 if self.options.max_jump is None else self.options.max_jump
        return LatentAttention(self.options.hidden, self.options.key_dim,
                               score=self.options.score, normalizer="jump", max_jump=width)
