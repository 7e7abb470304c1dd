"""The GrootL Mamba model against transformers' stock MambaForCausalLM, its own full forward (for
decoding), single-row runs (for batching), and PEFT / checkpointing / saving round trips."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
import transformers.models.mamba.modeling_mamba as stock_mamba
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

import grootl
import grootl.model.mixer as mixer_module
from conftest import REPO
from grootl.model import (GrootLConfig, GrootLMambaForCausalLM, load_model, merge_adapter, tiny_config,
                          tiny_model)

F64 = torch.float64
LORA_TARGETS = ["x_proj", "embeddings", "in_proj", "out_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the scans take many small steps, and OpenMP threads stall badly on a
    shared CPU (measured: the 130M-shape test takes ~13 s on one thread, minutes on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact_selective_scan(u, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, **_):
    """transformers' torch selective scan without its float32 casts of B and u (so a float64 model
    stays float64 throughout): h = exp(Δ A) h + Δ B u, y = (C·h + D u) * SiLU(z) (z optional)."""
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + u * D[:, None]
    y = y if z is None else y * F.silu(z)
    return (y, h) if return_last_state else y


@pytest.fixture
def exact_stock(monkeypatch):
    """Stock MambaForCausalLM with its scan computed in the input precision (everything else untouched)."""
    monkeypatch.setattr(stock_mamba, "mamba_selective_scan", exact_selective_scan)


def stock_twin(model: GrootLMambaForCausalLM) -> MambaForCausalLM:
    """A stock MambaForCausalLM holding the same weights."""
    config = MambaConfig(**{k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "grootl")})
    stock = MambaForCausalLM(config).to(model.dtype).eval()
    stock.load_state_dict(model.state_dict())
    return stock


def last_hidden(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True, **kwargs).hidden_states[-1]


def random_ids(batch, length, vocab=512, seed=0):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- settings and loading -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(modulation=-0.1), "-0.1"),
        (dict(modulation=float("nan")), "nan"),
        (dict(distance="hamming"), "hamming"),
        (dict(k=0), "0"),
        (dict(enabled="yes"), "yes"),
    ],
)
def test_bad_grootl_config_names_the_value(kwargs, word):
    with pytest.raises(ValueError, match=word):
        GrootLConfig(**kwargs)


def test_unknown_grootl_field_is_an_error():
    with pytest.raises(ValueError, match="lambda"):
        GrootLConfig.from_dict({"lambda": 0.3})


def test_lazy_exports():
    assert grootl.GrootLConfig is GrootLConfig and grootl.load_model is load_model


def test_save_round_trip_and_stock_transformers_loads_the_weights(tmp_path):
    settings = GrootLConfig(modulation=0.5, k=2, distance="euclidean")
    model = tiny_model(grootl=settings)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["grootl"] == settings.to_dict() and saved["model_type"] == "grootl_mamba"

    loaded = load_model(tmp_path)
    assert isinstance(loaded, GrootLMambaForCausalLM) and loaded.grootl == settings
    assert all(layer.mixer.grootl == settings for layer in loaded.backbone.layers)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(auto) is GrootLMambaForCausalLM and auto.grootl == settings
    override = load_model(tmp_path, grootl=GrootLConfig(enabled=False))
    assert override.grootl == GrootLConfig(enabled=False)

    stock = MambaForCausalLM.from_pretrained(tmp_path)
    assert type(stock) is MambaForCausalLM
    for name, value in model.state_dict().items():
        assert torch.equal(stock.state_dict()[name], value), name


def test_load_stock_checkpoint_keeps_weights_and_parameter_count(tmp_path):
    stock = MambaForCausalLM(tiny_config())
    stock.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=F64)
    assert model.grootl == GrootLConfig() and model.dtype == F64
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in stock.parameters())
    assert model.state_dict().keys() == stock.state_dict().keys()
    for name, value in stock.state_dict().items():
        assert torch.equal(model.state_dict()[name], value.to(F64)), name
    assert load_model(tmp_path, grootl={"modulation": 0.1}).grootl.modulation == 0.1


def test_load_model_takes_a_run_directory_and_refuses_missing_local_paths_at_once(tmp_path, monkeypatch):
    model = tiny_model(grootl=GrootLConfig(modulation=0.2))
    model.save_pretrained(tmp_path / "runs" / "demo" / "final")
    monkeypatch.chdir(tmp_path)
    loaded = load_model("runs/demo")  # a grootl train run directory: its final/ model
    assert loaded.grootl == GrootLConfig(modulation=0.2)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # no hub retries either way: the path looks local
    for missing in ("./no-such-model", "runs/no-such-run", str(tmp_path / "absent")):
        with pytest.raises(ValueError, match=f"^model path {re.escape(missing)} does not exist$"):
            load_model(missing)


def test_load_model_rejects_what_is_not_a_mamba_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no_such_dir"):
        load_model(tmp_path / "no_such_dir")
    tiny_model().save_pretrained(tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    config["grootl"]["modulation"] = -2
    (tmp_path / "edited" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="edited.*modulation.*-2"):
        load_model(tmp_path / "edited")
    assert load_model(tmp_path / "edited", grootl=GrootLConfig()).grootl == GrootLConfig()
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_model(tmp_path / "gpt2")


# ---- equality with the stock model ----------------------------------------------------------------


@pytest.mark.parametrize("settings", [GrootLConfig(enabled=False), GrootLConfig(modulation=0.0)])
def test_tree_off_equals_stock_mamba(settings, exact_stock, monkeypatch):
    model = tiny_model(grootl=settings).to(F64).eval()
    stock = stock_twin(model)
    monkeypatch.setattr("grootl.model.mixer.build_tree", None)  # the tree must not even be built
    ids = random_ids(3, 20)
    torch.testing.assert_close(last_hidden(model, ids), last_hidden(stock, ids), rtol=0, atol=1e-10)


def test_tree_off_matches_untouched_stock_within_its_float32_casts():
    model = tiny_model(grootl=GrootLConfig(enabled=False)).eval()
    ids = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock_twin(model)(ids).logits, rtol=1e-5, atol=1e-5)


def test_short_context_is_the_chain_scaled_by_one_plus_modulation(exact_stock):
    """With context length <= 2 the tree is the chain, so y = (1+λ)·C·h + D·u: the stock model with
    the B rows of every x_proj scaled by 1+λ."""
    lam = 0.3
    model = tiny_model(grootl=GrootLConfig(modulation=lam)).to(F64).eval()
    stock = stock_twin(model)
    rank, n = model.config.time_step_rank, model.config.state_size
    with torch.no_grad():
        for layer in stock.backbone.layers:
            layer.mixer.x_proj.weight[rank : rank + n] *= 1 + lam
    ids = random_ids(3, 18)
    ours = last_hidden(model, ids, context_lens=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(ours, last_hidden(stock, ids), rtol=0, atol=1e-10)
    assert (last_hidden(model, ids, context_lens=torch.tensor([18, 18, 18])) - ours).abs().max() > 1e-6


def test_mixer_follows_the_published_semantics():
    """One mixer against ../shared/README.md written out: y = chain + D·u + λ·tree scan (plain
    oracle) over the MST of the prompt graph, then ·SiLU(z) and out_proj."""
    from grootl.tree import build_tree, tree_scan_ref

    lam = 0.7
    mixer = tiny_model(grootl=GrootLConfig(modulation=lam)).to(F64).backbone.layers[1].mixer
    seen = {}
    mixer.in_proj.register_forward_hook(lambda m, i, o: seen.update(z=o.transpose(1, 2).chunk(2, dim=1)[1]))
    mixer.x_proj.register_forward_hook(lambda m, i, o: seen.update(u=i[0].transpose(1, 2), proj=o))
    hidden = torch.randn(2, 15, 32, dtype=F64, generator=torch.Generator().manual_seed(5))
    lens = torch.tensor([9, 15])
    with torch.no_grad():
        out = mixer(hidden, context_lens=lens)
        u, z = seen["u"], seen["z"]
        rank, n = mixer.time_step_rank, mixer.ssm_state_size
        dt, B, C = (p.transpose(1, 2) for p in seen["proj"].split([rank, n, n], dim=-1))
        delta = F.softplus(mixer.dt_proj(dt.transpose(1, 2)).transpose(1, 2))
        A = -torch.exp(mixer.A_log)
        chain = exact_selective_scan(u, delta, A, B, C, D=mixer.D)
        tree = tree_scan_ref(u, delta, A, B, C, build_tree(u, delta, B, lens))
        expected = mixer.out_proj(((chain + lam * tree) * F.silu(z)).transpose(1, 2))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)


def test_each_block_runs_the_chain_and_tree_scans_in_one_call(monkeypatch):
    import grootl.model.mixer as mixer_module

    calls = []
    for name in ("chain_scan", "tree_scan", "chain_tree_scan"):
        original = getattr(mixer_module, name)
        monkeypatch.setattr(mixer_module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = tiny_model(num_hidden_layers=3).eval()
    with torch.no_grad():
        model(random_ids(2, 10), use_cache=True, context_lens=[6, 10])
    assert calls == ["chain_tree_scan"] * 3
    calls.clear()
    with torch.no_grad():  # no prompt: the tree is the chain, nothing more to scan
        model(random_ids(2, 10), use_cache=True)
    assert calls == ["chain_scan"] * 3


# ---- context lengths ------------------------------------------------------------------------------


def test_rows_with_different_contexts_equal_each_row_alone():
    model = tiny_model().to(F64).eval()
    ids, lens = random_ids(3, 20), torch.tensor([4, 11, 20])
    batched = last_hidden(model, ids, context_lens=lens)
    for row in range(3):
        alone = last_hidden(model, ids[row : row + 1], context_lens=lens[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=1e-12)
    assert (batched[0] - last_hidden(model, ids[:1], context_lens=torch.tensor([11]))[0]).abs().max() > 1e-6


def test_context_lens_come_from_the_leading_ignored_labels():
    model = tiny_model().to(F64).eval()
    ids, lens = random_ids(2, 16), torch.tensor([5, 9])
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, :9] = -100
    labels[1, 14:] = -100  # trailing ignored labels (right padding) do not count
    with torch.no_grad():
        from_labels = model(ids, labels=labels)
        explicit = model(ids, context_lens=lens)
        default = model(ids)
    torch.testing.assert_close(from_labels.logits, explicit.logits, rtol=0, atol=0)
    assert (from_labels.logits - default.logits).abs().max() > 1e-6
    expected = F.cross_entropy(explicit.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(from_labels.loss, expected)


def test_response_positions_only_see_the_past_and_the_prompt():
    model = tiny_model().to(F64).eval()
    ids, lens = random_ids(1, 20), torch.tensor([8])
    changed = ids.clone()
    changed[0, 13] = (ids[0, 13] + 1) % 512
    a, b = last_hidden(model, ids, context_lens=lens), last_hidden(model, changed, context_lens=lens)
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=0)
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 0
    # inside the prompt the tree may carry later prompt tokens to earlier positions
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 512
    assert (last_hidden(model, changed, context_lens=lens)[:, :7] - a[:, :7]).abs().max() > 0


@pytest.mark.parametrize(
    "context_lens, message",
    [([3, 17], "context_lens\\[1\\] = 17 is outside \\[0, 16\\]"), ([-1, 2], "-1"), ([3], "shape \\(2,\\)"), ([1.5, 2.0], "integers")],
)
def test_bad_context_lens_names_the_value(context_lens, message):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=message):
        model(random_ids(2, 16), context_lens=torch.tensor(context_lens))


# ---- generation -----------------------------------------------------------------------------------


def test_cached_decoding_equals_a_full_forward_with_the_prompt_as_context():
    model = tiny_model().to(F64).eval()
    prompt, steps = random_ids(2, 9), random_ids(2, 5, seed=1)
    whole_prompt = torch.tensor([9, 9])
    with torch.no_grad():
        out = model(prompt, use_cache=True, output_hidden_states=True, context_lens=whole_prompt)
        decoded = [out.hidden_states[-1][:, -1]]
        for t in range(steps.shape[1]):
            out = model(steps[:, t : t + 1], cache=out.cache, use_cache=True, output_hidden_states=True)
            decoded.append(out.hidden_states[-1][:, -1])
        prefill = model(prompt, use_cache=True, context_lens=whole_prompt)
        chunk = model(steps, cache=prefill.cache, use_cache=True, output_hidden_states=True).hidden_states[-1]
    full_ids = torch.cat([prompt, steps], 1)
    full = last_hidden(model, full_ids, context_lens=whole_prompt)
    torch.testing.assert_close(torch.stack(decoded, 1), full[:, 8:], rtol=0, atol=1e-10)
    torch.testing.assert_close(chunk, full[:, 9:], rtol=0, atol=1e-10)  # several new tokens in one call
    # without the context length the prompt is empty (no tree mixing): a different function
    assert (last_hidden(model, full_ids)[:, 9:] - full[:, 9:]).abs().max() > 1e-6


@pytest.mark.parametrize("attention_mask", [False, True])
def test_without_labels_or_context_lens_no_position_sees_a_later_one(attention_mask):
    """The default prompt is empty: changing tokens 12+ changes no logit before 12, and the result is
    the tree over an empty prompt (the chain scaled as in decoding), not plain Mamba."""
    model = tiny_model().to(F64).eval()
    ids = random_ids(2, 20)
    edited = ids.clone()
    edited[:, 12:] = random_ids(2, 8, seed=5)
    extra = {"attention_mask": torch.ones_like(ids)} if attention_mask else {}
    with torch.no_grad():
        logits, logits_edited = model(ids, **extra).logits, model(edited, **extra).logits
        empty_prompt = model(ids, context_lens=[0, 0]).logits
        plain = model(ids, context_lens=[20, 20]).logits
        model.set_grootl(GrootLConfig(enabled=False))
        no_tree = model(ids).logits
    assert torch.equal(logits[:, :12], logits_edited[:, :12])
    torch.testing.assert_close(logits, empty_prompt, rtol=1e-10, atol=1e-10)
    assert (logits - no_tree).abs().max() > 1e-6 and (logits - plain).abs().max() > 1e-6


def test_old_cache_params_name_is_the_cache():
    """Stock Mamba still accepts ``cache_params=`` (deprecated name of ``cache``): same meaning here."""
    model = tiny_model().to(F64).eval()
    prompt, step = random_ids(2, 9), random_ids(2, 1, seed=1)
    with torch.no_grad():
        new = model(step, cache=model(prompt, use_cache=True).cache, use_cache=True).logits
        with pytest.warns(FutureWarning):
            old = model(step, cache_params=model(prompt, use_cache=True).cache, use_cache=True).logits
    torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_decoding_accepts_the_attention_mask_of_the_whole_sequence():
    """Manual decode loops pass the mask of everything so far; only its new columns apply."""
    model = tiny_model().to(F64).eval()
    prompt, step = random_ids(2, 9), random_ids(2, 1, seed=1)
    with torch.no_grad():
        plain = model(step, cache=model(prompt, use_cache=True).cache, use_cache=True).logits
        masked = model(step, cache=model(prompt, use_cache=True).cache, use_cache=True,
                       attention_mask=torch.ones(2, 10, dtype=torch.long)).logits
    assert masked.shape == plain.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(masked, plain, rtol=0, atol=0)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("context_lens", [None, torch.tensor([3, 10])])
def test_generate_logits_equal_full_forward(context_lens, use_cache):
    """generate() gives the tree the prompt (the whole prompt unless given), then decodes; without the
    cache every step re-runs the same prompt tree, so both ways give the same logits."""
    model = tiny_model().to(F64).eval()
    prompt = random_ids(2, 10)
    extra = {} if context_lens is None else {"context_lens": context_lens}
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        use_cache=use_cache,
        **extra,
    )
    with torch.no_grad():
        full = model(out.sequences, context_lens=torch.tensor([10, 10]) if context_lens is None else context_lens).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 9:-1], rtol=1e-6, atol=1e-6)


def test_left_padded_batch_generation_equals_one_by_one():
    model = tiny_model().eval()
    prompts = [random_ids(1, 9, seed=2), random_ids(1, 4, seed=3), random_ids(1, 6, seed=4)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 9 - p.shape[1] :], mask[row, 9 - p.shape[1] :] = p[0], 1
    kwargs = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    logits = torch.stack(batched.logits, 1)
    assert torch.isfinite(logits).all()
    for row, p in enumerate(prompts):
        alone = model.generate(p, **kwargs)
        assert torch.equal(batched.sequences[row, 9:], alone.sequences[0, p.shape[1] :])
        torch.testing.assert_close(logits[row], torch.stack(alone.logits, 1)[0], rtol=1e-5, atol=1e-5)


def test_tree_off_generation_equals_stock_generation():
    model = tiny_model(grootl=GrootLConfig(enabled=False)).eval()
    prompt = random_ids(2, 7)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ours, stock = model.generate(prompt, **kwargs), stock_twin(model).generate(prompt, **kwargs)
    assert torch.equal(ours.sequences, stock.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(stock.logits), rtol=1e-5, atol=1e-5)


# ---- training features ----------------------------------------------------------------------------


def test_merge_adapter_unties_the_output_layer_before_merging(tmp_path):
    """Plain PEFT merging of a LoRA on the (tied) embeddings changes the output layer too; merge_adapter
    keeps the adapted model's outputs, and the merged model saves and reloads as it is."""
    model = tiny_model().to(F64).eval()
    assert model.lm_head.weight is model.backbone.embeddings.weight  # tied, as in the Mamba checkpoints
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    ids = random_ids(2, 12)
    with torch.no_grad():
        adapted = get_peft_model(copy.deepcopy(model), config).eval()
        expected = adapted(ids).logits
        plain = copy.deepcopy(adapted).merge_and_unload()(ids).logits
        merged = merge_adapter(adapted)
        got = merged(ids).logits
    assert (plain - expected).abs().max() > 1e-2  # the corruption merge_adapter avoids
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path, dtype=F64).eval()(ids).logits, expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="PeftModel"):
        merge_adapter(model)


