"""lm-eval integration: the `grootl` model (context lengths per request), offline task YAMLs, `grootl eval`.

Tiny random Mamba models and the fixture splits in tests/assets/eval; small slices of ../shared/data
where it exists.
"""

from __future__ import annotations

import os

# lm-eval, datasets and huggingface_hub read these at import: set them before importing lm_eval.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import math
import shutil
import warnings
from pathlib import Path

import lm_eval
import peft
import pytest
import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from grootl.evaluation import compare, run
from grootl.evaluation.lm import GrootLLM
from grootl.evaluation.tasks import PAPER_SUITE, TASK_TEMPLATES, render_offline_tasks
from grootl.model import GrootLConfig, tiny_config, tiny_model

ASSETS = Path(__file__).parent / "assets"
FIXTURES = ASSETS / "eval"
UPSTREAM_TASKS = Path(lm_eval.__file__).parent / "tasks"
UPSTREAM_YAML = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "sst2": "glue/sst2/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "race": "race/race.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
DATA_FILE = {
    "piqa": "piqa_validation.jsonl",
    "arc_easy": "arc_easy_test.jsonl",
    "sst2": "sst2_validation.jsonl",
    "winogrande": "winogrande_validation.jsonl",
    "lambada_openai": "lambada_openai_test.jsonl",
    "race": "race_test.jsonl",
    "openbookqa": "openbookqa_test.jsonl",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A stock tiny Mamba checkpoint with the tiny tokenizer, a random LoRA adapter on it (with its
    base recorded), and a saved GrootL checkpoint with its own λ."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    torch.manual_seed(0)
    transformers.MambaForCausalLM(tiny_config()).save_pretrained(root / "stock")
    tokenizer.save_pretrained(root / "stock")
    base = transformers.MambaForCausalLM.from_pretrained(root / "stock")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["x_proj", "in_proj"], init_lora_weights=False)
    peft.get_peft_model(base, lora).save_pretrained(root / "adapter")
    tiny_model(GrootLConfig(modulation=0.5)).save_pretrained(root / "grootl")
    tokenizer.save_pretrained(root / "grootl")
    return {name: str(root / name) for name in ("stock", "adapter", "grootl")}


@pytest.fixture(scope="module")
def fixture_tasks(tmp_path_factory) -> TaskManager:
    """The offline task YAMLs rendered for the fixture splits (offline only: no default task index)."""
    rendered = render_offline_tasks(FIXTURES, tmp_path_factory.mktemp("tasks"))
    return TaskManager(include_path=str(rendered), include_defaults=False)


@pytest.fixture(scope="module")
def plain_scores(models, fixture_tasks) -> dict:
    """The grootl model with λ = 0 on the stock checkpoint, all fixture tasks (shared by tests)."""
    return evaluate(fixture_tasks, "grootl", pretrained=models["stock"], modulation=0)


def evaluate(task_manager, model: str, batch_size: int = 4, tasks=PAPER_SUITE, **model_args) -> dict:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks), batch_size=batch_size, device="cpu",
        task_manager=task_manager, log_samples=True,
    )


def loglikelihoods(results: dict) -> dict[str, list[float]]:
    """Per task, every request's log-likelihood in document order."""
    return {
        task: [resp[0][0] for sample in sorted(samples, key=lambda s: s["doc_id"]) for resp in sample["resps"]]
        for task, samples in results["samples"].items()
    }


def metrics(results: dict) -> dict:
    return {task: {k: v for k, v in values.items() if k != "alias"} for task, values in results["results"].items()}


# --- the grootl lm-eval model ------------------------------------------------------------------------


