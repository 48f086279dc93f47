"""Emission heads: the output layer every alignment model shares.

``p(y | h, c) = softmax(W_o tanh(W_h h + W_c c) [+ W_x x])`` for a decoder state ``h`` and a
context ``c`` (the expected value under soft attention, the value at ``z`` under hard attention;
Luong et al. 2015's attentional output layer without input feeding, as in Deng et al. 2018).
The optional lexical term ``W_x x`` reads the last ``lexical_dim`` features of the context (a
source word embedding placed there by the model) straight into the logits, so the emission at an
aligned position can name a translation of that source word, as a neural IBM Model 1 would.

Every method takes an optional ``vocabulary``: the ids (a 1-D tensor) the softmax is restricted
to, e.g. the target words of a training batch.  The restricted softmax is the full one
renormalised over those words: a cheaper training objective (Jean et al. 2015's batch
vocabulary, without importance correction), not the full-vocabulary likelihood.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["EmissionHead"]


class EmissionHead(nn.Module):
    """Vocabulary logits from a state and a context, and per-key emission tables.

    Args:
        state_dim: size of the decoder states ``h``.
        context_dim: size of the contexts ``c`` (the values attention reads).
        hidden: size of the combination layer.
        vocab_size: number of output tokens ``V``.
        lexical_dim: if positive, the last ``lexical_dim`` context features also enter the
            logits linearly (the lexical term ``W_x x``); at most ``context_dim``.
        contextual: whether the combination layer reads the whole context (``W_c c``); with
            ``False`` it reads the lexical features only, so the emission sees the state and
            the aligned word but not the rest of the context (needs ``lexical_dim``).
        stateful: whether the emission reads the decoder state ``h``; with ``False``,
            ``p(y | c)`` is a translation table of the context alone (the state then only
            steers the alignment, as in an HMM aligner).
    """

    def __init__(self, state_dim: int, context_dim: int, hidden: int, vocab_size: int,
                 lexical_dim: int = 0, contextual: bool = True, stateful: bool = True) -> None:
        super().__init__()
        for name, value in (("state_dim", state_dim), ("context_dim", context_dim),
                            ("hidden", hidden), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (isinstance(lexical_dim, bool) or not isinstance(lexical_dim, int)
                or not 0 <= lexical_dim <= context_dim):
            raise ValueError(f"lexical_dim must be an int in [0, context_dim={context_dim}], "
                             f"got {lexical_dim!r}")
        if not contextual and not lexical_dim:
            raise ValueError("contextual=False needs lexical_dim > 0 (the emission would read "
                             "no context)")
        self.vocab_size = vocab_size
        self.lexical_dim = lexical_dim
        self.contextual = contextual
        self.stateful = stateful
        self.combine_state = nn.Linear(state_dim, hidden)
        self.combine_context = nn.Linear(context_dim if contextual else lexical_dim, hidden,
                                         bias=False)
        self.out = nn.Linear(hidden, vocab_size)
        self.lexical = nn.Linear(lexical_dim, vocab_size, bias=False) if lexical_dim else None

    # ------------------------------------------------------------------ vocabulary

    def _check_vocabulary(self, vocabulary: torch.Tensor | None) -> None:
        if vocabulary is None:
            return
        if vocabulary.dim() != 1 or vocabulary.is_floating_point() or not vocabulary.numel():
            raise ValueError("vocabulary must be a non-empty 1-D tensor of token ids, got "
                             f"shape {tuple(vocabulary.shape)} {vocabulary.dtype}")
        if int(vocabulary.min()) < 0 or int(vocabulary.max()) >= self.vocab_size:
            raise ValueError(f"vocabulary holds ids outside [0, {self.vocab_size})")

    def _positions(self, vocabulary: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        """``targets`` as indices into the (restricted) softmax."""
        if vocabulary is None:
            return targets
        lookup = torch.full((self.vocab_size,), -1, dtype=torch.long, device=targets.device)
        lookup[vocabulary] = torch.arange(vocabulary.numel(), device=targets.device)
        positions = lookup[targets]
        if bool((positions < 0).any()):
            raise ValueError("vocabulary must contain every target id it scores")
        return positions

    def _output(self, vocabulary: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Output weights ``(V', hidden)`` and bias ``(V',)`` of the (restricted) softmax."""
        if vocabulary is None:
            return self.out.weight, self.out.bias
        return self.out.weight[vocabulary], self.out.bias[vocabulary]

    def _combined_state(self, states: torch.Tensor) -> torch.Tensor:
        """``W_h h + b``, or the bias alone when the emission ignores the state."""
        if self.stateful:
            return self.combine_state(states)
        return self.combine_state.bias.expand(states.shape[:-1] + (-1,))

    def _combined_context(self, context: torch.Tensor) -> torch.Tensor:
        """``W_c c`` over the features the combination layer reads."""
        return self.combine_context(context if self.contextual
                                    else context[..., -self.lexical_dim:])

    def _lexical_logits(self, context: torch.Tensor,
                        vocabulary: torch.Tensor | None) -> torch.Tensor | None:
        if self.lexical is None:
            return None
        weight = self.lexical.weight if vocabulary is None else self.lexical.weight[vocabulary]
        return F.linear(context[..., -self.lexical_dim:], weight)

    # ------------------------------------------------------------------ scores

    def logits(self, states: torch.Tensor, context: torch.Tensor,
               vocabulary: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(..., V)`` (``V = len(vocabulary)`` if given); ``states (..., state_dim)``
        broadcast against ``context (..., context_dim)``."""
        self._check_vocabulary(vocabulary)
        weight, bias = self._output(vocabulary)
        hidden = torch.tanh(self._combined_state(states) + self._combined_context(context))
        logits = F.linear(hidden, weight, bias)
        lexical = self._lexical_logits(context, vocabulary)
        return logits if lexical is None else logits + lexical

    def log_prob(
        self, states: torch.Tensor, context: torch.Tensor, targets: torch.Tensor,
        vocabulary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``log p(targets | states, context)``, the broadcast of ``targets`` and the inputs'
        leading dims (e.g. ``(n, batch, T)`` for sampled contexts ``(n, batch, T, dim)``);
        normalised over ``vocabulary`` if given (it must contain every target)."""
        log_probs = self.logits(states, context, vocabulary).log_softmax(-1)
        positions = self._positions(vocabulary, targets)
        index = positions.expand(log_probs.shape[:-1]).unsqueeze(-1)
        return log_probs.gather(-1, index).squeeze(-1)

    def table(
        self,
        states: torch.Tensor,
        values: torch.Tensor,
        targets: torch.Tensor,
        target_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        chunk_elements: int = 1 << 24,
        vocabulary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``log p(y_t | h_t, values_k)`` for every key: ``(batch, T, keys)``.

        Only (query, key) pairs that are both real are evaluated (the others are 0), in
        chunks of at most ``chunk_elements`` logits, so memory stays bounded for long inputs.

        Args:
            states: ``(batch, T, state_dim)``; values: ``(batch, keys, context_dim)``;
            targets: ``(batch, T)`` ids; masks: ``(batch, T)`` and ``(batch, keys)`` bool.
            vocabulary: ids the softmax is restricted to (must contain every real target).
        """
        self._check_vocabulary(vocabulary)
        batch, length, _ = states.shape
        keys = values.shape[1]
        valid = torch.ones(batch, length, keys, dtype=torch.bool, device=states.device)
        if target_mask is not None:
            valid = valid & target_mask[:, :, None]
        if key_mask is not None:
            valid = valid & key_mask[:, None, :]
        if not self.stateful:
            return self._stateless_table(values, targets, valid, vocabulary)
        rows, steps, positions = valid.nonzero(as_tuple=True)
        weight, bias = self._output(vocabulary)
        state_part = self._combined_state(states)[rows, steps]
        context_part = self._combined_context(values)[rows, positions]
        words = self._positions(vocabulary, targets[rows, steps]).unsqueeze(-1)
        # the lexical term depends on the key only: computed once per key, then gathered
        lexical = self._lexical_logits(values, vocabulary)
        lexical_part = None if lexical is None else lexical[rows, positions]
        chunk = max(1, chunk_elements // weight.shape[0])
        pieces = []
        for start in range(0, rows.shape[0], chunk):
            stop = start + chunk
            logits = F.linear(torch.tanh(state_part[start:stop] + context_part[start:stop]),
                              weight, bias)
            if lexical_part is not None:
                logits = logits + lexical_part[start:stop]
            pieces.append(logits.log_softmax(-1).gather(-1, words[start:stop]).squeeze(-1))
        found = torch.cat(pieces) if pieces else state_part.new_zeros(0)
        return found.new_zeros(batch, length, keys).index_put((rows, steps, positions), found)

    def state_free_log_probs(self, values: torch.Tensor,
                             vocabulary: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(y | values_k)`` over the vocabulary, ``(..., keys, V)``, of a head built with
        ``stateful=False`` (the emission then does not change from step to step)."""
        if self.stateful:
            raise ValueError("state_free_log_probs needs a head built with stateful=False")
        no_state = values.new_zeros(values.shape[:-1] + (1,))  # read for its shape only
        return self.logits(no_state, values, vocabulary).log_softmax(-1)

    def _stateless_table(self, values: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                         vocabulary: torch.Tensor | None) -> torch.Tensor:
        """The table of a state-free emission: one softmax per key, read at every target
        (``T`` times fewer logits than a softmax per (target, key) pair)."""
        log_probs = self.state_free_log_probs(values, vocabulary)          # (batch, keys, V')
        # padded steps may hold ids outside the vocabulary: score a known word there instead
        known = targets.new_tensor(0) if vocabulary is None else vocabulary[0]
        words = self._positions(vocabulary, torch.where(valid.any(-1), targets, known))
        found = log_probs.gather(-1, words[:, None, :].expand(-1, values.shape[1], -1))
        return found.transpose(1, 2).masked_fill(~valid, 0.0)
