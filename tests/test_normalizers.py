"""The normalizer contract: every registered normalizer (and one defined here, as a user would)
returns an alignment distribution with valid soft weights, exact masking, readouts in every
mode and exact gradients; segmentation attention matches brute-force enumeration."""

import itertools
import math

import pytest
import torch

import structattn as sa
from structattn.data.copy import aligned_copy_batch
from structattn.distributions.segmentation import SegmentationAlignment
from structattn.infer.readout import READOUT_MODES, readout
from structattn.models.toy import AlignedCopyModel
from structattn.nn import (
    NORMALIZERS,
    InferenceNetwork,
    LatentAttention,
    Normalizer,
    make_normalizer,
    register_normalizer,
)

torch.set_num_threads(1)


@register_normalizer("test-sharpened-softmax")
class SharpenedSoftmax(Normalizer):
    """A user's normalizer, defined outside the library: softmax of ``scores / temperature``."""

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, scores, mask=None):
        return sa.CategoricalAlignment(logits=scores / self.temperature, mask=mask)


#: the library's normalizers and the user's one above; normalizers other test modules register
#: (when pytest imports them first) are theirs to test, so the cases never depend on file order
NAMES = sorted(name for name, cls in NORMALIZERS.items()
               if cls.__module__.startswith("structattn.") or cls.__module__ == __name__)
#: every registered normalizer with its defaults, and the built-ins' other settings
CASES = [(name, {}) for name in NAMES] + [
    ("tree", {"projective": True}),
    ("tree", {"multiroot": True}),
    ("entmax", {"alpha": 1.3, "learnable": True}),
    ("segmentation", {"transition": [[1.0, -1.0], [-1.0, 1.0]], "scale": 1.0}),
    ("monotonic", {"max_jump": 1}),
    ("relaxed", {"temperature": 0.5, "straight_through": False}),
]
CASE_IDS = [name + "".join(f"-{key}={value}" for key, value in options.items())
            for name, options in CASES]
LENGTHS = torch.tensor([4, 3])


def _inputs(dtype=torch.float64, size=4, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scores = scale * torch.randn(2, size, size, generator=generator, dtype=dtype)
    key_mask = torch.arange(size) < LENGTHS[:, None]
    return scores, key_mask.unsqueeze(-2)


def _valid_queries(normalizer, mask):
    """``(batch, queries)``: queries whose weights must sum to the attention mass."""
    if normalizer.self_attention:
        return mask[:, 0, :]
    return torch.ones(mask.shape[0], mask.shape[-1], dtype=torch.bool)


def test_the_readout_modes_are_soft_sample_argmax_and_enum():
    assert set(READOUT_MODES) == {"soft", "sample", "argmax", "enum"}


def test_the_registry_holds_every_built_in_and_the_user_normalizer():
    for name in ("softmax", "sparsemax", "entmax15", "entmax", "relaxed", "segmentation",
                 "tree", "monotonic", "jump", "test-sharpened-softmax"):
        assert name in NORMALIZERS
        assert isinstance(make_normalizer(name), Normalizer)
    with pytest.raises(ValueError, match="normalizer"):
        make_normalizer("no-such-normalizer")
    with pytest.raises(ValueError, match="Normalizer"):
        register_normalizer("bad")(int)


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_attention_is_a_valid_weighting_with_masked_keys_at_exactly_zero(name, options):
    normalizer = make_normalizer(name, **options).double()
    scores, mask = _inputs()
    dist = normalizer(scores, mask)
    attention = dist.attention
    assert attention.shape == scores.shape
    assert (attention >= 0).all()
    assert (attention.masked_select(~mask.expand_as(attention)) == 0).all()
    valid = _valid_queries(normalizer, mask)
    totals = attention.sum(-1)
    mass = torch.full_like(totals, normalizer.attention_mass)
    assert torch.allclose(totals[valid], mass[valid])
    assert (totals[~valid] == 0).all()
    assert torch.allclose(normalizer.weights(scores, mask), attention)


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_masked_scores_get_exactly_zero_gradient(name, options):
    normalizer = make_normalizer(name, **options).double()
    scores, mask = _inputs()
    scores.requires_grad_(True)
    weights = normalizer.weights(scores, mask)
    (weights * torch.randn_like(weights)).sum().backward()
    unused = ~mask.expand_as(scores)
    if normalizer.self_attention:
        unused = unused | ~mask.transpose(-1, -2).expand_as(scores)
    assert (scores.grad.masked_select(unused) == 0).all()
    assert scores.grad.masked_select(~unused).abs().sum() > 0


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mode", ["soft", "sample", "argmax"])
def test_readout_never_reads_a_masked_key(name, options, mode):
    normalizer = make_normalizer(name, **options).double()
    scores, mask = _inputs()
    values = torch.randn(2, 4, 3, dtype=torch.float64)
    values = values.masked_fill(~mask.transpose(-1, -2), 1e6)
    dist = normalizer(scores, mask)
    context = readout(dist, values, mode)
    assert context.shape == (2, 4, 3)
    valid = _valid_queries(normalizer, mask)
    bound = normalizer.attention_mass * values.abs().masked_fill(values.abs() > 1e5, 0).amax()
    assert (context[valid].abs() <= bound + 1e-9).all()


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_samples_modes_log_probs_and_entropies_have_the_batch_shape(name, options):
    normalizer = make_normalizer(name, **options).double()
    scores, mask = _inputs()
    dist = normalizer(scores, mask)
    sample = dist.rsample() if dist.has_rsample else dist.sample()
    log_prob = dist.log_prob(sample)
    entropy = dist.entropy()
    assert log_prob.shape == entropy.shape == dist.batch_shape
    assert torch.isfinite(log_prob).all() and torch.isfinite(entropy).all()
    if not dist.has_rsample:  # discrete: probabilities and entropies of a finite support
        assert (log_prob <= 1e-9).all() and (entropy >= -1e-9).all()


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_weights_pass_gradcheck_in_float64(name, options):
    normalizer = make_normalizer(name, **options).double()
    scores, mask = _inputs(size=3, seed=1)
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: normalizer.weights(s, mask), (scores,))


