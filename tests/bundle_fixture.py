"""A small but real export folder for the bundle tests, made in about a minute.

Why not `edgetl export`: a full fine-tune + PT2E export takes minutes here. This trains a tiny CNN on
builtin:shapes at 32 px (ImageNet mean/std, so the three channels differ), converts it with litert-torch
to an fp32 and an int8 .tflite (int8 input/output, as edgetl's exports have), and writes the sidecar
manifests, labels.txt and test_inputs.npz in the format `edgetl export` writes, with verification
figures measured in ai-edge-litert like edgetl's own verification.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgetl.manifest import sha256_file

SIZE = 32
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    from edgetl.data import preprocess_spec, to_array
    from edgetl.datasets import resolve_builtin

    root = resolve_builtin("builtin:shapes")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    spec = preprocess_spec(SIZE, MEAN, STD, layout="NHWC")
    xs, ys = [], []
    for index, label in enumerate(labels):
        for path in sorted((root / label).iterdir()):
            xs.append(to_array(Image.open(path).convert("RGB"), spec))
            ys.append(index)
    return np.stack(xs).astype(np.float32), np.asarray(ys), labels


def build_export(folder: Path, quants: tuple[str, ...] = ("int8",)) -> Path:
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgetl import formats
    from edgetl.data import preprocess_spec

    torch.manual_seed(0)
    x, y, labels = _data()
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:60], order[60:]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, len(labels)),
    )
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    yt = torch.from_numpy(y)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        batch = torch.from_numpy(np.random.default_rng(_).choice(train, 64))
        loss = torch.nn.functional.cross_entropy(net(xt[batch]), yt[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    model = litert_torch.to_channel_last_io(net, args=[0]).eval()
    example = (torch.from_numpy(x[:1]),)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    np.savez(folder / "test_inputs.npz", x=x[test], y=y[test])
    spec = preprocess_spec(SIZE, MEAN, STD, layout="NHWC")
    for quant in quants:
        if quant == "int8":
            static = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
            quantizer = PT2EQuantizer().set_global(static)
            graph = torch.export.export(model, example).module()
            graph = prepare_pt2e(graph, quantizer)
            for i in train[:100]:
                graph(torch.from_numpy(x[i : i + 1]))
            graph = convert_pt2e(graph, fold_quantize=False)
            converted = litert_torch.convert(graph, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        else:
            converted = litert_torch.convert(model, example)
        name = f"tiny-{SIZE}-{quant}.tflite"
        converted.export(str(folder / name))
        described = formats.describe(folder / name)
        io = {"input": described["inputs"][0], "output": described["outputs"][0]}
        logits = formats.run(folder / name, x[test])
        sidecar = {
            "kind": "edgetl.artifact", "schema_version": 1, "file": name, "format": "tflite",
            "runtime": "LiteRT (ai-edge-litert Interpreter)", "quant": quant,
            "bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name),
            "labels_file": "labels.txt", "labels": labels,
            "model": {"backbone": "tiny", "width": 1.0, "image_size": SIZE, "num_classes": len(labels)},
            "preprocess": spec, "input": {**io["input"], "layout": "NHWC"},
            "output": {**io["output"], "meaning": "logits"},
            "quantization": None, "parent": None,
            "verification": {"images": len(test), "top1": float((logits.argmax(1) == y[test]).mean()),
                             "status": "ok"},
            "versions": {"ai-edge-litert": "2.3.0"},
        }
        (folder / f"{name}.json").write_text(json.dumps(sidecar, indent=2))
    return folder
