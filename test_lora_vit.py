"""lora_vit.py against references: torchvision's ViT, dense LoRA algebra, and every kind of weights file."""
import math

import pytest
import torch
import torchvision

import lora_vit
from lora_vit import PRESETS, ViT, WeightsError


def _ours_from_torchvision(tv: torchvision.models.VisionTransformer, cfg: lora_vit.ViTConfig) -> ViT:
    ours = ViT(cfg, num_classes=tv.heads.head.out_features)
    ours.load_state_dict(lora_vit.timm_names_from_torchvision(tv.state_dict()), strict=True)
    return ours.eval()


def _randomise_head_(tv: torchvision.models.VisionTransformer) -> None:
    torch.nn.init.normal_(tv.heads.head.weight, std=0.05)  # torchvision zero-initialises it
    torch.nn.init.normal_(tv.heads.head.bias, std=0.05)


@pytest.mark.parametrize("name", ["vit_b_16", "vit_b_32"])
def test_presets_match_torchvision(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().eval()
    _randomise_head_(tv)
    ours = _ours_from_torchvision(tv, PRESETS[name])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, got = tv(x), ours(x)
    assert want.abs().max() > 0.1  # a real comparison, not of zeros
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_small_vit_matches_torchvision():
    torch.manual_seed(1)
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                              hidden_dim=48, mlp_dim=96, num_classes=100).eval()
    _randomise_head_(tv)
    ours = _ours_from_torchvision(tv, PRESETS["vit_nano"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=0)


# ---- LoRA


def _lora_model(seed: int = 0) -> tuple[ViT, list[lora_vit.LoRALinear]]:
    torch.manual_seed(seed)
    model = ViT(PRESETS["vit_nano"], num_classes=10).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    layers = lora_vit.add_lora_(model, ["qkv", "fc2"], rank=4, lora_alpha=8.0)
    return model, layers


def test_fresh_adapter_changes_nothing():
    torch.manual_seed(0)
    plain = ViT(PRESETS["vit_nano"], num_classes=10).eval()
    torch.nn.init.normal_(plain.head.weight, std=0.1)
    model, layers = _lora_model(0)
    assert all(layer.B.abs().sum() == 0 and layer.A.abs().sum() > 0 for layer in layers)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)


def test_adapter_forward_and_fold_equal_a_dense_model():
    """The unfolded forward, and the folded one, equal a plain ViT whose weights are W0 + g (alpha/r) B A."""
    model, layers = _lora_model(0)
    for layer in layers:
        torch.nn.init.normal_(layer.B, std=0.2)
    layers[0].importance = torch.nn.Parameter(torch.tensor(0.7))
    dense = ViT(PRESETS["vit_nano"], num_classes=10).eval()
    reference = {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items()
                 if not k.endswith((".A", ".B", ".importance"))}
    for (name, module), gain in zip([(n, m) for n, m in model.named_modules() if m in layers], [0.7, 1, 1, 1]):
        reference[f"{name}.weight"] += gain * (8.0 / 4) * module.B.detach() @ module.A.detach()  # by hand
    dense.load_state_dict(reference)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = dense(x)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        for layer in layers:
            layer.fold_()
        assert all(layer.B.abs().sum() == 0 for layer in layers)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_strip_lora_keeps_outputs_and_removes_adapters():
    model, layers = _lora_model(0)
    for layer in layers:
        torch.nn.init.normal_(layer.B, std=0.2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for layer in layers:
            layer.fold_()
        lora_vit.strip_lora_(model)
        after = model(x)
    assert not lora_vit.lora_layers(model)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_lora_trains_only_adapters_and_head():
    model, _ = _lora_model(0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith((".A", ".B")) or n.startswith("head.")}
    assert len([n for n in trainable if n.endswith(".A")]) == 2 * 2  # qkv and fc2 of 2 blocks


# ---- weights files


def _save(tmp_path, obj, name="w.pt"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("obj,message", [
    (torch.zeros(3), "holds a Tensor, not a state dict"),
    ([torch.zeros(3)], "holds a list, not a state dict"),
    ({"cls_token": 3}, "entry 'cls_token' is a int, not a tensor"),
    ({}, "holds a dict, not a state dict"),
])
def test_files_that_are_not_state_dicts_are_named(tmp_path, obj, message):
    with pytest.raises(WeightsError, match=message):
        lora_vit.read_weights_file(_save(tmp_path, obj))


def test_corrupt_and_truncated_files_say_so(tmp_path):
    good = _save(tmp_path, ViT(PRESETS["vit_nano"], 10).state_dict())
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:1000])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file" * 8)
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(WeightsError, match="is corrupt or truncated"):
            lora_vit.read_weights_file(tmp_path / name)


