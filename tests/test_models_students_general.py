"""Width students of models nncompress did not write (models/narrowed.py): PyTorch's own
building blocks -- nn.Sequential, nn.TransformerEncoder with token ids and a padding mask,
stacked bidirectional GRUs on token ids, LSTMs with projections, grouped convolutions with
norms -- through student_of, kd_student and TAKD."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import nncompress as nc
from helpers import tiny_data
from nncompress.distill.trainer import takd
from nncompress.errors import ModelError
from nncompress.models.students import student_of
from nncompress.recipe import Recipe, Stage
from test_prune_structured_general import BiGRU, GroupedCNN, ProjLSTM, TextEncoder, _text_batch


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64),
                         nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 3))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: case -> (model, a batch, size ratio); the grouped CNN (661 parameters, channels in
#: groups of 4) has coarse steps: 3x has no student within 15 %, 2x has
CASES: dict[str, tuple[Any, Any, float]] = {
    "sequential": (_mlp, lambda: torch.randn(4, 1, 12), 3.0),
    "transformer-encoder": (TextEncoder, _text_batch, 3.0),
    "bigru-tokens": (BiGRU, lambda: torch.randint(0, 50, (4, 7)), 3.0),
    "lstm-projection": (ProjLSTM, lambda: torch.randn(4, 5, 8), 3.0),
    "grouped-cnn": (GroupedCNN, lambda: torch.randn(4, 3, 10), 2.0),
}


def _call(model: nn.Module, x: Any) -> torch.Tensor:
    return model(*x) if isinstance(x, tuple) else model(x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_width_student_of_any_model_is_near_the_size_fresh_and_loads(case: str,
                                                                        tmp_path) -> None:
    make, batch, ratio = CASES[case]
    torch.manual_seed(0)
    teacher, x = make().eval(), batch()
    with torch.no_grad():
        before = _call(teacher, x)
    state = torch.get_rng_state()
    student = student_of(teacher, ratio, example_input=x).eval()
    assert torch.equal(torch.get_rng_state(), state)  # seeded in a forked RNG
    target = _params(teacher) / ratio
    assert abs(_params(student) - target) <= 0.15 * target
    with torch.no_grad():
        out = _call(student, x)
        assert out.shape == before.shape
        torch.testing.assert_close(_call(teacher, x), before)  # the teacher is untouched
    # re-initialised, not the teacher's weights narrowed: the last layer differs
    last_t, last_s = (next(m for m in reversed(list(net.modules())) if isinstance(m, nn.Linear))
                      for net in (teacher, student))
    assert not torch.equal(last_s.weight, last_t.weight[:, :last_s.in_features])
    again = student_of(teacher, ratio, example_input=x).eval()
    assert all(torch.equal(a, b) for a, b in
               zip(student.state_dict().values(), again.state_dict().values(), strict=True))
    nc.save(student, tmp_path / "s.nnc")
    loaded = nc.load(tmp_path / "s.nnc", skeleton=make()).eval()
    with torch.no_grad():
        torch.testing.assert_close(_call(loaded, x), out)


def test_a_larger_ratio_never_gives_a_larger_student() -> None:
    teacher, x = TextEncoder().eval(), _text_batch()
    sizes = [_params(student_of(teacher, r, example_input=x)) for r in (1.5, 2.0, 4.0)]
    assert sizes[0] > sizes[1] > sizes[2]


@pytest.mark.parametrize(("model", "kwargs", "words"), [
    (_mlp(), {}, "give example_input"),
    (_mlp(), {"kind": "mobilenet", "example_input": torch.randn(2, 1, 12)},
     "student kind 'mobilenet' needs one of the reference models"),
    (_mlp(), {"kind": "tiny", "example_input": torch.randn(2, 1, 12)},
     "unknown student kind 'tiny'"),
    (nn.Linear(12, 3), {"example_input": torch.randn(2, 12)},
     "finds no channel group it can narrow"),
    (_mlp(), {"size_ratio": 400.0, "example_input": torch.randn(2, 1, 12)},
     "narrowest width student (one unit per group) has"),
])
def test_refusals_are_one_line_and_name_the_problem(model: nn.Module, kwargs: dict[str, Any],
                                                    words: str) -> None:
    ratio = kwargs.pop("size_ratio", 4.0)
    with pytest.raises(ModelError) as info:
        student_of(model, ratio, **kwargs)
    text = str(info.value)
    assert words in text and "\n" not in text


def test_kd_student_and_a_ta_chain_on_a_users_sequential() -> None:
    """The technique traces the user model on a batch of the data; the chain's sizes
    strictly decrease; training moves the student off chance."""
    torch.manual_seed(0)
    data = tiny_data(n=192)
    teacher = _mlp()
    nc.fit(teacher, data, epochs=15, lr=1e-2, progress=False)
    recipe = Recipe("kd", (Stage.technique("kd_student", size_ratio=3.0, epochs=15,
                                           lr=1e-2),))
    result = nc.compress(teacher, recipe, data, progress=False, measure_latency=False)
    assert isinstance(result.model, nn.Sequential)
    assert _params(result.model) < _params(teacher) / 2.5
    assert result.final.accuracy > 0.6
    assert any("kd_student: Sequential student of" in line for line in result.log)
    chain = takd(teacher, data, size_ratio=6.0, assistants=1, epochs=2, progress=False)
    sizes = [chain.teacher_params, *(link.params for link in chain.links)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
