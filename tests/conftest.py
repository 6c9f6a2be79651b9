"""Shared test settings: one torch thread (fast and deterministic on a busy 2-core box)."""

import torch

torch.set_num_threads(1)
