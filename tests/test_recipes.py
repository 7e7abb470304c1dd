"""Every shipped recipe is validated against the code; recipe parsing, overrides and errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from accelerate.utils.launch import prepare_multi_gpu_env
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule
from transformers import AutoTokenizer

from grootl import load_model
from grootl.cli import main as cli_main
from grootl.data import TEMPLATES
from grootl.model import families, tiny_model
from grootl.train import RecipeError, load_recipe, train, valid_keys
from grootl.train.modeling import add_lora, build_base
from grootl.train.recipe import Recipe

from conftest import ASSETS, REPO

RECIPES = REPO / "recipes"
TRAIN_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate")
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))
PAPER_130M = {"grootl": RECIPES / "mamba-130m/alpaca-grootl.yaml", "lora": RECIPES / "mamba-130m/alpaca-lora.yaml"}
SIZES = ("130m", "370m", "790m", "1.4b", "2.8b")
# tiny random-init recipes of the other families: one per kind of mixer (Mamba-2 SSD; a hybrid with attention)
TINY_FAMILY_RECIPES = {"mamba2": RECIPES / "tiny/mamba2-demo.yaml", "bamba": RECIPES / "tiny/bamba-demo.yaml"}
FSDP_7B = RECIPES / "accelerate/fsdp-7b.yaml"
# the family of a checkpoint, by hub id (prefix); Mamba-Codestral is a Mamba-2 checkpoint in transformers format
CHECKPOINT_FAMILIES = {"state-spaces/mamba": "mamba", "mistralai/Mamba-Codestral-7B": "mamba2",
                       **{hub_id: model_type for model_type, family in families.FAMILIES.items() for hub_id in family.examples}}
# Zamba's hybrid layers share one attention block: FSDP2 cannot hold its weights in two units, so Zamba's
# launch wraps its Mamba layers only (fsdp-7b.yaml's header; the shared block stays in the root unit)


def test_the_promised_recipes_are_shipped():
    names = {p.relative_to(RECIPES).as_posix() for p in TRAIN_RECIPES + ACCELERATE_CONFIGS}
    assert {"tiny/cpu-demo.yaml", "accelerate/ddp.yaml", "accelerate/fsdp.yaml", "accelerate/fsdp-7b.yaml",
            "accelerate/deepspeed-zero2.yaml"} <= names
    assert {f"{model}/alpaca-{arm}.yaml" for model in ("mamba-codestral-7b", "falcon-mamba-7b", "bamba-9b",
                                                        "nemotron-nano-9b-v2") for arm in ("grootl", "lora")} <= names
    assert {f"mamba-{size}/alpaca-{arm}.yaml" for size in SIZES for arm in ("grootl", "lora")} <= names


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
        model = build_base(recipe)  # the config is a valid config of its family
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


def differences(a: Recipe, b: Recipe, prefix: str = "") -> set[str]:
    """The dotted keys where two recipes differ."""
    a, b = (dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in (a, b))
    keys = set()
    for key in a:
        if isinstance(a[key], dict) and isinstance(b[key], dict) and a[key] and b[key]:
            keys |= differences(a[key], b[key], f"{prefix}{key}.")
        elif a[key] != b[key]:
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize("size", SIZES)
def test_every_size_uses_the_paper_settings(size):
    """A larger size differs from 130M only in its checkpoint (the arms: test_the_two_arms_differ_only_in_the_scan)."""
    grootl = load_recipe(RECIPES / f"mamba-{size}/alpaca-grootl.yaml")
    assert grootl.model.name_or_path == f"state-spaces/mamba-{size}-hf"
    if size != "130m":
        assert differences(grootl, load_recipe(PAPER_130M["grootl"])) == {"model.name_or_path", "output_dir"}


@pytest.mark.parametrize("folder", sorted({p.parent for p in RECIPES.glob("*/alpaca-lora.yaml")}), ids=lambda p: p.name)
def test_the_two_arms_differ_only_in_the_scan(folder):
    grootl, lora = (load_recipe(folder / f"alpaca-{arm}.yaml") for arm in ("grootl", "lora"))
    assert (grootl.method, lora.method) == ("grootl", "lora") and differences(grootl, lora) == {"method", "output_dir"}
    assert (Path(grootl.output_dir).name, Path(lora.output_dir).name) == (f"{folder.name}-alpaca-grootl", f"{folder.name}-alpaca-lora")


def test_extends_lays_a_recipe_over_its_base(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base/data.jsonl").write_text("")
    (tmp_path / "base/base.yaml").write_text(
        "output_dir: runs/base\nmodel: {name_or_path: org/model}\ndata: {path: data.jsonl, max_length: 64}\n"
        "train: {lr: 1.0e-3, batch_size: 8}\nlora: {target_modules: [in_proj, out_proj]}\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base/base.yaml\noutput_dir: runs/child\ntrain: {lr: 5.0e-4}\nlora: {target_modules: [x_proj]}\n")
    child = load_recipe(tmp_path / "child.yaml")
    assert child.train.lr == 5e-4 and child.train.batch_size == 8  # section by section
    assert child.data.path == str(tmp_path / "base/data.jsonl") and child.data.max_length == 64  # the base's folder
    assert child.lora.target_modules == ["x_proj"] and child.output_dir.endswith("runs/child")  # lists replace
    assert load_recipe(tmp_path / "child.yaml", ["train.batch_size=2"]).train.batch_size == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("extends: base/missing.yaml\n", r"^recipe file base/missing.yaml does not exist \(extended by r.yaml\)$"),
        ("extends: r.yaml\n", r"^r.yaml: extends: makes a cycle through r.yaml$"),
        ("extends: base/loop.yaml\n", r"^base/loop.yaml: extends: makes a cycle through r.yaml$"),
        ("extends: [a.yaml]\n", r"^r.yaml: extends must be the path of another recipe file; got \['a.yaml'\]$"),
        ("output_dir: x\ntrain: {lr: 1\n  seed: [\n", r"^r.yaml: not valid YAML \(line 3, column 7: expected ',' or '}', but got ':'\)$"),
        ("extends: base/broken.yaml\n", r"^base/broken.yaml: not valid YAML \(line 2, column 1: .*\)$"),
    ],
)
def test_bad_extends_and_bad_yaml_are_one_line_naming_the_file(tmp_path, monkeypatch, text, message):
    (tmp_path / "base").mkdir()
    (tmp_path / "base/loop.yaml").write_text("extends: ../r.yaml\n")
    (tmp_path / "base/broken.yaml").write_text("output_dir: x\n\tmethod: lora\n")
    (tmp_path / "r.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)  # files are named relative to the current directory
    with pytest.raises(RecipeError, match=message):
        load_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize(
    "base, child, overrides, message",
    [
        ("train: {max_stepz: 2}", "", [], r"^base/base.yaml: unknown recipe key\(s\) \['train.max_stepz'\]; valid keys: .*; "
                                            r"did you mean train.max_steps for train.max_stepz\?$"),
        ("", "train: {max_stepz: 2}", [], r"^child.yaml: unknown recipe key\(s\) \['train.max_stepz'\]"),
        ("train: {lr: fast}", "train: {batch_size: 2}", [], r"^base/base.yaml: recipe key train.lr must be float; got 'fast'$"),
        ("train: {lr: fast}", "train: {lr: 1.0e-3}", ["train.lr=x"], r"^command line: recipe key train.lr must be float; got 'x'$"),
        ("", "method: qlora", [], r"^child.yaml: recipe key method must be one of \['grootl', 'lora', 'full'\]; got 'qlora'$"),
        ("", "grootl: {k: 0}", [], r"^child.yaml: recipe section grootl: .*k must be an int >= 1"),
        ("train: 5", "", ["train.lr=1"], r"^base/base.yaml: recipe section train must be a mapping$"),
        ("", "", ["train.lrate=1"], r"^command line: unknown recipe key 'train.lrate'; valid keys: .*; did you mean train.lr "),
        ("", "", ["train.lr.x=1"], r"^command line: unknown recipe key 'train.lr.x'"),
        ("", "", ["train.lr=["], r"^command line: override 'train.lr=\[': the value is not valid YAML \(line 1, column 2: "),
        ("", "", ["model.init=random"], r"^command line: recipe key model.tokenizer is required when model.init is random$"),
        ("", "output_dir: null", [], r"^child.yaml: recipe key output_dir must not be empty \(null\)$"),
    ],
)
def test_errors_name_the_file_or_command_line_that_set_the_key(tmp_path, monkeypatch, base, child, overrides, message):
    """Through extends:, an unknown key, a wrong type or a bad value is reported against the file that set it."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base/base.yaml").write_text(f"output_dir: runs/x\nmodel: {{name_or_path: org/model}}\n{base}\n")
    (tmp_path / "child.yaml").write_text(f"extends: base/base.yaml\n{child}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=message):
        load_recipe("child.yaml", overrides)


def test_every_shipped_eval_task_yaml_is_indexed_by_lm_eval_and_checked(tmp_path):
    """Each offline task YAML renders to a task lm-eval's TaskManager indexes under the file's name, reading data
    files that exist; all of them are the paper's suite, whose requests test_eval.py checks against lm-eval's
    own tasks task by task."""
    from lm_eval.tasks import TaskManager

    from grootl.evaluation.tasks import PAPER_SUITE, TASK_TEMPLATES, missing_data_files, render_offline_tasks

    names = sorted(path.stem for path in TASK_TEMPLATES.glob("*.yaml"))
    assert names == sorted(PAPER_SUITE)
    manager = TaskManager(include_path=str(render_offline_tasks(ASSETS / "eval", tmp_path)), include_defaults=False)
    assert sorted(manager.all_tasks) == names and missing_data_files(manager, names) == []


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2 and config.mixed_precision == "bf16"
    if config.fsdp_config:
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # a unit per decoder layer
        # FSDP1 puts frozen and LoRA weights in one unit only with use_orig_params; FSDP2 always can
        assert config.fsdp_config.get("fsdp_version", 1) == 2 or config.fsdp_config["fsdp_use_orig_params"]
    if config.deepspeed_config:
        assert config.deepspeed_config["zero_stage"] == 2
        assert config.deepspeed_config["gradient_clipping"] == load_recipe(PAPER_130M["grootl"]).train.max_grad_norm


def launched_fsdp_plugin(monkeypatch, launch_args: list[str]) -> FullyShardedDataParallelPlugin:
    """The FSDP plugin of a process that `accelerate launch LAUNCH_ARGS script` starts: Accelerate's own
    reading of the config file and flags into the FSDP_* environment, and the plugin's reading of it."""
    args = launch_command_parser().parse_args([*launch_args, "train.py"])
    _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    for key in env:
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # FSDP1's broadcast init asks for a GPU; the wrap is the same
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])  # as Accelerator does
    return plugin


