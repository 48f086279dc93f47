"""Syntactic (tree) attention in the sense of Kim et al. 2017, trained from a downstream loss.

Each word has a "level" in 0..K-1 (the first word has level 0, the others a level >= 1) and a
random payload symbol. The hidden tree attaches every word to the nearest word on its left
with a strictly lower level (the first word is the root), a projective tree. The model never
sees a tree: it scores arcs from level and position embeddings, reads each word's context as
the expectation of its payload embeddings under the arc marginals of a dependency CRF (its
syntactic attention), and is trained only to predict, for every word, the payload of its head.
Doing so forces the attention to find the heads.

At the end it draws, for one held-out sentence, the arc marginals as a heatmap and the argmax
tree against the hidden tree (networkx + matplotlib), and reports the head accuracy of the
argmax trees on held-out sentences.

The attention is the library's ``"tree"`` normalizer (``structattn.nn.make_normalizer``): scores
``(batch, dependent, head)`` in, a dependency CRF out, whose ``.attention`` gives every word a
distribution over its heads. Outputs go under ``--out`` (default ``runs/structured_attention``).

    python examples/structured_attention.py                      # projective CRF, ~1 minute
    python examples/structured_attention.py --structure nonprojective
    python examples/structured_attention.py --smoke-test         # a few steps, for CI
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from structattn.nn import make_normalizer  # noqa: E402


def make_batch(batch: int, words: int, levels: int, payloads: int, generator: torch.Generator):
    """Random levels and payloads ``(batch, words)`` and hidden heads (``heads[j] = j`` at root)."""
    payload = torch.randint(0, payloads, (batch, words), generator=generator)
    tokens = torch.randint(1, levels, (batch, words), generator=generator)
    tokens[:, 0] = 0
    heads = torch.zeros(batch, words, dtype=torch.long)
    for b in range(batch):
        for j in range(words):
            heads[b, j] = j
            for h in range(j - 1, -1, -1):
                if tokens[b, h] < tokens[b, j]:
                    heads[b, j] = h
                    break
    return tokens, payload, heads


class TreeAttentionModel(nn.Module):
    """Arc scorer + dependency CRF attention + head-payload classifier."""

    def __init__(self, levels: int, payloads: int, words: int, hidden: int, structure: str) -> None:
        super().__init__()
        self.normalizer = make_normalizer("tree", projective=structure == "projective")
        self.token = nn.Embedding(levels, hidden)
        self.position = nn.Embedding(words, hidden)
        self.head_proj = nn.Linear(hidden, hidden)
        self.dependent_proj = nn.Linear(hidden, hidden)
        # relative position bias, offset d - h in [-(words-1), words-1]
        self.distance = nn.Parameter(torch.zeros(2 * words - 1))
        self.root = nn.Parameter(torch.zeros(hidden))
        self.value = nn.Embedding(payloads, hidden)
        self.classify = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, payloads + 1)
        )

    def arc_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, words, words)``, ``[b, dependent, head]``, root scores on the diagonal."""
        words = tokens.shape[-1]
        states = self.token(tokens) + self.position.weight[:words]
        heads, dependents = self.head_proj(states), self.dependent_proj(states)
        scores = heads @ dependents.transpose(-1, -2) / heads.shape[-1] ** 0.5
        offsets = torch.arange(words).unsqueeze(0) - torch.arange(words).unsqueeze(1)
        scores = scores + self.distance[offsets + words - 1]
        root = dependents @ self.root
        scores = (
            scores
            - torch.diag_embed(torch.diagonal(scores, dim1=-2, dim2=-1))
            + torch.diag_embed(root)
        )
        return scores.transpose(-1, -2)

    def forward(self, tokens: torch.Tensor, payload: torch.Tensor):
        crf = self.normalizer(self.arc_scores(tokens))
        attention = crf.attention  # [b, dependent, head], differentiable
        values = self.value(payload)
        # the diagonal is the root, which has no payload: it reads a learned root vector
        arcs = attention - torch.diag_embed(torch.diagonal(attention, dim1=-2, dim2=-1))
        root_weight = torch.diagonal(attention, dim1=-2, dim2=-1).unsqueeze(-1)
        context = arcs @ values + root_weight * self.root
        logits = self.classify(torch.cat([context, self.token(tokens)], -1))
        return logits, crf


