"""The vocabulary context head (issue 31's zero-click parse): trained on cached features, it learns
what the features say, and the checkpoint it makes computes the slots exactly as before."""
import numpy as np
import torch

from ihp_backend.core.checkpoint import Binding, make_checkpoint, network_of
from ihp_backend.core.network import NetConfig, VocabContext, build_network
from ihp_backend.core.vocabulary import VOCABULARY, lookup
from model_training.pose_labels import LABEL_SPACES
from model_training.train_vocab_context import held_out_miou, space_classes, train_head, with_head


def synthetic_cache(n=24, c=16, seed=0):
    """Stride-16 features whose first channels say, per 4x4 block, which of three LIP-20 names a
    pixel is; the frozen head's vocabulary logits are zero (knows nothing)."""
    rng = np.random.default_rng(seed)
    names = ["Hair", "Face", "Pants"]
    chans = [lookup(["Hair", "Face", "Pants"])[m] for m in names]
    cls = rng.integers(0, 3, (n, 4, 3))
    high = rng.normal(0, 0.3, (n, c, 4, 3)).astype(np.float32)
    for k in range(3):
        high[:, k] += 2.0 * (cls == k)
    t_lip = np.asarray(chans)[cls].repeat(4, 1).repeat(4, 2)  # the block's name at stride 4
    targets = np.full((n, len(LABEL_SPACES), 16, 12), -1, np.int64)
    targets[:, LABEL_SPACES.index("lip20")] = t_lip
    vocab = np.zeros((n, len(VOCABULARY), 16, 12), np.float32)
    return torch.from_numpy(high), torch.from_numpy(vocab), torch.from_numpy(targets)


def test_the_context_head_learns_the_names_its_features_hold():
    torch.manual_seed(0)
    high, vocab, targets = synthetic_cache()
    head = VocabContext(high.shape[1], 8, len(VOCABULARY))
    lip = np.array(sorted(lookup(space_classes("lip20")).values()))
    li = LABEL_SPACES.index("lip20")
    before, _ = held_out_miou(head, high[:6], vocab[:6], targets[:6, li], lip)
    log = train_head(head, high, vocab, targets, VOCABULARY, np.arange(6, 24), np.arange(6), epochs=40,
                     lr=1e-2, batch=6, balance=0.0)
    assert log[-1]["loss"] < log[0]["loss"]
    assert before < 0.2 and log[-1]["held_out_lip20_miou"] > 0.9