def test_learnable_entmax_alpha_receives_a_gradient_and_starts_where_asked():
    normalizer = make_normalizer("entmax", alpha=1.3, learnable=True)
    assert math.isclose(float(normalizer.alpha.detach()), 1.3, rel_tol=1e-6)
    scores, mask = _inputs(dtype=torch.float32)
    weights = normalizer.weights(scores, mask)
    (weights * torch.randn_like(weights)).sum().backward()
    assert normalizer.raw_alpha.grad is not None and normalizer.raw_alpha.grad != 0
    assert list(normalizer.parameters()) == [normalizer.raw_alpha]
    normalizer.raw_alpha.grad = None
    dist = normalizer(scores, mask)
    assert torch.allclose(dist.attention, weights, atol=1e-5)
    (dist.attention * torch.randn_like(weights)).sum().backward()
    assert normalizer.raw_alpha.grad != 0


def test_the_user_normalizer_works_where_the_built_ins_do():
    attention = LatentAttention(4, 4, normalizer="test-sharpened-softmax", temperature=0.25)
    query, keys = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    dist = attention(query, keys)
    scores, _ = attention.scores(query, keys)
    assert torch.allclose(dist.attention, (scores / 0.25).softmax(-1), atol=1e-6)
    network = InferenceNetwork(4, 4, hidden=6, normalizer=SharpenedSoftmax())
    guide = network(torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    assert guide.batch_shape == (2, 3)
    model = AlignedCopyModel(7, hidden=8, normalizer="test-sharpened-softmax")
    batch = aligned_copy_batch(2, 5, 7, generator=torch.Generator().manual_seed(0))
    value = model.marginal_log_likelihood(batch)
    assert torch.isfinite(value) and value < 0


def test_an_object_and_options_together_are_refused():
    with pytest.raises(ValueError, match="options"):
        make_normalizer(SharpenedSoftmax(), temperature=2.0)


def test_readout_names_the_distribution_it_cannot_read():
    class NoAttention:
        pass

    with pytest.raises(ValueError, match="NoAttention"):
        readout(NoAttention(), torch.randn(2, 3, 4), "soft")

    class NoMode(torch.distributions.Distribution):
        arg_constraints = {}

        @property
        def attention(self):
            return torch.ones(2, 3) / 3

    with pytest.raises(ValueError, match="NoMode"):
        readout(NoMode(torch.Size([2]), validate_args=False), torch.randn(3, 4), "argmax")
    with pytest.raises(ValueError, match="mode"):
        readout(sa.CategoricalAlignment(logits=torch.randn(2, 3)), torch.randn(3, 4), "magic")
    scores, mask = _inputs()
    with pytest.raises(ValueError, match="SegmentationAlignment"):
        readout(make_normalizer("segmentation")(scores, mask), torch.randn(2, 4, 3), "enum")


def test_enum_readout_lists_the_context_of_every_key_and_averages_to_soft():
    scores, mask = _inputs()
    values = torch.randn(2, 4, 3, dtype=torch.float64)
    for name in ("softmax", "sparsemax"):
        dist = make_normalizer(name)(scores, mask)
        contexts = readout(dist, values, "enum")                    # (K, 2, 1, 3)
        keys = dist.enumerate_support(expand=False).reshape(-1)
        assert torch.equal(contexts[:, :, 0], values[:, keys].transpose(0, 1))
        weights = dist.attention[..., keys].permute(2, 0, 1).unsqueeze(-1)   # (K, 2, 4, 1)
        assert torch.allclose((weights * contexts).sum(0), readout(dist, values, "soft"))


def test_structured_argmax_readout_reads_the_best_structure():
    scores, mask = _inputs()
    tree = make_normalizer("tree").double()(scores, mask)
    values = torch.randn(2, 4, 3, dtype=torch.float64)
    assert torch.equal(readout(tree, values, "argmax"), sa.infer.gather(values, tree.argmax))
    segmentation = make_normalizer("segmentation").double()(scores, mask)
    best = segmentation.argmax.double()
    expected = 2.0 * best / best.sum(-1, keepdim=True).clamp_min(1) @ values
    assert torch.allclose(readout(segmentation, values, "argmax"), expected)


# ------------------------------------------------------------------ segmentation vs brute force

def _brute_force_segmentation(scores, mask, transition):
    """Marginals, log-probabilities of every selection, entropy: by enumerating 2^keys."""
    keys = scores.shape[-1]
    valid = [k for k in range(keys) if mask[k]]
    selections, log_scores = [], []
    for bits in itertools.product((0, 1), repeat=len(valid)):
        selection = torch.zeros(keys, dtype=torch.long)
        total = scores.new_zeros(())
        for position, bit in zip(valid, bits, strict=True):
            selection[position] = bit
            total = total + bit * scores[position]
        for left, right in zip(bits[:-1], bits[1:], strict=True):
            total = total + transition[right, left]
        selections.append(selection)
        log_scores.append(total)
    log_scores = torch.stack(log_scores)
    log_probs = log_scores - log_scores.logsumexp(0)
    selections = torch.stack(selections)
    marginals = (log_probs.exp()[:, None] * selections).sum(0)
    entropy = -(log_probs.exp() * log_probs).sum()
    return marginals, selections, log_probs, entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("keys", [1, 2, 5])
def test_segmentation_matches_brute_force_enumeration(dtype, scale, keys):
    generator = torch.Generator().manual_seed(keys)
    scores = (scale * torch.randn(2, 3, keys, generator=generator, dtype=torch.float64))
    transition = scale * torch.randn(2, 2, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 1, keys, dtype=torch.bool)
    if keys > 2:
        mask[1, 0, 1] = False  # a hole: the chain skips the key
        mask[1, 0, -1] = False
    dist = SegmentationAlignment(scores.to(dtype), mask, transition.to(dtype), scale=2.0)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    for b, q in itertools.product(range(2), range(3)):
        marginals, selections, log_probs, entropy = _brute_force_segmentation(
            scores[b, q], mask[b, 0], transition)
        assert torch.allclose(dist.marginals[b, q].double(), marginals, atol=tolerance)
        expected_attention = 2.0 * marginals / marginals.sum()
        assert torch.allclose(dist.attention[b, q].double(), expected_attention,
                              atol=10 * tolerance)
        value = torch.zeros((len(selections),) + scores.shape, dtype=torch.long)
        value[:, b, q] = selections
        got = dist.log_prob(value)[:, b, q].double()
        # relative to the size of the scores: float32 rounds log-scores at scale 100
        assert torch.allclose(got, log_probs, atol=tolerance * max(1.0, scale) * keys)
        assert torch.allclose(dist.entropy()[b, q].double(), entropy,
                              atol=tolerance * max(1.0, scale) * keys)


def test_segmentation_samples_follow_the_exact_distribution():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(1, 1, 3, generator=generator, dtype=torch.float64)
    transition = torch.tensor([[1.0, -1.0], [-0.5, 0.8]], dtype=torch.float64)
    dist = SegmentationAlignment(scores, transition=transition)
    _, selections, log_probs, _ = _brute_force_segmentation(
        scores[0, 0], torch.ones(3, dtype=torch.bool), transition)
    torch.manual_seed(0)
    draws = dist.sample((20000,))[:, 0, 0]
    codes = (draws * torch.tensor([1, 2, 4])).sum(-1)
    frequencies = torch.bincount(codes, minlength=8).double() / len(codes)
    expected = torch.zeros(8, dtype=torch.float64)
    expected[(selections * torch.tensor([1, 2, 4])).sum(-1)] = log_probs.exp()
    assert (frequencies - expected).abs().max() < 0.015
    viterbi = dist.argmax[0, 0]
    assert torch.equal(viterbi, selections[log_probs.argmax()])


def test_segmentation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scores"):
        SegmentationAlignment(torch.randn(3))
    with pytest.raises(ValueError, match="transition"):
        SegmentationAlignment(torch.randn(2, 3), transition=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="scale"):
        SegmentationAlignment(torch.randn(2, 3), scale=0.0)
    with pytest.raises(ValueError, match="mask"):
        SegmentationAlignment(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="square"):
        make_normalizer("tree")(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="prefix"):
        make_normalizer("monotonic")(torch.randn(1, 2, 3), torch.tensor([[[True, False, True]]]))


def test_segmentation_skips_masked_keys_inside_the_sequence_with_zero_gradient():
    scores = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]],
                        dtype=torch.bool).unsqueeze(-2)
    dist = SegmentationAlignment(scores, mask, torch.tensor([[0.5, -1.0], [-1.0, 2.0]],
                                                            dtype=torch.float64))
    (dist.attention * torch.randn(3, 2, 6, dtype=torch.float64)).sum().backward()
    hidden = ~mask.expand_as(scores)
    assert (dist.marginals.detach()[hidden] == 0).all()
    assert (scores.grad[hidden] == 0).all() and (scores.grad[~hidden] != 0).all()
    # the chain over the valid keys only, by hand: the same marginals
    compact = SegmentationAlignment(scores.detach()[0:1, :, [0, 2, 3, 5]],
                                    transition=dist.transition)
    assert torch.allclose(dist.marginals.detach()[0:1, :, [0, 2, 3, 5]], compact.marginals)