def tiny_family_model(model_type: str, grootl: dict | None = None) -> torch.nn.Module:
    """A tiny random GrootL model of a family (``mamba``: grootl_mamba)."""
    if model_type == "mamba":
        return tiny_model(grootl)
    return families.from_config(families.tiny_config(model_type), grootl)


@pytest.fixture
def process_group():
    """A one-process gloo group: what FSDP2 shards over on CPU."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("model_type", ["mamba", *families.TINY_CONFIGS])
def test_fsdp_7b_shards_every_family(monkeypatch, process_group, model_type):
    """fsdp-7b.yaml as Accelerate prepares it (FSDP2, the wrap from the model's no-split classes): every
    decoder layer is its own unit, the frozen base stays bf16 beside the float32 LoRA adapters (FSDP1
    needs one dtype per unit and refuses that mix), and a GrootL step gives every adapter weight a gradient."""
    plugin = launched_fsdp_plugin(monkeypatch, ["--config_file", str(FSDP_7B)])
    family = families.FAMILIES.get(model_type)
    targets = family.lora_targets if family else load_recipe(PAPER_130M["grootl"]).lora.target_modules
    recipe = load_recipe(PAPER_130M["grootl"], [f"lora.target_modules=[{','.join(targets)}]"])
    model = add_lora(tiny_family_model(model_type, {"modulation": 0.3}).to(torch.bfloat16), recipe)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="bf16",
                                  is_main_process=True, torch_device_mesh=None, device=torch.device("cpu"))
    model = fsdp2_prepare_model(accelerator, model)  # what Accelerator.prepare runs for FSDP2
    names = set(plugin.transformer_cls_names_to_wrap)  # fully_shard subclasses each unit (FSDPMamba2Block)
    layers = [m for m in model.modules() if names & {cls.__name__ for cls in type(m).__mro__}]
    assert layers and all(isinstance(m, FSDPModule) for m in layers)
    dtypes = {trains: {p.dtype for p in model.parameters() if p.requires_grad is trains} for trains in (False, True)}
    assert dtypes == {False: {torch.bfloat16}, True: {torch.float32}}
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids.masked_fill(torch.arange(16) < 8, -100)).loss.backward()  # 8 prompt tokens
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def documented_launches() -> list[str]:
    """Every `accelerate launch --config_file recipes/accelerate/...` command in the README and the
    comments of the configs and recipes (a comment's continued lines joined)."""
    texts = [(REPO / "README.md").read_text(), *(path.read_text() for path in ACCELERATE_CONFIGS + TRAIN_RECIPES)]
    lines = re.sub(r"\\\n[#\s]*", " ", "\n".join(texts)).splitlines()
    return [line.lstrip("# ").split("#")[0] for line in lines if "launch --config_file recipes/accelerate/" in line]


@pytest.mark.parametrize("command", documented_launches())
def test_documented_launches_keep_the_papers_effective_batch(command):
    words = command.split()
    config = ClusterConfig.from_yaml_file(str(REPO / words[words.index("--config_file") + 1]))
    processes = int(words[words.index("--num_processes") + 1]) if "--num_processes" in words else config.num_processes
    recipe_at = words.index("grootl.train") + 1
    run = load_recipe(REPO / words[recipe_at], words[recipe_at + 1:])
    assert run.train.batch_size * run.train.grad_accum * processes == 16


@pytest.mark.parametrize("command", [c for c in documented_launches() if "fsdp" in c])
def test_documented_fsdp_launches_wrap_the_models_decoder_layers(monkeypatch, command):
    """Accelerate's own name resolution, on a tiny model of the recipe's family, finds every class the
    launch wraps, and those units hold every GrootL mixer."""
    words = command.split()
    plugin = launched_fsdp_plugin(monkeypatch, words[words.index("launch") + 1:words.index("-m")])
    hub_id = load_recipe(REPO / words[words.index("grootl.train") + 1]).model.name_or_path
    model_type = next(family for prefix, family in CHECKPOINT_FAMILIES.items() if hub_id.startswith(prefix))
    model = tiny_family_model(model_type)
    plugin.set_auto_wrap_policy(model)  # raises naming a class the model lacks
    wrapped = tuple(plugin.auto_wrap_policy.keywords["transformer_layer_cls"])
    assert wrapped and {cls.__name__ for cls in wrapped} <= set(model._no_split_modules)
    in_units = {id(sub) for unit in model.modules() if isinstance(unit, wrapped) for sub in unit.modules()}
    mixers = model.grootl_mixers() if model_type != "mamba" else [m for m in model.modules() if type(m).__name__ == "GrootLMixer"]
    assert mixers and all(id(mixer) in in_units for mixer in mixers)


def test_random_family_config_errors_name_the_config_class():
    tiny = load_recipe(TINY_FAMILY_RECIPES["bamba"])
    with pytest.raises(RecipeError, match=r"model.config has unknown BambaConfig field\(s\) \['state_size'\]"):
        build_base(load_recipe(TINY_FAMILY_RECIPES["bamba"], ["model.config.state_size=8"]))
    with pytest.raises(RecipeError, match=r"model.config.model_type 'mamba3' is not a supported family: \['mamba', "):
        build_base(load_recipe(TINY_FAMILY_RECIPES["bamba"], ["model.config.model_type=mamba3"]))
    with pytest.raises(RecipeError, match=r"model.config is not a valid BambaConfig: "):
        build_base(load_recipe(TINY_FAMILY_RECIPES["bamba"], ["model.config.mamba_n_heads=3"]))
    assert type(build_base(tiny)).__name__ == "GrootLBambaForCausalLM"


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILY_RECIPES))
def test_tiny_family_recipe_trains_exports_and_reloads(tmp_path, model_type):
    run = load_recipe(TINY_FAMILY_RECIPES[model_type], [
        f"output_dir={tmp_path / 'run'}", "data.max_length=48", "train.batch_size=4", "train.grad_accum=1",
        "train.max_steps=6", "train.warmup_steps=0", "train.schedule=constant", "log.progress=false",
        "log.trackers=[]", "data.eval_size=0", "eval.every=null", "checkpoint.every=null"])
    final = train(run)
    merged, base = load_model(str(final)).eval(), load_model(str(tmp_path / "run/base")).eval()
    assert merged.config.model_type == f"grootl_{model_type}" and merged.grootl.enabled and merged.grootl.modulation == 0.3
    texts = [json.loads(line)["output"] for line in (ASSETS / "alpaca_tiny.jsonl").read_text().splitlines()[:4]]
    batch = AutoTokenizer.from_pretrained(final)(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
    ids = batch["input_ids"]
    labels = ids.masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :8] = -100  # the first 8 tokens are the prompt
    with torch.no_grad():
        trained, untrained = (m(input_ids=ids, labels=labels) for m in (merged, base))
        adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
        torch.testing.assert_close(adapted(input_ids=ids, labels=labels).logits, trained.logits, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(trained.loss) and not torch.allclose(trained.logits, untrained.logits, atol=1e-3)


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
    assert err.startswith("grootl train: error: command line: unknown recipe key 'train.nope'") and "Traceback" not in err


def test_cli_prints_the_resolved_recipe(capsys):
    assert cli_main(["train", str(PAPER_130M["lora"]), "train.lr=3e-4", "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "lora" and printed["train"]["lr"] == 3e-4