def base_checkpoint(weights_dtype: str) -> tuple[NetConfig, dict]:
    """A small network with the vocabulary head and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    cfg = NetConfig(num_slots=6, aspp_channels=16, decoder_channels=16, unclaimed=True, vocab_size=len(VOCABULARY))
    base = build_network(cfg)
    with torch.no_grad():
        base(torch.randn(2, cfg.in_channels, 64, 48))
    base.eval()
    return cfg, make_checkpoint(base, Binding("shuffled", 6, ["background", "part"], vocabulary=VOCABULARY), 64,
                                [0.5] * 3, [0.25] * 3, "base", {"weights_dtype": weights_dtype})


def test_a_network_given_the_head_keeps_its_slots_and_stores_float16():
    cfg, ck = base_checkpoint("float16")
    head = VocabContext(960, 8, len(VOCABULARY))
    torch.nn.init.normal_(head.out.weight)
    new = with_head(ck, head.eval(), 8, "base+context", {"epochs": 0})
    assert new["net"]["vocab_context"] == 8 and new["model_version"] == "base+context"
    assert {v.dtype for k, v in new["state_dict"].items() if k.startswith("vocab_context.")} >= {torch.float16}
    a, b = network_of(ck).eval(), network_of(new).eval()
    x = torch.randn(1, cfg.in_channels, 64, 48)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    v = cfg.vocab_start
    assert torch.allclose(ya[:, :v], yb[:, :v], atol=1e-3)  # float16 storage of the same weights
    assert (ya[:, v:] - yb[:, v:]).abs().amax() > 1e-3


def test_the_parser_runs_the_context_head_for_the_parse_without_clicks_only(tmp_path):
    """A clicked parse is the base network's, bit for bit; the click-free one has the head's say."""
    from ihp_backend.core.checkpoint import save_checkpoint
    from ihp_backend.core.inference import Parser
    cfg, ck = base_checkpoint("float32")
    head = VocabContext(960, 8, len(VOCABULARY))
    torch.nn.init.normal_(head.out.weight)
    torch.nn.init.normal_(head.out.bias)
    paths = {"base": tmp_path / "base.pt", "ctx": tmp_path / "ctx.pt"}
    save_checkpoint(ck, str(paths["base"]))
    save_checkpoint(with_head(ck, head.eval(), 8, "ctx", {}), str(paths["ctx"]))
    a, b = (Parser.from_file(str(paths[k]), precision="float32", aspp_rank=0) for k in ("base", "ctx"))
    img = (np.random.default_rng(1).random((64, 48, 3)) * 255).astype(np.uint8)
    clicks = np.array([[20.0, 20.0, 1]])
    assert torch.equal(a.logits(img, clicks), b.logits(img, clicks))
    za, zb = a.logits(img, []), b.logits(img, [])
    v = cfg.vocab_start
    assert torch.equal(za[:v], zb[:v]) and (za[v:] - zb[v:]).abs().amax() > 1e-3


def parses_alike(given: dict, new: dict, tmp_path):
    """Parsers of two checkpoints, asserted to give the same logits without clicks (to float
    precision) and bit for bit with one; returns them with the photo and clicks used."""
    from ihp_backend.core.checkpoint import save_checkpoint
    from ihp_backend.core.inference import Parser
    save_checkpoint(given, str(tmp_path / "a.pt"))
    save_checkpoint(new, str(tmp_path / "b.pt"))
    a, b = (Parser.from_file(str(tmp_path / k), precision="float32", aspp_rank=0) for k in ("a.pt", "b.pt"))
    img = (np.random.default_rng(1).random((64, 48, 3)) * 255).astype(np.uint8)
    assert torch.allclose(a.logits(img, []), b.logits(img, []), atol=1e-5)
    clicks = np.array([[20.0, 20.0, 1]])
    assert torch.equal(a.logits(img, clicks), b.logits(img, clicks))
    return a, b, img, clicks


def test_a_head_with_its_own_backbone_blocks_starts_as_the_head_it_was_given(tmp_path):
    """``--blocks N``: the head's copy of the backbone's last blocks starts as the trained ones and
    its layers as a given head's, so the new checkpoint parses as that one does until training
    moves them; a clicked parse never runs the copy."""
    from ihp_backend.core.checkpoint import save_checkpoint
    from ihp_backend.core.inference import Parser
    from model_training.train_vocab_context import context_head
    cfg, ck = base_checkpoint("float32")
    head = VocabContext(960, 8, len(VOCABULARY))
    torch.nn.init.normal_(head.out.weight)
    given = with_head(ck, head.eval(), 8, "ctx", {})
    blocks = context_head(ck, 8, 3, init=given)
    assert len(blocks.blocks) == 3
    new = with_head(ck, blocks.eval(), 8, "ctx-blocks", {})
    assert new["net"]["vocab_context_blocks"] == 3
    _, b, img, clicks = parses_alike(given, new, tmp_path)
    # trained, the copy moves and the backbone's own blocks do not
    with torch.no_grad():
        for p in blocks.blocks.parameters():
            p.add_(0.05)
    moved = with_head(ck, blocks.eval(), 8, "moved", {})
    assert all(torch.equal(moved["state_dict"][k], new["state_dict"][k]) for k in new["state_dict"]
               if k.startswith("encoder."))
    save_checkpoint(moved, str(tmp_path / "c.pt"))
    c = Parser.from_file(str(tmp_path / "c.pt"), precision="float32", aspp_rank=0)
    assert (c.logits(img, [])[cfg.vocab_start:] - b.logits(img, [])[cfg.vocab_start:]).abs().amax() > 1e-3
    assert torch.equal(c.logits(img, clicks), b.logits(img, clicks))


def test_a_pooling_head_starts_as_the_head_it_was_given_and_sees_the_whole_photo(tmp_path):
    """``--pool 1 2 4``: the head widened with pyramid pooling computes what the given head did
    until training moves it (the pooled features enter through zero weights); its checkpoint
    stores the bins and serves them; and once trained, a pixel's logits depend on the photo far
    from it, which a 3x3 head on stride-16 features cannot."""
    from ihp_backend.core.checkpoint import read_checkpoint
    from model_training.train_vocab_context import context_head
    cfg, ck = base_checkpoint("float32")
    head = VocabContext(960, 8, len(VOCABULARY))
    torch.nn.init.normal_(head.out.weight)
    given = with_head(ck, head.eval(), 8, "ctx", {})
    pooled = context_head(ck, 8, 0, init=given, pool=(1, 2))
    assert len(pooled.pool) == 2
    new = with_head(ck, pooled.eval(), 8, "ctx-pool", {})
    parses_alike(given, new, tmp_path)
    assert tuple(read_checkpoint(str(tmp_path / "b.pt"))["net"]["vocab_context_pool"]) == (1, 2)
    # moved off zero, the pooled path makes the top-left logits depend on the bottom-right
    with torch.no_grad():
        torch.nn.init.normal_(pooled.context[0].weight)
    pooled.eval()
    x = torch.randn(1, 960, 8, 6)
    y = x.clone()
    y[..., 5:, 4:] += 3.0
    with torch.no_grad():
        assert (pooled(x)[..., 0, 0] - pooled(y)[..., 0, 0]).abs().amax() > 1e-4
        assert torch.equal(head.eval()(x)[..., 0, 0], head(y)[..., 0, 0])


def test_parts_nobody_clicked_are_filled_by_the_click_free_parse(tmp_path):
    """``IHP_FILL_KNOWN``: with a context head, the unclicked known parts of a clicked parse take
    the meaning the parse without clicks gave them (computed once per photo), the same whether
    that parse came first or not; ``click_free_fill=False`` keeps the clicked forward's."""
    from ihp_backend.core.checkpoint import save_checkpoint
    from ihp_backend.core.inference import Parser
    cfg, ck = base_checkpoint("float32")
    head = VocabContext(960, 8, len(VOCABULARY))
    known = lookup(["Hair", "Face", "Pants"])
    with torch.no_grad():
        head.out.bias[known["Face"]] = 100.0  # the click-free parse sees Face everywhere
    save_checkpoint(with_head(ck, head.eval(), 8, "ctx", {}), str(tmp_path / "ctx.pt"))
    make = lambda: Parser.from_file(str(tmp_path / "ctx.pt"), precision="float32", aspp_rank=0, unclaimed_bias=20.0)
    v = cfg.vocab_start
    fill = {v + known["Hair"]: v + known["Hair"], v + known["Face"]: v + known["Face"],
            v + known["Pants"]: v + known["Pants"]}
    img = (np.random.default_rng(2).random((64, 48, 3)) * 255).astype(np.uint8)
    clicks = np.array([[20.0, 20.0, 1]])
    allowed = [0, 1, cfg.unclaimed_channel]
    first = make()
    first.parse(img, [], allowed_slots=sorted(fill))  # the zero-click parse, then a click
    after_zero = first.parse(img, clicks, allowed_slots=allowed, fill=fill, zoom=False).labels
    alone = make().parse(img, clicks, allowed_slots=allowed, fill=fill, zoom=False).labels
    own = make().parse(img, clicks, allowed_slots=allowed, fill=fill, zoom=False, click_free_fill=False).labels
    assert np.array_equal(after_zero, alone)
    assert (alone == v + known["Face"]).mean() > 0.5  # the unclaimed pixels went to the click-free meaning
    assert (own == v + known["Face"]).mean() < 0.5


