"""GrootL on the Mamba-2 families (grootl.model.families), each on a tiny random config on CPU: the
stock model at λ=0, causality where the loss is taken, per-row prompts and left padding, one-state
decoding, save/load, PEFT LoRA on the family's projections, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import grootl
from grootl.model import GrootLConfig
from grootl.model import families
from grootl.model.families import FAMILIES

FAMILY_TYPES = sorted(FAMILIES)
# one family per kind of GrootL mixer for the costlier checks (Granite-4.0-H and Nemotron-H share Bamba's
# mixer and forward wrapper; they get the checks where their own code differs: stock parity, weights, cache)
KINDS = ["bamba", "falcon_mamba", "mamba2", "zamba"]
TREE = GrootLConfig(modulation=0.5)


def stock_and_grootl(model_type: str, grootl: GrootLConfig = TREE):
    """A random stock model of the family and the GrootL model holding the same weights (eval mode)."""
    family = FAMILIES[model_type]
    config = families.tiny_config(model_type)
    stock = family.causal_lm.stock_causal_lm(config).eval()
    model = families.from_config(config, grootl).eval()
    model.load_state_dict(stock.state_dict())
    return stock, model


def ids(batch, length, seed=0):
    return torch.randint(1, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_modulation_zero_is_the_stock_model(model_type):
    stock, model = stock_and_grootl(model_type, GrootLConfig(modulation=0.0))
    assert model.config.model_type == "grootl_" + model_type
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in stock.parameters())
    assert model.state_dict().keys() == stock.state_dict().keys()
    x = ids(2, 13)
    with torch.no_grad():
        torch.testing.assert_close(model(x, context_lens=torch.tensor([9, 13])).logits, stock(x).logits)
    generate = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(x, **generate), stock.generate(x, **generate))


@pytest.mark.parametrize("model_type", KINDS)
def test_tree_changes_outputs_only_where_it_reaches(model_type):
    stock, model = stock_and_grootl(model_type)
    x, prompt = ids(1, 14), torch.tensor([8])
    with torch.no_grad():
        base = model(x, context_lens=prompt).logits
        assert not torch.allclose(base, stock(x).logits, atol=1e-4), "λ > 0 changes the outputs"
        later = x.clone()
        later[0, 10] = (later[0, 10] + 1) % 512  # a response token
        changed = model(later, context_lens=prompt).logits
        torch.testing.assert_close(changed[:, :10], base[:, :10])
        assert not torch.allclose(changed[:, 10:], base[:, 10:])
        inside = x.clone()
        inside[0, 6] = (inside[0, 6] + 1) % 512  # a prompt token reaches earlier prompt positions via the tree
        assert not torch.allclose(model(inside, context_lens=prompt).logits[:, :6], base[:, :6], atol=1e-6)
        # labels give the prompt too: its leading -100 run
        labels = torch.where(torch.arange(14) < 8, -100, x)
        torch.testing.assert_close(model(x, labels=labels).logits, base)


@pytest.mark.parametrize("model_type", KINDS)
def test_a_row_in_a_left_padded_batch_equals_the_row_alone(model_type):
    _, model = stock_and_grootl(model_type)
    rows, prompts = [ids(1, 12, seed=1)[0], ids(1, 8, seed=2)[0]], [7, 3]
    length = max(len(r) for r in rows)
    batch = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, length - len(r):], mask[i, length - len(r):] = r, 1
    pad = torch.tensor([length - len(r) for r in rows])
    with torch.no_grad():
        out = model(batch, attention_mask=mask, context_lens=pad + torch.tensor(prompts)).logits
        for i, r in enumerate(rows):
            alone = model(r[None], context_lens=torch.tensor([prompts[i]])).logits
            torch.testing.assert_close(out[i, int(pad[i]):], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_cached_generation_equals_a_full_forward_with_the_prompt_as_context(model_type):
    _, model = stock_and_grootl(model_type)
    model.generation_config.eos_token_id = None  # all 5 new tokens generated, none padding after an EOS
    x = ids(2, 10, seed=3)
    greedy = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        out = model.generate(x, output_logits=True, return_dict_in_generate=True, **greedy)  # the tree over x
        full = model(out.sequences, context_lens=torch.tensor([10, 10])).logits
        assert torch.equal(model.generate(x, use_cache=False, **greedy), out.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 9:-1], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[:, 10:], full[:, 9:-1].argmax(-1))


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_save_and_load_round_trip(model_type, tmp_path):
    stock, model = stock_and_grootl(model_type)
    stock.save_pretrained(tmp_path / "stock")
    loaded = grootl.load_model(str(tmp_path / "stock"), grootl=TREE)  # dispatches on the model type
    model.save_pretrained(tmp_path / "grootl")
    again = grootl.load_model(str(tmp_path / "grootl"))
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "grootl")
    x, prompt = ids(1, 9), torch.tensor([6])
    with torch.no_grad():
        want = model(x, context_lens=prompt).logits
        for other in (loaded, again, auto):
            assert type(other) is type(model) and other.grootl == TREE
            torch.testing.assert_close(other.eval()(x, context_lens=prompt).logits, want)
    with pytest.raises(ValueError, match="not a supported family"):
        families.from_config(families.tiny_config("mamba2").__class__.__base__())


@pytest.mark.parametrize("model_type", KINDS)
def test_lora_and_gradient_checkpointing(model_type):
    _, model = stock_and_grootl(model_type)
    x = ids(2, 12, seed=4)
    labels = torch.where(torch.arange(12) < 7, -100, x)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(FAMILIES[model_type].lora_targets)))
    adapted = {n.split(".lora_")[0] for n, _ in lora.named_parameters() if "lora_" in n}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == set(FAMILIES[model_type].lora_targets)
    lora.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora.zero_grad()
        lora(x, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad})
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "lora_B" in n)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)


def test_shipped_recipes_adapt_modules_their_family_has():
    from conftest import REPO
    from grootl.train import load_recipe

    checkpoints = {example: family for family in FAMILIES.values() for example in family.examples}
    recipes = [load_recipe(p) for p in sorted((REPO / "recipes").rglob("alpaca-*.yaml"))]
    covered = set()
    for recipe in recipes:
        family = checkpoints.get(recipe.model.name_or_path)
        if family is not None:
            model = families.from_config(families.tiny_config(family.model_type))
            assert set(recipe.lora.target_modules) <= {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            covered.add(family.model_type)
    assert covered == set(FAMILIES), "every family ships a recipe for a real checkpoint"


@pytest.mark.parametrize("model_type", ["mamba2", "bamba"])  # a causal LM that passes no kwargs on, one that does
def test_the_backbone_called_directly_gets_its_own_prompt_never_an_earlier_ones(model_type):
    """TRL's fused LM head (SFTTrainer's default loss) runs ``model.base_model(**batch)`` itself: its
    ``context_lens`` must reach the mixers, and a call without one reads an empty prompt, not the last forward's."""
    _, model = stock_and_grootl(model_type)
    x, prompt = ids(2, 12, seed=10), torch.tensor([8, 5])
    seen = []
    model.base_model.register_forward_hook(lambda module, args, out: seen.append(out.last_hidden_state))
    with torch.no_grad():
        model(x, context_lens=prompt)
        model(x)
        told, empty = seen
        torch.testing.assert_close(model.base_model(input_ids=x, context_lens=prompt).last_hidden_state, told)
        model(x, context_lens=prompt)
        torch.testing.assert_close(model.base_model(input_ids=x).last_hidden_state, empty)
    assert not torch.allclose(told, empty)
    with pytest.raises(ValueError, match=r"context_lens\[0\] = 8 is outside \[0, 6\]"):
        model.base_model(input_ids=x[:, :6], context_lens=prompt)