@pytest.mark.parametrize("name", ["segmentation", "tree", "monotonic", "jump"])
def test_structured_normalizers_give_pyro_sample_sites(name):
    import pyro
    from pyro import poutine

    scores, mask = _inputs()
    dist = make_normalizer(name).double()(scores, mask)

    def model():
        with pyro.plate("batch", dist.batch_shape[0], dim=-len(dist.batch_shape)):
            return pyro.sample("z", dist)

    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()
    site = trace.nodes["z"]
    assert torch.allclose(site["log_prob"], dist.log_prob(site["value"]))
    assert torch.isfinite(site["log_prob"]).all()


@pytest.mark.parametrize("start", [1.5, 2.0, 1.3])
def test_learnable_entmax_alpha_gets_a_gradient_at_every_start(start):
    """A learned alpha that starts (or lands) on a closed-form value must still train."""
    normalizer = sa.nn.make_normalizer("entmax", alpha=start, learnable=True)
    scores = torch.randn(3, 4, 6, dtype=torch.float64)
    target = torch.softmax(torch.randn(3, 4, 6, dtype=torch.float64), -1)
    loss = (normalizer(scores).attention - target).pow(2).sum()
    loss.backward()
    grads = [p.grad for p in normalizer.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
                         for g in grads)


@pytest.mark.parametrize("options, message", [
    ({"max_jump": -1}, "max_jump"),
    ({"max_jump": True}, "max_jump"),
    ({"max_jump": 2, "jump_scores": torch.zeros(4)}, "jump_scores"),
])
def test_jump_normalizer_refuses_bad_settings_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        make_normalizer("jump", **options)


def test_jump_normalizer_learns_its_jump_scores_from_a_loss():
    normalizer = make_normalizer("jump", max_jump=2)
    scores, mask = _inputs(dtype=torch.float32)
    normalizer(scores, mask).attention[..., 0].sum().backward()
    assert normalizer.jump_scores.grad is not None
    assert bool(normalizer.jump_scores.grad.abs().sum() > 0)