def test_portable_recipe_targets_what_stock_peft_accepts(tmp_path):
    """recipes/mamba-130m/alpaca-grootl-portable.yaml: its LoRA (no out_proj), trained on GrootL, loads onto
    stock Mamba with plain PEFT."""
    from grootl.train import load_recipe

    recipe = load_recipe(REPO / "recipes" / "mamba-130m" / "alpaca-grootl-portable.yaml")
    assert recipe.method == "grootl" and "out_proj" not in recipe.lora.target_modules
    config = LoraConfig(r=4, target_modules=recipe.lora.target_modules, init_lora_weights=False)
    base = tiny_model(grootl=GrootLConfig(enabled=False)).to(F64)
    stock_base = stock_twin(base)
    adapted = get_peft_model(base, config).eval()
    adapted.save_pretrained(tmp_path)
    stock = PeftModel.from_pretrained(stock_base, tmp_path).eval()
    ids = random_ids(2, 9)
    with torch.no_grad():  # tree off: the stock model computes the same function
        torch.testing.assert_close(stock(ids).logits, adapted(ids).logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out_proj"):  # why the published targets need a GrootL model
        get_peft_model(MambaForCausalLM(tiny_config()), LoraConfig(r=4, target_modules=LORA_TARGETS))


@pytest.mark.parametrize("enabled", [True, False])
def test_every_lora_parameter_gets_a_gradient(enabled):
    model = tiny_model(grootl=GrootLConfig(enabled=enabled))
    # init_lora_weights=False: both LoRA factors random, so every one of them can receive a gradient
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config).train()
    ids = random_ids(2, 14)
    labels = ids.clone()
    labels[:, :6] = -100
    peft_model(input_ids=ids, labels=labels).loss.backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {t for t in LORA_TARGETS if any(f".{t}." in n for n in trainable)} == set(LORA_TARGETS)
    assert len(trainable) == 2 * (1 + 3 * model.config.num_hidden_layers)
    for name, p in trainable.items():
        assert "lora_" in name and p.grad is not None and p.grad.abs().max() > 0, name