def synthetic_spaces(tmp_path, n=6):
    """``n`` photos (80 x 56) of a figure whose left half is "Left-arm" and right half "Right-arm"
    in LIP-20 / CIHP-20 (upper-arms in PASCAL-Person-Part, skin in ccp12), each space a
    ``ParsingDataset`` as ``pose_labels.ccp_parts`` gives them."""
    from PIL import Image
    from model_training.parsing_dataset import ParsingDataset
    from model_training.pose_labels import SPACE_FLIP
    rng = np.random.default_rng(0)
    spaces = {}
    for s in LABEL_SPACES:
        classes = space_classes(s)
        left = {"ppp": "upper-arms", "ccp12": classes[1]}.get(s, "Left-arm")
        right = {"ppp": "upper-arms", "ccp12": classes[1]}.get(s, "Right-arm")
        items = []
        for i in range(n):
            lab = np.zeros((80, 56), np.uint8)
            lab[20:60, 10:28] = classes.index(right)  # the person's right arm is on the viewer's left
            lab[20:60, 28:46] = classes.index(left)
            img = (rng.random((80, 56, 3)) * 60).astype(np.uint8)
            img[lab > 0] += 150
            d = tmp_path / s
            d.mkdir(exist_ok=True)
            Image.fromarray(img).save(d / f"{i}.jpg")
            Image.fromarray(lab).save(d / f"{i}.png")
            items.append((str(i), str(d / f"{i}.jpg"), str(d / f"{i}.png")))
        spaces[s] = ParsingDataset(f"ccp-{s}", items, list(classes), list(SPACE_FLIP[s]))
    return spaces


