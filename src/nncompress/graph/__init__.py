"""Model-graph analysis for structured pruning (pure: never mutates a model)."""

from nncompress.graph.groups import HANDLED, Analysis, ChannelGroup, analyse, channel_groups

__all__ = ["HANDLED", "Analysis", "ChannelGroup", "analyse", "channel_groups"]
