"""Checkpoint averaging ("model soup") used by model_training.release: pure state-dict maths."""
import pytest
import torch

from ihp_backend.core.checkpoint import Binding, make_checkpoint, read_checkpoint, save_checkpoint
from model_training.release import averaged_state, release


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g),
            "bn.running_mean": torch.randn(4, generator=g),
            "bn.num_batches_tracked": torch.tensor(seed),
            "half.weight": torch.randn(5, generator=g).half()}


def test_averaged_state_is_the_elementwise_mean_and_keeps_dtypes():
    a, b, c = _state(1), _state(2), _state(3)
    avg = averaged_state([a, b, c])
    assert torch.allclose(avg["conv.weight"], (a["conv.weight"] + b["conv.weight"] + c["conv.weight"]) / 3)
    assert avg["bn.num_batches_tracked"].item() == 1  # integer buffers come from the first state
    assert avg["half.weight"].dtype == torch.float16
    assert torch.allclose(avg["half.weight"].float(),
                          (a["half.weight"].float() + b["half.weight"].float() + c["half.weight"].float()) / 3,
                          atol=1e-3)
    assert torch.equal(averaged_state([a])["conv.weight"], a["conv.weight"])


def test_averaged_state_refuses_mismatched_networks():
    a, b = _state(1), _state(2)
    with pytest.raises(ValueError, match="different parameters"):
        averaged_state([a, {k: v for k, v in b.items() if k != "bn.running_mean"}])
    with pytest.raises(ValueError, match="shape"):
        averaged_state([a, {**b, "conv.weight": torch.zeros(4, 3, 5, 5)}])
    with pytest.raises(ValueError, match="nothing"):
        averaged_state([])


def test_release_averages_several_checkpoints(tmp_path):
    from ihp_backend.core.network import IHPNet, NetConfig
    cfg = NetConfig(num_slots=4, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        ck = make_checkpoint(IHPNet(cfg), Binding("shuffled", 4), 64, [0.5] * 3, [0.25] * 3,
                             f"c{seed}", {"step": seed})
        paths.append(str(tmp_path / f"c{seed}.pt"))
        save_checkpoint(ck, paths[-1])
    out = str(tmp_path / "avg.pt")
    release(paths, out, "avg-1", recalibrate=0, half=False)
    got = read_checkpoint(out)
    s1, s2 = (read_checkpoint(p)["state_dict"] for p in paths)
    key = next(k for k, v in s1.items() if v.is_floating_point() and not torch.equal(v, s2[k]))
    assert torch.allclose(got["state_dict"][key], (s1[key] + s2[key]) / 2)
    assert got["training"]["averaged_from"] == [f"{tmp_path.name}/c1.pt", f"{tmp_path.name}/c2.pt"]
    other = {**read_checkpoint(paths[1]), "binding": "fixed"}
    save_checkpoint(other, paths[1])
    with pytest.raises(ValueError, match="different network or binding"):
        release(paths, out, "avg-2", recalibrate=0)
