"""Modern recipes: published values, the warm-up + cosine schedule, AdamW's groups, the EMA,
gradient accumulation, and a bit-exact resume of a run that uses all of them."""

from __future__ import annotations

import math

import pytest
import torch
from support import SignalAt  # a loader that sends SIGINT at a chosen batch
from torch import nn

from densenets import create_model
from densenets.cli import main
from densenets.training.checkpoint import load_checkpoint
from densenets.training.data import TensorLoader, load_digits_data
from densenets.training.loop import Trainer
from densenets.training.mixing import BatchMix
from densenets.training.optim import UpdateRules, build_ema, build_optimizer
from densenets.training.recipes import resolve
from densenets.training.schedule import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rdnet_recipe_has_the_published_values_and_picks_drop_path_by_size():
    c = resolve("imagenet-rdnet")
    assert (c.optimizer, c.lr, c.weight_decay, c.epochs, c.schedule) == \
        ("adamw", 1e-3, 0.05, 300, "cosine")
    assert (c.warmup_epochs, c.warmup_lr, c.min_lr) == (20, 1e-4, 1e-6)
    assert (c.mixup, c.cutmix, c.label_smoothing, c.random_erasing, c.color_jitter) == \
        (0.8, 1.0, 0.1, 0.25, 0.4)
    assert c.auto_augment == "rand-m9-n2" and not c.decay_norm_bias
    sizes = {m: resolve("imagenet-rdnet", model=m).drop_path
             for m in ("rdnet_tiny", "rdnet_small", "rdnet_base", "rdnet_large")}
    assert sizes == {"rdnet_tiny": 0.15, "rdnet_small": 0.35, "rdnet_base": 0.4,
                     "rdnet_large": 0.5}
    assert resolve("imagenet-rdnet", drop_path=0.2).drop_path == 0.2  # a flag wins


def test_modern_imagenet_recipe_and_paper_recipes_keep_their_values():
    m = resolve("imagenet-modern")
    assert (m.optimizer, m.lr, m.momentum, m.nesterov, m.weight_decay) == \
        ("sgd", 0.5, 0.9, False, 2e-5)
    assert (m.epochs, m.batch_size, m.warmup_epochs, m.warmup_lr) == (600, 1024, 5, 0.005)
    assert (m.label_smoothing, m.mixup, m.cutmix, m.auto_augment, m.random_erasing) == \
        (0.1, 0.2, 1.0, "trivial", 0.1)
    assert m.ema_decay and m.resize == 232 and m.drop_path == 0.0
    for name in ("digits", "cifar10+", "imagenet"):  # the paper's recipes: nothing modern on
        p = resolve(name)
        assert (p.optimizer, p.schedule, p.warmup_epochs, p.label_smoothing, p.mixup,
                p.ema_decay, p.accum_steps, p.decay_norm_bias) == \
            ("sgd", "step", 0.0, 0.0, 0.0, 0.0, 1, True)


@pytest.mark.parametrize("bad,match", [
    (dict(optimizer="adam"), "--optimizer"), (dict(schedule="poly"), "--schedule"),
    (dict(warmup_epochs=40, epochs=30), "--warmup-epochs"),
    (dict(label_smoothing=1.0), r"\[0, 1\)"),
    (dict(accum_steps=0), "--accum-steps"), (dict(min_lr=1.0), "--min-lr"),
    (dict(auto_augment="rand-m9-mstd0.5"), "not supported"), (dict(mixup_prob=2), "probability"),
])
def test_bad_modern_values_are_refused_with_the_flag_named(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve("digits-modern", **bad)


def test_warmup_then_cosine_matches_the_closed_form_and_torch_schedulers():
    lr, floor, start, epochs, per_epoch, warm = 1e-3, 1e-6, 1e-4, 10, 7, 2
    s = Schedule(lr, kind="cosine", epochs=epochs, warmup_epochs=warm, warmup_lr=start,
                 min_lr=floor)
    total, w = epochs * per_epoch, warm * per_epoch

    def closed(t: int) -> float:
        if t < w:
            return start + (lr - start) * t / w
        return floor + (lr - floor) * (1 + math.cos(math.pi * (t - w) / (total - w))) / 2

    for t in (0, 1, 7, 13, 14, 15, 40, 69):
        assert s.lr_at(t // per_epoch, t % per_epoch, per_epoch) == pytest.approx(closed(t),
                                                                                    rel=1e-12)
    assert s.lr_at(0, 0, per_epoch) == start and s.lr_at(2, 0, per_epoch) == lr
    # the same rates as torch's LinearLR followed by CosineAnnealingLR, stepped per update
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start / lr, 1.0, total_iters=w),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - w, eta_min=floor)], [w])
    for t in range(total):
        assert s.lr_at(t // per_epoch, t % per_epoch, per_epoch) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), t
        opt.step()
        sched.step()


def test_step_schedule_is_the_papers_per_epoch_rate_with_or_without_warmup():
    s = Schedule(0.1, [150, 225])
    assert not s.per_step()
    assert [s.lr_at(e, 5, 10) for e in (0, 149, 150, 225)] == \
        [0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1 ** 2]
    w = Schedule(0.1, [3], warmup_epochs=1, warmup_lr=0.0)
    assert w.per_step() and w.lr_at(0, 5, 10) == pytest.approx(0.05) and w.lr_at(3, 0, 10) \
        == pytest.approx(0.01)


def test_adamw_exempts_norm_weights_and_biases_from_weight_decay():
    model = create_model("densenet-bc-16-k4", num_classes=10)
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, decay_norm_bias=False)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    ids = {id(p) for p in exempt["params"]}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(id(m.weight) in ids and id(m.bias) in ids for m in norms)
    assert id(model.classifier.bias) in ids and id(model.classifier.weight) not in ids
    assert all(p.ndim > 1 for p in decayed["params"])
    both = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4)  # the paper: every parameter
    assert len(both.param_groups) == 1 and both.param_groups[0]["weight_decay"] == 1e-4