def test_loading_an_adapter_as_a_model_says_what_it_is_and_names_its_base(tmp_path):
    _, model = stock_and_grootl("mamba2")
    model.save_pretrained(tmp_path / "base")
    base = grootl.load_model(str(tmp_path / "base"))
    get_peft_model(base, LoraConfig(r=2, target_modules=["in_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"is a PEFT adapter of '.*base', not a model: .*PeftModel.from_pretrained") as err:
        grootl.load_model(str(tmp_path / "adapter"))
    assert "\n" not in str(err.value)


def test_bad_context_lens_are_named():
    _, model = stock_and_grootl("mamba2")
    with pytest.raises(ValueError, match=r"context_lens\[1\] = 20 is outside \[0, 9\]"):
        model(ids(2, 9), context_lens=torch.tensor([3, 20]))
    with pytest.raises(ValueError, match="unknown GrootL config field"):
        families.from_config(families.tiny_config("mamba2"), {"lambda": 0.3})


@pytest.mark.parametrize("model_type", KINDS)
def test_grootl_train_runs_the_family_recipe_on_a_local_checkpoint(model_type, tmp_path):
    """The code path of the family's shipped recipe, on a saved tiny stock checkpoint: train, export, reload."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from conftest import ASSETS, REPO
    from grootl.train import load_recipe, train

    family = FAMILIES[model_type]
    stock = tmp_path / "stock"
    family.causal_lm.stock_causal_lm(families.tiny_config(model_type)).save_pretrained(stock)
    AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(stock)
    shipped = next(p for p in sorted((REPO / "recipes").rglob("alpaca-grootl.yaml"))
                   if load_recipe(p).model.name_or_path in family.examples)
    run = load_recipe(shipped, [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={stock}", "model.dtype=float32",
        f"data.path={ASSETS / 'alpaca_tiny.jsonl'}", "data.max_length=48", "train.batch_size=4", "train.grad_accum=1",
        "train.max_steps=2", "train.lr=1e-2", "train.mixed_precision=no", "train.gradient_checkpointing=true",
        "log.progress=false", "log.trackers=[]", "checkpoint.every=null"])
    final = train(run)
    merged = grootl.load_model(str(final)).eval()
    assert merged.config.model_type == family.grootl_model_type and merged.grootl.active
    adapted = PeftModel.from_pretrained(grootl.load_model(str(stock), grootl=merged.grootl), final / "adapter").eval()
    x, prompt = ids(2, 12, seed=5), torch.tensor([7, 12])
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, context_lens=prompt).logits, merged(x, context_lens=prompt).logits,
                                   atol=1e-4, rtol=1e-4)


# ---- mamba-ssm's Mamba-2 kernels (the CUDA fast path), wired on CPU through twins ------------------------


def require(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"mamba-ssm twin: {what}")


def chunk_scan_twin(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                    dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
    """mamba_ssm's ``mamba_chunk_scan_combined`` on CPU: its shape checks and contract (float32 math, output in
    x's dtype, float32 final states), computed by the plain recurrence."""
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    require(dt.shape == (batch, length, heads) and A.shape == (heads,) and heads % groups == 0, "x, dt, A")
    require(B.shape == C.shape == (batch, length, groups, n) and D is None and z is None, "B, C (b, L, g, N)")
    require(initial_states is None or initial_states.shape == (batch, heads, head_dim, n), "initial_states")
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    dt = (F.softplus(dt) if dt_softplus else dt).clamp(*dt_limit)
    Bh = B.float().repeat_interleave(heads // groups, 2)
    Ch = C.float().repeat_interleave(heads // groups, 2)
    h = torch.zeros(batch, heads, head_dim, n) if initial_states is None else initial_states.float()
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t].float())[..., None] * Bh[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, 1).to(x.dtype)
    return (y, h) if return_final_states else y


def state_update_twin(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm's multi-head ``selective_state_update`` on CPU: its shape checks and contract (state updated in
    place, float32 math, output in x's dtype)."""
    batch, heads, head_dim, n = state.shape
    require(x.shape == dt.shape == (batch, heads, head_dim) and A.shape == (heads, head_dim, n), "x, dt, A")
    require(B.shape == C.shape and B.shape[0] == batch and B.shape[2] == n, "B, C (b, g, N)")
    require(D is None or D.shape == (heads, head_dim), "D (heads, head_dim)")
    Bh = B.float().repeat_interleave(heads // B.shape[1], 1)[:, :, None]
    Ch = C.float().repeat_interleave(heads // C.shape[1], 1)[:, :, None]
    state.copy_(torch.exp(dt.float()[..., None] * A) * state + (dt.float() * x.float())[..., None] * Bh)
    return ((state * Ch).sum(-1) + (0 if D is None else D * x.float())).to(x.dtype)


def train_and_generate(model, x: torch.Tensor, labels: torch.Tensor):
    """A training step's loss and gradients, then greedy generations with their logits."""
    model.zero_grad()
    loss = model.train()(x, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    out = model.eval().generate(x, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return loss.detach(), grads, out


def assert_same_run(got, want, logits_atol: float = 1e-5) -> None:
    """Two :func:`train_and_generate` results agree: loss, every gradient, generations and their logits."""
    (loss, grads, out), (want_loss, want_grads, want_out) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert torch.equal(out.sequences, want_out.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(want_out.logits), rtol=1e-4, atol=logits_atol)


def test_mamba_ssm_path_trains_and_generates_like_the_torch_path(monkeypatch):
    """What runs on CUDA with mamba_ssm installed, checked on CPU: the mixer hands the kernels inputs they
    accept and gets the torch path's loss, gradients and generations back, tree branch included."""
    from grootl.model.families import ssd

    _, model = stock_and_grootl("mamba2")
    x = ids(2, 14, seed=6)
    labels = torch.where(torch.arange(14) < 8, -100, x)
    plain = train_and_generate(model, x, labels)
    calls = []
    twins = ssd.SSDKernels(lambda *a, **k: calls.append("scan") or chunk_scan_twin(*a, **k),
                           lambda *a, **k: calls.append("update") or state_update_twin(*a, **k))
    monkeypatch.setattr(ssd, "ssd_kernels", lambda t: twins)
    assert_same_run(train_and_generate(model, x, labels), plain)
    layers = model.config.num_hidden_layers
    # training, the prefill, then every decoded position
    assert calls == ["scan"] * 2 * layers + ["update"] * 4 * layers

# ---- Zamba (v1): Mamba-1 heads, one tree over all heads ---------------------------------------------------


def brute_force_x_distances(u, delta, B, k, distance):
    """Distance between X[t] and X[t-j] with X[t] = (Δ·u ⊗ B) per head, built and flattened over (h, p, n)."""
    X = (delta * u)[:, :, :, None] * B[:, :, None]  # (batch, H, P, N, L)
    X = X.flatten(1, 3)
    out = torch.zeros(X.shape[0], X.shape[-1], k, dtype=X.dtype)
    for j in range(1, k + 1):
        a, b = X[..., j:], X[..., :-j]
        if distance == "cosine":
            out[:, j:, j - 1] = 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        elif distance == "euclidean":  # squared: the same order
            out[:, j:, j - 1] = ((a - b) ** 2).sum(1)
        else:
            out[:, j:, j - 1] = (a - b).abs().sum(1)
    return out


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_zamba_tree_weights_are_the_distances_of_x_over_all_heads(distance):
    from grootl.model.families import zamba

    g = torch.Generator().manual_seed(7)
    u, delta, B = (torch.randn(2, 2, *shape, generator=g, dtype=torch.float64) for shape in ((6, 11), (6, 11), (4, 11)))
    delta = F.softplus(delta)
    got = zamba.edge_weights(u, delta, B, k=3, distance=distance)
    want = brute_force_x_distances(u, delta, B, 3, distance)
    for j in range(1, 4):
        torch.testing.assert_close(got[:, j:, j - 1], want[:, j:, j - 1], rtol=1e-9, atol=1e-9)


def zamba_mixer_ref(mixer, hidden, context_lens, lam):
    """ZambaMambaMixer's forward written plainly, head by head, plus λ·(the tree scan over the tree of the
    brute-force X distances), from grootl.tree.tree_scan_ref."""
    from grootl.tree import Tree, graph, tree_scan_ref

    length = hidden.shape[1]
    proj = mixer.in_proj(hidden).transpose(1, 2)
    x, gate = proj[:, 0::2], proj[:, 1::2]  # in_proj's channels interleave x and the gate
    u = F.silu(mixer.conv1d(x)[..., :length]).unflatten(1, (mixer.n_mamba_heads, -1))
    heads = []
    for h in range(mixer.n_mamba_heads):
        time_step, B, C = (mixer.x_proj_weight[h] @ u[:, h]).split([mixer.time_step_rank] + [mixer.ssm_state_size] * 2, 1)
        heads.append((u[:, h], F.softplus(mixer.dt_proj_weight[h] @ time_step + mixer.dt_proj_bias[h, :, None]),
                      -torch.exp(mixer.A_log[h]), B, C))
    u_all, delta_all, B_all = (torch.stack([head[i] for head in heads], 1) for i in (0, 1, 3))
    weights = brute_force_x_distances(u_all.detach(), delta_all.detach(), B_all.detach(), 3, "cosine")
    tree = graph.spanning_tree(weights, context_lens)
    chain = Tree.chain(hidden.shape[0], length)
    ys = [tree_scan_ref(*head, chain) + lam * tree_scan_ref(*head, tree) + mixer.D[h, :, None] * head[0]
          for h, head in enumerate(heads)]
    return mixer.out_proj((torch.cat(ys, 1) * F.silu(gate)).transpose(1, 2))


def test_zamba_mixer_equals_its_plain_reference_with_gradients():
    """float64, fresh random weights and inputs: the GrootL Zamba mixer's output and gradients are those of
    the plain reference (chain + λ·tree + D skip per head, one tree over all heads)."""
    from transformers.models.zamba.modeling_zamba import ZambaMambaMixer

    torch.manual_seed(8)
    config = families.tiny_config("zamba", mamba_d_state=4)
    stock = ZambaMambaMixer(config, layer_idx=0).double()
    with torch.no_grad():
        for p in stock.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    hidden, lens = torch.randn(2, 12, 32, dtype=torch.float64), torch.tensor([7, 12])
    mixer = ZambaMambaMixer(config, layer_idx=0).double()
    mixer.load_state_dict(stock.state_dict())
    mixer.__class__ = FAMILIES["zamba"].causal_lm.grootl_mixer
    mixer.grootl, mixer.tree_inputs = TREE, (lens, None)
    weights = torch.randn(2, 12, 32, dtype=torch.float64)
    outs = []
    for module, run in ((mixer, lambda h: mixer(h)), (stock, lambda h: zamba_mixer_ref(stock, h, lens, 0.5))):
        h = hidden.clone().requires_grad_()
        out = run(h)
        (out * weights).sum().backward()
        outs.append((out.detach(), h.grad, {n: p.grad for n, p in module.named_parameters()}))
    (got, got_dh, got_grads), (want, want_dh, want_grads) = outs
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_dh, want_dh)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=lambda m: f"{name}: {m}")


def test_zamba_fused_kernel_path_trains_and_generates_like_the_torch_path(monkeypatch):
    """What runs on CUDA with mamba_ssm / causal_conv1d installed, checked on CPU through twins that keep the
    kernels' input checks: per head ``selective_scan_fn``, the multi-head ``selective_state_update`` (B scaled
    by 1+λ), causal-conv1d; the same loss, gradients and generations as the torch path, tree branch included."""
    from grootl.model import mixer as mixer_module
    from test_model import TWINS

    _, model = stock_and_grootl("zamba")
    x = ids(2, 14, seed=9)
    labels = torch.where(torch.arange(14) < 8, -100, x)
    plain = train_and_generate(model, x, labels)
    calls = []

    def scan_twin(*args, **kwargs):
        calls.append("scan")
        return TWINS.selective_scan(*args, **kwargs)

    twins = TWINS._replace(selective_scan=scan_twin,
                           state_update=lambda *a, **k: calls.append("update") or state_update_twin(*a, **k))
    monkeypatch.setattr(mixer_module, "fast_kernels", lambda t: twins)
    # float32 rounding: on CPU one native call sums chain + λ·tree (in its own order), the twins run two scans
    assert_same_run(train_and_generate(model, x, labels), plain, logits_atol=5e-5)
    layers, heads = model.config.num_hidden_layers, model.config.n_mamba_heads
    # training and the prefill, per head, then every decoded position
    assert calls == ["scan"] * 2 * heads * layers + ["update"] * 4 * layers