def head_payloads(payload: torch.Tensor, heads: torch.Tensor, payloads: int) -> torch.Tensor:
    """Target per word: the payload of its head, or ``payloads`` (an extra class) at the root."""
    target = payload.gather(-1, heads)
    is_root = heads == torch.arange(payload.shape[-1])
    return torch.where(is_root, payloads, target)


def draw(tokens, heads, predicted, marginals, path: str) -> None:
    """Heatmap of the arc marginals and the argmax tree beside the hidden tree."""
    words = len(tokens)
    labels = [f"{j}:{int(t)}" for j, t in enumerate(tokens)]
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    image = axes[0].imshow(marginals, cmap="viridis", vmin=0, vmax=1)
    axes[0].set_xticks(range(words), labels, rotation=90)
    axes[0].set_yticks(range(words), labels)
    axes[0].set_xlabel("dependent (position:level)")
    axes[0].set_ylabel("head (diagonal: root)")
    axes[0].set_title("arc marginals (syntactic attention)")
    figure.colorbar(image, ax=axes[0], fraction=0.046)
    for axis, tree, title in ((axes[1], predicted, "argmax tree"), (axes[2], heads, "hidden tree")):
        graph = nx.DiGraph()
        graph.add_node("ROOT")
        graph.add_nodes_from(labels)
        for j, h in enumerate(tree.tolist()):
            graph.add_edge("ROOT" if h == j else labels[h], labels[j])
        layout = {"ROOT": (-1.0, 0.0)}
        layout.update({label: (float(j), -1.0 - 0.3 * (j % 2)) for j, label in enumerate(labels)})
        wrong = {
            (labels[h] if h != j else "ROOT", labels[j])
            for j, h in enumerate(tree.tolist())
            if h != heads[j]
        }
        colors = ["tab:red" if edge in wrong else "tab:blue" for edge in graph.edges()]
        nx.draw_networkx(
            graph,
            pos=layout,
            ax=axis,
            node_color="white",
            edgecolors="black",
            node_size=700,
            font_size=8,
            edge_color=colors,
            connectionstyle="arc3,rad=-0.4",
            arrows=True,
        )
        axis.set_title(title + (" (red: wrong head)" if tree is predicted else ""))
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    model = TreeAttentionModel(args.levels, args.payloads, args.words, args.hidden, args.structure)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    for step in range(1, args.num_steps + 1):
        tokens, payload, heads = make_batch(
            args.batch_size, args.words, args.levels, args.payloads, generator
        )
        logits, _ = model(tokens, payload)
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            head_payloads(payload, heads, args.payloads).reshape(-1),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == 1:
            print(f"step {step:>5d}  loss {loss.item():.4f}")

    tokens, payload, heads = make_batch(256, args.words, args.levels, args.payloads, generator)
    with torch.no_grad():
        _, crf = model(tokens, payload)
        predicted = crf.argmax
        marginals = crf.attention.transpose(-1, -2)  # drawn [head, dependent]
    accuracy = (predicted == heads).float().mean().item()
    print(f"held-out head accuracy of the argmax trees: {accuracy:.3f} (256 sentences)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tree_attention_{args.structure}.png")
    draw(tokens[0], heads[0], predicted[0], marginals[0].numpy(), path)
    print(f"saved {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tree attention (dependency CRF marginals) on a toy task"
    )
    parser.add_argument(
        "--structure",
        default="projective",
        choices=["projective", "nonprojective"],
        help="which dependency CRF provides the attention",
    )
    parser.add_argument("-n", "--num-steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per step")
    parser.add_argument("--words", type=int, default=8, help="words per sentence")
    parser.add_argument("--levels", type=int, default=5, help="number of token levels")
    parser.add_argument("--payloads", type=int, default=10, help="number of payload symbols")
    parser.add_argument("--hidden", type=int, default=32, help="embedding size")
    parser.add_argument("--learning-rate", type=float, default=0.02, help="Adam learning rate")
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=os.path.join("runs", "structured_attention"),
                        help="folder for the PNG (default runs/structured_attention)")
    parser.add_argument("--smoke-test", action="store_true", help="run a few steps only")
    return parser


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    if arguments.smoke_test:
        arguments.num_steps, arguments.log_every = 5, 1
    main(arguments)
