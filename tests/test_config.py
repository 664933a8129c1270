from pathlib import Path

import pytest
import torch
import yaml

from kdistill.build import validate
from kdistill.config import RunConfig, dump_config, load_config, parse_override
from kdistill.errors import ConfigError

from .conftest import REPO

# `generate-*.yaml` configure `kdistill generate` (tests/test_generate.py loads them). Recipes
# with the SmolLM2 teacher load a 135M-parameter model (minutes on 2 cores): their full build
# is a slow test; the default suite parses and checks them.
RUN_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml")
                     if not p.name.startswith("generate-"))
LLM_RECIPES = [p for p in RUN_RECIPES if "smollm2" in p.read_text()]
RECIPES = [p for p in RUN_RECIPES if p not in LLM_RECIPES]


def test_default_recipe_file_equals_builtin_default() -> None:
    assert load_config(REPO / "recipes" / "default.yaml") == RunConfig() == load_config(None)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_builds(recipe: Path) -> None:
    assert len(recipe.read_text().splitlines()) < 40
    cfg = load_config(recipe)
    splits = validate(cfg)
    if splits.task == "seq2seq":  # translation: the joint BPE's vocabulary
        assert splits.num_classes == cfg.data.vocab_size
        return
    assert splits.num_classes == {"fortunes5": 5, "fortunes43": 43,
                                  "general_text": 0}.get(cfg.data.name, 10)


@pytest.mark.parametrize("recipe", LLM_RECIPES, ids=[p.stem for p in LLM_RECIPES])
def test_llm_recipes_parse(recipe: Path) -> None:
    assert len(recipe.read_text().splitlines()) < 40
    cfg = load_config(recipe)
    # Cross-tokenizer recipes tokenize the data with the student's own BPE.
    projected = cfg.teacher.model.arch == "projected_lm"
    assert cfg.data.tokenizer == (cfg.teacher.model.args["tokenizer"] if projected else "smollm2")
    assert cfg.method.name in ("token_kd", "gkd")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", LLM_RECIPES, ids=[p.stem for p in LLM_RECIPES])
def test_llm_recipes_build(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(recipe)
    vocab = 49152
    if cfg.teacher.model.arch == "projected_lm":  # its tokenizer first, as the recipe says
        from kdistill.data.bpe import train_bpe

        monkeypatch.chdir(tmp_path)
        vocab = len(train_bpe(cfg.data.training_documents(), 4096, Path(cfg.data.tokenizer)))
    splits = validate(cfg)
    assert splits.task == "causal_lm" and splits.num_classes == vocab


def test_overrides_are_yaml_values() -> None:
    cfg = load_config(None, ["train.seeds=[0,1,2]", "method.temperature=8",
                             "method.alpha={kind: linear, start: 0.7, end: 0.3}", "name=x"])
    assert cfg.train.seeds == [0, 1, 2]
    assert cfg.method.temperature == 8.0
    assert cfg.method.alpha.kind == "linear"
    assert cfg.name == "x"
    assert parse_override("a.b=") == ("a.b", None)


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(REPO / "recipes" / "mnist-cnn-to-mlp.yaml")
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def _error(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("method: {name: kd, temprature: 4}", "method.temprature: unknown key"),
        ("train: {epochs: many}", "train.epochs"),
        ("method: {name: kd, temperature: -1}", "temperature must be > 0"),
        ("method: {name: kd, alpha: 1.5}", "alpha must be <= 1"),
        ("method: {name: kd, alpha: {kind: linear, start: 0.5, end: 2}}", "method.alpha"),
        ("method: {name: fitnetz}",
         "method.name: unknown method 'fitnetz' (did you mean 'fitnet'?)"),
        ("method: {name: ce}", "'ce' is the baseline"),
        ("bogus: 1", "bogus: unknown key"),
        ("train: [1, 2", "invalid YAML at line"),
        ("- just\n- a list", "a recipe is a mapping"),
        ("train: {optimizer: {name: lion}}", "train.optimizer.name"),
        ("train: {batch_size: 0}", "train.batch_size"),
        ("train: {lr_schedule: -1}", "train.lr_schedule: lr_schedule must be >= 0"),
        ("train: {lr_schedule: {kind: warmup, value: 1, warmup: 0}}",
         "train.lr_schedule.warmup: Input should be greater than 0"),
        ("teacher: {model: {arch: mlp, args: {hidden: [8]}}}",
         "teacher.train: the teacher would be an untrained network"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _error(tmp_path, text)


def test_validation_split_must_be_usable() -> None:
    with pytest.raises(ConfigError, match=r"data\.val_size: a count must be a whole number"):
        load_config(None, ["data.name=digits", "data.val_size=250.5"])  # refused when read
    cfg = load_config(None, ["data.name=digits", "data.val_size=0.0001"])
    with pytest.raises(ConfigError, match=r"data\.val_size: .*leaves an empty validation split"):
        validate(cfg)  # known once the data is loaded


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_form() -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(None, ["=3"])


class FiveWay(torch.nn.Module):
    """A user model with the wrong number of classes for digits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_teacher_student_class_mismatch_is_a_config_error() -> None:
    base = ["data.name=digits", "data.val_size=200", "teacher.model.arch=mlp",
            "teacher.model.args={hidden: [8]}"]
    validate(load_config(None, base))  # fine: both built for digits' 10 classes
    bad = load_config(None, [*base, "teacher.model.arch=custom",
                             "teacher.model.target=tests.test_config:FiveWay",
                             "teacher.model.args={}"])
    validate(bad)  # without build_custom the user's class is checked, not built
    with pytest.raises(ConfigError, match=r"teacher\.model: outputs 5 classes but data .digits."):
        validate(bad, build_custom=True)


def test_missing_teacher_weights_file(tmp_path: Path) -> None:
    cfg = load_config(None, [f"teacher.model.weights={tmp_path / 'gone.safetensors'}"])
    with pytest.raises(ConfigError, match=r"teacher\.model\.weights: file not found"):
        validate(cfg)


def test_recipes_parse_with_safe_load_only() -> None:
    for recipe in RECIPES:
        assert isinstance(yaml.safe_load(recipe.read_text()), dict)


def test_errors_survive_pickling() -> None:
    import pickle

    from kdistill.errors import MissingDependencyError

    for err in (ConfigError("data.name", "unknown"), MissingDependencyError("d", "MNIST", "pip x")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
