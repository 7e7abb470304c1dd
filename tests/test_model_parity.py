"""Parity with stock ``MambaForCausalLM``: a port of the checks transformers' model, generation and
pipeline testers make, run on stock Mamba and on GrootL alike (tiny models, CPU). GrootL must pass
whatever stock passes: same arguments, same meanings."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, MambaForCausalLM, pipeline

from conftest import ASSETS
from grootl.model import GrootLMambaForCausalLM, tiny_config, tiny_model

KINDS = ["stock", "grootl"]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(kind: str, **overrides):
    torch.manual_seed(0)
    model = MambaForCausalLM(tiny_config(**overrides)) if kind == "stock" else tiny_model(**overrides)
    return model.eval()


def ids_of(batch=2, length=10, seed=0):
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def test_config_and_model_save_and_load(kind, tmp_path):
    model = make(kind)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    ignore = ("_name_or_path", "transformers_version")
    assert {k: v for k, v in config.to_dict().items() if k not in ignore} == {
        k: v for k, v in model.config.to_dict().items() if k not in ignore}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    ids = ids_of()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_inputs_embeds_return_dict_and_hidden_states(kind):
    model, ids = make(kind), ids_of()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        as_tuple = model(ids, return_dict=False, use_cache=False)
        kept = model(ids, logits_to_keep=1).logits
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 10, model.config.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(embeds, out.logits, rtol=0, atol=0)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    torch.testing.assert_close(kept, out.logits[:, -1:], **TOL)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))


def test_resize_token_embeddings(kind):
    model = make(kind)
    model.resize_token_embeddings(520)
    assert model.config.vocab_size == 520 and model.lm_head.weight.shape == (520, model.config.hidden_size)
    with torch.no_grad():
        assert model(torch.tensor([[519, 3, 4]])).logits.shape == (1, 3, 520)


def test_gradient_checkpointing_same_loss_and_gradients(kind):
    ids = ids_of(length=12)
    results = []
    for checkpointing in (False, True):
        model = make(kind).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, **TOL)


def test_cache_continues_the_sequence_and_accepts_the_old_name(kind):
    model, ids = make(kind), ids_of(length=12)
    with torch.no_grad():
        full = model(ids).logits
        prefill = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:9], cache=prefill.cache, use_cache=True).logits
        with pytest.warns(FutureWarning):
            old = model(ids[:, 8:9], cache_params=model(ids[:, :8], use_cache=True).cache, use_cache=True).logits
    torch.testing.assert_close(step[:, 0], full[:, 8], **TOL)
    torch.testing.assert_close(old, step, rtol=0, atol=0)


def test_left_padding_gives_the_unpadded_result(kind):
    model, ids = make(kind), ids_of(batch=1, length=7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        alone = model(ids).logits
        batched = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(batched[:, 3:], alone, **TOL)


@pytest.mark.parametrize(
    "mode",
    [dict(do_sample=False), dict(do_sample=True, top_k=20, temperature=0.8), dict(num_beams=3, do_sample=False),
     dict(do_sample=False, num_return_sequences=2, num_beams=2), dict(do_sample=False, use_cache=False)],
    ids=["greedy", "sample", "beam", "beams-returned", "no-cache"],
)
def test_generation_modes(kind, mode):
    model, ids = make(kind), ids_of(batch=2, length=6)
    torch.manual_seed(1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, pad_token_id=0, **mode)
    rows = 2 * mode.get("num_return_sequences", 1)
    assert out.shape == (rows, 11) and torch.equal(out[:, :6], ids.repeat_interleave(rows // 2, 0))
    if mode.get("use_cache") is False:  # the same tokens as with the cache
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, pad_token_id=0,
                                do_sample=False)
        assert torch.equal(out, cached)


def test_text_generation_pipeline(kind):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    model = make(kind, vocab_size=len(tokenizer))
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    text = generator("Hello there", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello there")


def test_peft_lora_trains(kind):
    model = get_peft_model(make(kind).train(), LoraConfig(r=4, target_modules=["x_proj", "in_proj", "embeddings"]))
    ids = ids_of()
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_device_map_offload_gives_the_same_outputs(kind, tmp_path):
    """Layers offloaded to disk and CPU (accelerate hooks): every weight the mixer reads directly, conv1d and
    dt_proj, must come back on time."""
    model = make(kind)
    model.save_pretrained(tmp_path / "model")
    device_map = {"backbone.embeddings": "cpu", "backbone.layers.0": "disk", "backbone.layers.1": "cpu",
                  "backbone.norm_f": "cpu", "lm_head": "cpu"}
    offloaded = type(model).from_pretrained(tmp_path / "model", device_map=device_map,
                                            offload_folder=str(tmp_path / "offload")).eval()
    assert offloaded.backbone.layers[0].mixer.dt_proj.weight.device.type == "meta"  # really offloaded
    ids = ids_of()
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_grootl_refuses_use_mambapy_in_one_line():
    with pytest.raises(ValueError, match="use_mambapy=True.*set use_mambapy=False"):
        GrootLMambaForCausalLM(tiny_config(use_mambapy=True))
    copy.deepcopy(tiny_model(use_associative_scan=True))  # stock's default: accepted (picks stock's scan only)