def test_shape_is_read_from_the_tensors():
    state = ViT(PRESETS["vit_small_cifar"], 10).state_dict()
    cfg = lora_vit.config_from_state_dict(state, img_size=48)
    assert cfg == lora_vit.ViTConfig(img_size=48, patch=4, dim=192, depth=6, heads=3, mlp_dim=768)
    nano = ViT(PRESETS["vit_nano"], 10).state_dict()
    with pytest.raises(WeightsError, match="width 48.*--heads"):
        lora_vit.config_from_state_dict(nano, img_size=32)
    assert lora_vit.config_from_state_dict(nano, img_size=32, heads=2) == PRESETS["vit_nano"]


def test_every_tensor_of_the_file_must_fit():
    deep = ViT(lora_vit.ViTConfig(32, 8, 48, 3, 2, 96), 10).state_dict()
    with pytest.raises(WeightsError, match="hold blocks.2"):
        lora_vit.load_backbone_(ViT(PRESETS["vit_nano"], 10), deep)  # 3 blocks into 2
    shallow = {k: v for k, v in ViT(PRESETS["vit_nano"], 10).state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(WeightsError, match="lack blocks.1"):
        lora_vit.load_backbone_(ViT(PRESETS["vit_nano"], 10), shallow)
    wide = ViT(lora_vit.ViTConfig(32, 8, 64, 2, 2, 96), 10).state_dict()
    with pytest.raises(WeightsError, match=r"cls_token the shape \(1, 1, 64\).*needs \(1, 1, 48\)"):
        lora_vit.load_backbone_(ViT(PRESETS["vit_nano"], 10), wide)
    extra = dict(ViT(PRESETS["vit_nano"], 10).state_dict(), **{"fc_norm.weight": torch.ones(48)})
    with pytest.raises(WeightsError, match="hold fc_norm.weight"):
        lora_vit.load_backbone_(ViT(PRESETS["vit_nano"], 10), extra)


def test_loading_copies_every_backbone_tensor_but_not_the_head():
    torch.manual_seed(0)
    src = ViT(PRESETS["vit_nano"], 10)
    torch.nn.init.normal_(src.head.weight)
    dst = ViT(PRESETS["vit_nano"], 100)  # another head size: the head is never loaded
    lora_vit.load_backbone_(dst, src.state_dict())
    for name, value in src.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(dst.state_dict()[name], value), name
    assert dst.head.weight.abs().sum() == 0


def test_layer_scale_is_folded_exactly():
    """A file with timm's LayerScale (ls1.gamma, ls2.gamma) gives the function of a ViT that applies gamma."""
    torch.manual_seed(0)
    cfg = PRESETS["vit_nano"]
    src = ViT(cfg, 10).eval()
    gammas = {f"blocks.{i}.{ls}.gamma": torch.rand(cfg.dim) + 0.5 for i in range(cfg.depth) for ls in ("ls1", "ls2")}
    for i, block in enumerate(src.blocks):  # the reference: scale each branch's output, as timm's LayerScale does
        block.attn.register_forward_hook(lambda m, inp, out, g=gammas[f"blocks.{i}.ls1.gamma"]: out * g)
        block.mlp.register_forward_hook(lambda m, inp, out, g=gammas[f"blocks.{i}.ls2.gamma"]: out * g)
    folded = ViT(cfg, 10).eval()
    lora_vit.load_backbone_(folded, {**src.state_dict(), **gammas})
    folded.head.load_state_dict(src.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded.forward_features(x), src.forward_features(x), atol=1e-5, rtol=1e-5)


def _keys_cubic(t: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel (a = -0.75, as torch's and OpenCV's bicubic)."""
    t = abs(t)
    return ((a + 2) * t**3 - (a + 3) * t**2 + 1) if t <= 1 else (a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a) if t < 2 else 0.0


def _resize_1d(values: list[float], n_out: int) -> list[float]:
    """Half-pixel centres, edge samples repeated: the reference written out by hand."""
    n = len(values)
    out = []
    for j in range(n_out):
        x = (j + 0.5) * n / n_out - 0.5
        i0 = math.floor(x)
        out.append(sum(_keys_cubic(x - i) * values[min(max(i, 0), n - 1)] for i in range(i0 - 1, i0 + 3)))
    return out


@pytest.mark.parametrize("side,grid", [(4, 7), (6, 3)])  # enlarge and shrink
def test_position_grid_resampling_is_bicubic(side, grid):
    torch.manual_seed(side)
    pos = torch.randn(1, 1 + side * side, 2, dtype=torch.float64)
    out = lora_vit.resample_pos_embed(pos, grid)
    assert out.shape == (1, 1 + grid * grid, 2) and torch.equal(out[:, 0], pos[:, 0])  # class token's row kept
    for ch in range(2):
        img = pos[0, 1:, ch].reshape(side, side).tolist()
        rows = [_resize_1d(r, grid) for r in img]  # separable: along x, then along y
        want = [_resize_1d([rows[i][j] for i in range(side)], grid) for j in range(grid)]  # want[j][i] = (y=i, x=j)
        got = out[0, 1:, ch].reshape(grid, grid)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64).T, atol=1e-10, rtol=0)
    assert torch.equal(lora_vit.resample_pos_embed(pos, side), pos)  # same grid: untouched
    with pytest.raises(WeightsError, match="not a square grid"):
        lora_vit.resample_pos_embed(torch.randn(1, 1 + 12, 8), 4)


def test_a_file_loads_at_another_input_size():
    src = ViT(PRESETS["vit_nano"], 10).state_dict()  # 4 x 4 grid at 32 px
    cfg = lora_vit.config_from_state_dict(src, img_size=64, heads=2)
    model = ViT(cfg, 10)
    lora_vit.load_backbone_(model, src)
    assert model.pos_embed.shape == (1, 1 + 64, 48)
    torch.testing.assert_close(model.pos_embed, lora_vit.resample_pos_embed(src["pos_embed"], 8))


def test_offline_torchvision_weights_name_the_file_and_folder(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as e:
        lora_vit.torchvision_weights("vit_b_16")
    assert "put vit_b_16-c867db91.pth" in str(e.value) and f"into {tmp_path / 'checkpoints'}/" in str(e.value)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vit_b_16-c867db91.pth").write_bytes(b"half a download")
    with pytest.raises(WeightsError, match="vit_b_16-c867db91.pth are corrupt or truncated .*delete the file"):
        lora_vit.torchvision_weights("vit_b_16")


def test_lora_delta_is_the_dense_product():
    torch.manual_seed(0)
    layer = lora_vit.LoRALinear(torch.nn.Linear(7, 5).double(), rank=3, lora_alpha=6.0).double()
    torch.nn.init.normal_(layer.B)
    want = 2.0 * layer.B.detach() @ layer.A.detach()
    torch.testing.assert_close(layer.delta().detach(), want)
    assert torch.linalg.matrix_rank(want).item() == 3 and math.isclose(layer.scale, 2.0)


# ----------------------------------------------------------------------------------------------------------
# The files users have: safetensors, DINO/iBOT/MAE wrappers and prefixes, the Hugging Face cache


def _timm_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in ViT(PRESETS["vit_nano"], 10).state_dict().items() if not k.startswith("head.")}


def _loaded(path) -> ViT:
    state = lora_vit.read_weights_file(path)
    model = ViT(lora_vit.config_from_state_dict(state, img_size=32, heads=PRESETS["vit_nano"].heads), 10)
    lora_vit.load_backbone_(model, state)
    return model


def _assert_same_model(a: ViT, b: ViT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


def _hub_folder(root, name: str, state, config: dict | None):
    """The Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    import json
    from safetensors.torch import save_file
    folder = root / f"models--{name.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    save_file(state, str(snapshot / "model.safetensors"))
    if config is not None:
        (snapshot / "config.json").write_text(json.dumps(config))
    return folder


def test_safetensors_wrappers_and_prefixes_load_bit_for_bit(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    state = _timm_state()
    torch.save(state, tmp_path / "plain.pth")
    save_file(state, str(tmp_path / "model.safetensors"))
    dino_head = {"head.mlp.0.weight": torch.randn(5, 48), "head.last_layer.weight_g": torch.randn(5, 1)}
    torch.save({"student": {f"module.backbone.{k}": v + 1 for k, v in state.items()},  # not the one evaluated
                "teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **{k: v for k, v in dino_head.items()}},
                "epoch": 100}, tmp_path / "dino.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pth.tar")
    torch.save({"model": {**state, "mask_token": torch.zeros(1, 1, 48), "decoder_embed.weight": torch.randn(4, 48)}},
               tmp_path / "mae.bin")
    reference = _loaded(tmp_path / "plain.pth")
    for name in ("model.safetensors", "dino.pth", "ddp.pth.tar", "mae.bin"):
        _assert_same_model(_loaded(tmp_path / name), reference)
    assert not torch.equal(reference.state_dict()["blocks.0.attn.qkv.weight"], _timm_state(seed=1)["blocks.0.attn.qkv.weight"])


def test_a_file_with_python_objects_is_refused(tmp_path):
    import argparse
    torch.save({"args": argparse.Namespace(lr=0.1), "teacher": _timm_state()}, tmp_path / "pickled.pt")  # DINO's full checkpoints
    with pytest.raises(WeightsError, match=r"pickled.pt holds Python objects that torch.load\(weights_only=True\) refuses"):
        lora_vit.read_weights_file(tmp_path / "pickled.pt")


def test_safetensors_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsError, match="pip install safetensors"):
        lora_vit.read_weights_file(tmp_path / "model.safetensors")


def test_hub_name_resolves_offline_from_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    state = _timm_state()
    torch.save(state, tmp_path / "plain.pth")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    name = "timm/vit_base_patch16_224.augreg_in21k"
    _hub_folder(tmp_path / "hf" / "hub", name, state, {"pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
    assert lora_vit.is_hub_name(name) and not lora_vit.is_hub_name("weights/vit.pth")
    path, config = lora_vit.hub_weights(name)
    assert path.name == "model.safetensors" and lora_vit.hub_normalization(config) == "0.5,0.5,0.5/0.5,0.5,0.5"
    _assert_same_model(_loaded(path), _loaded(tmp_path / "plain.pth"))


def test_hub_name_absent_offline_names_the_folder_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import sys
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: no download possible
    with pytest.raises(WeightsError) as e:
        lora_vit.hub_weights("timm/vit_small_patch16_224.augreg_in21k")
    message = str(e.value)
    assert str(tmp_path / "cache" / "models--timm--vit_small_patch16_224.augreg_in21k") in message
    assert "huggingface-cli download timm/vit_small_patch16_224.augreg_in21k" in message
