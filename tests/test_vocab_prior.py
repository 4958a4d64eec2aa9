"""The vocabulary head's prior on clicked parts (IHP_VOCAB_PRIOR), the unclaimed probability shared
out by meaning (IHP_VOCAB_SHARE) and the vocabulary branch."""
import numpy as np
import torch

from ihp_backend.core.checkpoint import Binding
from ihp_backend.core.inference import with_vocabulary_prior, with_vocabulary_share
from ihp_backend.core.label_rules import prior_channels
from ihp_backend.core.network import NetConfig, build_network, load_widening
from ihp_backend.core.vocabulary import VOCABULARY

V0 = 25  # vocab_start of a 24-slot network with the unclaimed channel
UNCLAIMED = 24
B = Binding("shuffled", 24, vocabulary=VOCABULARY)


def vch(name):
    return V0 + VOCABULARY.index(name)


def test_prior_channels_known_config():
    labels = ["Background", "Hair", "Face", "Pants"]
    to_slot = B.bind(labels)  # Background 0, Hair 1, Face 2, Pants 3
    prior = prior_channels(B, V0, labels, to_slot, np.array([1]), UNCLAIMED)
    # background, the clicked Hair, and the unclaimed channel standing for the unclicked parts
    assert prior == {0: [vch("Background")], 1: [vch("Hair")], UNCLAIMED: [vch("Face"), vch("Pants")]}
    everything = prior_channels(B, V0, labels, to_slot, np.array([1, 2, 3]), UNCLAIMED)
    assert everything[UNCLAIMED] == [] and everything[3] == [vch("Pants")]


def test_prior_channels_unknown_or_mixed_config_gives_no_prior():
    assert prior_channels(B, V0, ["bg", "Widget"], B.bind(["bg", "Widget"]), np.array([1]), UNCLAIMED) == {}
    mixed = ["Background", "Hair", "Widget"]
    assert prior_channels(B, V0, mixed, B.bind(mixed), np.array([1]), UNCLAIMED) == {}
    assert prior_channels(Binding("shuffled", 24), V0, ["Hair"], {"Hair": 1}, np.array([1]), UNCLAIMED) == {}


def test_prior_moves_an_ambiguous_pixel_to_the_class_the_head_sees():
    # two slots tie on the clicks' evidence everywhere; the head says "Hair" on the left, "Face" on the right
    out = V0 + len(VOCABULARY)
    logits = torch.zeros(out, 2, 2)
    logits[vch("Hair"), :, 0] = 4.0
    logits[vch("Face"), :, 1] = 4.0
    slots = np.array([1, 2])
    prior = {1: [vch("Hair")], 2: [vch("Face")]}
    sub = logits[torch.as_tensor(slots)]
    fused = with_vocabulary_prior(sub, slots, logits, prior, weight=1.0)
    assert fused.argmax(0).tolist() == [[0, 1], [0, 1]]
    assert torch.equal(with_vocabulary_prior(sub, slots, logits, prior, weight=0.0), sub)
    # a channel without prior is unchanged; a strong click is never vetoed (probability floor)
    slots3 = np.array([1, 2, 3])
    strong = logits[torch.as_tensor(slots3)].clone()
    strong[1] += 20.0  # slot 2 (Face) everywhere, also where the head sees Hair
    fused = with_vocabulary_prior(strong, slots3, logits, prior, weight=1.0)
    assert torch.equal(fused[2], strong[2]) and fused.argmax(0).eq(1).all()


def test_vocab_branch_starts_silent_from_a_trained_network():
    cfg = NetConfig(num_slots=6, aspp_channels=16, decoder_channels=16, low_level_channels=8,
                    prev_mask=True, unclaimed=True, vocab_size=5)
    old = build_network(cfg).eval()
    wide = build_network(NetConfig(**{**cfg.to_dict(), "vocab_branch": 8})).eval()
    widened = load_widening(wide, old.state_dict())
    assert any(k.startswith("vocab_branch.") for k in widened)
    x = torch.randn(1, cfg.in_channels, 64, 48)
    with torch.no_grad():
        a, b = old(x, features=True)[0], wide(x, features=True)[0]
    assert torch.equal(a, b)
    with torch.no_grad():  # the branch adds to the vocabulary logits only
        wide.vocab_branch[-1].bias.fill_(1.0)
        c = wide(x, features=True)[0]
    assert torch.equal(c[:, :cfg.vocab_start], a[:, :cfg.vocab_start])
    assert torch.allclose(c[:, cfg.vocab_start:], a[:, cfg.vocab_start:] + 1.0)


def test_train_only_freezes_the_trunk_and_its_batchnorm_statistics():
    from model_training.train import freeze_except
    cfg = NetConfig(num_slots=6, aspp_channels=16, decoder_channels=16, low_level_channels=8,
                    unclaimed=True, vocab_size=5, vocab_branch=8)
    net = build_network(cfg)
    net.train()
    params = freeze_except(net, ["vocab_branch"])
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("vocab_branch.") for n in names)
    assert len(params) == len(names)
    assert not net.decoder.training and not net.encoder.training and net.vocab_branch.training
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("vocab_branch.")}
    x = torch.randn(2, cfg.in_channels, 64, 48)
    out, _ = net(x, features=True)
    out[:, cfg.vocab_start:].sum().backward()
    torch.optim.SGD(params, lr=0.1).step()
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # weights and running statistics
    assert net.vocab_branch[-1].weight.abs().sum() > 0


def test_share_gives_unclaimed_pixels_to_the_clicked_label_the_head_sees_there():
    # one Skin click (slot 1) on the face (column 0); the slots call the arm (column 1) and the
    # background (column 2) "unclaimed"; the head sees Skin on the face and the arm, Background
    # on the right, Hair nowhere. Shared out: the arm goes to the clicked Skin, the background
    # pixel stays unlabelled (background), an unclicked Hair keeps its share on the unclaimed channel.
    out = V0 + len(VOCABULARY)
    logits = torch.zeros(out, 1, 3)
    slots = np.array([0, 1, UNCLAIMED])
    logits[1, 0, 0] = 6.0
    logits[UNCLAIMED, 0, 1:] = 6.0
    logits[vch("Skin"), 0, :2] = 6.0
    logits[vch("Background"), 0, 2] = 6.0
    prior = {0: [vch("Background")], 1: [vch("Skin")], UNCLAIMED: [vch("Hair")]}
    sub = logits[torch.as_tensor(slots)]
    assert sub.argmax(0).tolist() == [[1, 2, 2]]
    shared = with_vocabulary_share(sub, slots, logits, prior, UNCLAIMED)
    assert shared.argmax(0).tolist() == [[1, 1, 0]]
    # log-probabilities that still sum to one; the clicked channel only gains
    assert torch.allclose(shared.exp().sum(0), torch.ones(1, 3), atol=1e-5)
    assert (shared[1] >= torch.log_softmax(sub, 0)[1] - 1e-6).all()
    # no unclaimed channel among the outputs, or no known names: unchanged
    assert torch.equal(with_vocabulary_share(sub[:2], slots[:2], logits, prior, UNCLAIMED), sub[:2])
    assert torch.equal(with_vocabulary_share(sub, slots, logits, {}, UNCLAIMED), sub)