def test_a_live_view_moves_every_label_space_alike_and_a_flip_swaps_left_and_right(tmp_path):
    from model_training.train_vocab_context import augmented_view, view_config
    spaces = synthetic_spaces(tmp_path, 1)
    image, _ = spaces["lip20"].load(0)
    labels = {s: ds.load(0)[1] for s, ds in spaces.items()}
    luts = {s: ds.flip_lut() for s, ds in spaces.items()}
    lip = space_classes("lip20")
    identity = {s: np.arange(256, dtype=np.uint8) for s in spaces}

    def right_arm_on_viewers_left(luts) -> list[bool]:
        sides = []
        for seed in range(12):
            view, out = augmented_view(image, labels, luts, view_config(64), seed, 64)
            assert view.shape[:2] == out["lip20"].shape == out["ppp"].shape == (64, 42)
            person = [(out[s] > 0) & (out[s] < 255) for s in LABEL_SPACES]
            assert all(np.array_equal(person[0], p) for p in person[1:])  # one crop, zoom, flip for all
            right = np.nonzero(out["lip20"] == lip.index("Right-arm"))[1]
            left = np.nonzero(out["lip20"] == lip.index("Left-arm"))[1]
            if len(right) and len(left):
                sides.append(bool(right.mean() < left.mean()))
        return sides

    # the person's right arm stays on the viewer's left in every view, mirrored or not ...
    assert all(right_arm_on_viewers_left(luts))
    # ... because mirrored views swap the names: without the swap some views have it the other way
    assert not all(right_arm_on_viewers_left(identity))


def test_live_training_moves_the_head_and_its_blocks_and_resumes(tmp_path, monkeypatch):
    """``--live-steps``: the head and its copied blocks learn on views drawn afresh, the backbone
    itself never moves, the state is saved every ``every`` steps, and a run stopped midway
    resumes from its last save instead of starting over."""
    from ihp_backend.core.checkpoint import save_checkpoint
    from ihp_backend.core.inference import Parser
    import model_training.train_vocab_context as tvc
    cfg, ck = base_checkpoint("float32")
    ck["input_size"] = 64
    save_checkpoint(ck, str(tmp_path / "base.pt"))
    parser = Parser.from_file(str(tmp_path / "base.pt"), precision="float32", aspp_rank=0, zoom=False)
    frozen = {k: v.clone() for k, v in parser.net.state_dict().items()}
    spaces = synthetic_spaces(tmp_path, 6)
    head = tvc.context_head(ck, 8, 2)
    start = {k: v.clone() for k, v in head.state_dict().items()}
    state = str(tmp_path / "head.state")
    calls, real_loss = [], tvc.head_loss

    def stopped_at_the_third_step(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kw)

    monkeypatch.setattr(tvc, "head_loss", stopped_at_the_third_step)
    try:
        tvc.train_head_live(head, parser, spaces, np.arange(2, 6), np.arange(2), steps=4, lr=1e-2, batch=2,
                            blocks_lr=1e-2, state_path=state, every=1)
    except KeyboardInterrupt:
        pass
    assert torch.load(state, weights_only=False)["step"] == 2
    monkeypatch.setattr(tvc, "head_loss", real_loss)
    again = tvc.context_head(ck, 8, 2)
    log = tvc.train_head_live(again, parser, spaces, np.arange(2, 6), np.arange(2), steps=4, lr=1e-2, batch=2,
                              blocks_lr=1e-2, state_path=state, every=1)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(0 <= r["held_out_lip20_miou"] <= 1 for r in log)
    moved = again.state_dict()
    blocks = [k for k in start if k.startswith("blocks.") and k.endswith(".weight")]
    assert blocks and not torch.equal(moved[blocks[0]], start[blocks[0]])
    assert not torch.equal(moved["out.weight"], start["out.weight"])
    assert all(torch.equal(v, frozen[k]) for k, v in parser.net.state_dict().items())
