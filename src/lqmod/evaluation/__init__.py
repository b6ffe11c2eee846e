"""Evaluation of causal LMs: perplexity on token streams and held-out loss on packed windows."""

from lqmod.evaluation.perplexity import Perplexity, stream_perplexity, token_nll, window_plan, windows_loss

__all__ = ["Perplexity", "stream_perplexity", "token_nll", "window_plan", "windows_loss"]
