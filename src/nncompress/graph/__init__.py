"""Model-graph analysis for structured pruning (pure: never mutates a model)."""

from nncompress.graph.groups import HANDLED, ChannelGroup, channel_groups

__all__ = ["HANDLED", "ChannelGroup", "channel_groups"]
