"""The accuracy budget's backoff rules: each notch is milder, valid, and they run out."""

from __future__ import annotations

import pytest

from nncompress.budget import BACKOFF, backed_off, strength
from nncompress.technique import all_techniques

STARTS = {
    "magnitude_prune": {"sparsity": 0.9},
    "dynamic_surgery": {"sparsity": 0.9},
    "sparse_vd": {},
    "weight_sharing": {"bits": 4, "zero_below": 0.01},
    "hashed_net": {"compression": 8.0},
    "l1_filter_prune": {"macs_reduction": 2.0},
    "network_slimming": {"ratio": 0.5},
    "channel_lasso": {"ratio": 0.5},
    "thinet": {"macs_reduction": 3.0},
    "low_rank": {"energy": 0.9},
    "layer_prune": {"count": 3},
    "lowbit": {"weight_bits": 2, "activation_bits": 2},
    "mixed_precision": {"average_bits": 2.0},
    "binarize": {"activations": True},
}


@pytest.mark.parametrize("technique", sorted(BACKOFF))
def test_every_rule_backs_off_to_valid_milder_configs_then_stops(technique: str) -> None:
    config = all_techniques().get(technique).config.model_validate(STARTS[technique])
    seen = [strength(technique, config)]
    for _ in range(200):
        milder = backed_off(technique, config)
        if milder is None:
            break
        assert type(milder) is type(config) and milder != config
        seen.append(strength(technique, milder))
        config = milder
    else:
        pytest.fail(f"{technique} never runs out of milder settings")
    assert len(seen) >= 2 and len(set(seen)) == len(seen)


def test_specific_notches() -> None:
    techniques = all_techniques()
    mag = techniques.get("magnitude_prune").config.model_validate({"sparsity": 0.9})
    assert backed_off("magnitude_prune", mag).sparsity == pytest.approx(0.85)
    vd = techniques.get("sparse_vd").config.model_validate({})
    assert backed_off("sparse_vd", vd).kl_weight == 0.5
    ws = techniques.get("weight_sharing").config.model_validate({"bits": 5})
    assert backed_off("weight_sharing", ws).bits == 6
    assert backed_off("fold_batchnorm", techniques.get("fold_batchnorm").config()) is None


def test_bits_precision_backoffs_step_towards_more_bits() -> None:
    from nncompress.technique import all_techniques
    techniques = all_techniques()
    low = backed_off("lowbit", techniques.get("lowbit").config(weight_bits=3,
                                                               activation_bits=4))
    assert (low.weight_bits, low.activation_bits) == (4, 5)
    assert backed_off("lowbit", techniques.get("lowbit").config(weight_bits=8)) is None
    mixed = backed_off("mixed_precision",
                       techniques.get("mixed_precision").config(average_bits=3.0))
    assert mixed.average_bits == 3.75
    binary = techniques.get("binarize").config(activations=True)
    milder = backed_off("binarize", binary)
    assert milder.activations is False
    assert backed_off("binarize", milder) is None