def test_lambda_zero_equals_hf(models, fixture_tasks, plain_scores):
    hf = evaluate(fixture_tasks, "hf", pretrained=models["stock"])
    ours = plain_scores
    assert set(ours["results"]) == set(PAPER_SUITE)
    # The native CPU scan sums in another order than transformers' torch loop: float32 rounding only.
    for task, expected in loglikelihoods(hf).items():
        assert loglikelihoods(ours)[task] == pytest.approx(expected, rel=1e-6, abs=1e-5), task
    for task, values in metrics(hf).items():
        for name, value in values.items():
            if name.startswith("acc") or not isinstance(value, float):  # accuracies: exactly the same
                assert metrics(ours)[task][name] == value, (task, name)
            else:  # perplexities follow the log-likelihoods
                assert metrics(ours)[task][name] == pytest.approx(value, rel=1e-5), (task, name)


def test_peft_adapter_equals_hf_with_peft(models, fixture_tasks, plain_scores):
    hf = evaluate(fixture_tasks, "hf", pretrained=models["stock"], peft=models["adapter"])
    ours = evaluate(fixture_tasks, "grootl", pretrained=models["stock"], peft=models["adapter"], modulation=0)
    adapter_only = evaluate(fixture_tasks, "grootl", pretrained=models["adapter"], modulation=0)
    no_adapter = plain_scores
    assert loglikelihoods(adapter_only) == loglikelihoods(ours)  # base found from adapter_config.json
    for task, expected in loglikelihoods(hf).items():
        # The GrootL mixer and transformers' scan round differently at ~1e-7 once LoRA changes the
        # projections' memory layout (and the native scan sums in its own order).
        assert loglikelihoods(ours)[task] == pytest.approx(expected, rel=1e-6, abs=1e-5), task
        assert loglikelihoods(no_adapter)[task] != pytest.approx(expected, rel=1e-3), task
    assert {t: m.get("acc,none") for t, m in metrics(ours).items()} == {t: m.get("acc,none") for t, m in metrics(hf).items()}


def test_tree_changes_scores_and_a_request_scores_the_same_alone_or_in_a_batch(models, fixture_tasks, plain_scores):
    plain = loglikelihoods(plain_scores)
    alone = loglikelihoods(evaluate(fixture_tasks, "grootl", 1, pretrained=models["stock"], modulation=0.5))
    batched = loglikelihoods(evaluate(fixture_tasks, "grootl", 16, pretrained=models["stock"], modulation=0.5))
    for task in PAPER_SUITE:
        assert batched[task] == pytest.approx(alone[task], rel=1e-6, abs=1e-5), task
        assert alone[task] != pytest.approx(plain[task], rel=1e-6, abs=1e-5), task


def _loglikelihood_by_hand(model, context: list[int], continuation: list[int], context_len: int) -> float:
    ids = torch.tensor([context + continuation][0][:-1])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, context_lens=torch.tensor([context_len])).logits.log_softmax(-1)[0]
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return sum(float(logits[p, token]) for p, token in zip(positions, continuation))


def _split_like_lm_eval(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: the whole string's tokens, the first len(tokens of context) being context."""
    whole, context_len = lm.tok_encode(context + continuation), len(lm.tok_encode(context))
    return whole[:context_len], whole[context_len:]


def test_each_row_gets_its_own_context_length(models):
    lm = GrootLLM(pretrained=models["stock"], modulation=0.5, device="cpu", batch_size=4)
    seen = []
    lm.model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["context_lens"].tolist()), with_kwargs=True)
    # Two requests share their model input (tokens of "a b c d" minus the last) with different context
    # splits: lm-eval's logits cache would give both the same forward; each must get its own tree.
    pairs = [("The cat sat on the", " mat"), ("A", " b c d e"), ("A b", " c d e"), ("Numbers: one two three four five", " six")]
    requests = [Instance("loglikelihood", {}, pair, i, ("t", i, 1)) for i, pair in enumerate(pairs)]
    scored = lm.loglikelihood(requests)
    encoded = [_split_like_lm_eval(lm, context, continuation) for context, continuation in pairs]
    assert encoded[1][0] + encoded[1][1] == encoded[2][0] + encoded[2][1] and encoded[1][0] != encoded[2][0]
    assert sorted(sum(seen, [])) == sorted(len(context) for context, _ in encoded)
    for (context, continuation), (logprob, _) in zip(encoded, scored):
        assert logprob == pytest.approx(_loglikelihood_by_hand(lm.model, context, continuation, len(context)), abs=1e-5)
    # A context split elsewhere scores differently, so the lengths above are what decided the scores.
    context, continuation = encoded[0]
    assert scored[0][0] != pytest.approx(_loglikelihood_by_hand(lm.model, context, continuation, len(context) + 1), abs=1e-5)


