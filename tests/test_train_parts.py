import os

import torch

from prism.train import EMA, list_checkpoints, step_generator


def test_ema_warmup_and_decay_hand_computed():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = EMA(model, decay=0.9)
    values = [1.0, 2.0, 3.0]
    expected = 0.0
    for n, v in enumerate(values):
        torch.nn.init.constant_(model.weight, v)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))  # 0.1, 0.1818..., 0.25
        expected = d * expected + (1 - d) * v
    assert abs(ema.shadow["weight"].item() - expected) < 1e-6
    # long after the warm-up, the nominal decay applies
    ema.updates = 10_000
    assert ema.current_decay() == 0.9


def test_step_generator_is_a_pure_function_of_its_key():
    a = torch.rand(4, generator=step_generator(0, 5, 1))
    assert torch.equal(a, torch.rand(4, generator=step_generator(0, 5, 1)))
    for other in (step_generator(1, 5, 1), step_generator(0, 6, 1), step_generator(0, 5, 0), step_generator(0, 5, 1, domain=1)):
        assert not torch.equal(a, torch.rand(4, generator=other))


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step_00000002", True), ("step_00000010", True), ("step_00000011", False), (".tmp-step_00000012", True)]:
        os.makedirs(root / name)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_00000002", "step_00000010"]
