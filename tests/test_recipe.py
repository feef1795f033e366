"""The training recipe's options (issue 26): each one changes what it says, is saved in config.json, and a
combination that would ignore it is refused before any work."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.transforms import v2

import repvgg
from repvgg.cli import main
from repvgg.engine.config import TrainConfig
from repvgg.engine.data import Augmentation, build_data
from repvgg.engine.distributed import DistContext
from repvgg.engine.recipe import LRSchedule, batch_mixing, build_optimizer, default_lr, parameter_groups
from repvgg.engine.training import ClassificationRun, Task, Trainer, train
from repvgg.exceptions import TrainingError
from tests.test_data import fake_fashion_mnist, make_image_folder

SMALL = {"batch_size": 32, "progress": False, "seed": 0, "epochs": 1}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=128, test=64)


def config(data_dir: Path, output: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig.from_dict({**SMALL, "data_dir": str(data_dir), "output": str(output), **overrides})


# -- optimizers and learning-rate rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opt", "kind"),
    [("sgd", "SGD"), ("adamw", "AdamW"), ("lamb", "Lamb"), ("lars", "Lars")],
)
def test_each_optimizer_is_the_one_named_and_its_lr_rule_follows_the_effective_batch(
    fashion: Path, tmp_path: Path, opt: str, kind: str
) -> None:
    run = ClassificationRun(config(fashion, tmp_path / "r", opt=opt, accum_steps=2), DistContext())
    optimizer = run.trainer.optimizer
    assert type(optimizer).__name__ == kind
    assert run.effective_batch == 64
    assert run.lr == pytest.approx(default_lr(opt, 64))
    assert "effective batch 64" in run.header() and f"{opt}'s rule" in run.header()
    decays = {group["weight_decay"] for group in optimizer.param_groups}
    assert decays == {1e-4, 0.0}, "the authors' exclusions hold for every optimizer"


def test_lr_rules_are_the_published_ones() -> None:
    assert default_lr("sgd", 256) == pytest.approx(0.1)
    assert default_lr("adamw", 1024) == pytest.approx(1e-3)  # DeiT: 5e-4 x 1024 / 512
    assert default_lr("lamb", 2048) == pytest.approx(5e-3)


def test_build_optimizer_keeps_momentum_and_nesterov() -> None:
    groups = parameter_groups(nn.Linear(3, 2), 1e-4, custom_l2=False)
    sgd = build_optimizer("sgd", groups, 0.1, momentum=0.8, nesterov=True)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"]


# -- schedules -------------------------------------------------------------------------------------------


def test_schedules_have_their_shapes() -> None:
    cosine = LRSchedule(100, 10, "cosine", min_factor=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1), "ends at min_lr"
    step = LRSchedule(90, 0, "step", step_every=30, decay_rate=0.1)
    assert [step(i) for i in (0, 29, 30, 59, 60)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    poly = LRSchedule(100, 0, "poly", power=2.0)
    assert poly(50) == pytest.approx(0.25)
    one_cycle = LRSchedule(100, 0, "onecycle")
    assert one_cycle(0) == pytest.approx(1 / 25), "starts at the peak / 25, as OneCycleLR"
    assert one_cycle(30) == pytest.approx(1.0), "peaks after 30% of the steps"
    assert one_cycle(100) == pytest.approx(1 / 25 / 1e4)
    torch_cycle = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), max_lr=1.0, total_steps=101
    )
    expected = []
    for _ in range(101):
        expected.append(torch_cycle.get_last_lr()[0])
        torch_cycle.optimizer.step()
        torch_cycle.step()
    assert [one_cycle(i) for i in range(0, 101, 10)] == pytest.approx(expected[::10], rel=0.05, abs=1e-6)


@pytest.mark.parametrize(
    ("options", "epoch_lrs"),
    [
        ({"sched": "step", "decay_epochs": 1, "decay_rate": 0.5, "lr": 0.1}, [0.1, 0.05, 0.025]),
        ({"sched": "cosine", "min_lr": 0.01, "lr": 0.1}, [0.1, 0.0775, 0.0325]),  # 0.01 + 0.09 x cosine
        ({"sched": "poly", "poly_power": 2.0, "lr": 0.1}, [0.1, 0.1 * (2 / 3) ** 2, 0.1 * (1 / 3) ** 2]),
        ({"sched": "onecycle", "lr": 0.1}, [0.1 / 25, 0.1, 0.1 * (1 + 1 / 25e4) / 2]),  # rise: 2 of 6 steps
    ],
)
def test_the_schedule_chosen_sets_each_epoch_s_learning_rate(
    fashion: Path, tmp_path: Path, options: dict[str, Any], epoch_lrs: list[float]
) -> None:
    train(config(fashion, tmp_path / "r", epochs=3, train_subset=64, val_subset=32, **options))
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx(epoch_lrs)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["sched"] == options["sched"]


# -- accumulation and clipping ---------------------------------------------------------------------------


def _linear_trainer(batches: list[Any], **options: Any) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return Trainer(
        model,
        batches,  # type: ignore[arg-type]
        Task(),
        optimizer,
        LRSchedule(10),
        epochs=1,
        channels_last=False,
        progress=False,
        **options,
    )


def test_accumulating_two_half_batches_is_one_step_of_the_whole_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 1, 3, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,), generator=generator)
    whole = _linear_trainer([(images, labels)])
    halves = _linear_trainer([(images[:4], labels[:4]), (images[4:], labels[4:])], accum_steps=2)
    assert whole.steps_per_epoch == halves.steps_per_epoch == 1
    whole.fit()
    halves.fit()
    for a, b in zip(whole.model.parameters(), halves.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_clipping_bounds_the_step_by_the_gradient_norm() -> None:
    images = torch.randn(8, 1, 3, 4, dtype=torch.float64) * 100
    labels = torch.zeros(8, dtype=torch.long)
    free, clipped = _linear_trainer([(images, labels)]), _linear_trainer([(images, labels)], clip_grad=1e-3)
    before = [p.detach().clone() for p in clipped.model.parameters()]
    free.fit()
    clipped.fit()
    moved = torch.cat([(p - b).flatten() for p, b in zip(clipped.model.parameters(), before, strict=True)])
    moved_free = torch.cat([(p - b).flatten() for p, b in zip(free.model.parameters(), before, strict=True)])
    lr = 0.5  # the first step's factor of LRSchedule(10) is 1
    assert float(moved.detach().norm()) <= lr * 1e-3 * (1 + 1e-9)
    assert float(moved_free.detach().norm()) > 100 * float(moved.detach().norm())


def test_too_few_batches_for_one_accumulated_step_are_refused() -> None:
    batch = (torch.zeros(2, 1, 3, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TrainingError, match="fewer than the 3 accumulated"):
        _linear_trainer([batch, batch], accum_steps=3)


# -- augmentation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "kind"),
    [
        ("autoaugment", v2.AutoAugment),
        ("randaugment", v2.RandAugment),
        ("trivialaugment", v2.TrivialAugmentWide),
    ],
)
def test_each_policy_is_in_the_training_transform_and_changes_the_images(
    fashion: Path, policy: str, kind: type
) -> None:
    plain = build_data("fashion-mnist", fashion)
    augmented = build_data("fashion-mnist", fashion, augmentation=Augmentation(policy, magnitude=20))
    assert any(isinstance(step, kind) for step in augmented.train.transform.transforms)
    torch.manual_seed(3)
    first = torch.stack([plain.train[i][0] for i in range(16)])
    torch.manual_seed(3)
    second = torch.stack([augmented.train[i][0] for i in range(16)])
    assert not torch.equal(first, second)
    assert augmented.val[0][0].equal(plain.val[0][0]), "evaluation images are not augmented"


def test_the_run_s_augmentation_and_mixing_are_the_configured_ones(fashion: Path, tmp_path: Path) -> None:
    options = {"augment": "randaugment", "augment_magnitude": 5, "mixup": 0.2, "cutmix": 1.0}
    options |= {"mixup_prob": 0.8, "mixup_switch_prob": 0.3}
    run = ClassificationRun(config(fashion, tmp_path / "r", **options), DistContext())
    steps = run.data.train.transform.transforms
    assert [s.magnitude for s in steps if isinstance(s, v2.RandAugment)] == [5]
    mixing = run.trainer.mixup
    assert isinstance(mixing, v2.RandomApply) and mixing.p == 0.8
    (choice,) = mixing.transforms
    assert isinstance(choice, v2.RandomChoice) and choice.p == pytest.approx([0.7, 0.3])
    assert [type(t).__name__ for t in choice.transforms] == ["MixUp", "CutMix"]


def test_random_erasing_erases_rectangles_of_training_images_only(fashion: Path) -> None:
    bundle = build_data("fashion-mnist", fashion, augmentation=Augmentation(random_erasing=1.0))
    torch.manual_seed(0)
    image = bundle.train[0][0]
    assert (image == 0).sum() > 4, "a rectangle set to 0 (after normalisation)"
    assert not any(
        isinstance(step, v2.RandomErasing) for step in getattr(bundle.val.transform, "transforms", [])
    )


def test_cutmix_pastes_a_rectangle_and_mixup_blends(fashion: Path) -> None:
    images = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(4)])
    labels = torch.arange(4)
    torch.manual_seed(0)
    cut_images, cut_labels = batch_mixing(4, mixup=0, cutmix=1.0)(images, labels)  # type: ignore[misc]
    values = set(cut_images[0].unique().tolist())
    assert values <= {0.0, 1.0, 2.0, 3.0} and len(values) == 2, "pixels come from two images, not blends"
    assert cut_labels.shape == (4, 4) and cut_labels.sum(1).allclose(torch.ones(4))
    torch.manual_seed(0)
    mixed_images, _ = batch_mixing(4, mixup=1.0, cutmix=0)(images, labels)  # type: ignore[misc]
    assert len(mixed_images[0].unique()) == 1 and float(mixed_images[0, 0, 0, 0]) % 1 != 0, "a blend"
    both = batch_mixing(4, mixup=1.0, cutmix=1.0, switch_prob=1.0)
    torch.manual_seed(0)
    assert len(both(images, labels)[0][0].unique()) == 2, "switch 1: CutMix every time"  # type: ignore[misc]
    sometimes = batch_mixing(4, mixup=1.0, cutmix=0, prob=0.5)
    torch.manual_seed(0)
    soft = [sometimes(images, labels)[1].ndim == 2 for _ in range(40)]  # type: ignore[misc]
    assert 5 < sum(soft) < 35, "about half of the batches are mixed"
    assert batch_mixing(4, mixup=0, cutmix=0) is None


def test_drop_path_trains_stochastically_and_converts_exactly() -> None:
    model = repvgg.create_model(
        "repvgg_a0", num_classes=5, strides=[1, 2, 2, 2, 2], drop_path_rate=0.3
    ).double()
    blocks = [block for block in model.modules() if isinstance(block, repvgg.RepVGGBlock)]
    rates = [block.drop_path for block in blocks]
    assert rates[0] == 0 and max(rates) == pytest.approx(0.3 * 20 / 21), "rising towards the last block"
    assert all(b.drop_path == 0 for b in blocks if b.rbr_identity is None), "only blocks with an identity"
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model.train()
    assert not torch.equal(model(images), model(images)), "paths dropped at random while training"
    model.eval()
    report = repvgg.verify_equivalence(model)
    assert report.passed and report.max_abs_error < 1e-10
    without = repvgg.create_model("repvgg_a0", num_classes=5, strides=[1, 2, 2, 2, 2]).double().eval()
    without.load_state_dict(model.state_dict())
    assert torch.equal(without(images), model(images)), "no effect in eval mode"
    assert "drop_path" not in json.dumps(model.config), "not part of the architecture record"


def test_drop_path_reaches_the_run_s_model(fashion: Path, tmp_path: Path) -> None:
    run = ClassificationRun(config(fashion, tmp_path / "r", drop_path=0.2), DistContext())
    rates = [b.drop_path for b in run.model.modules() if isinstance(b, repvgg.RepVGGBlock)]
    assert max(rates) == pytest.approx(0.2 * 20 / 21)


def test_crop_pct_and_interpolation_are_recorded_and_used(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", per_class=4)
    run = tmp_path / "run"
    arguments = ["train", "--data", "imagefolder", "--data-dir", str(folder), "--image-size", "32"]
    arguments += ["--crop-pct", "0.8", "--interpolation", "bicubic", "--epochs", "1", "--batch-size", "4"]
    arguments += ["--model", "repvgg_a0", "--no-progress", "--output", str(run), "--workers", "0"]
    assert main(arguments) == 0
    deployed = repvgg.load_checkpoint(run / "model_deploy.safetensors")
    assert deployed.preprocessing.resize == 40 and deployed.preprocessing.image_size == 32
    assert deployed.preprocessing.interpolation == "bicubic"
    saved = json.loads((run / "config.json").read_text())
    assert saved["crop_pct"] == 0.8 and saved["interpolation"] == "bicubic"
    resize = next(s for s in deployed.preprocessing.transform().transforms if isinstance(s, v2.Resize))
    assert resize.interpolation == v2.InterpolationMode.BICUBIC


def test_the_default_crop_pct_is_the_paper_s_and_saved_resolved(fashion: Path, tmp_path: Path) -> None:
    run = ClassificationRun(config(fashion, tmp_path / "r"), DistContext())
    assert run.resolved_config().crop_pct == 1.0
    assert build_data("fashion-mnist", fashion, crop_pct=0.875).preprocessing.resize == 32


# -- checkpoints: best K, best in both forms, early stopping ----------------------------------------------


class Scripted(Task):
    """Validation figures read from a script, one per epoch: the ranking and stopping are then known."""

    def __init__(self, values: list[float], metric: str = "top1") -> None:
        super().__init__()
        self.values, self.metric, self.calls = values, metric, 0

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        value = self.values[self.calls]
        self.calls += 1
        return {self.metric: value}


def _scripted_trainer(output: Path, values: list[float], **options: Any) -> Trainer:
    model = repvgg.create_model("repvgg_a0", num_classes=3, in_chans=1, strides=[1, 2, 2, 2, 2])
    batches = [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))]
    return Trainer(
        model,
        batches,  # type: ignore[arg-type]
        Scripted(values, options.pop("metric", "top1")),
        torch.optim.SGD(model.parameters(), lr=1e-4),
        LRSchedule(len(values)),
        epochs=len(values),
        output=output,
        best_file="best_train.safetensors",
        channels_last=False,
        progress=False,
        **options,
    )


def test_the_best_k_checkpoints_are_kept_and_ranked(tmp_path: Path) -> None:
    trainer = _scripted_trainer(tmp_path, [50.0, 70.0, 60.0, 65.0, 40.0], keep_best=2)
    trainer.fit()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.safetensors"))
    assert kept == ["epoch-002.safetensors", "epoch-004.safetensors"]
    ranking = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert [r["epoch"] for r in ranking] == [2, 4] and ranking[0]["top1"] == 70.0
    assert trainer.best_epoch == 2
    assert repvgg.load_checkpoint(tmp_path / "checkpoints" / "epoch-002.safetensors") is not None


def test_loss_ranks_lower_first_and_patience_stops_the_run(tmp_path: Path, capsys: Any) -> None:
    trainer = _scripted_trainer(
        tmp_path, [3.0, 2.0, 2.5, 2.1, 1.0, 0.5], metric="loss", best_metric="loss", patience=2
    )
    records = trainer.fit()
    assert [r["epoch"] for r in records] == [1, 2, 3, 4], "two epochs without a lower loss after epoch 2"
    assert trainer.stopped_early == 4 and trainer.best == 2.0
    assert "stopped early after epoch 4" in capsys.readouterr().out


def test_patience_and_the_ranking_survive_a_resume(tmp_path: Path) -> None:
    values = [50.0, 70.0, 60.0, 65.0, 80.0]
    first = _scripted_trainer(tmp_path, values, keep_best=2, patience=3)
    first.epochs = 3
    first.fit()
    second = _scripted_trainer(tmp_path, values[3:], keep_best=2, patience=3)
    second.epochs = 5
    second.resume()
    assert second.best_epoch == 2 and second.kept == [(70.0, 2), (60.0, 3)]
    second.fit()
    ranking = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert [r["epoch"] for r in ranking] == [5, 2]
    assert not (tmp_path / "checkpoints" / "epoch-003.safetensors").exists()


def test_a_run_saves_its_best_in_both_forms_and_checks_them(fashion: Path, tmp_path: Path) -> None:
    summary = train(config(fashion, tmp_path / "r", epochs=2, keep_best=2, ema_decay=0.9))
    best = summary["best"]
    assert best["metric"] == "ema_val_top1", "with an EMA, the EMA weights are ranked"
    assert best["deploy_form"] == "best_deploy.safetensors" and best["max_abs_error"] < 1e-4
    deployed = repvgg.load_checkpoint(tmp_path / "r" / "best_deploy.safetensors")
    assert deployed.deploy
    report = repvgg.verify_checkpoints(
        tmp_path / "r" / "best_train.safetensors", tmp_path / "r" / "best_deploy.safetensors"
    )
    assert report.passed
    assert len(json.loads((tmp_path / "r" / "checkpoints" / "best.json").read_text())) == 2


# -- every option saved, resumable, refused when it would be ignored ---------------------------------------


NEW_OPTIONS: dict[str, Any] = {
    "opt": "adamw",
    "sched": "poly",
    "poly_power": 2.0,
    "min_lr": 1e-5,
    "warmup_epochs": 0.5,
    "clip_grad": 5.0,
    "accum_steps": 2,
    "mixup": 0.2,
    "cutmix": 1.0,
    "mixup_prob": 0.8,
    "mixup_switch_prob": 0.3,
    "augment": "randaugment",
    "augment_magnitude": 5,
    "random_erasing": 0.25,
    "drop_path": 0.1,
    "crop_pct": 0.9,
    "interpolation": "bicubic",
    "keep_best": 2,
    "best_metric": "loss",
    "patience": 3,
}


def test_every_new_option_is_saved_and_a_run_resumes_with_them(fashion: Path, tmp_path: Path) -> None:
    options = {**NEW_OPTIONS, "train_subset": 64, "val_subset": 32, "batch_size": 16}
    train(config(fashion, tmp_path / "r", **options))
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    for name, value in options.items():
        assert saved[name] == value, name
    resumed = train(config(fashion, tmp_path / "r", epochs=2, **options), resume=True)
    assert resumed["epochs"] == 2
    records = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in records] == [1, 2]
    with pytest.raises(TrainingError, match="Resuming cannot change `opt`"):
        train(
            config(fashion, tmp_path / "r", epochs=3, **{**options, "opt": "sgd", "momentum": 0.9}),
            resume=True,
        )


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "nesterov-adamw": ({"opt": "adamw", "nesterov": True}, "`nesterov` acts only with `opt` sgd"),
    "momentum-lamb": ({"opt": "lamb", "momentum": 0.5}, "`momentum` acts only with `opt` sgd or lars"),
    "decay-rate-cosine": ({"decay_rate": 0.5}, "`decay_rate` acts only with `sched` step"),
    "poly-power-step": ({"sched": "step", "poly_power": 2.0}, "`poly_power` acts only with `sched` poly"),
    "magnitude-trivial": ({"augment": "trivialaugment", "augment_magnitude": 3}, "randaugment"),
    "mixup-prob-alone": ({"mixup_prob": 0.5}, "`mixup_prob` acts only with `mixup` or `cutmix`"),
    "switch-mixup-only": ({"mixup": 0.2, "mixup_switch_prob": 0.2}, "both `mixup` and `cutmix`"),
    "drop-path-residual": (
        {"layout": "residual_reorg", "drop_path": 0.1},
        "`drop_path` acts in RepVGG blocks",
    ),
    "drop-path-one": ({"drop_path": 1.0}, "`drop_path` must be at least 0 and at most 0.99"),
    "crop-pct-above-one": ({"crop_pct": 1.5}, "`crop_pct` must be at least 0.05 and at most 1"),
    "accum-zero": ({"accum_steps": 0}, "`accum_steps` must be at least 1"),
    "clip-zero": ({"clip_grad": 0.0}, "`clip_grad` must be above 0"),
    "keep-best-zero": ({"keep_best": 0}, "`keep_best` must be at least 1"),
    "patience-zero": ({"patience": 0}, "`patience` must be at least 1"),
    "opt-unknown": ({"opt": "adam"}, "`opt` must be one of sgd, adamw, lamb, lars"),
    "sched-unknown": ({"sched": "linear"}, "`sched` must be one of"),
    "augment-unknown": ({"augment": "augmix"}, "`augment` must be one of"),
    "best-metric-unknown": ({"best_metric": "top5"}, "`best_metric` must be one of top1, loss"),
    "interpolation-unknown": ({"interpolation": "lanczos"}, "`interpolation` must be one of"),
    "random-erasing-above-one": (
        {"random_erasing": 2.0},
        "`random_erasing` must be at least 0 and at most 1",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_options_that_would_be_ignored_or_are_out_of_range_are_refused(
    fashion: Path, tmp_path: Path, case: str
) -> None:
    options, message = REFUSED[case]
    with pytest.raises(TrainingError, match=message.replace("(", r"\(")):
        config(fashion, tmp_path / "r", **options).validate()
    assert not (tmp_path / "r").exists()


def test_min_lr_above_the_default_learning_rate_is_refused_before_training(
    fashion: Path, tmp_path: Path
) -> None:
    with pytest.raises(TrainingError, match=r"`min_lr` 1 must be below the learning rate 0\.0125"):
        ClassificationRun(config(fashion, tmp_path / "r", min_lr=1.0), DistContext())


def test_an_earlier_release_s_autoaugment_switch_is_read_as_the_policy(fashion: Path, tmp_path: Path) -> None:
    from repvgg.engine.config import load_run_config

    saved = {**SMALL, "data_dir": str(fashion), "output": str(tmp_path / "r"), "autoaugment": True}
    (tmp_path / "old.json").write_text(json.dumps(saved))
    assert TrainConfig.from_dict(load_run_config(tmp_path / "old.json")).augment == "autoaugment"


def test_lamb_without_timm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_timm(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("timm"):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    groups = parameter_groups(nn.Linear(3, 2), 1e-4, custom_l2=False)
    with pytest.raises(TrainingError, match=r"pip install 'repvgg\[train\]'"):
        build_optimizer("lamb", copy.deepcopy(groups), 0.01)
    assert math.isfinite(default_lr("lamb", 1))