def test_truncated_context_length_is_what_the_model_sees(models):
    lm = GrootLLM(pretrained=models["stock"], modulation=0.5, device="cpu", batch_size=2, max_length=12)
    seen = []
    lm.model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["context_lens"].tolist()), with_kwargs=True)
    context, continuation = "one two three four five six seven eight nine ten", " eleven"
    (logprob, _), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    context_ids, continuation_ids = _split_like_lm_eval(lm, context, continuation)
    kept = 12 + 1 - len(continuation_ids)  # lm-eval keeps the last max_length + 1 tokens, then drops one
    assert len(context_ids) > kept and seen == [[kept]]
    assert logprob == pytest.approx(_loglikelihood_by_hand(lm.model, context_ids[-kept:], continuation_ids, kept), abs=1e-5)


def test_rolling_and_generation_match_hf_at_lambda_zero_and_batch_at_lambda_positive(models):
    texts = ["the quick brown fox jumps over the lazy dog", "hello there", "a b c d e f g h i j k l m n o p"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    prompts = [Instance("generate_until", {}, (t, gen_kwargs), i) for i, t in enumerate(texts)]
    hf = HFLM(pretrained=models["stock"], device="cpu", batch_size=3)
    plain = GrootLLM(pretrained=models["stock"], modulation=0, device="cpu", batch_size=3)
    assert plain.loglikelihood_rolling(rolling) == hf.loglikelihood_rolling(rolling)
    assert plain.generate_until(prompts) == hf.generate_until(prompts)
    tree_batched = GrootLLM(pretrained=models["stock"], modulation=0.5, device="cpu", batch_size=3)
    tree_alone = GrootLLM(pretrained=models["stock"], modulation=0.5, device="cpu", batch_size=1)
    assert tree_batched.generate_until(prompts) == tree_alone.generate_until(prompts)
    scores = tree_batched.loglikelihood_rolling(rolling)
    assert scores == pytest.approx(tree_alone.loglikelihood_rolling(rolling), abs=1e-5)
    assert all(math.isfinite(s) for s in scores)


def test_an_adapter_loads_without_warnings(models):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = GrootLLM(pretrained=models["adapter"], device="cpu")
    assert isinstance(lm.model, peft.PeftModel)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_grootl_checkpoint_keeps_its_modulation_unless_overridden(models):
    assert GrootLLM(pretrained=models["grootl"], device="cpu").grootl_config.modulation == 0.5
    overridden = GrootLLM(pretrained=models["grootl"], device="cpu", modulation=0.1, k=2, grootl_enabled=False)
    assert overridden.grootl_config == GrootLConfig(modulation=0.1, k=2, enabled=False)
    assert GrootLLM(pretrained=models["stock"], device="cpu").grootl_config == GrootLConfig()


# --- offline task YAMLs -------------------------------------------------------------------------------


def _hub_schema(task: str, doc: dict) -> dict:
    """A local record in the field layout of the hub split lm-eval's standard task reads."""
    if task not in ("arc_easy", "openbookqa"):
        return doc
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    question = {"question": doc["question"]} if task == "arc_easy" else {"question_stem": doc["question"]}
    return {"id": doc["id"], **question, "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]}


def _requests(config: dict) -> list:
    task = ConfigurableTask(config=config)
    task.build_all_requests()
    targets = [task.doc_to_target(doc) for doc in task.eval_docs]
    return [(i.doc_id, i.request_type, i.arguments) for i in task.instances] + targets


def assert_offline_matches_standard(task: str, data_dir: Path, tmp_path: Path) -> None:
    """The offline YAML builds the very requests lm-eval's standard task builds from the same records."""
    offline = load_yaml(render_offline_tasks(data_dir, tmp_path / "rendered") / f"{task}.yaml")
    standard = load_yaml(UPSTREAM_TASKS / UPSTREAM_YAML[task])
    split = "test" if standard.get("test_split") else "validation"
    docs = [json.loads(line) for line in (data_dir / DATA_FILE[task]).read_text().splitlines()]
    hub_file = tmp_path / f"hub_{task}.jsonl"
    hub_file.write_text("".join(json.dumps(_hub_schema(task, doc)) + "\n" for doc in docs))
    standard.pop("tag", None)
    standard.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(hub_file)}})
    standard.update(training_split=None, validation_split="validation" if split == "validation" else None)
    assert offline[f"{split}_split"] == split
    # The same metrics, each with its aggregation and direction spelt out (lm-eval warns where one is not).
    assert [m["metric"] for m in offline["metric_list"]] == [m["metric"] for m in standard["metric_list"]]
    for ours, theirs in zip(offline["metric_list"], standard["metric_list"]):
        assert {"aggregation", "higher_is_better"} <= set(ours) and ours.items() >= theirs.items()
    assert offline["metadata"] == standard["metadata"]
    built = _requests(offline)
    assert len(built) > len(docs)
    assert built == _requests(standard)


