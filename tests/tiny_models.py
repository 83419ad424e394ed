"""The tiny saved model several test modules score, generate from or run jobs on (one copy of its recipe)."""

import torch

from mcdist.checkpoint import save_model
from mcdist.config import ModelConfig
from mcdist.model import MCLanguageModel


def save_tiny_model(folder, **fields):
    """(folder, model): a float64 2-layer grm model over gated memory (d_model 16, 2 heads, C = 4), seeded 0, in eval
    mode, saved to ``folder``; ``fields`` override the config's (e.g. vocab_size)."""
    torch.manual_seed(0)
    config = ModelConfig(**{**dict(d_model=16, n_layers=2, n_heads=2, memory="gated", aggregation="grm",
                                   segment_len=4, chunk_len=2, minibatch_len=2), **fields})
    model = MCLanguageModel(config).double().eval()
    save_model(model, config, str(folder))
    return str(folder), model