def _digits_trainer(run_dir, epochs=2, batch=64, rules=None, interrupt=None, **kw) -> Trainer:
    torch.manual_seed(0)
    model = kw.pop("model", None) or create_model("densenet-bc-16-k4", in_channels=1)
    train, test = load_digits_data()
    loader = TensorLoader(train, batch, [0.3], [0.4], shuffle=True, seed=5)
    if interrupt:
        loader = SignalAt(loader, *interrupt)
    sched = kw.pop("schedule", None) or Schedule(2e-3, kind="cosine", epochs=epochs,
                                                 warmup_epochs=0.5, warmup_lr=1e-4,
                                                 min_lr=1e-5)
    return Trainer(model, loader, {"test": TensorLoader(test, 500, [0.3], [0.4])},
                   epochs=epochs, schedule=sched, run_dir=run_dir, progress=False,
                   log=lambda s: None, rules=rules or UpdateRules(), **kw)


def test_ema_equals_a_hand_computation_after_three_updates(tmp_path):
    decay = 0.9
    t = _digits_trainer(tmp_path, epochs=1, batch=480, rules=UpdateRules(ema_decay=decay),
                        optimizer="adamw")
    weights = [{k: v.clone() for k, v in t.model.state_dict().items()}]
    t.optimizer.register_step_post_hook(lambda *_: weights.append(
        {k: v.clone() for k, v in t.model.state_dict().items()}))
    t.fit()
    assert t.step == len(weights) - 1 == 3  # 1,437 images in batches of 480
    ema = t.ema.module.state_dict()
    for name, _ in t.model.named_parameters():
        w0, w1, w2, w3 = (w[name] for w in weights)
        hand = decay ** 3 * w0 + (1 - decay) * (decay ** 2 * w1 + decay * w2 + w3)
        torch.testing.assert_close(ema[name], hand, rtol=1e-5, atol=1e-7)
    assert not torch.equal(ema["classifier.weight"], t.model.classifier.weight)
    row = t.history[-1]
    assert {"test_ema_top1_err", "test_ema_loss", "test_top1_err"} <= row.keys()


def test_build_ema_is_off_at_zero_decay():
    assert build_ema(nn.Linear(2, 2), 0.0) is None


def test_accumulated_batches_make_the_same_update_as_one_large_batch(tmp_path):
    def linear():
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    kw = dict(epochs=1, schedule=Schedule(0.05), optimizer="sgd")
    big = _digits_trainer(tmp_path / "a", batch=128, model=linear(), **kw)
    big.fit()
    small = _digits_trainer(tmp_path / "b", batch=64, model=linear(),
                            rules=UpdateRules(accum_steps=2), **kw)
    small.fit()
    assert small.step == big.step == 12  # 23 batches of 64 -> 12 updates, the last of one batch
    for a, b in zip(big.model.parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _modern_rules() -> UpdateRules:
    return UpdateRules(label_smoothing=0.1, accum_steps=2, clip_grad=1.0, ema_decay=0.95,
                       mix=BatchMix(10, 0.4, 1.0, prob=0.8, seed=5))


def test_sigint_mid_epoch_then_resume_is_bit_identical_with_every_modern_part(tmp_path):
    kw = dict(optimizer="adamw", decay_norm_bias=False, weight_decay=0.05)
    reference = _digits_trainer(tmp_path / "ref", epochs=2, rules=_modern_rules(), **kw)
    reference.fit()
    # batch 9 of epoch 1 is the second of an accumulation pair: the stop waits for its update
    first = _digits_trainer(tmp_path / "run", epochs=2, rules=_modern_rules(),
                            interrupt=(1, 8), **kw)
    assert first.fit().status == "interrupted"
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 10, 12 + 5)
    assert state["scheduler"]["type"] == "cosine" and state["ema"]
    second = _digits_trainer(tmp_path / "run", epochs=2, rules=_modern_rules(), **kw)
    second.load_state_dict(state)
    assert second.fit().status == "completed"
    for a, b in ((reference.model, second.model), (reference.ema, second.ema)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "weights differ after resume"
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
             for r in reference.history]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
                     for r in second.history]


def test_drop_path_is_refused_for_a_densenet_and_cuda_graphs_for_modern_parts(tmp_path, capsys):
    code = main(["train", "--recipe", "digits-modern", "--drop-path", "0.1", "--epochs", "1",
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "concatenated, not added" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ema-decay"):
        Trainer(nn.Linear(2, 2), [], {}, epochs=1, schedule=Schedule(0.1), run_dir=tmp_path,
                rules=UpdateRules(ema_decay=0.9), cuda_graphs=True, device="cuda")