@pytest.mark.parametrize("task", PAPER_SUITE)
def test_offline_yaml_builds_the_standard_requests_on_fixtures(task, tmp_path):
    assert_offline_matches_standard(task, FIXTURES, tmp_path)


@pytest.mark.parametrize("task", [t for t in PAPER_SUITE if t != "race"])
def test_offline_yaml_builds_the_standard_requests_on_shared_slices(task, shared_data, tmp_path):
    data_dir = tmp_path / "slice"
    data_dir.mkdir()
    lines = (shared_data / "eval" / DATA_FILE[task]).read_text().splitlines()[:25]
    (data_dir / DATA_FILE[task]).write_text("\n".join(lines) + "\n")
    assert_offline_matches_standard(task, data_dir, tmp_path)


# --- grootl eval ----------------------------------------------------------------------------------------


def test_cli_paper_suite_offline_then_compare(models, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "grootl-run"  # `grootl train` layout: the merged model in final/
    shutil.copytree(models["grootl"], run_dir / "final")
    monkeypatch.chdir(tmp_path)
    arms = [("base", [models["stock"], "--no-tree", "--output", "base.results.json"]), ("grootl-run", [str(run_dir)])]
    for name, argv in arms:
        argv += ["--suite", "paper", "--data-dir", str(FIXTURES), "--limit", "1", "--batch-size", "3", "--device", "cpu"]
        assert run.main(argv) == 0
        results = json.loads((tmp_path / f"{name}.results.json").read_text())
        assert set(results["results"]) == set(PAPER_SUITE)
        assert results["config"]["model"] == "grootl"
        assert all(n["effective"] == 1 for n in results["n-samples"].values())
        assert math.isfinite(results["results"]["lambada_openai"]["perplexity,none"])
    assert str(run_dir / "final") in str(results["config"]["model_args"])
    capsys.readouterr()
    assert compare.main(["base.results.json", "grootl-run.results.json", "--chart", "chart.png"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| run | PIQA acc | ARC-E acc | SST-2 acc |")
    assert "| base |" in table and "| grootl-run |" in table
    assert (tmp_path / "chart.png").stat().st_size > 0


def test_cli_keeps_existing_results_unless_told(models, tmp_path, capsys, monkeypatch):
    output = tmp_path / "kept.json"
    output.write_text('{"results": "from an earlier run"}')
    argv = [models["stock"], "--tasks", "piqa", "--data-dir", str(FIXTURES), "--limit", "1", "--device", "cpu",
            "--output", str(output)]
    monkeypatch.setattr(run, "evaluate", lambda *a: pytest.fail("evaluated although the output exists"))
    assert run.main(argv) == 2
    assert f"{output} already exists: pass --overwrite" in capsys.readouterr().err
    assert output.read_text() == '{"results": "from an earlier run"}'
    monkeypatch.undo()
    assert run.main([*argv, "--overwrite"]) == 0
    assert set(json.loads(output.read_text())["results"]) == {"piqa"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]  # no partial file left behind


def test_cli_offline_on_shared_data(models, shared_data, tmp_path):
    output = tmp_path / "shared.json"
    tasks = [t for t in PAPER_SUITE if t != "race"]
    argv = [models["adapter"], "--tasks", ",".join(tasks), "--data-dir", str(shared_data / "eval"),
            "--limit", "2", "--batch-size", "4", "--output", str(output)]  # default device: cpu without a GPU
    assert run.main(argv) == 0
    results = json.loads(output.read_text())
    assert set(results["results"]) == set(tasks)
    assert all(n["effective"] == 2 for n in results["n-samples"].values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["MODEL", "--tasks", "piqa,no_such_task", "--data-dir", str(FIXTURES)], "unknown task(s): no_such_task"),
        (["./no/such/model", "--tasks", "piqa"], "model path ./no/such/model does not exist"),
        (["MODEL", "--suite", "paper", "--data-dir", "EMPTY"], "missing data file(s) for piqa: "),
        (["MODEL", "--tasks", "piqa", "--data-dir", "./no/such/dir"], "is not a directory"),
        (["EMPTY", "--tasks", "piqa"], "holds no model (config.json), adapter (adapter_config.json) or run"),
        (["MODEL", "--peft", "EMPTY", "--tasks", "piqa"], "holds no adapter_config.json"),
        (["MODEL", "--peft", "./no/adapter", "--tasks", "piqa"], "--peft ./no/adapter does not exist"),
        (["MODEL", "--tasks", "piqa", "--batch-size", "many"], "expected a positive int, 'auto' or 'auto:N'"),
        (["MODEL", "--tasks", "piqa", "--modulation", "-0.5"], "λ must be a number >= 0; got -0.5"),
        (["MODEL", "--tasks", "piqa", "--include-path", "TASKS"], "offline task YAMLs (__DATA_DIR__ placeholders): pass --data-dir"),
        (["GPT2", "--tasks", "piqa"], "is not a Mamba checkpoint: its config has model_type='gpt2'"),
        (["BASELESS", "--tasks", "piqa"], "names no base_model_name_or_path"),
    ],
)
def test_cli_bad_input_is_a_clear_error(models, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "baseless").mkdir()
    (tmp_path / "baseless" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    named = {"MODEL": models["stock"], "EMPTY": str(tmp_path / "empty"), "TASKS": str(TASK_TEMPLATES),
             "GPT2": str(tmp_path / "gpt2"), "BASELESS": str(tmp_path / "baseless")}
    argv = [named.get(a, a) for a in argv]
    try:
        assert run.main([*argv, "--device", "cpu", "--output", str(tmp_path / "out.json")]) == 2
    except SystemExit as exit_:  # argparse rejects a malformed option value
        assert exit_.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()



def test_cli_hub_model_that_cannot_be_reached_is_one_line(tmp_path, capsys, monkeypatch):
    """A hub id with no network (or no such repo) behind it: one line, not lm-eval's traceback."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub cannot be reached
    assert run.main(["someone/no-such-mamba", "--tasks", "piqa", "--output", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grootl eval: error: cannot load a Mamba checkpoint from 'someone/no-such-mamba': ")
    assert err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()