def test_lora_adapter_with_out_proj_saves_and_reloads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=2, target_modules=LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    ids = random_ids(1, 12)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = random_ids(2, 16)
    labels = ids.clone()
    labels[:, :7] = -100
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_model().to(F64).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.backbone.layers)
        loss = model(ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_torch_compile_traces_the_model():
    model = tiny_model(num_hidden_layers=1).eval()
    ids, lens = random_ids(2, 12), torch.tensor([4, 12])
    with torch.no_grad():
        expected = model(ids, context_lens=lens).logits
        compiled = torch.compile(model, backend="aot_eager")(ids, context_lens=lens).logits
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_trains_close_to_float32(dtype):
    model = tiny_model()
    ids = random_ids(2, 16)
    labels = ids.clone()
    labels[0, :6], labels[1, :10] = -100, -100
    with torch.no_grad():
        reference = model(ids, labels=labels).logits
    with torch.autocast("cpu", dtype=dtype):
        low = model(ids, labels=labels)
    low.loss.backward()
    assert torch.isfinite(low.logits).all()
    assert (low.logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_blocks_run_no_per_layer_value_checks(monkeypatch):
    """The tree ops skip the value checks (passes over the activations, host syncs on CUDA): the model checks
    context_lens once per forward, and diverged activations come out as a non-finite loss, the same on every
    process, rather than an error raised on one of them."""
    import grootl.tree.validation as validation

    model = tiny_model()
    ids = random_ids(2, 20)
    monkeypatch.setattr(validation, "_check_finite", lambda **_: pytest.fail("a per-layer value check ran"))
    assert torch.isfinite(model(ids, labels=ids).loss)
    with torch.no_grad():
        model.backbone.layers[0].mixer.x_proj.weight[0, 0] = float("nan")
    assert not torch.isfinite(model(ids, labels=ids).loss)
    with pytest.raises(ValueError, match=r"context_lens\[1\] = 21 is outside \[0, 20\]"):
        model(ids, context_lens=[3, 21])


# ---- the CUDA fast path's wiring, on CPU -----------------------------------------------------------

HALF_OR_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def require(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"fused-kernel twin: {what}")


def selective_scan_twin(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """mamba_ssm's ``selective_scan_fn`` on CPU: its input checks (dtypes and shapes as its C++ binding
    demands them) and its contract (float32 math, output in u's dtype, float32 last state)."""
    batch, dim, length = u.shape
    require(u.dtype in HALF_OR_FLOAT and delta.dtype == B.dtype == C.dtype == u.dtype, "u, delta, B, C: one dtype")
    require(A.dtype == torch.float32 and A.shape[0] == dim, "A: float32 (dim, N)")
    require(delta.shape == u.shape and B.shape == C.shape == (batch, A.shape[1], length), "shapes")
    require(all(t is None or (t.dtype == torch.float32 and t.shape == (dim,)) for t in (D, delta_bias)), "D, delta_bias")
    out = exact_selective_scan(u.float(), delta.float(), A, B.float(), C.float(), D, z, delta_bias,
                               delta_softplus, return_last_state)
    y, last = out if return_last_state else (out, None)
    return (y.to(u.dtype), last) if return_last_state else y.to(u.dtype)


def causal_conv1d_twin(x, weight, bias=None, activation=None, **_):
    """causal_conv1d's ``causal_conv1d_fn`` on CPU: its checks and contract (output in x's dtype)."""
    dim, width = weight.shape
    require(x.dtype in HALF_OR_FLOAT and weight.dtype in HALF_OR_FLOAT, "x, weight: float, half or bfloat16")
    require(x.dim() == 3 and x.shape[1] == dim and 2 <= width <= 4, "x (batch, dim, L), weight (dim, 2..4)")
    require(bias is None or bias.dtype == weight.dtype, "bias in weight's dtype")
    require(x.stride(2) == 1 or x.stride(1) == 1, "x contiguous in L or in dim")
    out = F.conv1d(F.pad(x.to(weight.dtype), (width - 1, 0)), weight[:, None], bias, groups=dim)
    return (F.silu(out) if activation in ("silu", "swish") else out).to(x.dtype)


def state_update_twin(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm's ``selective_state_update`` on CPU: its shape checks and contract (state updated in place,
    float32 math, output in x's dtype)."""
    batch, dim, n = state.shape
    require(x.shape == dt.shape == (batch, dim) and A.shape == (dim, n), "state (b, dim, N), x, dt (b, dim), A (dim, N)")
    require(B.shape == C.shape == (batch, n) and (D is None or D.shape == (dim,)), "B, C (b, N), D (dim,)")
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    dt = F.softplus(dt) if dt_softplus else dt
    state.copy_(torch.exp(dt[..., None] * A) * state.float() + (dt * x.float())[..., None] * B.float()[:, None])
    out = (state.float() * C.float()[:, None]).sum(-1) + (0 if D is None else D * x.float())
    return (out if z is None else out * F.silu(z.float())).to(x.dtype)


TWINS = mixer_module.FusedKernels(selective_scan_twin, causal_conv1d_twin, state_update_twin)


def loss_and_grads(model, ids, labels):
    model.zero_grad()
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_fused_kernel_path_trains_like_the_torch_path(monkeypatch, autocast):
    """What runs on CUDA with mamba_ssm / causal_conv1d installed, checked on CPU: the mixer hands the
    fused kernels inputs they accept (also under bf16 autocast) and gets the torch path's loss and
    gradients back, tree branch included."""
    model = tiny_model().train()
    ids = random_ids(2, 20)
    labels = ids.clone()
    labels[0, :7] = labels[1, :12] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, grads = loss_and_grads(model, ids, labels)
        calls = []
        monkeypatch.setattr(mixer_module, "fast_kernels", lambda x: calls.append(x.dtype) or TWINS)
        fused_loss, fused_grads = loss_and_grads(model, ids, labels)
    assert len(calls) == 2 * model.config.num_hidden_layers
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_loss, loss, **tol)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, **tol, msg=lambda m: f"{name}: {m}")


def test_fused_kernel_path_generates_like_the_torch_path(monkeypatch):
    """The prefill takes the chain's last state from ``selective_scan_fn``; each decoded position goes through
    ``selective_state_update`` with B scaled by 1+λ."""
    model = tiny_model().eval()
    ids = random_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    settings = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    plain = model.generate(ids, attention_mask=mask, **settings)
    updates = []
    twins = TWINS._replace(state_update=lambda *a, **k: updates.append(1) or state_update_twin(*a, **k))
    monkeypatch.setattr(mixer_module, "fast_kernels", lambda x: twins)
    fused = model.generate(ids, attention_mask=mask, **settings)
    assert len(updates) == 5 * model.config.num_hidden_layers  # every decoded position after the prefill
    assert torch.equal(fused.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(fused.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_decodes_consistently():
    """On CUDA the mamba_ssm / causal_conv1d kernels run where installed, the torch path otherwise."""
    model = tiny_model().eval()
    ids, lens = random_ids(2, 24), torch.tensor([9, 24])
    with torch.no_grad():
        cpu = model(ids, context_lens=lens).logits
        model.cuda()
        gpu = model(ids.cuda(), context_lens=lens.cuda()).logits
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
    out = model.generate(
        ids.cuda(), max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
    )
    with torch.no_grad():
        full = model(out.sequences, context_lens=torch.tensor([24, 24], device="cuda")).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 23:-1], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_mamba_130m_shape_forward_and_backward():
    config = MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16)
    model = GrootLMambaForCausalLM(config).train()
    assert sum(p.numel() for p in model.parameters()) == 129_135_360
    ids = random_ids(1, 128, vocab=50280)
    labels = ids.clone()
    labels[:, :64] = -100
    loss = model(ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
