from dataclasses import dataclass, field
from pathlib import Path

import pytest

from minitron.pipeline.config import ConfigError, load_config, save_config


@dataclass
class Inner:
    tokens: int = 10
    lr: float = 1e-4
    tasks: list[str] = field(default_factory=lambda: ["a"])
    limit: int | None = None
    on: bool = False

    def check(self):
        if self.tokens <= 0:
            raise ConfigError("inner.tokens must be positive")


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: run\ninner:\n  tokens: 2e5\n  tasks: [b, c]\n")
    cfg = load_config(Outer, path, ["inner.lr=3e-4", "inner.limit=7", "inner.on=true", "inner.tasks=d,e"])
    assert cfg == Outer("run", Inner(tokens=200000, lr=3e-4, tasks=["d", "e"], limit=7, on=True))
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg
    assert load_config(Outer, None, ["inner.limit=null"]).inner.limit is None


@pytest.mark.parametrize("override, message", [
    ("inner.tokenz=5", "unknown key 'tokenz'; known: tokens, lr, tasks, limit, on"),
    ("inner.tokens=many", "inner.tokens: expected an integer"),
    ("inner.on=maybe", "expected true/false"),
    ("name.sub=1", "name is not a section"),
    ("inner.tokens", "key.sub=value"),
    ("inner.tokens=-1", "must be positive"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_bad_recipe_files(tmp_path):
    (tmp_path / "a.yaml").write_text("inner:\n  tokens: 1\n  extra: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) inner.extra"):
        load_config(Outer, tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(Outer, tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_one_source_of_every_default():
    """CLI options, the stage configs and the recipe sections agree on every default they share."""
    import dataclasses

    from minitron.cli import build_parser
    from minitron.distill import DistillConfig
    from minitron.pipeline import DataSection, DistillSection, ImportanceSection, ModelSection
    from minitron.pipeline.config import default_of
    from minitron.prune import PruneConfig
    from minitron.prune.plan import Target

    def names(cls):
        return {f.name for f in dataclasses.fields(cls)}

    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    checked = 0
    for cmd, classes in (("prune", (PruneConfig, Target)), ("distill", (DistillConfig,)), ("correct", (DistillConfig,))):
        for action in subcommands[cmd]._actions:
            owner = next((c for c in classes if action.dest in names(c)), None)
            if owner is None or action.required or action.dest in ("student", "out", "model") and cmd != "prune":
                continue
            assert action.default == default_of(owner, action.dest), (cmd, action.dest)
            checked += 1
    assert checked > 45
    for section, shared in ((ImportanceSection, PruneConfig), (DataSection, PruneConfig), (DataSection, DistillConfig),
                            (ModelSection, PruneConfig), (DistillSection, DistillConfig)):
        common = (names(section) & names(shared)) - {"tokens", "topk"}  # the recipe's own budget / cache switch
        assert common, (section, shared)
        for name in common:
            assert default_of(section, name) == default_of(shared, name), (section.__name__, name)


def test_freeze_embeddings_auto_follows_whether_the_hidden_width_was_kept(tmp_path):
    """`distill.freeze_embeddings: auto` (the default recipe's) freezes the embedding and LM head of a student that keeps
    the teacher's hidden width (they are the teacher's own) and trains them where the width was cut; true / false
    win; anything else is refused with the fix."""
    from minitron.arch.tiny import make_model
    from minitron.pipeline.recipe import RunConfig
    from minitron.pipeline.stages import _distill_config

    make_model("llama").save_pretrained(tmp_path / "teacher")
    make_model("llama").save_pretrained(tmp_path / "kept")
    make_model("llama", hidden_size=32, head_dim=16).save_pretrained(tmp_path / "cut")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"

    def frozen(student, *over):
        cfg = load_config(RunConfig, recipe, list(over))
        return _distill_config(cfg, str(tmp_path / "teacher"), str(tmp_path / student), tmp_path / "d",
                               1000).freeze_embeddings

    assert load_config(RunConfig, recipe).distill.freeze_embeddings == "auto"
    assert load_config(RunConfig, None, ["target.params=1M"]).distill.freeze_embeddings is False
    assert frozen("kept") is True and frozen("cut") is False
    assert frozen("kept", "distill.freeze_embeddings=false") is False
    assert frozen("cut", "distill.freeze_embeddings=true") is True
    with pytest.raises(ConfigError, match="none of true, false, auto"):
        load_config(RunConfig, None, ["target.params=1M", "distill.freeze_embeddings=maybe"])


def test_distill_lr_auto_follows_the_students_width(tmp_path):
    """`distill.lr: auto` is 0.2 / the student's hidden width (min_lr auto: a tenth of it); anything else that is
    not a positive number is refused with the fix."""
    from minitron.arch.tiny import make_model
    from minitron.distill.config import auto_lr
    from minitron.pipeline.recipe import RunConfig
    from minitron.pipeline.stages import _distill_config

    model = make_model("llama")
    model.save_pretrained(tmp_path / "student")
    cfg = load_config(RunConfig, None, ["target.params=1M", "distill.lr=auto", "distill.min_lr=auto"])
    d = _distill_config(cfg, "default", str(tmp_path / "student"), tmp_path / "d", 1000)
    assert d.lr == auto_lr(model.config.hidden_size) == 0.2 / model.config.hidden_size and d.min_lr == d.lr / 10
    assert auto_lr(576) == pytest.approx(3.47e-4, rel=1e-3)  # the default student: better than 6.9e-4, measured
    fixed = _distill_config(load_config(RunConfig, None, ["target.params=1M", "distill.lr=3e-4"]), "default",
                            str(tmp_path / "student"), tmp_path / "d", 1000)
    assert fixed.lr == 3e-4
    for bad in ("distill.lr=fast", "distill.min_lr=0"):
        with pytest.raises(ConfigError, match="neither a positive number nor auto"):
            load_config(RunConfig, None, ["target.params=1M", bad])
