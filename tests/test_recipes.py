"""Every shipped recipe is validated against the code; recipe parsing, overrides and errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

import grootl.model.modeling
from grootl.cli import main as cli_main
from grootl.data import TEMPLATES
from grootl.model import tiny_model
from grootl.train import RecipeError, load_recipe, valid_keys
from grootl.train.recipe import Recipe

from conftest import REPO

RECIPES = REPO / "recipes"
TRAIN_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate")
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))
PAPER_130M = {"grootl": RECIPES / "mamba-130m/alpaca-grootl.yaml", "lora": RECIPES / "mamba-130m/alpaca-lora.yaml"}


def test_the_promised_recipes_are_shipped():
    names = {p.relative_to(RECIPES).as_posix() for p in TRAIN_RECIPES + ACCELERATE_CONFIGS}
    assert {"mamba-130m/alpaca-grootl.yaml", "mamba-130m/alpaca-lora.yaml", "tiny/cpu-demo.yaml",
            "accelerate/ddp.yaml", "accelerate/fsdp.yaml", "accelerate/deepspeed-zero2.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)  # schema, types and value checks
    assert recipe.data.template in TEMPLATES
    for key in ("data.path", "model.tokenizer", "model.name_or_path"):
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value and value.startswith("/"):
            assert Path(value).exists(), f"{path.name}: {key} points at a missing {value}"
    if recipe.model.init == "random":
        model = tiny_model(**recipe.model.config)  # the config is a valid MambaConfig
        module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        assert set(recipe.lora.target_modules) <= module_names
    else:
        assert recipe.model.name_or_path.count("/") == 1  # a hub id, loaded on the user's machine


def test_paper_recipes_use_the_paper_settings():
    arms = {method: load_recipe(path) for method, path in PAPER_130M.items()}
    for method, recipe in arms.items():
        assert recipe.method == method
        assert recipe.model.name_or_path == "state-spaces/mamba-130m-hf" and recipe.data.path == "tatsu-lab/alpaca"
        assert (recipe.data.template, recipe.data.max_length, recipe.train.epochs) == ("grootl", 2048, 1)
        assert (recipe.train.lr, recipe.train.schedule, recipe.train.warmup_steps) == (2e-5, "constant", 20)
        assert recipe.train.weight_decay == 0 and recipe.train.batch_size * recipe.train.grad_accum == 16
        assert recipe.train.mixed_precision == "bf16" and recipe.train.gradient_checkpointing
        assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (8, 16, 0.0)
        assert sorted(recipe.lora.target_modules) == ["embeddings", "in_proj", "out_proj", "x_proj"]
        assert (recipe.grootl.modulation, recipe.grootl.k) == (0.3, 3)
    grootl, lora = (dataclasses.asdict(arms[m]) for m in ("grootl", "lora"))
    differing = {key for key in grootl if grootl[key] != lora[key]}
    assert differing == {"method", "output_dir"}  # the arms differ only in the scan


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2 and config.mixed_precision == "bf16"
    if config.fsdp_config:
        layer = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        assert hasattr(grootl.model.modeling, layer)
        assert config.fsdp_config["fsdp_use_orig_params"]  # frozen and LoRA weights share FSDP units
    if config.deepspeed_config:
        assert config.deepspeed_config["zero_stage"] == 2
        assert config.deepspeed_config["gradient_clipping"] == load_recipe(PAPER_130M["grootl"]).train.max_grad_norm


def test_unknown_key_lists_the_valid_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: out\nmodel: {name_or_path: a/b}\ntrain: {learning_rate: 0.1}\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key\(s\) \['train.learning_rate'\]; valid keys: .*train\.lr"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.lrate'; valid keys: output_dir, method"):
        load_recipe(path, ["train.lrate=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=fast", r"train.lr must be float; got 'fast'"),
        ("method=qlora", r"method must be one of \['grootl', 'lora', 'full'\]"),
        ("train.batch_size=0", r"train.batch_size must be > 0"),
        ("train.schedule=step", r"train.schedule must be one of"),
        ("grootl.k=0", r"recipe section grootl: .*k must be an int >= 1"),
        ("data.template=chatml", r"data.template must be one of"),
        ("train.epochs=true", r"train.epochs must be int; got True"),
        ("model.init=random", r"model.tokenizer is required when model.init is random"),
        ("lr", r"must look like key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(PAPER_130M["grootl"], [override])


def test_overrides_are_typed_and_dotted():
    recipe = load_recipe(PAPER_130M["grootl"], ["train.lr=1e-4", "lora.target_modules=[in_proj]",
                                                 "train.max_steps=7", "model.config.hidden_size=16", "seed=3"])
    assert recipe.train.lr == 1e-4 and recipe.train.max_steps == 7 and recipe.seed == 3
    assert recipe.lora.target_modules == ["in_proj"] and recipe.model.config == {"hidden_size": 16}
    assert isinstance(load_recipe(PAPER_130M["grootl"]).train.lr, float)  # YAML's 2.0e-5, and 2e-5 (a str in YAML 1.1)
    assert load_recipe(values={"output_dir": "o", "model": {"name_or_path": "a/b"}, "train": {"lr": "2e-5"}}).train.lr == 2e-5
    assert load_recipe(PAPER_130M["grootl"], ["train.mixed_precision=no"]).train.mixed_precision == "no"  # not False


def test_paths_resolve_against_the_recipe_file_and_overrides_against_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (tmp_path / "data.jsonl").write_text("")
    (folder / "r.yaml").write_text("output_dir: runs/x\nmodel: {name_or_path: org/model}\ndata: {path: ../data.jsonl}\n")
    monkeypatch.chdir(tmp_path / "recipes")
    recipe = load_recipe(folder / "r.yaml")
    assert recipe.data.path == str(tmp_path / "data.jsonl")
    assert recipe.output_dir == str(folder / "runs/x")  # output_dir: the current directory
    assert recipe.model.name_or_path == "org/model"  # a hub id stays as it is
    monkeypatch.chdir(tmp_path)
    assert load_recipe(folder / "r.yaml", ["data.path=data.jsonl"]).data.path == str(tmp_path / "data.jsonl")


def test_valid_keys_cover_every_field():
    keys = valid_keys()
    assert "train.grad_accum" in keys and "checkpoint.keep" in keys and len(keys) == len(set(keys))
    assert {k.split(".")[0] for k in keys} == {f.name for f in dataclasses.fields(Recipe)}


def test_cli_reports_recipe_errors_without_traceback(capsys):
    assert cli_main(["train", str(PAPER_130M["lora"]), "train.nope=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("grootl train: error: unknown recipe key 'train.nope'") and "Traceback" not in err


def test_cli_prints_the_resolved_recipe(capsys):
    assert cli_main(["train", str(PAPER_130M["lora"]), "train.lr=3e-4", "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "lora" and printed["train"]["lr"] == 3e-4
