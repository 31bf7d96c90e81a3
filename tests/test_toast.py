"""TOAST (methodlab.methods.toast, methodlab.models.vit): frozen backbone, per-mode trainable sets
and counts, token mask, feedback shapes, injection neutrality, the variational loss, tiny ViT
shapes, and a 2-worker Ray run that transfers a backbone registered in MLflow."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methodlab.config import load_config
from methodlab.losses.toast import variational_loss
from methodlab.methods.base import DataBundle, StepContext
from methodlab.methods.toast import Toast, vit_param_count
from methodlab.models import build_model
from methodlab.models.vit import TopDownViT, ViT, token_mask

TINY = {"img_size": 8, "in_channels": 1, "patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2}
SCRATCH = "method.scratch_kwargs={patch_size: 2, embed_dim: 16, depth: 2, num_heads: 2}"
MODES = ["toast", "toast-lite", "linear", "finetune"]


@functools.cache
def _bundle():
    from methodlab.data import resolve_dataset
    from methodlab.train.core import load_bundle

    cfg = load_config("toast")
    return load_bundle(cfg, resolve_dataset("digits_transfer", cfg.data.root), ["train", "val", "test"])


def _method(*overrides: str) -> Toast:
    cfg = load_config("toast", None, ["method.backbone=scratch", SCRATCH, *overrides])
    shared = _bundle()   # a fresh splits dict: the method swaps its train split per stage
    return Toast(cfg, DataBundle(shared.info, dict(shared.splits), shared.tables))


def _stage(method: Toast, stage: str, previous: dict):
    models = method.build_models(stage, previous)
    opts = method.build_optimizers(stage, models)
    scheds = method.build_schedulers(stage, opts, 4)
    ctx = StepContext(stage=stage, epoch=0, step=0, device=torch.device("cpu"), rank=0, world_size=1,
                      extra={"schedulers": scheds})
    return models, opts, ctx


def _tiny_model(lora: int = 0, bias: str = "free", seed: int = 0, **vit) -> TopDownViT:
    torch.manual_seed(seed)
    model = TopDownViT({**TINY, **vit}, 5, lora, bias)
    with torch.no_grad():   # non-zero biases everywhere, so bias handling is actually exercised
        for name, p in model.backbone.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


# ----------------------------------------------------------------------------------------------
# Frozen backbone, trainable sets and counts, per mode

C, L, K, R = 16, 2, 5, 4
# Written out by hand (not from the method's own `trains`): the official name rules of §2.4.
EXPECTED_NAMES = {
    "toast": {f"decoders.{i}.{w}.weight" for i in range(L) for w in ("linear", "linear2")}
    | {"prompt", "head.weight", "head.bias"},
    "toast-lite": {f"decoders.{i}.{w}.lora_{ab}" for i in range(L) for w in ("linear", "linear2") for ab in "AB"}
    | {"prompt", "top_down_transform", "head.weight", "head.bias"},
    "linear": {"head.weight", "head.bias"},
}
EXPECTED_COUNT = {
    "toast": L * 2 * C * C + C + C * K + K,
    "toast-lite": L * 2 * (2 * R * C) + C * C + C + C * K + K,
    "linear": C * K + K,
}


@pytest.mark.parametrize("mode", MODES)
def test_sgd_is_the_official_setting_for_every_mode(mode):
    """train.optimizer=sgd builds what bfshi/TOAST's `src/solver/optimizer.py` builds from
    `configs/base.yaml`: SGD with momentum 0.9 and weight decay 1e-4 on every trainable parameter
    but the classifier's bias (weight decay 0), at the configured lr; and one SGD step moves the
    parameters by -lr * (grad + wd * p) on the first step (momentum buffer = the gradient)."""
    method = _method(f"method.mode={mode}", "train.optimizer=sgd", "train.lr=0.03", "train.weight_decay=1e-4")
    pre, _, _ = _stage(method, "pretune", {})
    models, opts, ctx = _stage(method, "transfer", pre)
    opt = opts["opt"]
    assert type(opt) is torch.optim.SGD
    named = dict(models["model"].named_parameters())
    for group in opt.param_groups:
        assert group["momentum"] == 0.9 and group["nesterov"] is False and group["dampening"] == 0
        assert group["initial_lr"] == 0.03          # the lr before the warm-up factor
        is_bias = [p is named["head.bias"] for p in group["params"]]
        assert group["weight_decay"] == (0.0 if all(is_bias) else 1e-4) and (all(is_bias) or not any(is_bias))
    head = named["head.weight"]
    before = head.detach().clone()
    lr = opt.param_groups[0]["lr"]
    batch = next(method.train_split("transfer").batches(32))
    method.train_step("transfer", models, opts, batch, ctx)
    expected = before - lr * (head.grad + 1e-4 * before)
    assert torch.allclose(head.detach(), expected, rtol=1e-5, atol=1e-7)


def test_search_space_widens_lr_to_1e_1_and_offers_sgd():
    space = Toast.search_space
    assert space["train.lr"] == {"loguniform": [1e-3, 1e-1]}
    assert set(space["train.optimizer"]["choice"]) == {"adamw", "sgd"}
    assert "method.mode" not in space          # one sweep per mode: each baseline gets the same search


@pytest.mark.parametrize("mode", MODES)
def test_step_keeps_backbone_frozen_and_optimizer_holds_the_mode(mode):
    method = _method(f"method.mode={mode}")
    pre, opts, ctx = _stage(method, "pretune", {})
    # The pretune stage trains on the source data, the transfer stage on the target task.
    assert method.train_split("transfer") is method.data.splits["train"]
    if method.stage_epochs("pretune"):
        assert method.train_split("pretune").tensors is method.data.tables["source_train"]
        batch = next(method.train_split("pretune").batches(32))
        before = {k: v.clone() for k, v in pre["model"].backbone.state_dict().items()}
        method.train_step("pretune", pre, opts, batch, ctx)
        assert all(p.grad is None for p in pre["model"].backbone.parameters())
        assert all(torch.equal(before[k], v) for k, v in pre["model"].backbone.state_dict().items())
        # pretune trains W1, W2 and the prompt only; the source head stays frozen
        assert {n for n, p in pre["model"].named_parameters() if p.requires_grad} == \
            {f"decoders.{i}.{w}.weight" for i in range(L) for w in ("linear", "linear2")} | {"prompt"}
    assert method.stage_epochs("pretune") == (10 if mode in ("toast", "toast-lite") else 0)

    models, opts, ctx = _stage(method, "transfer", pre)
    model = models["model"]
    named = dict(model.named_parameters())
    in_opt = {id(p) for g in opts["opt"].param_groups for p in g["params"]}
    if mode == "finetune":
        assert in_opt == {id(p) for p in model.parameters()}
        assert method.n_trainable == sum(p.numel() for p in ViT(**TINY, num_classes=K).parameters())
    else:
        assert in_opt == {id(named[n]) for n in EXPECTED_NAMES[mode]}
        assert method.n_trainable == EXPECTED_COUNT[mode]
    backbone = model.backbone if isinstance(model, TopDownViT) else model
    frozen = {k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    batch = next(method.train_split("transfer").batches(32))
    out = method.train_step("transfer", models, opts, batch, ctx)
    assert float(out["trainable_params"]) == method.n_trainable
    changed = [k for k, v in frozen.items() if not torch.equal(v, backbone.state_dict()[k])]
    if mode == "finetune":
        assert changed
    else:
        assert not changed
        assert all(p.grad is None for n, p in backbone.named_parameters() if not n.startswith("head."))


def test_transfer_starts_from_the_pretuned_decoders():
    method = _method("method.mode=toast-lite")
    pre, _, _ = _stage(method, "pretune", {})
    with torch.no_grad():
        pre["model"].decoders[0].linear.weight.add_(1.0)
    models, _, _ = _stage(method, "transfer", pre)
    assert torch.equal(models["model"].decoders[0].linear.weight, pre["model"].decoders[0].linear.weight)
    assert torch.equal(models["model"].prompt, pre["model"].prompt)


def test_export_rebuilds_with_build_model():
    for mode in ("toast-lite", "finetune"):
        method = _method(f"method.mode={mode}")
        pre, _, _ = _stage(method, "pretune", {})
        models, _, _ = _stage(method, "transfer", pre)
        model, spec = method.export(models)
        rebuilt = build_model(spec)
        rebuilt.load_state_dict(model.state_dict())
        x = method.data.splits["val"].head(4)["image"]
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


# ----------------------------------------------------------------------------------------------
# Token mask, feedback, injection


def _np_mask(tokens: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    cos = tokens @ prompt / (np.linalg.norm(tokens, axis=-1) * np.linalg.norm(prompt) + 1e-30)
    return np.clip(cos, 0, 1)[..., None]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 12), st.floats(1e-3, 1e3), st.integers(0, 10_000))
def test_token_mask_in_unit_interval_scale_free_and_matches_numpy(b, n, c, scale, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    prompt = torch.randn(c, generator=g, dtype=torch.float64)
    mask = token_mask(tokens, prompt)
    assert mask.shape == (b, n, 1)
    assert bool(((mask >= 0) & (mask <= 1)).all())
    torch.testing.assert_close(token_mask(tokens, prompt * scale), mask, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mask.numpy(), _np_mask(tokens.numpy(), prompt.numpy()), atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(0, 10_000))
def test_one_top_down_signal_per_layer_with_token_shape_and_token_locality(depth, seed):
    model = _tiny_model(depth=depth, seed=seed)
    x = torch.randn(2, 17, 16)
    td, mask = model.top_down(x)
    assert len(td) == depth and all(t.shape == x.shape for t in td) and mask.shape == (2, 17, 1)
    # feedback reference: h_L = x~, h_l = W1_l h_{l+1}, td_l = W2_l h_l (per token, top down)
    h = (x * token_mask(x, model.prompt)) @ model.top_down_transform
    for layer in reversed(range(depth)):
        h = h @ model.decoders[layer].linear.weight.T
        torch.testing.assert_close(td[layer], h @ model.decoders[layer].linear2.weight.T)
    # token locality: perturbing token j changes the top-down signal at token j only
    x2 = x.clone()
    x2[:, 5] += torch.randn(16)
    with torch.no_grad():
        td2 = model.top_down(x2)[0]
    for a, b in zip(td, td2):
        diff = (a.detach() - b).abs().amax(dim=(0, 2))   # (N,)
        assert float(diff[torch.arange(17) != 5].max()) == 0.0


def test_bias_free_injection_of_zero_reproduces_bottom_up_exactly():
    model = _tiny_model(bias="free").eval()
    x = torch.rand(3, 1, 8, 8)
    tokens_in = model.backbone.tokens_in(x)
    zeros = [torch.zeros_like(tokens_in)] * model.backbone.depth
    bottom_up = model.backbone.run_blocks(tokens_in)
    assert torch.equal(model.backbone.run_blocks(tokens_in, zeros, "free"), bottom_up)
    # the official injection adds b_v again, so zero top-down is not a no-op there
    assert not torch.allclose(model.backbone.run_blocks(tokens_in, zeros, "faithful"), bottom_up)
    # and faithful == free plus b_v: the value path sees W_v td + b_v
    attn = model.backbone.blocks[0].attn
    td = torch.randn(3, 17, 16)
    torch.testing.assert_close(attn.value_of(td, bias=True), attn.value_of(td, bias=False) + attn.qkv.bias[32:])


def test_pass_one_under_no_grad_gives_the_same_gradients():
    model = _tiny_model()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])

    def grads(with_grad_pass1: bool):
        model.zero_grad(set_to_none=True)
        if with_grad_pass1:
            model.bottom_up = model.backbone.run_blocks   # instance attribute: pass 1 records a graph
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if with_grad_pass1:
            del model.bottom_up
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Variational loss


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(2, 6), st.integers(0, 10_000))
def test_variational_loss_matches_numpy_and_is_zero_at_reconstruction(layers, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(2, n, c, generator=g, dtype=torch.float64),
              torch.randn(2, n, c, generator=g, dtype=torch.float64)) for _ in range(layers)]
    ref = sum(np.mean((r.numpy() - t.numpy()) ** 2) for r, t in pairs)
    assert float(variational_loss(pairs)) == pytest.approx(ref, rel=1e-12)
    assert float(variational_loss(pairs)) >= 0
    assert float(variational_loss([(t, t) for _, t in pairs])) == 0.0


def test_variational_loss_gradient_reaches_only_w1():
    model = _tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("decoders.") or name == "prompt")
    _, pairs, _ = model(torch.rand(2, 1, 8, 8), aux=True)
    variational_loss(pairs).backward()
    for name, p in model.named_parameters():
        if name.endswith(".linear.weight"):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0
        else:
            assert p.grad is None, name


# ----------------------------------------------------------------------------------------------
# Shapes


@settings(max_examples=10, deadline=None)
@given(depth=st.integers(1, 3), heads=st.integers(1, 3), head_dim=st.integers(2, 6),
       patch=st.sampled_from([1, 2, 4, 8]), lora=st.sampled_from([0, 2]),
       bias=st.sampled_from(["free", "faithful"]))
def test_tiny_vit_shapes_run_forward_and_backward(depth, heads, head_dim, patch, lora, bias):
    dim = heads * head_dim
    vit = {"img_size": 8, "in_channels": 1, "patch_size": patch, "embed_dim": dim, "depth": depth,
           "num_heads": heads}
    model = TopDownViT(vit, 3, lora, bias)
    logits, pairs, mask = model(torch.rand(2, 1, 8, 8), aux=True)
    assert logits.shape == (2, 3) and len(pairs) == depth and mask.shape == (2, (8 // patch) ** 2 + 1, 1)
    (logits.sum() + variational_loss(pairs)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.decoders[0].linear2.weight.grad is not None
    plain = ViT(**vit, num_classes=3)
    assert sum(p.numel() for p in plain.parameters()) == vit_param_count(
        dim, depth, (8 // patch) ** 2 + 1, patch, 1, 4 * dim, 3)
    plain(torch.rand(2, 1, 8, 8)).sum().backward()


# ----------------------------------------------------------------------------------------------
# Ray: a backbone registered in MLflow, transferred by 2 workers


@pytest.mark.slow
def test_two_worker_toast_run_loads_a_registered_backbone(ray_cluster, home):
    from methodlab.tracking import Tracker
    from methodlab.train.launch import train

    cfg = load_config("toast", None, ["scaling.num_workers=2", "method.pretune_epochs=1", "train.epochs=1",
                                      "train.batch_size=64",
                                      "method.backbone=models:/test-vit-source@candidate"])
    spec = {"arch": "vit", "kwargs": {**TINY, "num_classes": 5}}
    torch.manual_seed(0)
    backbone = build_model(spec)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run_id = tracker.start_run("vit-source", {}, {}, "")
    assert tracker.log_model(run_id, backbone, spec, torch.rand(2, 1, 8, 8).numpy(), "test-vit-source", {}) == "1"
    tracker.end_run(run_id, "FINISHED")

    summary = train(cfg)
    assert summary.status == "FINISHED" and summary.version == "1"
    assert 0.0 <= summary.metrics["test_acc"] <= 1.0

    from methodlab.models.hub import load_pretrained
    model, exported = load_pretrained(f"models:/{cfg.tracking.registered_model}@candidate", cfg.tracking.uri)
    assert exported["arch"] == "toast_vit" and exported["kwargs"]["vit"]["embed_dim"] == 16
    # the transferred model still holds the registered backbone, bit for bit
    for k, v in backbone.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.backbone.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------------
# A backbone that is already pretuned (TOAST's released weights, imported as toast_vit)


def _pretuned_file(tmp_path, bias: str = "faithful", normalized: bool = True) -> str:
    from methodlab.models.hub import save_pretrained

    vit = {**TINY, **({"input_mean": [0.5], "input_std": [0.25]} if normalized else {})}
    spec = {"arch": "toast_vit", "kwargs": {"vit": vit, "num_classes": 5, "value_bias": bias}}
    model = _tiny_model(bias=bias, seed=3, **vit)
    save_pretrained(model, spec, str(tmp_path / "pretuned.pt"))
    return str(tmp_path / "pretuned.pt")


def test_a_pretuned_toast_vit_backbone_starts_the_transfer_with_its_decoders(tmp_path):
    cfg = load_config("toast", None, [f"method.backbone={_pretuned_file(tmp_path)}", "method.value_bias=faithful",
                                      "method.pretune_epochs=0"])
    shared = _bundle()
    method = Toast(cfg, DataBundle(shared.info, dict(shared.splits), shared.tables))
    pre, _, _ = _stage(method, "pretune", {})
    models, _, _ = _stage(method, "transfer", pre)
    loaded = _tiny_model(bias="faithful", seed=3)
    assert torch.equal(models["model"].decoders[1].linear2.weight, loaded.decoders[1].linear2.weight)
    assert torch.equal(models["model"].prompt, loaded.prompt)
    assert models["model"].value_bias == "faithful"
    # its input normalization came along: the transferred model standardizes what it gets
    assert models["model"].backbone.normalize.enabled


def test_a_pretuned_backbone_refuses_another_value_bias_and_a_normalizing_one_refuses_data_normalize(tmp_path):
    from methodlab.errors import ConfigError

    shared = _bundle()
    for overrides, words in [(["method.value_bias=free"], "value_bias=faithful"),
                             (["method.value_bias=faithful", "data.normalize=true"], "data.normalize=false")]:
        cfg = load_config("toast", None, [f"method.backbone={_pretuned_file(tmp_path)}", "method.pretune_epochs=0",
                                          *overrides])
        method = Toast(cfg, DataBundle(shared.info, dict(shared.splits), shared.tables))
        with pytest.raises(ConfigError, match=words):
            method.build_models("pretune", {})


@pytest.mark.parametrize("mode", MODES)
def test_the_run_charts_its_confusion_and_in_toast_modes_the_top_down_mask(mode):
    """After the last epoch: the test confusion matrix, and for a top-down model the token mask
    of the first val images on the patch grid, the clamped cosine of each pass-1 token to the
    prompt (computed here with torch's own cosine)."""
    from methodlab.methods.toast import MASK_IMAGES

    method = _method(f"method.mode={mode}", "method.pretune_epochs=1", "train.epochs=1")
    pretuned = _stage(method, "pretune", {})[0] if mode in ("toast", "toast-lite") else \
        {"model": method.build_models("pretune", {})["model"]}
    model = method.build_models("transfer", pretuned)["model"]
    method.evaluate("transfer", {"model": model}, "test", torch.device("cpu"))
    charts = method.epoch_artifacts("transfer", 0)
    if mode not in ("toast", "toast-lite"):
        assert set(charts) == {"confusion_test.png"}
        return
    assert set(charts) == {"confusion_test.png", "top_down_mask_val.png"}
    x = method.data.splits["val"].head(MASK_IMAGES)["image"]
    with torch.no_grad():
        tokens = model.backbone.run_blocks(model.backbone.tokens_in(x))
    want = torch.nn.functional.cosine_similarity(tokens[:, 1:], model.prompt.expand_as(tokens[:, 1:]), dim=-1)
    want = want.clamp(0, 1).reshape(MASK_IMAGES, 4, 4).detach()            # 8x8 digits, 2x2 patches
    axes = charts["top_down_mask_val.png"].axes
    assert len(axes) == 2 * MASK_IMAGES + 1                                  # and the colour scale
    for j in range(MASK_IMAGES):
        image = x[j, 0]
        stretched = (image - image.min()) / (image.max() - image.min())       # to its own min..max
        np.testing.assert_allclose(axes[j].images[0].get_array(), stretched.numpy(), atol=1e-6)
        np.testing.assert_allclose(axes[MASK_IMAGES + j].images[0].get_array(), want[j].numpy(), atol=1e-6)
    classes = method.data.info.meta.get("classes", range(method.data.info.num_classes))
    assert axes[0].get_title() == f"label {classes[int(method.data.splits['val'].head(1)['label'][0])]}"
